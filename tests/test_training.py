"""The training engine (fairforget/training.py): its loop, the objective registry's contract, the
optimizer factory and the privacy hook; an objective that owns trainable parts keeps SISA exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairforget import objectives
from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.model import build_model
from fairforget.objectives import OBJECTIVES, Objective, ObjectiveContext, build_objective
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.training import Batch, OptimizerSpec, train
from fairforget.unlearning.exact import unlearn


@pytest.fixture(scope="module")
def data():
    from fairforget.config import resolve

    cfg = resolve({"image-size": 8, "num-shards": 4})
    return shard_of(cfg, load_dataset(cfg))[0]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _fit(data, seeds, objective=None):
    model = build_model(10, 4, seed=3)
    objective = objective or build_objective("cross-entropy", ObjectiveContext(10))
    result = train(model, data, seeds=seeds, batch_size=32, objective=objective,
                   optimizer=OptimizerSpec(lr=0.01).build(model, objective))
    return model, result


def test_engine_is_the_plain_loop_bit_for_bit(data):
    """The engine changes nothing: the same weights as a hand-written Adam loop over the seeded
    permutations (the loop every training used before the engine)."""
    model, result = _fit(data, [5, 6])
    ref = build_model(10, 4, seed=3)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    ref.train()
    for seed in (5, 6):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(perm), 32):
            idx = perm[start : start + 32]
            loss = F.cross_entropy(ref(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert _same(_state(model), _state(ref))
    assert result.steps == 2 * -(-len(data) // 32) and result.samples == len(data) and result.loss > 0
    assert not _same(_state(model), _state(_fit(data, [5, 7])[0]))  # the seeds matter


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_contract(name, data):
    """Every registered objective: a finite scalar whose gradient reaches the encoder."""
    objective = build_objective(name, ObjectiveContext(10, 10, 32))
    assert objective.name == name and isinstance(objective, Objective)
    model = build_model(10, 4, seed=0)
    batch = Batch(data.x[:16], data.y[:16], data.private[:16], data.ids[:16])
    loss = objective.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder[0].weight.grad is not None and model.encoder[0].weight.grad.abs().sum() > 0


class ProjectionHead(Objective):
    """A test objective with a trainable part of its own (as EnD or RUBi would have)."""

    name = "test-projection"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.head = nn.Linear(ctx.bottleneck_dim, ctx.num_private)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        feats = model.features(batch.x)
        return F.cross_entropy(model.fc(feats), batch.y) + 0.1 * F.cross_entropy(self.head(feats), batch.private)


def test_an_objectives_own_parts_are_trained_checkpointed_and_exactly_unlearned(monkeypatch, tiny_cfg, tmp_path):
    monkeypatch.setitem(OBJECTIVES, ProjectionHead.name, ProjectionHead)
    cfg = tiny_cfg(objective=ProjectionHead.name, slices=2)
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    shard = SisaShard(tmp_path / "a", 0, data, settings)
    initial = _state(shard.load_stage(0)[1])
    shard.train_through()
    ckpt = torch.load(shard.checkpoint_path(2), weights_only=True)
    assert set(ckpt["objective"]) == {"head.weight", "head.bias"}
    assert not torch.equal(ckpt["objective"]["head.weight"], initial["head.weight"])  # the optimizer trained it
    assert len(ckpt["optimizer"]["param_groups"]) == 2
    original = [list(s) for s in shard.index["slices"]]
    victim = original[1][0]
    unlearn(shard, [victim])
    scratch = SisaShard(tmp_path / "b", 0, data, settings, slices=[[i for i in s if i != victim] for s in original])
    scratch.train_through()
    assert shard.model_hash() == scratch.model_hash()
    a = torch.load(shard.checkpoint_path(2), weights_only=True)["objective"]
    b = torch.load(scratch.checkpoint_path(2), weights_only=True)["objective"]
    assert _same(a, b)


class RecordingPrivacy:
    """A stand-in privacy engine: it sees model, optimizer and loader, keeps every other batch, and
    reports what it 'spent'."""

    name = "recording"

    def __init__(self) -> None:
        self.attached: tuple | None = None
        self.batches = 0

    def attach(self, model, optimizer, loader):
        self.attached = (model, optimizer, loader)
        hook = self

        class EveryOther:
            def __iter__(self):
                for i, batch in enumerate(loader):
                    if i % 2 == 0:
                        hook.batches += 1
                        yield batch

        return model, optimizer, EveryOther()

    def spent(self):
        return {"epsilon": float(self.batches)}

    def close(self):
        self.closed = True


def test_privacy_hook_wraps_the_loop_and_reports_its_spend(data):
    model = build_model(10, 4, seed=3)
    objective = build_objective("cross-entropy", ObjectiveContext(10))
    opt = OptimizerSpec(lr=0.01).build(model)
    privacy = RecordingPrivacy()
    result = train(model, data, seeds=[1], batch_size=32, objective=objective, optimizer=opt, privacy=privacy)
    assert privacy.attached[0] is model and privacy.attached[1] is opt
    batches = math.ceil(len(data) / 32)
    assert result.steps == privacy.batches == math.ceil(batches / 2)
    assert result.privacy == {"epsilon": float(privacy.batches)} and privacy.closed


def test_optimizer_factory_and_objective_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        OptimizerSpec(lr=0.1, name="rmsprop")
    with pytest.raises(ValueError, match="need lr > 0"):
        OptimizerSpec(lr=0.0)
    with pytest.raises(ConfigError, match="'objective' = 'focal'"):
        objectives.build_objective("focal", ObjectiveContext(10))
    model, objective = nn.Linear(2, 2), ProjectionHead(ObjectiveContext(10, 2, 2))
    opt = OptimizerSpec(lr=0.1, weight_decay=0.01, name="sgd").build(model, objective)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2 and opt.defaults["weight_decay"] == 0.01
