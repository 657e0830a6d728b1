"""Two ``fairforget forget`` commands on one run at once, as two real processes (an operator who
double-clicks, two researchers on one coordinator). Each must either be applied and report *its own*
deletion, or be refused with one line and a non-zero exit; neither may print a success for an id that
is still live (before the request ids, the second command printed the first one's result as its own).

Only Flower's transport is replaced (the in-process grid of tests/conftest.py delivers the messages
to the real ClientApp handlers inside each process); the CLI, the run folder's lock, the request and
status files and the ServerApp's driver are the product's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairforget.config import APP_DIR
from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir
from server.experiment import run_training
from tests.conftest import TINY, InProcessGrid

SHIM = """
import sys
from flwr.supercore.task_identity import TaskIdentity
from fairforget import runner
from fairforget.requests import Request
from server import cli
from server.app import run_driver
from tests.conftest import InProcessGrid

def in_process_flower(cfg, quiet=False):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_driver(InProcessGrid(cfg), cfg, Request.load(cfg.out_path, cfg.request))
    return runner.outcome(cfg, 0, quiet)

cli.run_flower = in_process_flower
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    out = tmp_path_factory.mktemp("concurrent") / "run"
    cfg = resolve({**TINY, "out-dir": str(out), "audit": False})
    run_training(InProcessGrid(cfg), cfg)
    return cfg


def _live(run: Path, shard: int) -> set[int]:
    index = json.loads((run / "nodes" / f"shard-{shard}" / "index.json").read_text())
    return {i for s in index["slices"] for i in s}


@pytest.mark.parametrize("offset", [0.0, 1.0, 12.0])
def test_two_forgets_at_once_each_report_only_their_own_outcome(trained, tmp_path, offset):
    run = tmp_path / "run"
    shutil.copytree(trained.out_path, run)
    shards = shard_of(trained, load_dataset(trained))
    victims = {0: shards[0].ids[0].item(), 1: shards[1].ids[0].item()}
    env = {**os.environ, "PYTHONPATH": str(APP_DIR), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    procs = {}
    for shard, victim in victims.items():
        procs[shard] = subprocess.Popen([sys.executable, "-c", SHIM, "forget", "--run", str(run), "--ids", str(victim)],
                                        env=env, cwd=APP_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if shard == 0:
            time.sleep(offset)
    results = {shard: (p.wait(timeout=300), *p.communicate()) for shard, p in procs.items()}

    ledger = RunDir(run).ledger
    deleted = ledger.deleted_ids()
    assert not ledger.pending()  # no deletion half done
    applied = 0
    for shard, (code, out, err) in results.items():
        victim = victims[shard]
        if code == 0:
            applied += 1
            assert victim in deleted and victim not in _live(run, shard), (offset, out, err)
            mine = [line for line in out.splitlines() if line.startswith("request ")]
            assert mine and all(f"shard {shard}:" in line for line in mine), (offset, out)  # its own result only
            assert "untouched shards" in out
        else:
            lines = [line for line in err.strip().splitlines() if line.startswith("fairforget: error:")]
            assert len(lines) == 1 and "Traceback" not in err, (offset, err[-2000:])
            assert "in use by" in lines[0] or "failed" in lines[0], lines
            assert victim not in deleted and victim in _live(run, shard), (offset, out, err)
            assert not [line for line in out.splitlines() if line.startswith("request ")], out  # no success claimed
    assert applied >= 1  # the first one always goes through
    # every request a command wrote has its own status, and what it says is what happened
    for status in (run / "requests").glob("*.status.json"):
        data = json.loads(status.read_text())
        for shard_ids in data.get("deleted", {}).values():
            for ids in shard_ids.values():
                assert set(ids) <= deleted


def test_a_forget_refused_by_the_lock_inside_its_run_says_so_in_one_line(trained, tmp_path, capsys, monkeypatch):
    """The race the CLI's early check cannot close: another command takes the run folder between the
    check and the ServerApp's lock. The ServerApp refuses (its request's status says why); the
    command prints one line, exits non-zero and claims nothing, although another run's status is ok."""
    from fairforget import runner
    from fairforget.locks import locked
    from fairforget.requests import Request
    from server import app, cli

    run = tmp_path / "run"
    shutil.copytree(trained.out_path, run)
    victim = shard_of(trained, load_dataset(trained))[0].ids[0].item()
    RunDir(run).write_status("forget", ok=True, request="0123456789abcdef")  # another command's success

    def flower(cfg, quiet=False):
        with locked(run, "the other command"):  # the other command holds the run while ours runs
            app.run_driver(InProcessGrid(cfg), cfg, Request.load(cfg.out_path, cfg.request))
        return runner.outcome(cfg, 0, quiet)

    monkeypatch.setattr(cli, "run_flower", flower)
    before = json.loads((run / "nodes" / "shard-0" / "index.json").read_text())
    assert cli.main(["forget", "--run", str(run), "--ids", str(victim)]) == cli.EXIT_RUN
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and "in use by fairforget the other command" in err, err
    assert not [line for line in out.splitlines() if line.startswith("request ")]
    assert json.loads((run / "nodes" / "shard-0" / "index.json").read_text()) == before
    assert victim not in RunDir(run).ledger.deleted_ids()
