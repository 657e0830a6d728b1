"""The robust FedAvg example (``fairforget_examples.robust_fedavg``): found by its entry-point name,
passes the contract suite in process, aggregates with Flower's own trimmed mean / median / mean (checked
against the coordinate-wise statistics computed here by hand, with a poisoned reply), and refuses bad
options in one line."""

from __future__ import annotations

import numpy as np
import pytest
from fairforget_examples.robust_fedavg import RobustFedAvg
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import strategies
from clients.testing import InProcessGrid, make_tiny_cfg
from fairforget import keys
from fairforget.config import ConfigError
from fairforget.model import build_model
from server.testing import Harness, parametrize_with_checks, trial_cache
from strategies.fedavg import FedAvgBaseline

SHARDS = 5  # odd, so that the median, a trimmed mean and the mean all differ
PARAMETERS = {n for n, _ in build_model(10, 4, seed=0).named_parameters()}


def test_found_by_its_entry_point_name():
    assert strategies.strategy_class("robust-fedavg") is RobustFedAvg


# ---------------------------------------------------------------------- the contract suite
@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    return trial_cache(Harness(make_tiny_cfg, InProcessGrid, tmp_path_factory.mktemp("contract")))


@parametrize_with_checks([RobustFedAvg])
def test_contract_suite(cls, check, trials):
    check(trials(cls))


# ---------------------------------------------------------------------- Flower's aggregation, by hand
def _models() -> tuple[dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """A global model and one model per shard, as numpy arrays."""
    def numpy(seed: int) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in build_model(10, 4, seed=seed).state_dict().items()}

    return numpy(99), {shard: numpy(shard) for shard in range(SHARDS)}


def _record(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in model.items()})


def _aggregate(strategy, tmp_path, global_model, models):
    """``strategy``'s aggregate of one round's replies (``models``, shard -> arrays), the global model
    sent through its ``configure_train``."""
    grid = InProcessGrid(make_tiny_cfg(tmp_path, **{"num-shards": SHARDS}))
    sent = list(strategy.configure_train(1, _record(global_model), ConfigRecord(), grid))
    replies = []
    for msg in sorted(sent, key=lambda m: m.metadata.dst_node_id):  # Flower samples nodes in random order
        shard = grid.nodes[msg.metadata.dst_node_id]
        replies.append(Message(RecordDict({
            keys.ARRAYS: _record(models[shard]),
            keys.METRICS: MetricRecord({keys.SHARD: shard, keys.NUM_EXAMPLES: 10 + 7 * shard}),
            keys.CONFIG: ConfigRecord({keys.SHARD: shard})}), reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def _strategy(**kwargs) -> RobustFedAvg:
    return RobustFedAvg(SHARDS, 1, 1, 0, 4, **kwargs)


@pytest.mark.parametrize("attack", ["sign-flip", "noise"])
@pytest.mark.parametrize(("aggregator", "trim"), [("trimmed-mean", 0.0), ("trimmed-mean", 0.2),
                                                  ("trimmed-mean", 0.4), ("median", 0.25), ("mean", 0.25)])
def test_aggregate_is_the_coordinatewise_statistic_of_the_poisoned_replies(aggregator, trim, attack, tmp_path):
    """One Byzantine node of 5 (shard 4, the highest): the aggregate is the coordinate-wise trimmed mean
    (dropping int(trim * 5) values at each end), median, or example-weighted mean of the four honest
    models and the poisoned one, computed here from the global model the strategy sent."""
    g, models = _models()
    got = _aggregate(_strategy(aggregator=aggregator, trim_fraction=trim, byzantine_nodes=1, byzantine_attack=attack,
                               byzantine_scale=4.0), tmp_path, g, models)
    noise = np.random.default_rng([0, 1, SHARDS - 1])  # seed, round, shard
    sent = dict(models)
    sent[SHARDS - 1] = {k: ((g[k] - 4.0 * (w - g[k]) if attack == "sign-flip" else
                             g[k] + 4.0 * noise.standard_normal(w.shape)).astype(w.dtype) if k in PARAMETERS else w)
                        for k, w in models[SHARDS - 1].items()}
    weights = np.array([10 + 7 * s for s in range(SHARDS)], dtype=np.float64)
    cut = int(trim * SHARDS)
    for key in g:
        stack = np.stack([sent[s][key] for s in range(SHARDS)]).astype(np.float64)
        ordered = np.sort(stack, axis=0)
        expected = {"trimmed-mean": ordered[cut:SHARDS - cut].mean(0), "median": ordered[SHARDS // 2],
                    "mean": np.tensordot(weights / weights.sum(), stack, axes=1)}[aggregator]
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)
    if aggregator != "mean" and cut != 0:  # the robust rules ignore the poisoned extreme; the mean does not
        mean = np.tensordot(weights / weights.sum(), np.stack([sent[s]["fc.weight"] for s in range(SHARDS)]), axes=1)
        assert np.abs(got["fc.weight"] - mean).max() > 0.05


def test_the_mean_without_attack_is_fedavg(tmp_path):
    """``aggregator = "mean"`` with no Byzantine node aggregates exactly as the fedavg baseline."""
    g, models = _models()
    robust = _aggregate(_strategy(aggregator="mean"), tmp_path, g, models)
    plain = _aggregate(FedAvgBaseline(SHARDS, 1, 1, 0, 4), tmp_path, g, models)
    assert robust.keys() == plain.keys() and all(np.array_equal(robust[k], plain[k]) for k in plain)


def test_the_attack_poisons_only_the_highest_shards(tmp_path):
    """Two Byzantine nodes are shards 3 and 4; the honest shards and the BatchNorm statistics are untouched."""
    strategy = _strategy(byzantine_nodes=2, byzantine_attack="noise")
    assert [s for s in range(SHARDS) if strategy.byzantine(s)] == [3, 4]
    g, models = _models()
    strategy.global_model = g
    bad = {k: v.numpy() for k, v in strategy.poisoned(_record(models[4]), 1, 4).items()}
    assert all(np.array_equal(bad[k], models[4][k]) != (k in PARAMETERS) for k in g)


# ---------------------------------------------------------------------- bad options: one line each
@pytest.mark.parametrize(("options", "expected"), [
    ('{"trim-fraction": 0.5}', "option 'trim-fraction' of strategy 'robust-fedavg' = 0.5: must be in [0, 0.5)"),
    ('{"trim-fraction": -0.1}', "option 'trim-fraction' of strategy 'robust-fedavg' = -0.1: must be in [0, 0.5)"),
    ('{"aggregator": "krum"}', "option 'aggregator' of strategy 'robust-fedavg' = 'krum': must be one of mean, "
                               "trimmed-mean, median"),
    ('{"byzantine-nodes": 2}', "option 'byzantine-nodes' of strategy 'robust-fedavg' = 2: must be in [0, num-shards"),
    ('{"byzantine-attack": "flip"}', "option 'byzantine-attack' of strategy 'robust-fedavg' = 'flip': must be one of"),
    ('{"byzantine-scale": -1}', "option 'byzantine-scale' of strategy 'robust-fedavg' = -1.0: must be >= 0"),
    ('{"trim-fraction": "0.2"}', "option 'trim-fraction' of strategy 'robust-fedavg' = '0.2': expected float"),
    ('{"beta": 0.2}', "strategy 'robust-fedavg' has no option 'beta'"),
])
def test_a_bad_option_is_one_line(options, expected, tmp_path):
    cfg = make_tiny_cfg(tmp_path, strategy="robust-fedavg", **{"strategy-options": options})
    with pytest.raises(ConfigError) as err:
        strategies.build_strategy(cfg, 10)
    message = str(err.value)
    assert message.startswith("config key 'strategy-options'") and expected in message and "\n" not in message, message
