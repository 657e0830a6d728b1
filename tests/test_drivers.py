"""The ServerApp drivers (train, forget) end to end through the in-process grid."""

import json

import pytest

from fairforget import keys
from fairforget.data import load_dataset, shard_of
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from server.run_files import RunDir


@pytest.fixture
def trained(tiny_cfg, grid_for):
    cfg = tiny_cfg()
    run_training(grid_for(cfg), cfg)
    return cfg


def _files(run: RunDir) -> dict[str, bytes]:
    paths = [run.metrics_path, run.path / "ledger.jsonl", run.report_path, *sorted(run.models_dir.glob("*.pt"))]
    return {p.name: p.read_bytes() for p in paths}


def test_training_writes_metrics_report_models(trained):
    run = RunDir(trained.out_path)
    m = run.metrics()
    assert m["schema_version"] == 1
    assert set(m["ensemble"]) == {"biased", "unbiased"}
    for split in m["ensemble"].values():
        assert 0.0 <= split["accuracy"] <= 1.0
        assert split["worst_group"]["accuracy"] <= split["accuracy"] + 1e-9
        assert sum(g["n"] for g in split["groups"]) == split["n"]
    assert len(m["shards"]) == trained.num_shards
    assert all(s["kl_bias"] > 0 for s in m["shards"])  # rho = 0.99: strongly biased shards
    assert [r["round"] for r in m["rounds"]] == list(range(1, trained.slices + 1))
    assert m["timing"]["full_retrain_seconds"] > 0
    assert m["unlearning"] == []
    assert run.config() == trained
    assert run.report_path.read_text().startswith("# fairforget report")
    assert (run.path / "group_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run.models_dir.iterdir()) == ["shard-0.pt", "shard-1.pt"]


def test_forget_retrains_only_the_owner(trained, grid_for):
    cfg = trained
    run = RunDir(cfg.out_path)
    shards = shard_of(cfg, load_dataset(cfg))
    victims = shards[1].ids[:2].tolist()
    before = _files(run)
    grid = grid_for(cfg.replace(mode="forget", forget_ids=",".join(map(str, victims))))
    run_forget(grid, grid.cfg)

    after = _files(run)
    assert after["shard-0.pt"] == before["shard-0.pt"]  # untouched shard: same bytes
    assert after["shard-1.pt"] != before["shard-1.pt"]
    unlearn_msgs = [m for m in grid.sent if m.metadata.message_type == keys.MSG_UNLEARN]
    assert [grid.nodes[m.metadata.dst_node_id] for m in unlearn_msgs] == [1]
    ledger = run.ledger.entries()
    assert len(ledger) == 1
    assert ledger[0]["shard"] == 1 and ledger[0]["ids"] == sorted(victims) and ledger[0]["request"] == 1
    assert ledger[0]["hash_before"] != ledger[0]["hash_after"]
    m = run.metrics()
    assert m["unlearning"][0]["ids"] == sorted(victims)
    assert m["unlearning"][0]["speedup_vs_full_retrain"] > 0
    assert "## Unlearning" in run.report_path.read_text() and (run.path / "unlearning.png").exists()


@pytest.mark.parametrize("case", ["unknown", "already-deleted"])
def test_forget_refuses_and_changes_nothing(trained, grid_for, case):
    cfg = trained
    run = RunDir(cfg.out_path)
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    if case == "already-deleted":
        g = grid_for(cfg.replace(mode="forget", forget_ids=str(victim)))
        run_forget(g, g.cfg)
        ids = f"{victim}"
    else:
        ids = "999999"
    before = _files(run)
    node_index = (cfg.out_path / "nodes" / "shard-0" / "index.json").read_bytes()
    g = grid_for(cfg.replace(mode="forget", forget_ids=ids))
    with pytest.raises(ForgetError):
        run_forget(g, g.cfg)
    assert _files(run) == before
    assert (cfg.out_path / "nodes" / "shard-0" / "index.json").read_bytes() == node_index
    assert not [m for m in g.sent if m.metadata.message_type == keys.MSG_UNLEARN]


def test_metrics_json_is_plain_json(trained):
    json.loads(RunDir(trained.out_path).metrics_path.read_text())
