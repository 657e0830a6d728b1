"""Deletion that survives crashes and races: fault injection at each step of a forget, restart and
reconciliation, then the invariants: every shard model equals the model trained from scratch without
exactly the deleted ids, the ledger lists exactly those ids, the budget matches the ledger, and no
checkpoint, index or model holds a deleted id. Plus the ledger's and the storage's own guarantees,
locks, and two concurrent forgets."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from fairforget import ledger as ledger_mod
from fairforget.data import load_dataset, shard_of
from fairforget.ledger import Ledger, LedgerError
from fairforget.locks import LockBusy, locked
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings, SisaShard, assign_slices
from fairforget.storage import durable_append_lines, read_jsonl, state_hash, torch_load
from fairforget.tombstones import Tombstones
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from tests.conftest import forget_request


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One trained tiny run, copied by each test (training it once keeps the file fast)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    out = tmp_path_factory.mktemp("crash") / "run"
    cfg = resolve({**TINY, "out-dir": str(out), "audit": False})
    run_training(InProcessGrid(cfg), cfg)
    return cfg


@pytest.fixture
def trained(base_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(base_run.out_dir, dst)
    return base_run.replace(out_dir=str(dst))


def _victims(cfg, per_shard: dict[int, int]) -> list[int]:
    shards = shard_of(cfg, load_dataset(cfg))
    return sorted(int(i) for k, n in per_shard.items() for i in shards[k].ids[3 : 3 + n].tolist())


def _forget(grid_for, cfg, ids) -> None:
    grid = grid_for(cfg)
    run_forget(grid, grid.cfg, forget_request(",".join(map(str, ids))))


def _replay_hash(cfg, shard: int, deleted: set[int], tmp: Path) -> str:
    """The shard trained from scratch, in a fresh folder, on its samples without ``deleted`` (same slices)."""
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[shard]
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    slices = [[i for i in sl if i not in deleted]
              for sl in assign_slices(data.ids.tolist(), settings.slices, settings.seed, shard)]
    fresh = SisaShard(tmp / f"replay-{shard}", shard, data.select_ids(sorted(set(data.ids.tolist()) - deleted)),
                      settings, slices=slices)
    fresh.train_through()
    return fresh.model_hash()


def assert_clean(cfg, deleted: set[int], tmp: Path) -> None:
    """The invariants after restart and reconciliation."""
    run = RunDir(cfg.out_path)
    lg = Ledger(run.path / "ledger.jsonl")
    assert lg.pending() == {}
    assert lg.deleted_ids() == deleted  # exactly the deleted ids
    assert Tombstones.of_run(run.path).ids() == deleted
    for k, state in run.load_models().items():
        assert state_hash(state) == _replay_hash(cfg, k, deleted, tmp), f"shard {k} is not the clean model"
        node_dir = run.path / "nodes" / f"shard-{k}"
        index = json.loads((node_dir / "index.json").read_text())
        assert not deleted & {i for sl in index["slices"] for i in sl}
        assert index["trained"] == cfg.slices and index.get("target", 0) <= index["trained"]
        for ckpt in (node_dir / "checkpoints").glob("stage-*.pt"):
            assert not deleted & set(torch_load(ckpt)["ids"].tolist()), f"{ckpt} trained on a deleted id"
        assert not (node_dir / "approx.pt").exists()
    # the budget a forget loads (budget.json brought in line with the ledger) is the ledger's
    from strategies import build_strategy

    budget = lg.settle(run.load_budget(build_strategy(cfg, 10).budget))
    for k in {e["shard"] for e in lg.entries()}:
        last = lg.last_done(k)
        assert budget.shards[k].capacity == last["capacity"]
        assert budget.shards[k].remaining == last["capacity_after"]


class Crash(RuntimeError):
    """The injected fault."""


def _crash_on_call(monkeypatch, target, name: str, on_call: int = 1):
    original = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise Crash(f"injected crash in {name}")
        return original(*a, **k)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_crash_before_the_intent_changes_nothing(trained, grid_for, monkeypatch, tmp_path):
    ids = _victims(trained, {1: 2})
    index = (trained.out_path / "nodes" / "shard-1" / "index.json").read_bytes()
    _crash_on_call(monkeypatch, Ledger, "intend")
    with pytest.raises(Crash):
        _forget(grid_for, trained, ids)
    assert Ledger(trained.out_path / "ledger.jsonl").lines() == []
    assert (trained.out_path / "nodes" / "shard-1" / "index.json").read_bytes() == index
    assert not Tombstones.of_run(trained.out_path).ids()
    monkeypatch.undo()
    _forget(grid_for, trained, ids)  # the retry is served
    assert_clean(trained, set(ids), tmp_path)


@pytest.mark.parametrize("where", ["after-node-commit", "mid-retrain"])
def test_node_crash_is_finished_on_restart(trained, grid_for, monkeypatch, tmp_path, where):
    ids = _victims(trained, {0: 1, 1: 2})
    if where == "after-node-commit":  # the index committed the deletion, nothing retrained
        _crash_on_call(monkeypatch, SisaShard, "train_through")
    else:  # the first retrained stage saved, the second not
        _crash_on_call(monkeypatch, SisaShard, "train_stage", on_call=2)
    with pytest.raises(ForgetError, match="did not finish"):
        _forget(grid_for, trained, ids)
    run = RunDir(trained.out_path)
    pending = run.ledger.pending()
    assert list(pending) == [1] and len(pending[1]) == 1  # one shard stored, the crashed one pending
    status_pending = {k for r in pending.values() for k in r}
    index = json.loads((run.path / "nodes" / f"shard-{min(status_pending)}" / "index.json").read_text())
    assert index["target"] > index["trained"]  # the retrain target was committed before anything was removed
    monkeypatch.undo()
    grid = grid_for(trained)
    run_forget(grid, grid.cfg, forget_request(ids=""))  # the restart reconciles (forget --resume)
    last = run.ledger.entries()[-1]
    assert last["resumed"] is True and last["hash_before"] == ""
    assert_clean(trained, set(ids), tmp_path)
    entries = len(run.ledger.entries())
    grid = grid_for(trained)  # asked again: satisfied by the finished request, not deleted twice
    again = run_forget(grid, grid.cfg, forget_request(",".join(map(str, ids))))
    assert sorted(r["id"] for r in again["satisfied"]) == sorted(ids)
    assert {r["request"] for r in again["satisfied"]} == {1}
    assert len(run.ledger.entries()) == entries
    assert not [m for m in grid.sent if m.metadata.message_type == "train.unlearn"]


def test_server_crash_after_one_of_two_replies(trained, grid_for, monkeypatch, tmp_path):
    ids = _victims(trained, {0: 1, 1: 1})
    _crash_on_call(monkeypatch, RunDir, "save_models", on_call=2)  # the second reply is never stored
    with pytest.raises(Crash):
        _forget(grid_for, trained, ids)
    run = RunDir(trained.out_path)
    assert [e["shard"] for e in run.ledger.entries()] == [0]
    assert list(run.ledger.pending()[1]) == [1]
    monkeypatch.undo()
    grid = grid_for(trained)
    run_forget(grid, grid.cfg, forget_request(ids=""))
    assert_clean(trained, set(ids), tmp_path)
    assert run.metrics()["unlearning"][-1]["request"] == 1


def test_crash_after_the_ledger_before_the_budget(trained, grid_for, monkeypatch, tmp_path):
    """An approximate deletion consumes budget; a crash before budget.json is written must not give
    the spent capacity back (the ledger, the record of decisions, wins)."""
    ids = _victims(trained, {1: 2})
    _crash_on_call(monkeypatch, RunDir, "save_budget")
    cfg = trained.replace(unlearn_method="finetune")
    with pytest.raises(Crash):
        _forget(grid_for, cfg, ids)
    monkeypatch.undo()
    run = RunDir(trained.out_path)
    assert not run.budget_path.exists() or 1 not in json.loads(run.budget_path.read_text())["shards"]
    from strategies import build_strategy

    budget = run.ledger.settle(run.load_budget(build_strategy(cfg, 10).budget))
    line = run.ledger.last_done(1)
    assert line["decision"] == ledger_mod.APPROXIMATE and budget.shards[1].used == 2
    assert budget.remaining(1) == line["capacity_after"] == line["capacity_before"] - 2


def test_torn_ledger_tail_is_an_unfinished_line_and_a_broken_middle_is_an_error(tmp_path):
    lg = Ledger(tmp_path / "ledger.jsonl")
    lg.intend(1, {0: {"ids": [3], "method": "exact-sisa", "decision": "exact-retrain"}}, "exact-sisa")
    with (tmp_path / "ledger.jsonl").open("a") as fh:
        fh.write('{"phase": "done", "request": 1, "sha')  # a crash mid-append
    assert lg.pending() == {1: {0: {"ids": [3], "method": "exact-sisa", "decision": "exact-retrain"}}}
    assert "line 2" in lg.torn
    lg.complete([{"request": 1, "shard": 0, "ids": [3], "decision": "exact-retrain"}])  # the torn line is cut
    assert lg.pending() == {} and lg.deleted_ids() == {3}
    assert len(read_jsonl(lg.path)) == 2
    lines = lg.path.read_text().splitlines()
    lg.path.write_text("\n".join([lines[0], "{not json", lines[-1]]) + "\n")
    with pytest.raises(LedgerError, match="line 2 is not a JSON object"):
        lg.entries()


def test_appends_are_whole_lines_and_the_ledger_is_never_rewritten(tmp_path):
    path = tmp_path / "log.jsonl"
    durable_append_lines(path, ['{"a": 1}'])
    inode = os.stat(path).st_ino
    durable_append_lines(path, ['{"a": 2}', '{"a": 3}'])
    assert os.stat(path).st_ino == inode  # appended in place, not replaced
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]


def test_lock_refuses_a_second_writer_with_one_line(tmp_path):
    with locked(tmp_path, "forget"):
        with pytest.raises(LockBusy) as exc:
            with locked(tmp_path, "audit"):
                pass
    assert "in use by fairforget forget (pid" in str(exc.value) and "\n" not in str(exc.value)
    with locked(tmp_path, "audit"):  # released when the holder ends
        pass


def _forget_in_child(cfg_map: dict, ids: str, queue) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from server.app import run_driver
    from tests.conftest import InProcessGrid, forget_request

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    from fairforget.requests import read_status

    cfg = resolve(cfg_map)
    request = forget_request(ids)
    try:
        run_driver(InProcessGrid(cfg), cfg, request)  # a refusal by the lock is the request's status, one line
        status = read_status(cfg.out_path, request.id)
        queue.put(("ok", ids) if status["ok"] else ("busy", status["error"]))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def test_two_concurrent_forgets_never_resurrect_an_id(trained, tmp_path):
    a, b = _victims(trained, {1: 1}), _victims(trained, {0: 1})
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_forget_in_child, args=(trained.to_mapping(), ",".join(map(str, ids)), queue))
             for ids in (a, b)]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert not [o for o in outcomes if o[0] == "error"], outcomes
    applied = {int(i) for kind, ids in outcomes if kind == "ok" for i in ids.split(",")}
    assert applied, outcomes  # at least one ran; the other ran after it or was refused with one line
    assert all("in use by" in text for kind, text in outcomes if kind == "busy")
    assert_clean(trained, applied, tmp_path)


def test_a_new_state_folder_never_trains_on_a_tombstoned_record(trained, grid_for, tmp_path):
    ids = _victims(trained, {0: 2})
    _forget(grid_for, trained, ids)
    import shutil

    shutil.rmtree(trained.out_path / "nodes")  # a site's state folder lost: the data owner's list remains
    grid = grid_for(trained)
    node = grid.node(101)
    assert not set(ids) & set(node.data.ids.tolist())
    node.sisa.train_through()
    for ckpt in (node.state_dir / "checkpoints").glob("stage-*.pt"):
        assert not set(ids) & set(torch_load(ckpt)["ids"].tolist())
