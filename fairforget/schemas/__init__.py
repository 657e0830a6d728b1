"""The versions of the files a run folder holds, checked when they are read, and the JSON Schemas
exported for them (``run-config.schema.json``: :mod:`fairforget.config_schema`).

``metrics.json`` carries ``schema_version``; a file of another version is refused in one line saying
which version it is and what to do (:func:`read_metrics`), before anything is written. Light (no
torch): the report and the comparison read it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fairforget import __version__

METRICS_SCHEMA_VERSION = 1  # server/experiment.py writes it; bump it when a reader would misread an older file
# The fairforget release that reads each metrics.json version (the latest with it), named in the refusal.
METRICS_READ_BY = {1: "0.1.0"}


class SchemaVersionError(ValueError):
    """A results file this fairforget cannot read; the message is one line for the user."""


def check_metrics_version(path: Path, data: Any, *, unversioned_ok: bool = False) -> dict[str, Any]:
    """``data`` (read from ``path``) if it is a ``metrics.json`` of :data:`METRICS_SCHEMA_VERSION`; else a
    one-line :class:`SchemaVersionError` naming the file, its version and what to do. ``unversioned_ok``:
    an object without ``schema_version`` passes (a quick check that refuses only another version)."""
    found = data.get("schema_version") if isinstance(data, dict) else None
    if (found == METRICS_SCHEMA_VERSION and type(found) is int) or (
            unversioned_ok and isinstance(data, dict) and "schema_version" not in data):
        return data
    reads = f"this fairforget ({__version__}) reads {METRICS_SCHEMA_VERSION}"
    if type(found) is not int:
        raise SchemaVersionError(f"{path}: no schema_version ({reads}): not a metrics.json fairforget wrote; "
                                 f"re-run `fairforget simulate` to make one")
    if found > METRICS_SCHEMA_VERSION:
        raise SchemaVersionError(f"{path}: schema_version {found}, {reads}: a newer fairforget wrote it; upgrade "
                                 f"fairforget to read it")
    release = METRICS_READ_BY.get(found)
    use = f", or read it with fairforget {release}" if release else ""
    raise SchemaVersionError(f"{path}: schema_version {found}, {reads}: re-run `fairforget simulate --config "
                             f"{Path(path).parent / 'config.toml'} --out NEW_DIR`{use}")


def read_metrics(path: Path, *, unversioned_ok: bool = False) -> dict[str, Any]:
    """A run's ``metrics.json``, its ``schema_version`` checked (:func:`check_metrics_version`); a file that
    is not JSON is a one-line :class:`SchemaVersionError` naming its line."""
    try:
        with Path(path).open(encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise SchemaVersionError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return check_metrics_version(path, data, unversioned_ok=unversioned_ok)
