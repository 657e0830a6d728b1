"""Layers point one way: ``fairforget/`` is the library and imports no app folder; ``clients/`` and
``strategies/`` are Flower code on the library only; ``server/`` may also use the strategies. Read
from every module's imports (module level and inside functions alike) with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fairforget", "clients", "strategies", "server", "simulations")
ALLOWED = {
    "fairforget": {"fairforget"},
    "clients": {"fairforget", "clients"},
    "strategies": {"fairforget", "strategies"},
    "server": {"fairforget", "strategies", "server"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) of every import in ``path``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES}
    return out


def modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_climbs(layer):
    assert modules(layer), f"no modules in {layer}/"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {pkg}"
           for p in modules(layer) for pkg, line in sorted(imported_packages(p)) if pkg not in ALLOWED[layer]]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\n\ndef f():\n    from server.forget import run_forget\n    import clients.app\n")
    assert {pkg for pkg, _ in imported_packages(bad)} == {"server", "clients"}
