"""Launch a run through Flower's simulation engine: ``flwr run APP local --stream`` (Ray backend).

The local SuperLink starts on demand (Flower manages it, under ``$FLWR_HOME``, default ``<python
env>/fairforget-flwr``, on two ports derived from the environment's path and creation time, so it
never collides with another checkout's, a deleted predecessor's or another Flower app's; all three
are environment variables); the app runs in the current Python environment (no per-run ``uv sync``);
the federation is sized per run with ``--federation-config num-supernodes=S``, one SuperNode per
shard. The ServerApp writes the request's status file (:mod:`fairforget.requests`) when it ends,
which is how this module learns whether *its* run worked (``flwr run --stream`` only streams the
logs, and another command's run may end in the same folder meanwhile).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from fairforget.config import APP_DIR, RunConfig


class FlowerRunError(RuntimeError):
    """The Flower run did not finish its work; the message says why in one line."""


def _environment_identity() -> str:
    """The environment's path and creation time: an environment deleted and re-created at the same
    path (a fresh clone) gets new ports, never a SuperLink left running by its predecessor."""
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    stamp = cfg.stat().st_mtime_ns if cfg.exists() else 0
    return f"{sys.prefix}:{stamp}"


def flower_env() -> dict[str, str]:
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)  # flwr and flower-superlink of this environment
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # The app runs in this environment: no per-run `uv sync` of its dependencies.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # A SuperLink of this environment's own (own home and ports), started on demand by `flwr run`,
    # so two checkouts or a user's other Flower apps never share one.
    env.setdefault("FLWR_HOME", str(Path(sys.prefix) / "fairforget-flwr"))
    port = 40000 + 2 * (zlib.crc32(_environment_identity().encode()) % 4000)
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(port))
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", str(port + 1))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def run_flower(cfg: RunConfig, quiet: bool = False) -> dict:
    """Run ``cfg`` (absolute ``out-dir``; ``request``: the id of the request file the caller wrote
    there) to the end and return that request's status; raise :class:`FlowerRunError` if the run
    failed, was refused (another command holds the run folder) or never finished. Only this request's
    own status file counts: a concurrent command's outcome is never taken for ours."""
    if not cfg.request:
        raise FlowerRunError("internal: a run started by a fairforget command names its request")
    flwr = shutil.which("flwr", path=flower_env()["PATH"])
    if flwr is None:
        raise FlowerRunError("the 'flwr' command is not installed in this environment")
    with tempfile.TemporaryDirectory(prefix="fairforget-") as tmp:
        cfg_file = Path(tmp) / "run-config.toml"
        cfg_file.write_text(cfg.to_toml())
        cmd = [
            flwr, "run", str(APP_DIR), "local", "--stream",
            "--run-config", str(cfg_file),
            "--federation-config",
            f"num-supernodes={cfg.num_shards} client-resources-num-cpus={cfg.client_cpus} "
            f"client-resources-num-gpus={cfg.client_gpus}",
        ]
        proc = subprocess.run(
            cmd, env=flower_env(), cwd=str(APP_DIR), check=False,
            stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.STDOUT if quiet else None,
        )
    return outcome(cfg, proc.returncode, quiet)


def outcome(cfg: RunConfig, returncode: int, quiet: bool = False) -> dict:
    """The status of the request ``cfg.request`` names, once its Flower run has ended; a
    :class:`FlowerRunError` when it failed, was refused or never finished."""
    from fairforget.requests import read_status

    result = read_status(Path(cfg.out_dir), cfg.request)
    if result is None:
        raise FlowerRunError(
            f"the Flower run ended (exit {returncode}) without finishing; see the log above"
            + ("" if not quiet else " (rerun without --quiet)")
        )
    if not result.get("ok"):
        raise FlowerRunError(f"the {result.get('mode')} run failed: {result.get('error')}")
    return result
