"""The deletion ledger ``OUT/ledger.jsonl``: an append-only record of decisions, in two phases.

* An **intent** line (``phase = "intent"``) is written, and fsynced, before any deletion message is
  sent: the request number, every id, the shards that own them (``shards``: shard -> ids), and per
  shard the method and the decision the deletion budget took.
* A **completion** line (``phase = "done"``, the decision rows below) is appended per shard as soon as
  that shard's reply is stored (its model saved in ``models/``): the ids, the owning shard, the
  method, the decision, the stage retraining started from, the seconds, the model hash before and
  after, the shard's capacity before and after, and what a replay needs (seed, index version, code
  version; ``fairforget verify``).
* A request the budget refuses gets ``refused`` completion lines and no intent (nothing was sent).

A shard of an intent without a completion line is **pending**: its node may or may not have
deleted (a crash, a failed or lost node). The forget driver reconciles pending shards before it
does anything else (:func:`server.forget.reconcile`): it re-sends the deletion, which a node that
already committed it answers from its state, and then records the completion.

Lines are appended whole and fsynced (:func:`fairforget.storage.durable_append_lines`), never
rewritten. On read every line is validated: a torn last line (a crash mid-append) is reported in
:attr:`Ledger.torn` and ignored; a broken line elsewhere is a one-line :class:`LedgerError`.

Every line is read and written through its typed record,
:class:`fairforget.schemas.ledger.LedgerLine` (its JSON Schema:
``fairforget/schemas/ledger-line.schema.json``): a line whose field has another type is a one-line
:class:`LedgerError` naming the file, the line and the field. Lines carry ``schema_version``; a
ledger of an older version is migrated on read (:func:`fairforget.schemas.ledger.migrate`), never
refused: a site must always be able to read its own deletion list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fairforget.capacity import DeletionBudget, ShardBudget
from fairforget.schemas.base import SchemaError
from fairforget.schemas.ledger import DONE, INTENT, LedgerLine, new_line, parse_line
from fairforget.storage import TornLine, atomic_write_bytes, durable_append_lines, finite, read_jsonl_numbered

# The decisions a ledger line records.
APPROXIMATE = "approximate"  # served by an approximate unlearner within the shard's deletion budget
EXACT_RETRAIN = "exact-retrain"  # exact SISA retraining, as asked
EXACT_FALLBACK = "exact-fallback"  # exact SISA retraining because the budget was spent (capacity-policy = retrain)
REFUSED = "refused"  # refused by the budget (capacity-policy = refuse): nothing changed
RETIRE_ORIGINAL = "retire-original"  # an original retired by step-wise augmentation (exact SISA unlearning)


class LedgerError(ValueError):
    """A ledger that cannot be trusted as it is; the message is one line for the user."""


class Ledger:
    """The ledger file at ``path``: read (:meth:`records`, :meth:`lines`, ...) and appended to."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.torn: str = ""  # set by a read that found a torn last line

    # ------------------------------------------------------------------ reading
    def records(self) -> list[LedgerLine]:
        """Every valid line as a typed :class:`~fairforget.schemas.ledger.LedgerLine`, migrated to the
        current version, intents included, in order."""
        try:
            rows = read_jsonl_numbered(self.path)
        except TornLine as exc:
            try:
                rows = read_jsonl_numbered(self.path, allow_torn_tail=True)
            except TornLine:
                raise LedgerError(str(exc)) from None
            self.torn = str(exc)
        out = []
        for n, (lineno, row) in enumerate(rows, 1):
            if "request" not in row or not isinstance(row.get("ids", []), list):
                raise LedgerError(f"{self.path}: entry {n} has no request number or no id list: {json.dumps(row)[:80]}")
            try:
                out.append(parse_line(row, f"{self.path} line {lineno}"))
            except SchemaError as exc:
                raise LedgerError(str(exc)) from None
        return out

    def lines(self) -> list[dict[str, Any]]:
        """Every valid line, intents included, in order: the JSON objects as written."""
        return [r.to_json() for r in self.records()]

    def entries(self) -> list[dict[str, Any]]:
        """The decision lines (completions and refusals), in order; intents left out."""
        return [r.to_json() for r in self.records() if not r.is_intent]

    def intents(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.records() if r.is_intent]

    def pending(self) -> dict[int, dict[int, dict[str, Any]]]:
        """``request -> shard -> {"ids", "method", "decision"}`` for every intent shard without a
        completion line."""
        records = self.records()
        done = {(r.request, r.shard) for r in records if not r.is_intent and r.shard is not None}
        out: dict[int, dict[int, dict[str, Any]]] = {}
        for r in records:
            if not r.is_intent:
                continue
            for shard, plan in r.plans.items():
                if (r.request, shard) not in done:
                    out.setdefault(r.request, {})[shard] = plan.to_json()
        return out

    def pending_ids(self) -> set[int]:
        return {int(i) for shards in self.pending().values() for p in shards.values() for i in p["ids"]}

    def deletions(self) -> dict[int, dict[str, Any]]:
        """id -> the completion line that deleted it (a ``refused`` request removed nothing; a retired
        original, ``retire-original``, left the classifier but not the site, and may still be deleted)."""
        return {int(i): e for e in self.entries() if e.get("decision") not in (REFUSED, RETIRE_ORIGINAL)
                for i in e.get("ids", [])}

    def deleted_ids(self) -> set[int]:
        """Ids a deletion request removed."""
        return set(self.deletions())

    def receipts(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """For each of ``ids`` a request deleted: the id, that request, its shard, the model hash after it
        (its receipt), the time and the record ids it named (what a repeated erasure request is told)."""
        done = self.deletions()
        return [{"id": int(i), "request": int(e["request"]), "shard": int(e["shard"]),
                 "hash_after": e.get("hash_after", ""), "time": e.get("time", ""),
                 **({"record": e["records"]} if "records" in e else {})}
                for i in sorted(ids) if (e := done.get(int(i))) is not None]

    def unlearned_ids(self) -> set[int]:
        """Ids no shard model trains on any more: the deleted ones and the retired originals."""
        return {int(i) for e in self.entries() if e.get("decision") != REFUSED for i in e.get("ids", [])}

    def next_request(self) -> int:
        return 1 + max((int(e["request"]) for e in self.lines()), default=0)

    def last_done(self, shard: int) -> dict[str, Any] | None:
        """The shard's last completion line that changed it (not a refusal)."""
        rows = [e for e in self.entries() if int(e.get("shard", -1)) == shard and e.get("decision") != REFUSED]
        return rows[-1] if rows else None

    def settle(self, budget: DeletionBudget) -> DeletionBudget:
        """Bring a restored deletion budget in line with the ledger, the record of decisions: for each
        shard whose last completion line records its capacity, that line's state wins over the saved
        ``budget.json`` (a crash between the ledger line and the budget write, or a hand-edited file)."""
        shards = {int(e["shard"]) for e in self.entries() if "shard" in e}
        for shard in sorted(shards):
            row = self.last_done(shard)
            if row is None or not {"capacity", "capacity_after", "num_examples"} <= set(row):
                continue
            cap, left = int(row["capacity"]), int(row["capacity_after"])
            budget.shards[shard] = ShardBudget(n=int(row["num_examples"]), capacity=cap, used=cap - left)
        return budget

    # ------------------------------------------------------------------ writing (append only)
    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` as they are (stamped with the time and the current ``schema_version``):
        whole lines, fsynced. :meth:`intend` and :meth:`complete` check theirs against the schema."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        durable_append_lines(self.path, [json.dumps(finite(new_line(r, stamp)), sort_keys=True, allow_nan=False)
                                         for r in rows])

    def intend(self, request: int, plans: Mapping[int, Mapping[str, Any]], method: str) -> None:
        """The intent line of ``request``: ``plans`` is shard -> {"ids", "method", "decision"}."""
        shards = {str(k): {"ids": sorted(int(i) for i in p["ids"]), "method": p["method"], "decision": p["decision"]}
                  for k, p in sorted(plans.items())}
        self._append_checked([{"phase": INTENT, "request": request, "method": method, "shards": shards,
                               "ids": sorted({i for p in shards.values() for i in p["ids"]})}])

    def complete(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append completion (or refusal) lines, each checked against the schema first."""
        self._append_checked([{"phase": DONE, **dict(r)} for r in rows])

    def _append_checked(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:  # a writer's mistake is a one-line error before anything is appended
            try:
                LedgerLine.parse(finite(r), f"{self.path}: the line to append")
            except SchemaError as exc:
                raise LedgerError(str(exc)) from None
        self.append(rows)

    def ensure(self) -> None:
        """Create an empty ledger if the run has none."""
        if not self.path.exists():
            atomic_write_bytes(self.path, b"")
