"""The deletion ledger's lines (``OUT/ledger.jsonl``, :mod:`fairforget.ledger`) as typed records, and
the migration of the lines older versions wrote.

Versions (``schema_version`` on each line; :data:`LEDGER_SCHEMA_VERSION` is the one written now):

* **1**, no ``schema_version`` key (every ledger before it was declared): the two-phase lines (an
  ``intent`` line, then ``done`` lines), and before them (the first releases) completion lines with no
  ``phase`` at all, which are decisions: they read as ``phase = "done"``;
* **2**: the same fields, and ``schema_version``.

A ledger is migrated on read, never refused (a site must always be able to read its own deletion
list): a line of an older version is read as the current one (:func:`migrate`), a line of a newer
version keeps the fields this version declares and carries the others in :attr:`Record.extra`. Nothing
is rewritten: the file stays append-only, the lines as their writer wrote them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fairforget.schemas.base import Record, SchemaError, doc

LEDGER_SCHEMA_VERSION = 2
INTENT = "intent"
DONE = "done"


@dataclass(frozen=True)
class ShardPlan(Record):
    """What an intent line decided for one shard."""

    ids: list[int] = doc("the ids this shard owns", factory=list)
    method: str = doc("the unlearner the shard is sent (`exact-sisa`, `finetune`, ...)", "")
    decision: str = doc("the budget's decision: `exact-retrain`, `approximate` or `exact-fallback`", "")


@dataclass(frozen=True)
class LedgerLine(Record):
    """One line of ``ledger.jsonl``: an intent (``phase = "intent"``, written before any deletion
    message is sent) or a decision (``phase = "done"``: one per shard once its reply is stored, or a
    refusal).

    Augmented shards add the generator's fields (``generator_invalidated``, ``policy``,
    ``synthetic_dropped``, ``synthetic_regenerated``, ``old_generator_version``,
    ``new_generator_version``, ``generator_kept``); an unlearner may add its own: they are kept in
    :attr:`extra`."""

    TITLE: ClassVar[str] = "fairforget deletion ledger line"
    REQUIRED: ClassVar[tuple[str, ...]] = ("request",)

    schema_version: int | None = doc("the line's format version (absent: version 1)")
    request: int = doc("the request number (1, 2, ...; a line's intent and completions share it)", 0)
    phase: str | None = doc("`intent` or `done` (absent: a version-1 completion line, read as `done`)")
    time: str | None = doc("when the line was written, UTC, ISO 8601 to the second")
    ids: list[int] = doc("the sample ids (an intent: every id of the request)", factory=list)
    method: str | None = doc("the unlearner that served it (an intent: the one asked for)")
    shards: dict[str, ShardPlan] | None = doc("an intent: shard -> what was decided for it")
    shard: int | None = doc("a decision: the shard it changed")
    decision: str | None = doc("`exact-retrain`, `approximate`, `exact-fallback`, `refused` or `retire-original`")
    reason: str | None = doc("a refusal: why the budget refused it (nothing was deleted)")
    capacity: int | None = doc("the shard's deletion capacity (approximate deletions before an exact retrain)")
    capacity_before: int | None = doc("the capacity left before this decision")
    capacity_after: int | None = doc("the capacity left after it")
    num_examples: int | None = doc("the shard's live samples after it")
    approx_deletions: int | None = doc("approximate deletions since the shard's last exact retrain")
    restart_stage: int | None = doc("the SISA stage retraining started from (0: from initialisation)")
    retrained_stages: int | None = doc("the stages retrained")
    seconds: float | None = doc("retraining compute, seconds")
    wall_seconds: float | None = doc("the shard's wall time, seconds")
    request_wall_seconds: float | None = doc("the request's wall time across shards, seconds")
    hash_before: str | None = doc("SHA-256 (16 hex) of the shard model before")
    hash_after: str | None = doc("SHA-256 of the shard model the server stored after: the receipt")
    resumed: bool | None = doc("finished after a crash (the node had committed it)")
    seed: int | None = doc("the run's seed (a replay by `fairforget verify` needs it)")
    index_version: int | None = doc("the shard index's version after the deletion")
    code_version: str | None = doc("the fairforget code that served it")
    site: str | None = doc("a deployment: the site that holds the shard")
    records: list[str] | None = doc("a deployment: the site's record ids the request named")
    augment_step: int | None = doc("`retire-original`: the augmentation step")
    replenished: int | None = doc("`retire-original`: synthetic samples drawn in their place")
    generator_version: int | None = doc("`retire-original`: the generator that drew them")

    # ------------------------------------------------------------------ migrated reading
    @property
    def version(self) -> int:
        """The line's format version (1 when it names none)."""
        return self.schema_version if self.schema_version is not None else 1

    @property
    def is_intent(self) -> bool:
        return self.phase == INTENT

    @property
    def plans(self) -> dict[int, ShardPlan]:
        """An intent's plans, by shard number."""
        return {int(k): p for k, p in (self.shards or {}).items()}


def migrate(line: LedgerLine) -> LedgerLine:
    """``line`` as the current version reads it: a line without ``phase`` (version 1's completion
    lines; a retired original's line, which :meth:`fairforget.ledger.Ledger.append` writes as it is) is
    a decision (``done``); other fields kept. The file is not rewritten."""
    if line.phase is None:
        return _with(line, phase=DONE)
    return line


def _with(line: LedgerLine, **changes: Any) -> LedgerLine:
    import dataclasses  # noqa: PLC0415

    new = dataclasses.replace(line, **changes)
    if "_json" in line.__dict__:
        object.__setattr__(new, "_json", line.__dict__["_json"])  # what the file holds is unchanged
    return new


def parse_line(obj: Mapping[str, Any], where: str) -> LedgerLine:
    """A ledger line read from ``where`` (``FILE line N``), checked and migrated to the current
    version. A line that does not match the schema is a one-line :class:`SchemaError`."""
    line = LedgerLine.parse(obj, where)
    if line.phase not in (None, INTENT, DONE):
        raise SchemaError(f"{where}: field 'phase' = {line.phase!r}: expected 'intent' or 'done'")
    if line.is_intent and line.shards is None:
        raise SchemaError(f"{where}: an intent line with no field 'shards'")
    return migrate(line)


def new_line(row: Mapping[str, Any], time: str) -> dict[str, Any]:
    """The JSON object a writer appends: ``row`` stamped with ``time`` (kept if it has one) and the
    current :data:`LEDGER_SCHEMA_VERSION` (kept if it names one)."""
    obj = {"time": time, **dict(row)}
    obj.setdefault("schema_version", LEDGER_SCHEMA_VERSION)
    return obj
