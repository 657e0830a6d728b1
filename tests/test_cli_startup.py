"""``fairforget --help`` and an argument-syntax error answer at once: they import no torch, Opacus,
Flower, Ray, diffusers or audit package (issue 27: 4.1 s of a 4.7 s ``--help`` was those imports),
and an error is one line with exit status 2.

Each case runs in a fresh interpreter (this test process has imported everything already), which
reports what the command printed, its exit status and which heavy modules it had imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fairforget.config import APP_DIR

HEAVY = ("torch", "opacus", "flwr", "ray", "diffusers", "scipy", "matplotlib", "sklearn", "fairforget.audit",
         "fairforget.sisa", "strategies")

PROBE = """
import contextlib, io, json, sys
from server import cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)})
print(json.dumps(results))
"""

HELP = [["--help"], *[[c, "--help"] for c in ("simulate", "forget", "request", "calibrate", "audit", "verify",
                                              "compare", "inspect")]]
ERRORS = [
    ([], "the following arguments are required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["forget", "--ids", "1"], "the following arguments are required: --run"),
    (["forget", "--run", "DIR"], "one of the arguments --resume --ids --ids-file is required"),
    (["forget", "--run", "DIR", "--ids", "1,x"], "argument --ids: sample ids must be non-negative integers"),
    (["forget", "--run", "DIR", "--ids", "5,5"], "argument --ids: sample id(s) listed twice: 5"),
    (["forget", "--run", "DIR", "--ids", "1", "--ids-file", "F"], "not allowed with argument --ids"),
    (["verify", "--run", "DIR", "--shard", "two"], "argument --shard: invalid int value: 'two'"),
    (["simulate", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.fixture(scope="module")
def probed() -> dict[str, dict]:
    argvs = HELP + [argv for argv, _ in ERRORS]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs), json.dumps(HEAVY)], cwd=APP_DIR,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return {" ".join(r["argv"]): r for r in json.loads(proc.stdout)}


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_help_imports_nothing_heavy(probed, argv):
    r = probed[" ".join(argv)]
    assert r["code"] == 0 and "usage: fairforget" in r["out"] and not r["err"], r
    assert r["heavy"] == [], f"`fairforget {' '.join(argv)}` imported {r['heavy']}"


@pytest.mark.parametrize(("argv", "expected"), ERRORS, ids=[" ".join(a) or "(none)" for a, _ in ERRORS])
def test_argument_error_is_one_line_and_imports_nothing_heavy(probed, argv, expected):
    r = probed[" ".join(argv)]
    err = r["err"].rstrip("\n")
    assert r["code"] == 2 and not r["out"], r
    assert err.startswith("fairforget: error: ") and "\n" not in err and expected in err, err
    assert "--help`" in err  # it says where the syntax is explained
    assert r["heavy"] == [], f"`fairforget {' '.join(argv)}` imported {r['heavy']}"


def test_the_installed_command_answers_help_without_heavy_imports():
    """The console script itself (``python -m server.cli``: the entry point ``server.cli:main``), with
    ``-X importtime``: no heavy module is imported on the way to the help text."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "server.cli", "forget", "--help"], cwd=APP_DIR,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--ids" in proc.stdout, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in HEAVY or m in HEAVY}, sorted(imported)


def test_every_user_error_the_command_recognises_exists():
    """``cli.USER_ERRORS`` names each one-line error by module and class (so that recognising one imports
    nothing): a renamed or moved class would turn that user error into a traceback."""
    import importlib

    from server import cli

    for module, name in cli.USER_ERRORS.items():
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{module}.{name}"
        assert cli._is_user_error(cls("x"))
    assert not cli._is_user_error(ValueError("x")) and cli._is_user_error(cli.UserError("x"))
