"""The deletion ledger: one JSON line per (request, shard) decision, kept in ``OUT/ledger.jsonl``.

Each line records the request number, the ids, the owning shard, the method, the decision (a request
refused by the deletion budget gets ``decision = "refused"`` and its reason, and changes nothing
else), the stage retraining started from (the last clean checkpoint), the seconds spent, and the
shard model's hash before and after. Appends rewrite the file atomically, so a crash never leaves
half a line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fairforget.storage import atomic_write_jsonl, read_jsonl

# The decisions a ledger line records.
APPROXIMATE = "approximate"  # served by an approximate unlearner within the shard's deletion budget
EXACT_RETRAIN = "exact-retrain"  # exact SISA retraining, as asked
EXACT_FALLBACK = "exact-fallback"  # exact SISA retraining because the budget was spent (capacity-policy = retrain)
REFUSED = "refused"  # refused by the budget (capacity-policy = refuse): nothing changed
RETIRE_ORIGINAL = "retire-original"  # an original retired by step-wise augmentation (exact SISA unlearning)


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def deleted_ids(self) -> set[int]:
        """Ids a deletion request removed (a ``refused`` request removed nothing; a retired original,
        ``retire-original``, left the classifier but not the site, and may still be deleted)."""
        return {int(i) for e in self.entries() if e.get("decision") not in (REFUSED, RETIRE_ORIGINAL)
                for i in e.get("ids", [])}

    def unlearned_ids(self) -> set[int]:
        """Ids no shard model trains on any more: the deleted ones and the retired originals."""
        return {int(i) for e in self.entries() if e.get("decision") != REFUSED for i in e.get("ids", [])}

    def next_request(self) -> int:
        return 1 + max((int(e["request"]) for e in self.entries()), default=0)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        new = [{"time": stamp, **dict(r)} for r in rows]
        atomic_write_jsonl(self.path, [*self.entries(), *new])

    def ensure(self) -> None:
        """Create an empty ledger if the run has none."""
        if not self.path.exists():
            atomic_write_jsonl(self.path, [])
