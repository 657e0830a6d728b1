"""fairforget ServerApp. Thin: reads the run config once, reads the request it names from the run
folder (:mod:`fairforget.requests`: a command never rides in the run config, which every site
receives), and hands both to the driver for its mode, holding the run folder's lock; then writes the
run's status (what was deleted, what is pending) and the request's own status."""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fairforget.binding import BindingError
from fairforget.config import ConfigError, RunConfig, resolve
from fairforget.data import DatasetError
from fairforget.ledger import LedgerError
from fairforget.locks import LockBusy, locked
from fairforget.requests import FORGET, Request, RequestError
from fairforget.run import RunDir, RunDirError
from fairforget.storage import sweep_leftovers
from server.experiment import run_training
from server.forget import ForgetError, run_forget

app = ServerApp()

DRIVERS = {"simulate": lambda grid, cfg, request: run_training(grid, cfg), FORGET: run_forget}
# Errors a user or an operator can act on: one line in the log and the status files, no traceback.
USER_ERRORS = (ConfigError, RequestError, ForgetError, BindingError, LockBusy, RunDirError, LedgerError, DatasetError)


def run_driver(grid: Grid, cfg: RunConfig, request: Request | None = None) -> None:
    """Run the request's driver (none: a training) holding the run folder's lock (a second writer
    fails at once, with nothing written); then write ``status.json``: ok or the error, and, from the
    ledger, the deletions this run completed and every one still pending; and the same in the
    request's own status file. A user's error is one logged line, never a traceback."""
    request = request or Request.simulate()
    if request.options:  # the request's own options (unlearn-method, capacity-policy, ...): the server's alone
        cfg = resolve(cfg.to_mapping(), request.options)
    run = RunDir(cfg.out_path)
    try:
        with locked(run.path, request.mode):
            sweep_leftovers(run.path)  # a folder swap or removal a crash cut short
            seen = len(run.ledger.lines()) if run.ledger.path.exists() else 0  # lines before this run
            try:
                extra = DRIVERS[request.mode](grid, cfg, request) or {}
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, USER_ERRORS) else str(exc)
                details = _deletions(run, seen)
                run.write_status(request.mode, ok=False, error=error, request=request.id, **details)
                request.write_status(run.path, ok=False, error=error, **details)
                if isinstance(exc, USER_ERRORS):
                    log(ERROR, "fairforget: error: %s", error)
                    return
                raise
            details = {**_deletions(run, seen), **extra}
            run.write_status(request.mode, ok=True, request=request.id, **details)
            request.write_status(run.path, ok=True, **details)
    except LockBusy as exc:  # another command holds the run: its status is not ours to overwrite
        request.write_status(run.path, ok=False, error=str(exc))
        log(ERROR, "fairforget: error: %s", exc)


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
    try:
        cfg = RunConfig.from_mapping(dict(context.run_config))
        request = Request.load(cfg.out_path, cfg.request) if cfg.request else None
    except (ConfigError, RequestError) as exc:
        log(ERROR, "fairforget: error: %s", exc)
        raise SystemExit(1) from None
    run_driver(grid, cfg, request)
