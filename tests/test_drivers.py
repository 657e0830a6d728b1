"""The ServerApp drivers (train, forget) end to end through the in-process grid."""

import json

import pytest

from fairforget import keys
from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from tests.conftest import forget_request


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
    privacy = m["privacy"]
    assert set(privacy["targets"]) == {"ensemble", "shard-0", "shard-1"}
    for target in privacy["targets"].values():
        assert set(target) == set(trained.audit_attacks.split(","))
        assert all(0.0 <= r["auc"] <= 1.0 and r["roc"]["fpr"][0] == 0.0 for r in target.values())
    assert set(privacy["attribute_inference"]) == {"ensemble", "shard-0", "shard-1"}
    # the server audited the ensemble; each site its own shard model, with references it trained itself
    assert privacy["audited_at"] == {"ensemble": "server", "shard-0": "site-0", "shard-1": "site-1"}
    assert set(privacy["sites"]) == {"site-0", "site-1"}
    for site, info in privacy["sites"].items():
        shard = next(s for s in m["shards"] if f"site-{s['shard']}" == site)
        assert info["scope"] == "shard" and info["targets"] == {} and info["members"] == shard["num_examples"]
        assert info["model_hash"] == shard["model_hash"]
        assert privacy["targets"][f"shard-{shard['shard']}"]["loss"]["n_members"] == shard["num_examples"]
        cache = run.path / "nodes" / site.replace("site", "shard") / "audit"
        assert len(list(cache.glob("references-shard-*.pt"))) == 1
    assert [p.name.split("-")[1] for p in (run.path / "audit").glob("references-*.pt")] == ["ensemble"]
    assert "## Privacy audit" in run.report_path.read_text() and (run.path / "mia_roc.png").exists()
    assert run.report_path.read_text().startswith("# fairforget report")
    assert (run.path / "group_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run.models_dir.iterdir()) == ["shard-0.pt", "shard-1.pt"]


def test_forget_retrains_only_the_owner(trained, grid_for):
    cfg = trained
    run = RunDir(cfg.out_path)
    shards = shard_of(cfg, load_dataset(cfg))
    victims = shards[1].ids[:2].tolist()
    before = _files(run)
    grid = grid_for(cfg)
    run_forget(grid, grid.cfg, forget_request(",".join(map(str, victims))))

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
    audit = m["unlearning"][0]["audit"]
    assert set(audit["deleted_vs_nonmembers_auc_before"]) == set(audit["deleted_vs_nonmembers_auc_after"])
    assert all(0.0 <= v <= 1.0 for v in audit["deleted_vs_nonmembers_auc_after"].values())
    assert "## Unlearning" in run.report_path.read_text() and (run.path / "unlearning.png").exists()


@pytest.mark.parametrize("case", ["unknown", "already-deleted"])
def test_forget_refuses_and_changes_nothing(trained, grid_for, case):
    cfg = trained
    run = RunDir(cfg.out_path)
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    if case == "already-deleted":
        g = grid_for(cfg)
        run_forget(g, g.cfg, forget_request(ids=str(victim)))
        ids = f"{victim}"
    else:
        ids = "999999"
    before = _files(run)
    node_index = (cfg.out_path / "nodes" / "shard-0" / "index.json").read_bytes()
    g = grid_for(cfg)
    if case == "already-deleted":  # an erasure request repeated is satisfied by the earlier one, not an error
        result = run_forget(g, g.cfg, forget_request(ids=ids))
        assert [(r["id"], r["request"]) for r in result["satisfied"]] == [(victim, 1)]
        assert result["satisfied"][0]["hash_after"] == run.ledger.entries()[-1]["hash_after"]
    else:
        with pytest.raises(ForgetError, match="unknown sample id"):
            run_forget(g, g.cfg, forget_request(ids=ids))
    assert _files(run) == before
    assert (cfg.out_path / "nodes" / "shard-0" / "index.json").read_bytes() == node_index
    assert not [m for m in g.sent if m.metadata.message_type == keys.MSG_UNLEARN]


def _strict(token: str):
    raise ValueError(f"not JSON: {token}")


def test_run_files_are_strict_json(trained, grid_for):
    """No NaN or Infinity (json.dumps writes them by default, and most JSON readers reject them)."""
    cfg = trained
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    grid = grid_for(cfg)
    run_forget(grid, grid.cfg, forget_request(ids=str(victim)))
    run = RunDir(cfg.out_path)
    metrics = json.loads(run.metrics_path.read_text(), parse_constant=_strict)
    assert metrics["unlearning"][0]["ids"] == [victim]
    for line in (run.path / "ledger.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_strict)
    json.loads(run.budget_path.read_text(), parse_constant=_strict)
    with pytest.raises(ValueError, match="not JSON: NaN"):
        json.loads('{"a": NaN}', parse_constant=_strict)


def test_nan_figures_are_written_as_null(tmp_path):
    from fairforget.storage import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=_strict) == {"a": None, "b": [1.0, None],
                                                                                      "c": 2.5}


def test_forgetting_a_record_an_earlier_run_deleted_is_satisfied(tiny_cfg, grid_for):
    """`make demo` twice: `simulate --force` keeps the old run's tombstones, so the new run never
    trained on ids 17, 42, 5; asking to forget them again is satisfied by the data owner's tombstone
    (exit 0 at the CLI), not refused, and nothing is retrained."""
    from fairforget.tombstones import Tombstones

    cfg = tiny_cfg(audit=False)
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    Tombstones.of_run(cfg.out_path).add([victim])  # what simulate --force carried over
    run_training(grid_for(cfg), cfg)
    grid = grid_for(cfg)
    result = run_forget(grid, grid.cfg, forget_request(str(victim)))
    assert result["satisfied"] == [{"id": victim, "tombstoned": True}]
    assert not [m for m in grid.sent if m.metadata.message_type == keys.MSG_UNLEARN]
    assert not RunDir(cfg.out_path).ledger.entries()
