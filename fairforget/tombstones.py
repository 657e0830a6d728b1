"""Tombstones: the deletion list kept by the data's owner, which every loader honours.

A shard index and the ledger live with a run; the data does not. So that a deleted record is never
trained on again (a later ``simulate``, ``simulate --force``, a new state folder, a reference
model, the attribute probe), the node that deletes it first appends its id to the owner's tombstone
file, fsynced, and only then changes its shard:

* data read from a data root with record ids of its own (``dataset = "image-folder"``): beside its
  ``labels.csv``, ``DATA_ROOT/.fairforget-tombstones.jsonl`` (or where the node-config key
  ``tombstones`` points), at a hospital site and in a simulation over a real image folder alike, so
  every later run, out-dir and state folder over that data honours it. A simulation also reads its
  run's ``OUT/tombstones.jsonl`` (where deletions were kept before, and where ``simulate --force``
  carries a replaced run's unfinished ones), never writes it;
* the embedded benchmark data (``biased-digits``, and the public benchmarks ``biased-mnist``,
  ``cifar10-skewed``, ``celeba``, whose ids are the dataset's own indices, not anybody's records):
  ``OUT/tombstones.jsonl`` (the data has no owner but the run; ``simulate --force`` carries the file
  into the replacing run).

A line is a JSON object ``{"id": SAMPLE_ID, "record": RECORD_ID, "request", "time"}``; ``record`` is
the site's record id as its loader normalised it (:func:`fairforget.site_secret.normalise_record_id`:
``./img/1.png`` and ``img/1.png`` are one record), present where the data has record ids. A record is
deleted when its record id is tombstoned, whatever sample id it has now (a new site key, a record
hashed anew, does not bring it back), or its sample id is. Lines of older versions (``{"id", ...}``
alone, the id an unkeyed hash of the record id) are read too and matched by that hash: a site's old
deletion list is never refused nor forgotten.

A node loads its data without the tombstoned records; a tombstoned id still in its shard index is a
deletion that crashed part-way, which the node finishes before anything else
(:meth:`clients.node.Node.resume`). The file is append-only (:func:`durable_append_lines`: whole
lines, fsynced before :meth:`Tombstones.add` returns, a failed write a one-line error with nothing
half appended), so a deletion is acknowledged only once its tombstone is durable.

Lines are read and written through their typed record,
:class:`fairforget.schemas.tombstones.TombstoneLine` (JSON Schema:
``fairforget/schemas/tombstone-line.schema.json``); a line that matches no version of it is a
one-line :class:`TombstoneError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fairforget.locks import locked
from fairforget.schemas.base import SchemaError
from fairforget.schemas.tombstones import TombstoneLine, new_line, parse_line
from fairforget.storage import durable_append_lines, read_jsonl_numbered

RUN_FILE = "tombstones.jsonl"
SITE_FILE = ".fairforget-tombstones.jsonl"


class TombstoneError(ValueError):
    """A tombstone line that names no deletion this version can read; the message is one line."""


def legacy_sample_id(record_id: str) -> int:
    """The sample id older versions gave a record id (61 bits of an unkeyed SHA-256), by which their
    tombstone lines name it."""
    return int.from_bytes(hashlib.sha256(f"record:{record_id}".encode()).digest()[:8], "big") >> 3


class Tombstones:
    """One tombstone file (``path``, appended to) read with older ones (``also``, read only).
    ``records``: the data's sample id -> normalised record id map (``DataBundle.records``), so that
    :meth:`ids` names the records' current sample ids and :meth:`add` writes their record ids."""

    def __init__(self, path: Path, records: Mapping[int, str] | None = None, also: Iterable[Path] = ()) -> None:
        self.path = Path(path)
        self.records = {int(k): str(v) for k, v in (records or {}).items()}
        self.also = [Path(p) for p in also if Path(p) != self.path]

    @classmethod
    def of_run(cls, run_dir: Path) -> Tombstones:
        return cls(Path(run_dir) / RUN_FILE)

    @classmethod
    def of_site(cls, data_root: Path) -> Tombstones:
        return cls(Path(data_root) / SITE_FILE)

    @classmethod
    def for_data(cls, cfg: Any, records: Mapping[int, str] | None = None, *, run_dir: Path | None = None,
                 path: str | Path | None = None) -> Tombstones:
        """The tombstones of the data ``cfg`` reads (see the module docstring): ``path`` if given (the
        node-config key ``tombstones``), else beside an image folder's ``labels.csv`` (with the run's
        own file, ``run_dir``, read as well: give it in a simulation), else the run's."""
        if path:
            return cls(Path(path), records)
        if cfg.data_root and _owns_records(cfg.dataset):
            also = [Path(run_dir) / RUN_FILE] if run_dir is not None else []
            return cls(Path(cfg.data_root).expanduser() / SITE_FILE, records, also)
        return cls(Path(run_dir if run_dir is not None else cfg.out_dir) / RUN_FILE, records)

    def lines(self) -> list[TombstoneLine]:
        """Every whole line of the files as a typed, migrated record (a torn last line, a crash
        mid-append, names nothing yet); a line of no known shape is a one-line :class:`TombstoneError`."""
        out = []
        for p in [*self.also, self.path]:
            try:
                out += [parse_line(row, f"{p} line {n}") for n, row in read_jsonl_numbered(p, TombstoneError,
                                                                                     allow_torn_tail=True)]
            except SchemaError as exc:
                raise TombstoneError(str(exc)) from None
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Every whole line of the files, as written."""
        return [line.to_json() for line in self.lines()]

    def ids(self) -> set[int]:
        """The sample ids of every tombstoned record: the ids the lines name, and the current sample id
        of each record of the data whose record id a line names (or whose older, unkeyed id it names)."""
        rows = self.lines()
        ids = {r.id for r in rows if r.id is not None}
        names = {r.record for r in rows if r.record is not None}
        old = {r.id for r in rows if r.id is not None and r.legacy}  # lines without a record
        if self.records and rows:
            ids |= {sid for sid, rec in self.records.items()
                    if rec in names or (old and legacy_sample_id(rec) in old)}
        return ids

    def add(self, ids: Iterable[int], request: int | None = None) -> list[int]:
        """Tombstone ``ids`` (those not already), each with its record id where the data has one;
        returns the new ones once they are durable (fsynced). Serialised by a lock on the file's
        folder's ``.tombstones.lock.d`` so concurrent nodes of one simulation append whole lines. A
        write the disk refuses is a one-line :class:`OSError` naming the file, nothing appended."""
        ids = sorted({int(i) for i in ids})
        lock_dir = self.path.parent / ".tombstones.lock.d"
        with locked(lock_dir, "tombstones", wait=float("inf")):
            have = self.ids()
            new = [i for i in ids if i not in have]
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            durable_append_lines(self.path, [json.dumps(new_line(i, self.records.get(i), request, stamp))
                                             for i in new])
        return new


def _owns_records(dataset: str) -> bool:
    """Whether the data has record ids of its own (the dataset declares ``OWNS_RECORDS``)."""
    from fairforget.data import dataset_declares  # noqa: PLC0415 - fairforget.data imports this module's users

    return dataset_declares(dataset, "OWNS_RECORDS")
