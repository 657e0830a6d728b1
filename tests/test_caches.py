"""The worker's caches (issue 27): a node kept across messages (:meth:`clients.node.Node.cached`) and a
shard's last checkpoint kept in memory (:meth:`fairforget.sisa.SisaShard.checkpoint`) give the same
models and deletions as fresh nodes, equal to the from-scratch replay; a state changed on disk by
another process is seen and the node rebuilt."""

import dataclasses

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

import fairforget.sisa
from clients import handlers
from clients import node as node_mod
from clients.node import Node
from clients.testing import make_tiny_cfg
from fairforget import keys
from fairforget.data import load_dataset, shard_of
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.storage import read_json, state_hash
from fairforget.unlearning import EXACT


@pytest.fixture(autouse=True)
def empty_cache():
    node_mod._NODES.clear()
    yield
    node_mod._NODES.clear()


def _train(shard, stage):
    return RecordDict({keys.CONFIG: ConfigRecord({keys.SHARD: shard, keys.TRAIN_MODE: keys.TRAIN_MODE_SISA,
                                                  keys.STAGE: stage, keys.SERVER_ROUND: stage})})


def _unlearn(shard, ids):
    return RecordDict({keys.CONFIG: ConfigRecord({keys.SHARD: shard, keys.FORGET_IDS: ids,
                                                  keys.UNLEARN_METHOD: EXACT})})


def _federation(cfg, node_for):
    """Every SISA stage of every shard, then one deletion from shard 1: the replies' model hashes."""
    out = [str(handlers.train(_train(k, stage), node_for(cfg, k))[keys.CONFIG][keys.MODEL_HASH])
           for stage in range(1, cfg.slices + 1) for k in range(cfg.num_shards)]
    victim = int(shard_of(cfg, load_dataset(cfg))[1].ids[0])
    reply = handlers.unlearn(_unlearn(1, [victim]), node_for(cfg, 1))
    out.append(state_hash(reply[keys.ARRAYS].to_torch_state_dict()))
    assert victim not in node_for(cfg, 1).data.ids.tolist()  # a node's data leaves its deleted records out
    out.append(str(handlers.train(_train(1, cfg.slices), node_for(cfg, 1))[keys.CONFIG][keys.MODEL_HASH]))
    return out


def _fresh(cfg, k):
    return Node.from_context(cfg.to_mapping(), {}, k)


def _cached(cfg, k):
    return Node.cached(cfg.to_mapping(), {}, k)


def test_cached_nodes_train_and_forget_as_fresh_ones_and_as_the_replay(tmp_path, monkeypatch):
    reads = []
    real = fairforget.sisa.torch_load
    monkeypatch.setattr(fairforget.sisa, "torch_load", lambda path: reads.append(path) or real(path))
    fresh_cfg = make_tiny_cfg(tmp_path / "fresh")
    fresh = _federation(fresh_cfg, _fresh)
    fresh_reads = len(reads)
    reads.clear()
    cached_cfg = make_tiny_cfg(tmp_path / "cached")
    cached = _federation(cached_cfg, _cached)
    assert cached == fresh  # every stage's model, the deletion's and the re-sent round's
    assert len(reads) < fresh_reads / 2  # the caches were used: checkpoints come from memory
    # the deletion equals training shard 1 from scratch without the id
    bundle = load_dataset(cached_cfg)
    index = read_json(cached_cfg.out_path / "nodes" / "shard-1" / "index.json")
    settings = SisaSettings.from_config(cached_cfg, bundle.num_classes, bundle.num_private)
    replay = SisaShard(tmp_path / "replay", 1, shard_of(cached_cfg, bundle)[1], settings, slices=index["slices"])
    replay.train_through()
    assert replay.model_hash() == cached[-1] and cached[-1] != cached[2 * cached_cfg.num_shards - 1]


def test_a_state_changed_by_another_process_is_seen_and_reloaded(tmp_path):
    cfg = make_tiny_cfg(tmp_path / "run")
    kept = _cached(cfg, 0)
    handlers.train(_train(0, 1), kept)
    assert _cached(cfg, 0) is kept  # kept across messages
    # another process (its own node, from disk) trains stage 2 and deletes a sample of shard 0
    other = _fresh(cfg, 0)
    handlers.train(_train(0, 2), other)
    victim = int(other.sisa.index["slices"][0][0])
    on_disk = state_hash(handlers.unlearn(_unlearn(0, [victim]), _fresh(cfg, 0))[keys.ARRAYS].to_torch_state_dict())
    assert kept.sisa.trained == 1 and victim in kept.data.ids.tolist()  # what the kept node still believes
    # a re-sent stage-2 message to the kept node: rebuilt from disk, answered from its checkpoint
    reply = handlers.train(_train(0, 2), _cached(cfg, 0))
    assert str(reply[keys.CONFIG][keys.MODEL_HASH]) == on_disk
    now = _cached(cfg, 0)
    assert now is not kept and now.sisa.trained == 2 and victim not in now.data.ids.tolist()
    assert now.sisa.index["version"] == _fresh(cfg, 0).sisa.index["version"]


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRFORGET_NODE_CACHE", "0")
    cfg = make_tiny_cfg(tmp_path / "run")
    assert _cached(cfg, 0) is not _cached(cfg, 0)


def test_the_evaluation_scores_only_the_models_that_changed(tmp_path):
    from fairforget.model import build_model
    from fairforget.storage import atomic_torch_save, torch_load
    from server.evaluation import evaluate_states

    cfg = make_tiny_cfg(tmp_path / "run")
    full = load_dataset(cfg)
    bundle = dataclasses.replace(full, test_biased=full.test_biased.subset(list(range(40))),
                                 test_unbiased=full.test_unbiased.subset(list(range(80))))
    states = {k: build_model(bundle.num_classes, cfg.model_width, seed=k).state_dict() for k in range(2)}
    cache = tmp_path / "eval-cache.pt"
    plain = evaluate_states(states, bundle, cfg)
    assert evaluate_states(states, bundle, cfg, cache=cache) == plain  # computed and kept
    assert evaluate_states(states, bundle, cfg, cache=cache) == plain  # read back
    # plant outputs for shard 0's model in the file: an unchanged model is read from it, never rescored
    kept = torch_load(cache)
    mine = [key for key in kept if key.startswith(state_hash(states[0]))]
    atomic_torch_save(cache, {**kept, **{key: torch.nn.functional.one_hot(torch.zeros(len(kept[key]), dtype=torch.long),
                                                                          bundle.num_classes).float() for key in mine}})
    read = evaluate_states(states, bundle, cfg, cache=cache)
    assert read["unbiased"]["per_model_accuracy"][0] == float((bundle.test_unbiased.y == 0).float().mean())
    assert read["unbiased"]["per_model_accuracy"][1] == plain["unbiased"]["per_model_accuracy"][1]
    # a retrained shard (another model hash) is scored again
    states[0] = build_model(bundle.num_classes, cfg.model_width, seed=7).state_dict()
    assert evaluate_states(states, bundle, cfg, cache=cache) == evaluate_states(states, bundle, cfg)
