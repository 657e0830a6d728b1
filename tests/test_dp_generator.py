"""Differentially private generators: the per-shard diffusion model trained with DP-SGD (Opacus
per-sample gradients, Poisson batches, the shard's accountant and hard stop), and a deletion that
keeps a DP generator and its samples. Tiny UNets (8 px, width 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.node import Node
from fairforget import keys
from fairforget.data.base import SYNTHETIC_ID_BASE
from fairforget.diffusion import generator as generator_module
from fairforget.diffusion.generator import (
    ConditionalGenerator,
    GeneratorError,
    GeneratorSettings,
    check_dp_trainable,
    per_sample_module,
    sample,
    train_generator,
)
from fairforget.privacy import DPSettings, PrivacyBudgetExceeded, ShardAccountant, epsilon_of

SETTINGS = GeneratorSettings(image_size=8, num_classes=3, num_private=2, width=8, train_steps=20, batch_size=16,
                             ddim_steps=2)
DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp", max_epsilon=1e4)
N = 48


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (two threads on a busy 2-core machine are many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 3, 8, 8, generator=g), torch.arange(N) % 3, torch.arange(N) % 2


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_dp_training_is_accounted_replayable_and_leaves_a_plain_model(tmp_path):
    x, y, a = _data()
    acc = ShardAccountant(0, "rdp", DP.delta, history=[(1.0, 0.1, 30)])  # the shard's SISA spend so far
    before = acc.epsilon()
    model = train_generator(x, y, a, SETTINGS, seed=5, dp=DP, accountant=acc)
    q = SETTINGS.batch_size / N
    assert acc.history == [(1.0, 0.1, 30), (DP.noise_multiplier, q, SETTINGS.train_steps)]
    assert acc.epsilon() > before
    own = epsilon_of("rdp", [(DP.noise_multiplier, q, SETTINGS.train_steps)], DP.delta)
    assert model.privacy["dp"] and model.privacy["epsilon"] == pytest.approx(own)
    assert model.privacy["steps"] == SETTINGS.train_steps and model.privacy["sample_rate"] == pytest.approx(q)
    # Opacus is gone again: no per-sample state, no hooks, samples as from any generator
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules())
    assert sample(model, y[:4], a[:4], seed=1).shape == (4, 3, 8, 8)
    # the guarantee travels with the saved generator
    model.save(tmp_path / "gen", {"version": 1})
    again, meta = ConditionalGenerator.load(tmp_path / "gen")
    assert again.privacy["epsilon"] == pytest.approx(own) and meta["privacy"]["dp"]

    # the noise is the site's secret: whoever knows the run seed (the server, another site) cannot
    # train the same generator again, so cannot subtract its noise
    first = _state(model)
    again = _state(train_generator(x, y, a, SETTINGS, seed=5, dp=DP))
    assert not all(torch.equal(first[k], again[k]) for k in first)
    plain = _state(train_generator(x, y, a, SETTINGS, seed=5))  # and DP is not the plain training
    assert not all(torch.equal(first[k], plain[k]) for k in first)


def test_hard_stop_refuses_before_training(monkeypatch):
    x, y, a = _data()
    acc = ShardAccountant(0, "rdp", DP.delta, history=[(1.0, 0.1, 30)])
    planned = [(DP.noise_multiplier, SETTINGS.batch_size / N, SETTINGS.train_steps)]
    cap = (acc.epsilon() + acc.epsilon(planned)) / 2  # above the spend so far, below spend + generator
    monkeypatch.setattr(generator_module, "_setup", lambda *a, **k: pytest.fail("built a model past the cap"))
    dp = DPSettings(DP.noise_multiplier, DP.max_grad_norm, DP.delta, "rdp", cap)
    with pytest.raises(PrivacyBudgetExceeded, match="generator training.*nothing was trained"):
        train_generator(x, y, a, SETTINGS, seed=5, dp=dp, accountant=acc)
    assert acc.history == [(1.0, 0.1, 30)]


def test_every_parameter_gets_exact_per_sample_gradients():
    """Opacus' hooks give every trainable parameter of the UNet (its mid-block attention included)
    and of the label embedding the gradient of that sample's own loss (float64, to rounding)."""
    torch.manual_seed(0)
    model = ConditionalGenerator(GeneratorSettings(image_size=8, num_classes=3, num_private=2, width=8)).double()
    b = 4
    x = torch.randn(b, 3, 8, 8, dtype=torch.double)
    noise = torch.randn_like(x)
    t = torch.tensor([0, 250, 600, 999])
    y, a = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 1])  # null rows too
    own = []
    for i in range(b):
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x[i : i + 1], t[i : i + 1], y[i : i + 1], a[i : i + 1]), noise[i : i + 1]).backward()
        own.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    gsm, handles = per_sample_module(model)
    try:
        F.mse_loss(gsm(x, t, y, a), noise).backward()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(".attentions." in n for n in names) and any(n.startswith("labels.") for n in names)
        for name, p in model.named_parameters():
            assert p.grad_sample.shape == (b, *p.shape), name
            for i in range(b):
                torch.testing.assert_close(p.grad_sample[i], own[i][name], rtol=1e-9, atol=1e-12, msg=name)
    finally:
        for h in handles:
            h.remove()
        gsm._close()


def test_wrong_per_sample_gradients_are_refused(monkeypatch):
    """Without the contiguity fix Opacus' conv grad sampler misreads the channels-last activations
    after the attention block; the first DP step sees it and refuses instead of claiming a guarantee."""
    x, y, a = _data()
    monkeypatch.setattr(generator_module, "_contiguous_conv_inputs", lambda model: [])
    acc = ShardAccountant(0, "rdp", DP.delta)
    with pytest.raises(GeneratorError, match=r"cannot be trained with DP-SGD.*mid_block\.resnets\.1\.conv"):
        train_generator(x, y, a, SETTINGS, seed=5, dp=DP, accountant=acc)
    assert acc.history == []  # nothing recorded for a training that did not finish
    with pytest.raises(GeneratorError, match="cannot be trained with DP-SGD"):
        check_dp_trainable(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))  # mixes a batch's samples


def test_empty_poisson_batches_are_noise_only_steps_and_count():
    x, y, a = _data()
    settings = GeneratorSettings(image_size=8, num_classes=3, num_private=2, width=4, train_steps=12, batch_size=1)
    acc = ShardAccountant(0, "rdp", DP.delta)
    model = train_generator(x, y, a, settings, seed=1, dp=DP, accountant=acc)  # q = 1/48: many empty batches
    assert model.privacy["empty_batches"] > 0
    assert acc.history == [(DP.noise_multiplier, 1 / N, 12)]


def test_forget_keeps_a_dp_generator_and_its_samples(tiny_cfg):
    cfg = tiny_cfg(**{"augment": True, "augment-kl-threshold": 0.3, "augment-steps": 1, "diffusion-width": 8,
                      "diffusion-train-steps": 20, "diffusion-batch-size": 16, "ddim-steps": 2,
                      "dp": True, "dp-accountant": "rdp", "dp-max-epsilon": 1000.0})
    context = {keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: cfg.num_shards}
    node = Node.from_context(cfg.to_mapping(), context)
    node.sisa.train_through()
    sisa_spend = list(node.sisa.accountant.history)
    report = node.augmenter.step(0, 0, None)
    assert report["generated"] > 0

    node = Node.from_context(cfg.to_mapping(), context)  # a new message: everything from the state folder
    store = node.augment_store
    assert store.state["generator_dp"] and 0 < store.state["generator_epsilon"] < cfg.dp_max_epsilon
    q = cfg.diffusion_batch_size / len(node.data)
    history = node.sisa.accountant.history  # the SISA stages, the generator, the retraining with its samples
    assert history[: len(sisa_spend) + 1] == [*sisa_spend, (cfg.dp_noise_multiplier, q, cfg.diffusion_train_steps)]
    synth_ids = set(store.synthetic((3, 8, 8))[0].ids.tolist())
    victim = sorted(i for i in node.sisa.live_ids() if i < SYNTHETIC_ID_BASE)[0]
    assert victim in store.state["generator_trained_on"] and synth_ids <= node.sisa.live_ids()

    result = node.augmenter.forget([victim])
    aug = result.augment
    assert aug["generator_invalidated"] is False and aug["generator_kept"] == "dp"
    assert aug["generator_epsilon"] == pytest.approx(store.state["generator_epsilon"])
    assert aug["generator_delta"] == cfg.dp_delta and aug["synthetic_dropped"] == 0

    node = Node.from_context(cfg.to_mapping(), context)
    store = node.augment_store
    live = node.sisa.live_ids()
    assert victim not in live and victim in store.deleted  # the original left the index...
    for path in (node.state_dir / "checkpoints").glob("stage-*.pt"):
        assert victim not in set(torch.load(path, weights_only=True)["ids"].tolist())  # ...and every checkpoint
    assert synth_ids <= live and set(store.synthetic((3, 8, 8))[0].ids.tolist()) == synth_ids  # samples kept
    assert store.state["generator_valid"] and store.state["generator_version"] == 1 and store.generator_dir.is_dir()
    kept, _ = ConditionalGenerator.load(store.generator_dir)
    assert kept.privacy["dp"] and np.isclose(kept.privacy["epsilon"], store.state["generator_epsilon"])
