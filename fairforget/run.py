"""A run folder and what it holds; every write is atomic. Used by the ServerApp's drivers, the
command line and the simulations; it knows nothing of Flower.

::

    OUT/config.toml      the resolved run config (written by the CLI)
    OUT/metrics.json     figures, with their schema_version (checked on read: fairforget/schemas/)
    OUT/ledger.jsonl     one line per deletion decision
    OUT/budget.json      the strategy's deletion budget: each shard's capacity and what is used of it
    OUT/calibration.json how the DP noise multiplier was chosen (dp = true)
    OUT/report.md        the report, with PNG plots beside it
    OUT/models/shard-K.pt  the server's copy of each constituent model
    OUT/status.json      how the last Flower run in this folder ended (deletions done, pending)
    OUT/tombstones.jsonl the run's deleted ids, honoured by every loader (fairforget/tombstones.py)
    OUT/.lock            held by the command writing the folder (fairforget/locks.py)
    OUT/nodes/shard-K/   node-local SISA state (simulation only; a site keeps its own)
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fairforget.capacity import DeletionBudget
from fairforget.config import ConfigError, RunConfig, resolve
from fairforget.ledger import Ledger
from fairforget.schemas import metrics_to_write, read_metrics
from fairforget.storage import atomic_torch_save, atomic_write_json, atomic_write_text, read_json, torch_load


class RunDirError(ValueError):
    """A folder that is not a fairforget run; the message is one line for the user."""


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.toml")
    metrics_path = property(lambda self: self.path / "metrics.json")
    report_path = property(lambda self: self.path / "report.md")
    status_path = property(lambda self: self.path / "status.json")
    models_dir = property(lambda self: self.path / "models")
    ledger = property(lambda self: Ledger(self.path / "ledger.jsonl"))
    budget_path = property(lambda self: self.path / "budget.json")
    calibration_path = property(lambda self: self.path / "calibration.json")

    # ------------------------------------------------------------------ checks
    def require_finished(self) -> None:
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a folder")
        missing = [p.name for p in (self.config_path, self.metrics_path) if not p.is_file()]
        if missing or not self.models_dir.is_dir():
            what = ", ".join(missing) or "models/"
            raise RunDirError(f"{self.path} is not a finished fairforget run (missing {what})")
        read_metrics(self.metrics_path, unversioned_ok=True)  # another schema_version: one line, nothing written

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config_path, cfg.to_toml())

    def config(self) -> RunConfig:
        """The run's config; keys added to the app since the run was made take their defaults."""
        try:
            with self.config_path.open("rb") as fh:
                return resolve(tomllib.load(fh))
        except (tomllib.TOMLDecodeError, ConfigError) as exc:
            raise RunDirError(f"{self.config_path} is not a valid run config: {exc}") from None

    # ------------------------------------------------------------------ models
    def save_models(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        for shard, state in states.items():
            atomic_torch_save(self.models_dir / f"shard-{shard}.pt", state)

    def load_models(self) -> dict[int, dict[str, torch.Tensor]]:
        paths = sorted(self.models_dir.glob("shard-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        return {int(p.stem.split("-")[1]): torch_load(p) for p in paths}

    # ------------------------------------------------------------------ the deletion budget
    def save_budget(self, budget: DeletionBudget) -> None:
        atomic_write_json(self.budget_path, budget.state_dict())

    def load_budget(self, budget: DeletionBudget) -> DeletionBudget:
        """Restore the saved spend into ``budget`` (a fresh one from the run config); returns it. A
        budget file that is not valid JSON, or not a valid budget with the run's parameters
        (:meth:`DeletionBudget.load_state_dict`), is a one-line :class:`RunDirError`, never recomputed."""
        if self.budget_path.is_file():
            try:
                budget.load_state_dict(read_json(self.budget_path))
            except ValueError as exc:  # json's JSONDecodeError and BudgetStateError alike
                raise RunDirError(f"{self.budget_path}: {exc}") from None
        return budget

    # ------------------------------------------------------------------ DP calibration
    def write_calibration(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.calibration_path, record)

    def calibration(self) -> dict[str, Any] | None:
        """How the run's DP noise was chosen (written by ``fairforget simulate`` before the run)."""
        return read_json(self.calibration_path) if self.calibration_path.is_file() else None

    # ------------------------------------------------------------------ figures
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``; one of another ``schema_version`` (or none) is a one-line
        :class:`~fairforget.schemas.SchemaVersionError` (:func:`~fairforget.schemas.read_metrics`)."""
        return read_metrics(self.metrics_path)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` atomically, checked first against its typed record
        (:func:`~fairforget.schemas.metrics_to_write`)."""
        atomic_write_json(self.metrics_path, metrics_to_write(metrics, self.metrics_path))

    def write_status(self, mode: str, ok: bool, error: str = "", **details: Any) -> None:
        """How the last Flower run ended; ``details``: e.g. the deletions it completed and those pending."""
        atomic_write_json(self.status_path, {
            "mode": mode, "ok": ok, "error": error,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"), **details,
        })

    def status(self) -> dict[str, Any] | None:
        return read_json(self.status_path) if self.status_path.is_file() else None
