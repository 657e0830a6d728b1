"""fairforget ServerApp. Thin: reads the run config once and hands it to the driver for its mode."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fairforget.config import RunConfig
from fairforget.run import RunDir
from server.experiment import run_training
from server.forget import run_forget

app = ServerApp()

DRIVERS = {"simulate": run_training, "forget": run_forget}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(dict(context.run_config))
    run = RunDir(cfg.out_path)
    try:
        DRIVERS[cfg.mode](grid, cfg)
    except Exception as exc:
        run.write_status(cfg.mode, ok=False, error=f"{type(exc).__name__}: {exc}")
        raise
    run.write_status(cfg.mode, ok=True)
