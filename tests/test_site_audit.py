"""Site audits (``query.audit``) through the in-process grid and the real handlers: what a site
receives, what it sends back, what its reference models train on, and the ensemble scope."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fairforget import keys
from fairforget.audit.site import SiteAudit, site_seed, split_heldout
from fairforget.config import ConfigError
from fairforget.records import pack_shards
from fairforget.run import RunDir
from fairforget.storage import torch_load
from server.audit import audit_messages, federated_audit, site_audits
from server.experiment import run_training
from server.grid import site_grid

ATTACKS = "loss,entropy,lira-offline,rmia"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (no audit yet), shared by this module's tests."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest's autouse fixture
    cfg = resolve({**TINY, "out-dir": str(tmp_path_factory.mktemp("site-audit") / "run"), "audit": False,
                   "audit-attacks": ATTACKS})
    run_training(InProcessGrid(cfg), cfg)
    return cfg


def _leaves(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _leaves(v, f"{path}/{k}")]
    if isinstance(obj, list):
        return [(path + "[]", v) for v in obj]
    return [(path, obj)]


def test_reply_carries_statistics_only(trained, grid_for):
    nodes = grid_for(trained)
    grid = site_grid(nodes, trained)  # as the drivers do: each message carries its node's shard
    states = RunDir(trained.out_path).load_models()
    messages = audit_messages(grid, trained, states)
    assert all(keys.ARRAYS not in m.content for m in messages)  # default scope: no weights travel
    replies = list(grid.send_and_receive(messages))
    assert not any(r.has_error() for r in replies)
    for reply in replies:
        assert list(reply.content.array_records) == []  # no arrays
        assert set(reply.content.config_records) == {keys.CONFIG}
        assert set(reply.content[keys.CONFIG]) == {keys.AUDIT_JSON}
        assert set(reply.content[keys.METRICS]) == {keys.SHARD}
        body = json.loads(reply.content[keys.CONFIG][keys.AUDIT_JSON])
        shard = body["shard"]
        assert set(body["targets"]) == {f"shard-{shard}"}
        assert set(body["targets"][f"shard-{shard}"]) == set(ATTACKS.split(","))
        node = nodes.node(reply.metadata.src_node_id)
        assert body["members"] == len(node.sisa.live_ids()) and body["references"] == trained.audit_references
        ids = {int(i) for i in node.data.ids.tolist()} | {int(i) for i in node.heldout.ids.tolist()}
        for path, value in _leaves(body):
            if path.endswith("[]"):  # every list is a curve or an interval: rates, not scores or ids
                assert path.rsplit("/", 1)[-1] in ("fpr[]", "tpr[]") or path.endswith("_ci95[]"), path
                assert isinstance(value, float) and 0.0 <= value <= 1.0, path
            elif isinstance(value, int) and not isinstance(value, bool):
                assert path.rsplit("/", 1)[-1] in ("shard", "members", "nonmembers", "population", "references",
                                                   "n_members", "n_nonmembers"), path
        assert not any(k in ("scores", "ids", "groups") for p, _ in _leaves(body) for k in p.split("/"))
        assert ids  # the site has records, none of which came back (no int leaf but counts)


def test_site_references_never_include_a_member(trained, grid_for):
    nodes = grid_for(trained)
    grid = site_grid(nodes, trained)  # as the drivers do: each message carries its node's shard
    site_audits(grid, trained, RunDir(trained.out_path).load_models())
    for node_id in grid.get_node_ids():
        node = nodes.node(node_id)
        cache = list((node.state_dir / "audit").glob("references-shard-*.pt"))
        assert len(cache) == 1
        trained_on = torch_load(cache[0])["trained_on"]
        assert len(trained_on) == trained.audit_references
        population, nonmembers = split_heldout(node.heldout, site_seed(trained.seed, node.shard))
        every_member = {int(i) for i in node.bundle.train.ids.tolist()}  # any site's, not only this one's
        for ids in trained_on:
            assert ids and set(ids) <= {int(i) for i in population.ids.tolist()}
            assert not set(ids) & every_member
            assert not set(ids) & {int(i) for i in nonmembers.ids.tolist()}  # nor a non-member candidate


def test_default_scope_refuses_weights_and_the_ensemble(trained, grid_for):
    nodes = grid_for(trained)
    grid = site_grid(nodes, trained)  # as the drivers do: each message carries its node's shard
    states = RunDir(trained.out_path).load_models()
    other = pack_shards({1: ArrayRecord(states[1])})
    everyone = pack_shards({k: ArrayRecord(v) for k, v in states.items()})
    own = {keys.AUDIT_SCOPE: "shard", keys.MODEL_TARGET: keys.TARGET_OWN_SHARD}
    asks = [RecordDict({keys.CONFIG: ConfigRecord(own), keys.ARRAYS: other}),
            RecordDict({keys.CONFIG: ConfigRecord({keys.AUDIT_SCOPE: "ensemble"}), keys.ARRAYS: everyone})]
    replies = list(grid.send_and_receive([Message(c, dst_node_id=101, message_type=keys.MSG_AUDIT) for c in asks]))
    assert "takes no weights, got shard(s) 1" in replies[0].error.reason
    assert "site-audit-scope is 'shard'" in replies[1].error.reason


def test_ensemble_scope_when_set(trained, grid_for):
    cfg = trained.replace(site_audit_scope="ensemble")
    nodes = grid_for(cfg)
    grid = site_grid(nodes, cfg)
    run = RunDir(cfg.out_path)
    states = run.load_models()
    assert all(set(m.content[keys.ARRAYS].keys()) == set(pack_shards(
        {k: ArrayRecord(v) for k, v in states.items()}).keys()) for m in audit_messages(grid, cfg, states))
    privacy = federated_audit(grid, run, cfg, None, states, deleted=set())
    assert privacy["audited_at"] == {"shard-0": "site-0", "shard-1": "site-1"}
    for site in ("site-0", "site-1"):
        assert privacy["sites"][site]["scope"] == "ensemble"
        assert set(privacy["sites"][site]["targets"]) == {"ensemble"}  # its own shard went to the targets
    with pytest.raises(ConfigError, match="site-audit-scope"):
        cfg.replace(site_audit_scope="everything")


def test_a_site_that_audited_another_model_is_an_error(trained, grid_for):
    nodes = grid_for(trained)
    grid = site_grid(nodes, trained)  # as the drivers do: each message carries its node's shard
    states = RunDir(trained.out_path).load_models()
    sites = site_audits(grid, trained, {0: states[0], 1: states[0]})  # the server holds another shard-1 model
    assert "targets" in sites["site-0"] and not sites["site-0"]["skipped"]
    assert "not the model the server holds" in sites["site-1"]["error"] and "targets" not in sites["site-1"]
    assert SiteAudit(shard=0, site="a", scope="shard", model_hash="h").to_records()[keys.METRICS][keys.SHARD] == 0


def test_the_sites_ensemble_audit_combines_as_the_strategys_predictor(trained, grid_for):
    """Under ``site-audit-scope = "ensemble"`` a site scores the ensemble as the run's strategy predicts
    (its weights travel with the message): all the weight on shard 0 makes site 0's ensemble audit that
    of its own model; an even predictor (the weights dropped) does not."""
    from fairforget.ensemble import Predictor
    from strategies.shard_ensemble import ShardEnsemble

    class ShardZeroOnly(ShardEnsemble):
        def predictor(self):
            return Predictor(weights={0: 1.0, 1: 0.0})

    cfg = trained.replace(site_audit_scope="ensemble", audit_attacks="loss", audit_references=0)
    grid = site_grid(grid_for(cfg), cfg)
    states = RunDir(cfg.out_path).load_models()
    message = audit_messages(grid, cfg, states, ShardZeroOnly.from_config(cfg, 10))[0]
    assert json.loads(message.content[keys.CONFIG][keys.ENSEMBLE_RULE]) == {"vote": "softmax",
                                                                             "weights": {"0": 1.0, "1": 0.0}}

    def site0(strategy):
        sites = site_audits(grid, cfg, states, strategy)
        return {t: v["loss"]["auc"] for t, v in sites["site-0"]["targets"].items()}

    weighted = site0(ShardZeroOnly.from_config(cfg, 10))
    assert weighted["ensemble"] == pytest.approx(weighted["shard-0"], abs=1e-12)
    even = site0(ShardEnsemble.from_config(cfg, 10))
    assert even["ensemble"] != pytest.approx(even["shard-0"], abs=1e-6)


def test_a_predictor_with_its_own_combination_code_cannot_go_to_the_sites(trained):
    from fairforget.ensemble import Ensemble, Predictor
    from server.audit import ensemble_rule
    from strategies.shard_ensemble import ShardEnsemble

    class Geometric(Ensemble):
        def combine(self, probs):
            return probs.log().mean(0).softmax(-1)

    class GeometricPredictor(Predictor):
        def __call__(self, states, num_classes, width):
            return Geometric(states, num_classes, width)

    class GeometricEnsemble(ShardEnsemble):
        def predictor(self):
            return GeometricPredictor()

    cfg = trained.replace(site_audit_scope="ensemble")
    states = RunDir(cfg.out_path).load_models()
    with pytest.raises(ConfigError, match=r"^config key 'site-audit-scope' = 'ensemble': .*Geometric\.combine"):
        ensemble_rule(cfg, states, GeometricEnsemble.from_config(cfg, 10))
    assert ensemble_rule(cfg, states, None) == {"vote": "softmax", "weights": None}
