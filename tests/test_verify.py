"""Deletion receipts (`fairforget verify`), safe `simulate --force`, and the validated deletion budget."""

import json

import pytest

from fairforget.capacity import BudgetStateError, DeletionBudget
from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings
from fairforget.storage import atomic_torch_save, atomic_write_json, read_json, torch_load
from fairforget.tombstones import Tombstones
from fairforget.verify import NOT_REPLAYABLE, read_node, verify_shard
from server import cli
from server.experiment import run_training
from server.forget import run_forget
from tests.conftest import forget_request


@pytest.fixture
def trained(tiny_cfg, grid_for):
    cfg = tiny_cfg(audit=False)
    run_training(grid_for(cfg), cfg)
    return cfg


@pytest.fixture
def bare(tiny_cfg):
    """A finished run's files without the training (the CLI's checks before Flower need no more)."""
    cfg = tiny_cfg(audit=False)
    run = RunDir(cfg.out_path)
    run.write_config(cfg)
    run.write_metrics({})
    run.models_dir.mkdir()
    return cfg


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _one_line_error(capsys, code, expected):
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE
    assert err.startswith("fairforget: error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err, err


def _forget(cfg, grid_for, ids):
    grid = grid_for(cfg)
    run_forget(grid, grid.cfg, forget_request(",".join(map(str, ids))))


# ---------------------------------------------------------------------- verify
def test_verify_matches_after_training_and_an_exact_forget_and_sees_a_tampered_model(trained, grid_for, capsys):
    cfg = trained
    run = RunDir(cfg.out_path)
    assert cli.main(["verify", "--run", str(run.path)]) == 0
    record = read_json(run.path / "verify.json")
    assert [v["status"] for v in record["shards"].values()] == ["match", "match"]
    for k, v in record["shards"].items():
        assert v["replay_hash"] == v["served_hash"] == run.metrics()["shards"][int(k)]["model_hash"]
        assert v["ledger_hash"] is None and v["deleted"] == 0 and v["seconds"] > 0
    before = record["shards"]["1"]["served_hash"]

    victims = shard_of(cfg, load_dataset(cfg))[1].ids[:2].tolist()
    _forget(cfg, grid_for, victims)
    capsys.readouterr()
    assert cli.main(["verify", "--run", str(run.path), "--shard", "1"]) == 0
    out = capsys.readouterr().out
    assert "shard 1: match" in out and "shard 0" not in out
    record = read_json(run.path / "verify.json")
    v = record["shards"]["1"]
    entry = run.ledger.entries()[-1]
    assert v["status"] == "match" and v["replay_hash"] == v["served_hash"] == v["ledger_hash"] == entry["hash_after"]
    assert v["served_hash"] != before and v["deleted"] == 2 and v["live"] == 539 - 2
    assert record["shards"]["0"]["status"] == "match"  # the earlier verification of shard 0 is kept
    assert record["last"] == {"time": v["time"], "shards": [1], "ok": True}
    report = run.report_path.read_text()
    assert "## Verification (deletion receipts)" in report and f"`{v['replay_hash']}`" in report

    # one weight of the served model changed: a mismatch, exit 1
    path = run.models_dir / "shard-1.pt"
    state = torch_load(path)
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3  # one weight
    atomic_torch_save(path, state)
    assert cli.main(["verify", "--run", str(run.path)]) == cli.EXIT_RUN
    out = capsys.readouterr().out
    assert "shard 1: mismatch" in out and "shard 0: match" in out and "MISMATCH: shard(s) 1" in out
    record = read_json(run.path / "verify.json")
    assert record["shards"]["1"]["status"] == "mismatch" and record["last"]["ok"] is False
    assert any("is not the replay" in p for p in record["shards"]["1"]["problems"])
    assert f"| 1 | {record['shards']['1']['time']} | mismatch" in run.report_path.read_text()


def test_verify_sees_a_deleted_id_brought_back(trained, grid_for, capsys):
    """Model and index put back to before the deletion (the replay then matches the served model):
    the ledger and the tombstones still say the id was deleted."""
    cfg = trained
    run = RunDir(cfg.out_path)
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    model_before = (run.models_dir / "shard-0.pt").read_bytes()
    index_path = cfg.out_path / "nodes" / "shard-0" / "index.json"
    index_before = read_json(index_path)
    _forget(cfg, grid_for, [victim])
    Tombstones.of_run(run.path).add([victim])  # as the node records it at the data's owner
    assert cli.main(["verify", "--run", str(run.path), "--shard", "0"]) == 0
    (run.models_dir / "shard-0.pt").write_bytes(model_before)
    index_path.write_text(json.dumps(index_before))
    capsys.readouterr()
    assert cli.main(["verify", "--run", str(run.path), "--shard", "0"]) == cli.EXIT_RUN
    v = read_json(run.path / "verify.json")["shards"]["0"]
    assert v["replay_hash"] == v["served_hash"]  # the replay alone would be fooled...
    assert v["status"] == "mismatch"  # ...the records are not
    assert any(f"deleted id(s) still live: {victim}" in p for p in v["problems"])
    assert any("ledger's receipt" in p for p in v["problems"])


def test_an_approximate_shard_is_reported_not_proven(tiny_cfg, grid_for, capsys):
    cfg = tiny_cfg(audit=False, **{"unlearn-method": "finetune", "unlearn-epochs": 1})
    run_training(grid_for(cfg), cfg)
    _forget(cfg, grid_for, shard_of(cfg, load_dataset(cfg))[1].ids[:1].tolist())
    assert cli.main(["verify", "--run", str(cfg.out_path)]) == 0  # not a failure of verify...
    out = capsys.readouterr().out
    assert "shard 1: approximate: no exactness receipt (served by finetune" in out and "shard 0: match" in out
    assert "verified: 1 of 2 shard(s)" in out  # ...and not a proof
    record = read_json(cfg.out_path / "verify.json")["shards"]
    assert record["1"]["status"] == "approximate" and record["1"]["replay_hash"] is None
    # an approximate shard's index and model are checked all the same: a deleted id live again, or a
    # served model that is not the node's approximate one, is a mismatch, not "approximate"
    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    ledger = RunDir(cfg.out_path).ledger.entries()
    index_path = cfg.out_path / "nodes" / "shard-1" / "index.json"
    index = read_json(index_path)
    victim = index["deleted"][0]
    atomic_write_json(index_path, {**index, "deleted": [], "slices": [index["slices"][0] + [victim],
                                                                     *index["slices"][1:]]})
    verdict = verify_shard(read_node(cfg.out_path, cfg, shard_of(cfg, bundle)[1], 1), settings, ledger)
    assert verdict.status == "mismatch" and any(f"deleted id(s) still live: {victim}" in p for p in verdict.problems)
    atomic_write_json(index_path, index)
    models = RunDir(cfg.out_path).load_models()
    atomic_torch_save(cfg.out_path / "models" / "shard-1.pt", models[0])  # another model served as shard 1's
    verdict = verify_shard(read_node(cfg.out_path, cfg, shard_of(cfg, bundle)[1], 1), settings, ledger)
    assert verdict.status == "mismatch" and any("not the node's approximate model" in p for p in verdict.problems)
    # DP-SGD with secure noise cannot be drawn again: no settings to replay with
    node = read_node(cfg.out_path, cfg, shard_of(cfg, load_dataset(cfg))[0], 0)
    assert verify_shard(node, None, []).status == NOT_REPLAYABLE


def test_verify_bad_input_is_one_line_and_writes_nothing(bare, capsys, tmp_path):
    run = RunDir(bare.out_path)
    before = _snapshot(run.path)
    _one_line_error(capsys, cli.main(["verify", "--run", str(run.path), "--shard", "7"]), "no shard 7")
    _one_line_error(capsys, cli.main(["verify", "--run", str(tmp_path / "nothing")]), "is not a folder")
    _one_line_error(capsys, cli.main(["verify", "--run", str(run.path)]), "shard-0.pt is missing")
    for k in (0, 1):
        atomic_torch_save(run.models_dir / f"shard-{k}.pt", {})
    before = _snapshot(run.path)
    _one_line_error(capsys, cli.main(["verify", "--run", str(run.path)]), "shard-0/index.json is missing")
    assert _snapshot(run.path) == before


# ---------------------------------------------------------------------- simulate --force
def _no_flower(monkeypatch):
    started = []
    monkeypatch.setattr(cli, "run_flower", lambda cfg, quiet=False: started.append(cfg.out_path))
    monkeypatch.setattr(cli, "_print_summary", lambda out: None)
    return started


SMALL = ["--set", "num-shards=2", "--set", "image-size=8", "--set", "model-width=4"]


def test_force_refuses_a_folder_that_holds_no_run(tmp_path, capsys, monkeypatch):
    started = _no_flower(monkeypatch)
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    (other / "config.toml").write_text("")  # an empty config.toml is no run
    code = cli.main(["simulate", *SMALL, "--out", str(other), "--force"])
    _one_line_error(capsys, code, "holds none (no valid config.toml); nothing was deleted")
    monkeypatch.setenv("HOME", str(other))
    (other / "config.toml").write_text('mode = "simulate"\nout-dir = "x"\nnum-shards = 2\n')
    code = cli.main(["simulate", *SMALL, "--out", "~", "--force"])
    _one_line_error(capsys, code, "the home folder")
    assert (other / "chapter1.tex").read_text() == "precious" and not started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_force_replaces_a_run_and_keeps_its_tombstones(bare, capsys, monkeypatch):
    started = _no_flower(monkeypatch)
    out = bare.out_path
    Tombstones.of_run(out).add([3, 17])
    tombstones = Tombstones.of_run(out).path.read_bytes()
    assert cli.main(["simulate", *SMALL, "--out", str(out), "--force"]) == 0
    assert started == [out]
    # the old run is gone, its deletions kept (and the new run's request file, for the ServerApp)
    assert sorted(p.name for p in out.iterdir()) == ["requests", "tombstones.jsonl"]
    assert Tombstones.of_run(out).path.read_bytes() == tombstones
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing left beside it


# ---------------------------------------------------------------------- the budget and its parameters
def test_a_broken_budget_is_a_one_line_error(bare, capsys):
    cfg = bare
    run = RunDir(cfg.out_path)
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    budget = DeletionBudget(cfg.capacity_bound, cfg.capacity_eps, cfg.capacity_delta, 330, cfg.capacity_c)
    budget.track(0, 540)
    state = budget.state_dict()
    cases = [
        ({"shards": {"0": {"n": 540, "capacity": 68, "used": -5}}}, "used = -5 is not a whole number >= 0"),
        ({"shards": {"0": {"n": 540, "capacity": 68, "used": 69}}}, "used 69 is more than its capacity 68"),
        ({"shards": {"0": {"n": 540, "capacity": 68}}}, "shard 0: missing field used"),
        ({"eps": 100.0}, "eps 100.0 (run: 1.0)"),
    ]
    for change, expected in cases:
        run.budget_path.write_text(json.dumps({**state, **change}))
        before = _snapshot(run.path)
        code = cli.main(["forget", "--run", str(run.path), "--ids", str(victim)])
        _one_line_error(capsys, code, expected)
        assert _snapshot(run.path) == before
    run.budget_path.write_text('{"bound": "newton", ')
    _one_line_error(capsys, cli.main(["forget", "--run", str(run.path), "--ids", str(victim)]), "budget.json: ")


def test_budget_state_is_validated_not_recomputed():
    budget = DeletionBudget("newton", 1.0, 1e-5, 330)
    budget.track(0, 540)
    budget.consume(0, 2)
    state = budget.state_dict()
    other = DeletionBudget("newton", 1.0, 1e-5, 330)
    other.load_state_dict(state)
    assert other.shards == budget.shards
    with pytest.raises(BudgetStateError, match="c 1.0 \\(run: 2.0\\)"):
        DeletionBudget("newton", 1.0, 1e-5, 330, c=2.0).load_state_dict(state)
    with pytest.raises(BudgetStateError, match="missing field\\(s\\) delta"):
        other.load_state_dict({k: v for k, v in state.items() if k != "delta"})
    assert other.shards == budget.shards  # a refused state changes nothing


def test_forget_cannot_change_the_capacity_parameters(bare, capsys):
    run = RunDir(bare.out_path)
    before = _snapshot(run.path)
    for key in ["capacity-eps=100", "capacity-c=10", "capacity-bound=dp", "capacity-delta=0.5"]:
        code = cli.main(["forget", "--run", str(run.path), "--ids", "1", "--set", key])
        _one_line_error(capsys, code, f"forget --set {key.split('=')[0]}: the capacity parameters are fixed")
    assert _snapshot(run.path) == before
