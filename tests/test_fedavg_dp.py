"""FedAvg under user-level DP through Flower's fixed-clipping wrappers (``strategies/fedavg_dp.py``)
and the ClientApp's clipping mod (``clients/app.py``), run in-process against the real handlers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients import handlers
from clients.app import app
from fairforget import keys
from fairforget.config import ConfigError, resolve
from server.grid import site_grid
from strategies import build_strategy
from strategies.base import StrategyReplyError
from strategies.fedavg import FedAvgBaseline
from strategies.fedavg_dp import FedAvgUserDP
from strategies.shard_ensemble import ShardEnsemble

SEED = ConfigRecord({keys.SEED: 0})


def dp_cfg(tiny_cfg, **overrides):
    values = {"strategy": "fedavg", "dp": True, "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0,
              "dp-accountant": "rdp", **overrides}
    return tiny_cfg(**values)


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.to_numpy_ndarrays()]).astype(np.float64)


@pytest.fixture
def recording_grid(grid_for):
    """``grid_for``'s Grid that keeps (message, reply arrays as they arrived) for every exchange.
    ``through_app=True`` delivers to the real ClientApp, mods included, instead of the bare handlers."""

    class Recording(grid_for):
        def __init__(self, cfg, through_app: bool = False) -> None:
            super().__init__(cfg)
            self.through_app = through_app
            self.exchanges: list[tuple[Message, ArrayRecord | None]] = []

        def reply(self, msg):
            r = self.via_app(msg) if self.through_app else super().reply(msg)
            if msg.metadata.message_type != keys.MSG_IDENTIFY:  # the grid's query.identify: not an exchange here
                self.exchanges.append((msg, None if r.has_error() else r.content.get(keys.ARRAYS)))
            return r

        @property
        def trains(self) -> list[Message]:
            return [m for m in self.sent if m.metadata.message_type == keys.MSG_TRAIN]

        def via_app(self, msg: Message) -> Message:
            node_config = {keys.NODE_PARTITION_ID: self.nodes[msg.metadata.dst_node_id],
                           keys.NODE_NUM_PARTITIONS: self.cfg.num_shards}
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config=node_config,
                              state=RecordDict(), run_config=self.cfg.to_mapping())
            try:
                return app(msg, context)
            except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    return Recording


# ---------------------------------------------------------------------- (a) server-side clipping
def test_server_side_dp_adds_calibrated_noise_and_reports_a_growing_spend(tiny_cfg, recording_grid):
    cfg = dp_cfg(tiny_cfg, rounds=2)
    strategy = build_strategy(cfg, 10)
    assert isinstance(strategy, FedAvgUserDP) and strategy.name == "fedavg" and not strategy.exact_unlearning
    grid = recording_grid(cfg)
    seen = {}

    def evaluate_fn(server_round, arrays):
        seen[server_round] = (arrays, strategy.privacy_summary())
        return None

    initial = strategy.initial_arrays(10)
    result = strategy.start(grid=site_grid(grid, cfg), initial_arrays=initial, num_rounds=strategy.num_rounds(),
                            train_config=SEED, evaluate_fn=evaluate_fn)
    assert len(grid.trains) == 2 * cfg.num_shards
    assert all(m.content[keys.CONFIG][keys.TRAIN_MODE] == keys.TRAIN_MODE_LOCAL for m in grid.trains)
    assert all(KEY_CLIPPING_NORM not in m.content[keys.CONFIG] for m in grid.trains)  # the server clips
    assert set(strategy.shard_reports) == set(range(cfg.num_shards))
    state = strategy.ensemble_states(result.arrays)[0]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not any("running" in k for k in state)  # GroupNorm: nothing but weights gets the noise

    # round 1: the model is the uniform mean of the clipped updates plus N(0, (sigma C / n)^2) per weight
    start, clip, n = flat(initial), cfg.dp_max_grad_norm, cfg.num_shards
    updates = [flat(arrays) - start for _, arrays in grid.exchanges[:n]]
    clipped = [u * min(1.0, clip / np.linalg.norm(u)) for u in updates]
    noise = flat(seen[1][0]) - (start + np.mean(clipped, axis=0))
    std = cfg.dp_noise_multiplier * clip / n
    assert noise.size > 1000
    assert abs(noise.std() / std - 1) < 0.1
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)

    # the spend: one Gaussian release per round, growing, and Flower's RDP accountant agrees
    assert seen[0][1]["rounds"] == 0 and seen[0][1]["epsilon"] == 0.0
    eps = [seen[r][1]["epsilon"] for r in (1, 2)]
    assert 0 < eps[0] < eps[1] < math.inf
    final = strategy.privacy_summary()
    assert final["rounds"] == 2 and final["steps"] == 2 and final["epsilon"] == eps[1]
    assert final["mechanism"] == "user-level DP (Flower server-side fixed clipping)"
    assert (final["noise_multiplier"], final["clipping_norm"], final["delta"]) == (1.0, 1.0, cfg.dp_delta)
    assert final["flower"]["releases"] == 2
    assert final["flower"]["epsilon"] == pytest.approx(final["epsilon"], rel=1e-3)
    assert 0 < final["tpr_bound"]["0.01"] < 1


def test_spend_is_reported_with_the_runs_accountant(tiny_cfg):
    strategy = build_strategy(dp_cfg(tiny_cfg, **{"dp-accountant": "prv"}), 10)
    strategy.history = [(1.0, 1.0, 1)] * 3
    summary = strategy.privacy_summary()
    assert summary["accountant"] == "prv" and summary["rounds"] == 3
    assert 0 < summary["epsilon"] <= strategy.planned_epsilon(3) + 1e-9  # PRV is at least as tight as RDP


# ---------------------------------------------------------------------- (b) client-side clipping
def test_client_side_clipping_mod_clips_local_updates(tiny_cfg, recording_grid):
    clip = 0.05
    cfg = dp_cfg(tiny_cfg, rounds=1, **{"dp-fedavg-clipping": "client", "dp-max-grad-norm": clip})
    strategy = build_strategy(cfg, 10)
    grid = recording_grid(cfg, through_app=True)
    result = strategy.start(grid=site_grid(grid, cfg), initial_arrays=strategy.initial_arrays(10), num_rounds=1,
                            train_config=SEED)
    assert result.arrays is not None and len(grid.exchanges) == cfg.num_shards
    for msg, arrays in grid.exchanges:
        assert msg.content[keys.CONFIG][KEY_CLIPPING_NORM] == clip
        assert arrays is not None, "the ClientApp answered with an error"
        sent = flat(msg.content[keys.ARRAYS])
        assert np.linalg.norm(flat(arrays) - sent) <= clip * (1 + 1e-4)
        unclipped = flat(handlers.train(msg.content, grid.node(msg.metadata.dst_node_id))[keys.ARRAYS])
        assert np.linalg.norm(unclipped - sent) > 2 * clip  # so the mod did clip
    assert strategy.privacy_summary()["mechanism"] == "user-level DP (Flower client-side fixed clipping)"


def test_clipping_mod_leaves_other_messages_alone(tiny_cfg, recording_grid):
    cfg = tiny_cfg()  # shard ensemble: SISA stages through the ClientApp
    grid = recording_grid(cfg, through_app=True)
    strategy = ShardEnsemble.from_config(cfg, 10)
    strategy.start(grid=site_grid(grid, cfg), initial_arrays=ArrayRecord(), num_rounds=1)
    for msg, arrays in grid.exchanges:
        assert arrays is not None, "a SISA train message failed through the ClientApp"
        node_state = grid.node(msg.metadata.dst_node_id).sisa.model_state(1)
        assert all(torch.equal(node_state[k], v) for k, v in arrays.to_torch_state_dict().items())
    node_id = next(iter(grid.nodes))
    # a clipping norm on a SISA stage is refused, not ignored
    sisa = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.TRAIN_MODE: keys.TRAIN_MODE_SISA, keys.STAGE: 1,
                                                          KEY_CLIPPING_NORM: 1.0})}),
                   dst_node_id=node_id, message_type=keys.MSG_TRAIN)
    reply = grid.via_app(sisa)
    assert reply.has_error() and "clipping" in reply.error.reason
    # other handlers carry no mod at all
    describe = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.FORGET_IDS: [0], KEY_CLIPPING_NORM: 1.0,
                                                              keys.SHARD: grid.nodes[node_id]})}),
                       dst_node_id=node_id, message_type=keys.MSG_DESCRIBE)
    assert not grid.via_app(describe).has_error()


# ---------------------------------------------------------------------- (c) dp = false is plain FedAvg
def test_without_dp_fedavg_is_unchanged(tiny_cfg, recording_grid):
    cfg = tiny_cfg(strategy="fedavg")
    built = build_strategy(cfg, 10)
    assert type(built) is FedAvgBaseline and built.privacy_summary() is None
    plain = FedAvgBaseline(cfg.num_shards, cfg.rounds, cfg.local_epochs, cfg.seed, cfg.model_width)
    states = []
    for strategy, through_app in ((built, True), (plain, False)):  # the ClientApp's mod is a no-op here
        grid = recording_grid(cfg, through_app=through_app)
        result = strategy.start(grid=site_grid(grid, cfg), initial_arrays=strategy.initial_arrays(10),
                                num_rounds=cfg.rounds, train_config=SEED)
        assert all(arrays is not None for _, arrays in grid.exchanges)
        states.append(strategy.ensemble_states(result.arrays)[0])
    assert states[0].keys() == states[1].keys() and "encoder.1.running_var" in states[0]  # BatchNorm, as before
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---------------------------------------------------------------------- (d) configuration
def test_bad_clipping_side_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        resolve({"dp-fedavg-clipping": "both"})
    assert "'dp-fedavg-clipping' = 'both': must be one of server, client" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dp-noise-multiplier": 0.0}, "'dp-noise-multiplier' = 0"),
    ({"dp-noise-multiplier": 0.3, "dp-max-epsilon": 5.0}, "'dp-max-epsilon' = 5: fedavg with user-level DP would"),
    ({"dp-secure-mode": True}, "'dp-secure-mode' = true"),
])
def test_unaffordable_or_unsupported_dp_is_refused_before_training(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        build_strategy(dp_cfg(tiny_cfg, **overrides), 10)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_error_and_missing_replies_are_raised(tiny_cfg):
    strategy = build_strategy(dp_cfg(tiny_cfg), 10)
    msg = Message(RecordDict(), dst_node_id=7, message_type=keys.MSG_TRAIN)
    with pytest.raises(StrategyReplyError, match="node 7 failed: disk full"):
        strategy.aggregate_train(1, [Message(Error(code=1, reason="disk full"), reply_to=msg)])
