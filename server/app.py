"""fairforget ServerApp. Thin: reads the run config once and hands it to the driver for its mode,
holding the run folder's lock, and writes the run's status (what was deleted, what is pending)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fairforget.config import RunConfig
from fairforget.locks import locked
from fairforget.run import RunDir
from server.experiment import run_training
from server.forget import run_forget

app = ServerApp()

DRIVERS = {"simulate": run_training, "forget": run_forget}


def run_driver(grid: Grid, cfg: RunConfig) -> None:
    """Run ``cfg.mode``'s driver holding the run folder's lock (a second writer fails at once, with
    nothing written); then write ``status.json``: ok or the error, and, from the ledger, the
    deletions this run completed and every one still pending."""
    run = RunDir(cfg.out_path)
    with locked(run.path, cfg.mode):
        seen = len(run.ledger.lines()) if run.ledger.path.exists() else 0  # lines before this run
        try:
            DRIVERS[cfg.mode](grid, cfg)
        except Exception as exc:
            run.write_status(cfg.mode, ok=False, error=f"{type(exc).__name__}: {exc}", **_deletions(run, seen))
            raise
        run.write_status(cfg.mode, ok=True, **_deletions(run, seen))


def _deletions(run: RunDir, seen: int) -> dict:
    """``deleted``: request -> shard -> ids whose completion this run recorded (new requests and the
    unfinished ones it finished); ``pending``: every request still unfinished."""
    if not run.ledger.path.exists():
        return {}
    deleted: dict[str, dict[str, list[int]]] = {}
    for e in run.ledger.lines()[seen:]:
        if e.get("phase", "done") == "done" and e.get("decision") != "refused" and "shard" in e:
            deleted.setdefault(str(e["request"]), {})[str(e["shard"])] = e["ids"]
    pending = {str(r): {str(k): p["ids"] for k, p in shards.items()} for r, shards in run.ledger.pending().items()}
    return {"deleted": deleted, "pending": pending}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_driver(grid, RunConfig.from_mapping(dict(context.run_config)))
