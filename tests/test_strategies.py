"""The contract every registered strategy keeps, run against the real ClientApp handlers in-process."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from fairforget import keys
from fairforget.model import build_model
from fairforget.records import pack_shards, unpack_shards
from server.grid import site_grid
from strategies import STRATEGIES
from strategies.base import StrategyReplyError
from strategies.shard_ensemble import ShardEnsemble


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
