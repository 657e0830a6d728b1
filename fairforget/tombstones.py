"""Tombstones: the deletion list kept by the data's owner, which every loader honours.

A shard index and the ledger live with a run; the data does not. So that a deleted record is never
trained on again (a later ``simulate``, ``simulate --force``, a new state folder, a reference
model, the attribute probe), the node that deletes it first appends its id to the owner's tombstone
file, fsynced, and only then changes its shard:

* a hospital site: ``DATA_ROOT/.fairforget-tombstones.jsonl`` beside its ``labels.csv`` (or the
  node-config key ``tombstones``), so it outlives every run and state folder of that site;
* a simulation: ``OUT/tombstones.jsonl`` (the run's embedded data has no owner but the run;
  ``simulate --force`` carries the file into the replacing run).

A node loads its data without the tombstoned ids; a tombstoned id still in its shard index is a
deletion that crashed part-way, which the node finishes before anything else
(:meth:`clients.node.Node.resume`). The file is append-only JSON lines ``{"id", "request", "time"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from fairforget.locks import locked
from fairforget.storage import durable_append_lines, read_jsonl

RUN_FILE = "tombstones.jsonl"
SITE_FILE = ".fairforget-tombstones.jsonl"


class Tombstones:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_run(cls, run_dir: Path) -> Tombstones:
        return cls(Path(run_dir) / RUN_FILE)

    @classmethod
    def of_site(cls, data_root: Path) -> Tombstones:
        return cls(Path(data_root) / SITE_FILE)

    def ids(self) -> set[int]:
        """Every tombstoned id (a torn last line, a crash mid-append, names no id yet)."""
        return {int(r["id"]) for r in read_jsonl(self.path, allow_torn_tail=True)}

    def add(self, ids: Iterable[int], request: int | None = None) -> list[int]:
        """Tombstone ``ids`` (those not already); returns the new ones. Serialised by a lock on the
        file's folder's ``.tombstones.lock`` so concurrent nodes of one simulation append whole lines."""
        ids = sorted({int(i) for i in ids})
        lock_dir = self.path.parent / ".tombstones.lock.d"
        with locked(lock_dir, "tombstones", wait=float("inf")):
            new = [i for i in ids if i not in self.ids()]
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            durable_append_lines(self.path, [json.dumps({"id": i, "request": request, "time": stamp}) for i in new])
        return new
