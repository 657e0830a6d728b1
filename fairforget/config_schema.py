"""The run configuration's schema, exported: every key as :class:`~fairforget.config.RunConfig` declares
it (:data:`~fairforget.config.KEYS`), as a JSON Schema for editors and other tools.

The declaration is the one source: ``RunConfig``'s fields give each key's type, default, one-line
meaning and the values it may take; ``validate`` enforces them, ``pyproject.toml``'s
``[tool.flwr.app.config]`` is checked against them (``tests/test_config_schema.py``), and the
reference page ``docs/reference/config.md`` and ``fairforget/schemas/run-config.schema.json`` are
generated from them (``docs/gen_reference.py``)::

    python -m fairforget.config_schema --json-schema          # print the JSON Schema
    python -m fairforget.config_schema --write                # rewrite the shipped file

Light on purpose (no torch): the ``fairforget`` command's start-up may read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fairforget.config import KEYS, Bound, Key

RUN_CONFIG_SCHEMA = Path(__file__).resolve().parent / "schemas" / "run-config.schema.json"
JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
BY_NAME = {k.name: k for k in KEYS}


def _static(k: Key, side: str) -> tuple[Bound | None, bool]:
    """``k``'s bound on ``side`` (``minimum``/``maximum``) as a number, and whether it is exclusive. A
    bound naming another key (``min-shards`` <= ``num-shards``) takes that key's own bound on the same
    side: the tightest a JSON Schema, which cannot compare two keys, can say."""
    bound, exclusive = getattr(k, side), k.open_min if side == "minimum" else k.open_max
    while isinstance(bound, str):
        other = BY_NAME[bound]
        bound = getattr(other, side)
        exclusive = exclusive or (other.open_min if side == "minimum" else other.open_max)
    return bound, exclusive


def property_schema(k: Key) -> dict[str, Any]:
    """One key's JSON Schema: type, default, description and its range, choices or form."""
    out: dict[str, Any] = {"type": JSON_TYPES[k.type], "default": k.default, "description": k.meaning}
    if k.choices:
        out["enum"] = list(k.choices)
    if k.form is not None:
        out.update(k.form.json_schema)
    for side in ("minimum", "maximum"):
        bound, exclusive = _static(k, side)
        if bound is not None:
            out[("exclusiveMinimum" if side == "minimum" else "exclusiveMaximum") if exclusive else side] = bound
    if k.multiple_of:
        out["multipleOf"] = k.multiple_of
    if k.relative or k.form is not None:
        out["$comment"] = f"must be {k.rule()}"
    return out


def json_schema() -> dict[str, Any]:
    """The run configuration as a JSON Schema (draft 2020-12): a flat object of the declared keys, as a
    user's ``--config`` file, ``OUT/config.toml`` or ``[tool.flwr.app.config]`` holds them."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fairforget run configuration",
        "description": "Run-config keys of fairforget (pyproject.toml [tool.flwr.app.config]); any subset overrides "
                       "the defaults. Generated from fairforget.config.RunConfig: do not edit by hand.",
        "type": "object",
        "properties": {k.name: property_schema(k) for k in KEYS},
        "additionalProperties": False,
    }


def render_json_schema() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairforget.config_schema", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--json-schema", action="store_true", help="print the run config's JSON Schema")
    what.add_argument("--write", action="store_true", help=f"write it to {RUN_CONFIG_SCHEMA.name} in the package")
    args = parser.parse_args(argv)
    if args.write:
        RUN_CONFIG_SCHEMA.parent.mkdir(exist_ok=True)
        RUN_CONFIG_SCHEMA.write_text(render_json_schema(), encoding="utf-8")
        print(RUN_CONFIG_SCHEMA)
    else:
        sys.stdout.write(render_json_schema())
    return 0


if __name__ == "__main__":
    sys.exit(main())
