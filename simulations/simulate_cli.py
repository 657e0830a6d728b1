"""One ``fairforget simulate`` run from a study script (through Flower's simulation engine, as a user
runs it): the command line it prints and the wall seconds it took.

Run-config values on a study's command line are TOML scalars (``--set objective="end"``):
:func:`toml_value` writes a Python value that way; :func:`simulate` takes a mapping whose values are
already TOML text (or numbers) and raises ``CalledProcessError`` when the run fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toml_value(value: object) -> str:
    """``True`` -> ``true``, ``"end"`` -> ``"end"`` (quoted), numbers as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def simulate(out: Path, sets: Mapping[str, object], *, quiet: bool = True) -> float:
    """``fairforget simulate --out OUT --force --set K=V ...``; its wall seconds."""
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--out", str(out), "--force", *(["--quiet"] * quiet)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    print("$ fairforget", " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0
