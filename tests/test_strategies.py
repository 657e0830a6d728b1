"""The contract every registered strategy keeps, run against the real ClientApp handlers in-process:
the contract suite (:mod:`server.testing`) over every registered strategy, and over two deliberately
broken ones (registered only inside their test) to show that it fails them."""

import ast
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

import strategies
from fairforget import keys
from fairforget.config import ConfigError, resolve
from fairforget.ensemble import Ensemble, Predictor
from fairforget.model import build_model
from fairforget.records import pack_shards, unpack_shards
from server.grid import site_grid
from server.testing import Harness, Trial, check_predictor_is_used, check_strategy, parametrize_with_checks
from strategies import STRATEGIES
from strategies.base import StrategyReplyError
from strategies.shard_ensemble import ShardEnsemble
from tests.conftest import TINY, InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def _harness(root: Path) -> Harness:
    return Harness(make_cfg=lambda out, **over: resolve({**TINY, "out-dir": str(out), **over}),
                   make_grid=InProcessGrid, root=root)


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    """One :class:`Trial` per strategy class, shared by its checks (one training each)."""
    root = tmp_path_factory.mktemp("contract")
    cache: dict[type, Trial] = {}
    return lambda cls: cache.setdefault(cls, Trial(cls, _harness(root)))


@parametrize_with_checks([STRATEGIES[n] for n in sorted(STRATEGIES)])
def test_contract_suite(cls, check, trials):
    check(trials(cls))


# ---------------------------------------------------------------------- deliberately broken strategies
class AveragingShardEnsemble(ShardEnsemble):
    """Declares keeps_shard_models, but stores the average of the shard models as every shard's."""

    name = "broken-averaging"

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        states = unpack_shards(arrays)
        mean = {k: torch.stack([s[k].double() for s in states.values()]).mean(0).to(v.dtype)
                for k, v in states[0].items()}
        self.shard_arrays = {k: ArrayRecord(mean) for k in states}
        return pack_shards(self.shard_arrays), metrics


class FirstShardEnsemble(Ensemble):
    """Predicts with shard 0 alone (weights 1, 0, ...) in ``predict_proba``, but leaves ``combine``,
    which evaluation uses, the even mean: the weights never reach the evaluation."""

    def predict_proba(self, x):
        return self.member_probs(x)[0]


class FirstShardPredictor(Predictor):
    def __call__(self, states, num_classes, width):
        return FirstShardEnsemble(states, num_classes, width)


class UnusedPredictorEnsemble(ShardEnsemble):
    name = "broken-predictor"

    def predictor(self):
        return FirstShardPredictor()


@pytest.mark.parametrize(("cls", "message"), [(AveragingShardEnsemble, "declares keeps_shard_models"),
                                              (UnusedPredictorEnsemble, "predict_proba is not combine")])
def test_the_suite_fails_a_broken_strategy(cls, message, tmp_path):
    with pytest.raises(AssertionError, match=message):
        check_strategy(cls, _harness(tmp_path))
    assert cls.name not in STRATEGIES  # registered for the check only


class WeightedShardEnsemble(ShardEnsemble):
    """A correct weighted ensemble: all the weight on shard 0, declared through its predictor."""

    name = "weighted-test"

    def predictor(self):
        return Predictor(weights={0: 1.0, 1: 0.0})


def test_a_weighted_ensembles_weights_reach_evaluation_and_audit(tmp_path):
    """The strategy's weights are what the evaluation scores (shard 0's own accuracy) and what the
    audit attacks: it passes the predictor check."""
    trial = Trial(WeightedShardEnsemble, _harness(tmp_path))
    check_predictor_is_used(trial)
    m = trial.trained
    assert m["ensemble"]["unbiased"]["accuracy"] == pytest.approx(m["shards"][0]["accuracy_unbiased"])


# ---------------------------------------------------------------------- strategies from anywhere
def _entry_points(monkeypatch, *pairs):
    import importlib.metadata as md

    eps = [md.EntryPoint(name=n, value=v, group=strategies.ENTRY_POINT_GROUP) for n, v in pairs]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [e for e in eps if e.group == group])


def test_a_strategy_from_a_module_path_or_an_entry_point(tiny_cfg, monkeypatch):
    path = "tests.test_strategies:WeightedShardEnsemble"
    assert strategies.strategy_class(path) is WeightedShardEnsemble
    assert isinstance(strategies.build_strategy(tiny_cfg(strategy=path), 10), WeightedShardEnsemble)
    _entry_points(monkeypatch, ("weighted", path))
    assert strategies.strategy_class("weighted") is WeightedShardEnsemble
    assert strategies.strategy_class("fedavg") is STRATEGIES["fedavg"]


@pytest.mark.parametrize(("name", "plugins", "expected"), [
    ("nowhere.module:Strategy", [], "'strategy' = 'nowhere.module:Strategy': cannot import it: ModuleNotFoundError"),
    ("tests.test_strategies:Missing", [], "cannot import it: AttributeError"),
    ("tests.test_strategies:ROOT", [], "tests.test_strategies:ROOT is not a fairforget strategy"),
    ("broken", [("broken", "nowhere.module:Strategy")],
     "plugin 'nowhere.module:Strategy' (entry point group fairforget.strategies) fails to import"),
    ("notone", [("notone", "tests.test_strategies:FirstShardPredictor")], "is not a fairforget strategy"),
    ("twice", [("twice", "a.b:C"), ("twice", "d.e:F")], "two plugins register 'twice': 'a.b:C' and 'd.e:F'"),
    ("fedavg", [("fedavg", "a.b:C")], "plugin 'a.b:C' registers 'fedavg', the name of a built-in strategy"),
    ("fedsgd", [("robust", "a.b:C")], "'strategy' = 'fedsgd': must be one of fedavg, robust, shard-ensemble"),
])
def test_a_bad_strategy_plugin_is_one_line(monkeypatch, name, plugins, expected):
    _entry_points(monkeypatch, *plugins)
    with pytest.raises(ConfigError) as err:
        strategies.strategy_class(name)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


class WithOptions(WeightedShardEnsemble):
    name = "with-options"
    options = {"trim-fraction": 0.1, "rule": "median", "warmup": 2}


def test_strategy_options_are_declared_and_checked_by_the_strategy(tiny_cfg):
    path = "tests.test_strategies:WithOptions"
    cfg = tiny_cfg(strategy=path, **{"strategy-options": '{"trim-fraction": 0, "rule": "mean"}'})
    strategies.build_strategy(cfg, 10)
    assert WithOptions.parse_options(cfg.strategy_options) == {"trim-fraction": 0.0, "rule": "mean", "warmup": 2}
    for options, expected in [
        ('{"trim": 0.2}', "strategy 'with-options' has no option 'trim' (its options: rule, trim-fraction, warmup)"),
        ('{"warmup": 1.5}', "option 'warmup' of strategy 'with-options' = 1.5: expected int"),
        ('{"rule": true}', "option 'rule' of strategy 'with-options' = True: expected str"),
    ]:
        with pytest.raises(ConfigError) as err:
            strategies.build_strategy(tiny_cfg(strategy=path, **{"strategy-options": options}), 10)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="strategy 'fedavg' has no option 'x' \\(it takes none\\)"):
        strategies.build_strategy(tiny_cfg(strategy="fedavg", **{"strategy-options": '{"x": 1}'}), 10)
    with pytest.raises(ConfigError, match="'strategy-options' = 'nope': must be"):
        tiny_cfg(**{"strategy-options": "nope"})


def test_no_code_outside_strategies_compares_strategy_names():
    """Capabilities, not names: no module outside strategies/ compares ``cfg.strategy`` or spells a
    registered strategy's name (the run config's declared default, ``key("shard-ensemble", ...)``, aside:
    that is where defaults are declared, once)."""
    names = {c.name for c in STRATEGIES.values()}
    bad = []
    for layer in ("fairforget", "server", "clients"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            tree = ast.parse(path.read_text())
            defaults = {id(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
                        and isinstance(n.func, ast.Name) and n.func.id == "key"}
            for node in ast.walk(tree):
                if id(node) in defaults:
                    continue
                operands = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
                if any(isinstance(o, ast.Attribute) and o.attr == "strategy" for o in operands):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: the name {node.value!r}")
    assert not bad, "\n".join(bad)


@pytest.fixture(params=sorted(STRATEGIES))
def name(request):
    return request.param


def test_contract_full_run(name, tiny_cfg, grid_for):
    cfg = tiny_cfg(strategy=name)
    nodes = grid_for(cfg)
    grid = site_grid(nodes, cfg)  # as every driver does: messages carry the shard the server assigned
    strategy = STRATEGIES[name].from_config(cfg, 10)
    assert strategy.name == name
    rounds = strategy.num_rounds()
    assert rounds >= 1
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(10), num_rounds=rounds,
                            train_config=ConfigRecord({"seed": 0}))
    train_msgs = [m for m in nodes.sent if m.metadata.message_type == keys.MSG_TRAIN]
    assert len(train_msgs) == rounds * cfg.num_shards
    assert {m.metadata.dst_node_id for m in train_msgs} == set(nodes.get_node_ids())
    assert {(m.metadata.dst_node_id, m.content[keys.CONFIG][keys.SHARD]) for m in train_msgs} == {(101, 0), (102, 1)}
    states = strategy.ensemble_states(result.arrays)
    assert states
    for state in states.values():  # every constituent is a loadable SimpleConvNet
        build_model(10, cfg.model_width, seed=0).load_state_dict(state)
    assert set(strategy.shard_reports) == set(range(cfg.num_shards))
    for report in strategy.shard_reports.values():
        assert report[keys.NUM_EXAMPLES] > 0 and report[keys.KL_BIAS] >= 0


def test_error_reply_is_raised(name, tiny_cfg):
    cfg = tiny_cfg(strategy=name)
    strategy = STRATEGIES[name].from_config(cfg, 10)
    msg = Message(__import__("flwr.app", fromlist=["RecordDict"]).RecordDict(), dst_node_id=7,
                  message_type=keys.MSG_TRAIN)
    bad = Message(Error(code=1, reason="disk full"), reply_to=msg)
    with pytest.raises(StrategyReplyError, match="node 7.*disk full"):
        strategy.aggregate_train(1, [bad])


def test_shard_ensemble_never_averages(tiny_cfg, grid_for):
    cfg = tiny_cfg()
    grid = grid_for(cfg)
    strategy = ShardEnsemble.from_config(cfg, 10)
    result = strategy.start(grid=site_grid(grid, cfg), initial_arrays=ArrayRecord(), num_rounds=strategy.num_rounds())
    states = strategy.ensemble_states(result.arrays)
    assert sorted(states) == list(range(cfg.num_shards))
    w0, w1 = states[0]["fc.weight"], states[1]["fc.weight"]
    assert not (w0 == w1).all()
    # each constituent is exactly its node's last SISA checkpoint
    for node_id, shard in grid.nodes.items():
        node_state = grid.node(node_id).sisa.model_state()
        assert all((node_state[k] == states[shard][k]).all() for k in node_state)
    # SISA stages are sent one per round, with no weights going down
    train = [m for m in grid.sent if m.metadata.message_type == keys.MSG_TRAIN]
    stages = sorted({int(m.content[keys.CONFIG][keys.STAGE]) for m in train})
    assert stages == list(range(1, cfg.slices + 1))
    assert all(keys.ARRAYS not in m.content for m in grid.sent)


def test_pack_roundtrip():
    a = ArrayRecord(build_model(10, 4, seed=1).state_dict())
    b = ArrayRecord(build_model(10, 4, seed=2).state_dict())
    out = unpack_shards(pack_shards({3: a, 11: b}))
    assert sorted(out) == [3, 11]
    ref = a.to_torch_state_dict()
    assert all((out[3][k] == ref[k]).all() for k in ref)


@pytest.mark.parametrize("kwargs", [dict(num_shards=0, num_slices=2), dict(num_shards=2, num_slices=0),
                                    dict(num_shards=2, num_slices=2, vote="median")])
def test_constructor_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ShardEnsemble(**kwargs)
