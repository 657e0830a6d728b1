"""The debiasing objectives (fairforget/objectives/): each one's value on a hand-built batch, its own
parts' gradients, EnD against the linear probe, and the run-config keys' errors. The shared contract
(finite loss, gradient reaches the encoder) is in test_training.py; exact unlearning with every
objective in test_sisa.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairforget.config import ConfigError, resolve
from fairforget.objectives import OBJECTIVES, ObjectiveContext, build_objective
from fairforget.objectives.end import end_terms
from fairforget.objectives.rebias import hsic
from fairforget.objectives.rubi import rubi_logits
from fairforget.training import Batch


class FixedFeatures(nn.Module):
    """A 'model' whose bottleneck is given: features(x) = x, logits = fc(x)."""

    def __init__(self, dim: int, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _batch(x, y, a) -> Batch:
    return Batch(torch.as_tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(a), torch.arange(len(y)))


# ---------------------------------------------------------------------- EnD
def test_end_disentangling_is_zero_for_orthogonal_features_of_one_bias():
    eye = torch.eye(4)
    y, a = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    r_perp, r_par = end_terms(eye, y, a)
    assert r_perp.item() == 0.0
    assert r_par.item() == 0.0  # no pair of one class with two bias values
    # the same bias value, identical features: |G| = 1 on both same-bias pairs
    z = torch.stack([eye[0], eye[0], eye[1], -eye[1]])
    r_perp, _ = end_terms(z, y, a)
    assert r_perp.item() == pytest.approx((1.0 + 1.0) / 2)
    # opposite pairs of one bias value cancel inside |sum|: EnD's absolute value is of the sum
    z = torch.stack([eye[0], -eye[0], eye[0], -eye[0]])
    r_perp, _ = end_terms(z, torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 0]))
    assert r_perp.item() == pytest.approx(abs(-1 + 1 - 1 - 1 + 1 - 1) / 6)


def test_end_entangling_pulls_one_class_across_bias_values():
    eye = torch.eye(2)
    y, a = torch.tensor([0, 0]), torch.tensor([0, 1])
    assert end_terms(torch.stack([eye[0], eye[0]]), y, a)[1].item() == pytest.approx(0.0)  # aligned
    assert end_terms(torch.stack([eye[0], eye[1]]), y, a)[1].item() == pytest.approx(0.5)  # orthogonal
    assert end_terms(torch.stack([eye[0], -eye[0]]), y, a)[1].item() == pytest.approx(1.0)  # opposite


def test_end_loss_is_ce_plus_weighted_terms_on_centred_features():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    batch = _batch(x, [0, 0, 1, 1], [0, 1, 0, 1])
    model = FixedFeatures(2)
    end = build_objective("end", ObjectiveContext(3, 2, 2, {"end-alpha": 0.7, "end-beta": 0.3}))
    z = F.normalize(x - x.mean(0), dim=1)
    r_perp, r_par = end_terms(z, batch.y, batch.private)
    expected = F.cross_entropy(model(x), batch.y) + 0.7 * r_perp + 0.3 * r_par
    assert end.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    assert r_perp.item() > 0 and r_par.item() > 0


# ---------------------------------------------------------------------- RUBi
def test_rubi_masks_the_main_logits_with_the_bias_branch():
    main = torch.tensor([[2.0, -4.0, 6.0]])
    assert torch.allclose(rubi_logits(main, torch.zeros(1, 3)), main / 2)
    assert torch.allclose(rubi_logits(main, torch.full((1, 3), 30.0)), main)
    assert torch.allclose(rubi_logits(main, torch.full((1, 3), -30.0)), torch.zeros(1, 3), atol=1e-10)
    mixed = rubi_logits(main, torch.tensor([[0.0, 30.0, -30.0]]))
    assert torch.allclose(mixed, torch.tensor([[1.0, -4.0, 0.0]]), atol=1e-6)


def test_rubi_loss_is_masked_ce_plus_bias_only_ce():
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    rubi = build_objective("rubi", ObjectiveContext(3, 2, 32))
    rubi.eval()  # BatchNorm on running statistics, so both passes see the same bias logits
    g = rubi.bias_net(x)
    expected = F.cross_entropy(model(x) * torch.sigmoid(g), y) + F.cross_entropy(g, y)
    assert rubi.loss(model, _batch(x, y.tolist(), [0] * 6)).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------- Learned-Mixin + H
def test_learned_mixin_with_a_uniform_bias_expert_is_ce_plus_log_k_terms():
    """A uniform bias expert shifts every logit equally (CE unchanged), its scaled distribution is
    uniform (entropy log K), and its own CE is log K."""
    x = torch.randn(5, 4)
    batch = _batch(x, [0, 1, 2, 0, 1], [0, 1, 0, 1, 0])
    model = FixedFeatures(4)
    lm = build_objective("learned-mixin", ObjectiveContext(3, 2, 4, {"learned-mixin-entropy": 0.25}))
    terms = lm.terms(model, batch)
    assert terms["entropy"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert terms["mixin"].item() == pytest.approx(F.cross_entropy(model(x), batch.y).item(), rel=1e-6)
    expected = F.cross_entropy(model(x), batch.y).item() + 0.25 * math.log(3) + math.log(3)
    assert lm.loss(model, batch).item() == pytest.approx(expected, rel=1e-6)


def test_learned_mixin_entropy_of_the_scaled_bias_expert():
    x = torch.randn(2, 4)
    batch = _batch(x, [0, 1], [1, 1])
    model = FixedFeatures(4)
    lm = build_objective("learned-mixin", ObjectiveContext(3, 2, 4))
    with torch.no_grad():
        lm.bias_table.weight[1] = torch.tensor([2.0, 0.0, -1.0])
        lm.gate.weight.zero_()
        lm.gate.bias.fill_(1.0)
    g = math.log1p(math.e)  # softplus(1)
    log_b = F.log_softmax(torch.tensor([2.0, 0.0, -1.0]), 0)
    p = F.softmax(g * log_b, 0)
    assert lm.terms(model, batch)["entropy"].item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    mixed = F.log_softmax(model(x), 1) + g * log_b
    assert lm.terms(model, batch)["mixin"].item() == pytest.approx(F.cross_entropy(mixed, batch.y).item(), rel=1e-5)


# ---------------------------------------------------------------------- ReBias
def test_hsic_is_zero_against_a_constant_and_larger_for_dependent_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    assert hsic(x, torch.ones(64, 2)).item() == pytest.approx(0.0, abs=1e-7)
    noise = torch.randn(64, 3, generator=gen)
    assert hsic(x, x).item() > 5 * hsic(x, noise).item()


def test_rebias_players_get_their_own_gradients():
    """f descends on +HSIC, g on -HSIC: each HSIC term reaches one player only."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 3
    model = FixedConv()
    rebias = build_objective("rebias", ObjectiveContext(3, 2, 8, {"rebias-lambda": 2.0, "rebias-lambda-g": 0.5}))
    terms = rebias.terms(model, _batch(x, y.tolist(), [0] * 8))
    terms["hsic_f"].backward(retain_graph=True)
    assert model.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in rebias.bias_net.parameters())
    model.zero_grad(set_to_none=True)
    terms["hsic_g"].backward(retain_graph=True)
    assert model.conv.weight.grad is None
    assert rebias.bias_net.encoder[0].weight.grad.abs().sum() > 0
    total = terms["ce"] + terms["bias_ce"] + 2.0 * terms["hsic_f"] - 0.5 * terms["hsic_g"]
    assert rebias.loss(model, _batch(x, y.tolist(), [0] * 8)).item() == pytest.approx(total.item(), rel=1e-5)


class FixedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 3)

    def features(self, x):
        return self.conv(x).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


# ---------------------------------------------------------------------- every objective
@pytest.mark.parametrize("name", sorted(n for n in OBJECTIVES if n != "cross-entropy"))
def test_an_objectives_own_parts_get_gradients(name):
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 3
    objective = build_objective(name, ObjectiveContext(3, 2, 8))
    model = FixedConv()
    objective.loss(model, _batch(x, y.tolist(), (torch.arange(8) % 2).tolist())).backward()
    assert model.conv.weight.grad.abs().sum() > 0
    for pname, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("key", ["end-alpha", "end-beta", "learned-mixin-entropy", "rebias-lambda", "rebias-lambda-g"])
def test_a_negative_weight_is_a_one_line_error_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"^config key '{key}' = -0.5: must be >= 0$"):
        resolve({key: -0.5})
    name = key.rsplit("-", 1)[0] if key.startswith("end") else key.split("-lambda")[0].split("-entropy")[0]
    with pytest.raises(ConfigError, match=f"^config key '{key}' = -0.5: must be >= 0$"):
        build_objective(name, ObjectiveContext(3, 2, 8, {key: -0.5}))


def test_an_unknown_objective_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^config key 'objective' = 'focal': must be one of cross-entropy, end, "
                                          r"learned-mixin, rebias, rubi$"):
        build_objective("focal", ObjectiveContext(3))


# ---------------------------------------------------------------------- EnD against the probe
def test_end_groups_by_the_private_value_of_original_samples_only():
    """A synthetic sample's private label is what its generator was asked for: EnD's terms leave it out
    (it still counts in the cross-entropy)."""
    from fairforget.data.base import SYNTHETIC_ID_BASE

    end = build_objective("end", ObjectiveContext(3, 2, 4, {"end-alpha": 1.0, "end-beta": 1.0}))
    model = FixedFeatures(4)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0]])
    y, a = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1, 1])
    real = Batch(x, y, a, torch.tensor([0, 1, 2, 3]))
    mixed = Batch(x, y, a, torch.tensor([0, 1, SYNTHETIC_ID_BASE, SYNTHETIC_ID_BASE + 1]))
    t_real, t_mixed = end.terms(model, real), end.terms(model, mixed)
    assert t_real["disentangle"].item() > 0.1  # the two identical samples of private value 1
    z = F.normalize(x - x.mean(0, keepdim=True), dim=1)
    expected, _ = end_terms(z[:2], y[:2], a[:2])
    assert t_mixed["disentangle"].item() == pytest.approx(expected.item())
    assert t_mixed["ce"].item() == pytest.approx(t_real["ce"].item())


# ---------------------------------------------------------------------- head refit (EnD)
def _separable(n: int = 60, dim: int = 6, classes: int = 3, seed: int = 0):
    """Features whose first ``classes`` dimensions name the class (a tiny scale, as after EnD's
    normalised terms), the rest noise; a SampleSet whose x *is* the bottleneck (FixedFeatures)."""
    from fairforget.data.base import SampleSet

    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=gen) * 0.01
    x[torch.arange(n), y] += 0.05
    return SampleSet(x, y, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.full((n,), -1))


def test_head_refit_fits_a_lagging_head_on_the_frozen_bottleneck_deterministically():
    from fairforget.objectives.head_refit import refit_head

    data = _separable()
    models = []
    for _ in range(2):
        model = FixedFeatures(6)
        with torch.no_grad():  # a head that lags behind its features: reads noise dimensions only
            model.fc.weight.zero_()
            model.fc.weight[:, 3:] = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
            model.fc.bias.zero_()
        report = refit_head(model, data, epochs=200)
        models.append(model)
        assert report["head_accuracy_before"] < 0.6
        assert report["head_accuracy_after"] == 1.0
        assert model.training  # the mode it was called in
    assert torch.equal(models[0].fc.weight, models[1].fc.weight)  # no randomness: SISA replays it
    assert refit_head(models[0], data, epochs=0) == {}


def test_head_refit_weighs_every_class_private_group_equally():
    from fairforget.objectives.head_refit import group_weights

    y, a = torch.tensor([0, 0, 0, 1, 0]), torch.tensor([0, 0, 0, 0, 1])  # groups of 3, 1, 1 samples
    w = group_weights(y, a)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[:3].sum().item() == pytest.approx(w[3].item()) == pytest.approx(w[4].item())


def test_head_refit_leaves_the_encoder_and_batchnorm_statistics_alone():
    from fairforget.data.base import SampleSet
    from fairforget.model import build_model
    from fairforget.objectives.head_refit import refit_head

    model = build_model(3, 2, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = SampleSet(torch.rand(12, 3, 8, 8, generator=gen), torch.arange(12) % 3, torch.zeros(12, dtype=torch.long),
                     torch.arange(12), torch.full((12,), -1))
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = model.fc.weight.clone()
    refit_head(model, data, epochs=20)
    assert all(torch.equal(encoder[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head, model.fc.weight)


def test_end_serves_the_refitted_head_and_trains_on_from_the_joint_one():
    """After a training the model holds the refitted head and EnD keeps the joint one (checkpointed
    with its state); before the next training the joint head is back, so the encoder's trajectory is
    plain EnD's. ``end-refit-epochs = 0`` leaves the head alone."""
    data = _separable()
    end = build_objective("end", ObjectiveContext(3, 2, 6, {"end-refit-epochs": 100}))
    model = FixedFeatures(6)
    joint = (model.fc.weight.clone(), model.fc.bias.clone())
    report = end.after_training(model, data)
    assert report["head_accuracy_after"] == 1.0
    assert not torch.equal(model.fc.weight, joint[0])
    state = end.state_dict()
    assert torch.equal(state["head.joint_weight"], joint[0]) and bool(state["head.stashed"])
    restored = build_objective("end", ObjectiveContext(3, 2, 6, {"end-refit-epochs": 100}))
    restored.load_state_dict(state)  # a SISA stage resumes from the checkpoint's objective state
    restored.before_training(model)
    assert torch.equal(model.fc.weight, joint[0]) and torch.equal(model.fc.bias, joint[1])
    restored.before_training(model)  # nothing stashed any more: a no-op
    assert torch.equal(model.fc.weight, joint[0])
    off = build_objective("end", ObjectiveContext(3, 2, 6, {"end-refit-epochs": 0}))
    assert off.after_training(model, data) == {} and torch.equal(model.fc.weight, joint[0])


def test_the_engine_calls_the_objectives_training_hooks():
    from fairforget.training import OptimizerSpec, train

    calls = []

    class Hooked(nn.Module):
        def loss(self, model, batch):
            return F.cross_entropy(model(batch.x), batch.y)

        def before_training(self, model):
            calls.append("before")

        def after_training(self, model, data):
            calls.append(("after", len(data)))
            return {"seen": float(len(data))}

    model, data = FixedFeatures(6), _separable()
    result = train(model, data, seeds=[1, 2], batch_size=16, objective=Hooked(),
                   optimizer=OptimizerSpec(lr=0.01).build(model))
    assert calls == ["before", ("after", 60)] and result.after == {"seen": 60.0}


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine OpenMP's spinning threads make this 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_end_lowers_the_probes_accuracy_against_vanilla_on_a_strongly_biased_set(one_thread):
    """Barbano et al.'s attack (a linear probe on the frozen bottleneck, trained on biased data,
    tested on unbiased data): vanilla's bottleneck gives the colour away, EnD's much less."""
    from fairforget.audit.probe import bottleneck, linear_probe
    from fairforget.data import load_dataset, shard_of
    from fairforget.model import build_model
    from fairforget.training import OptimizerSpec, train

    cfg = resolve({"image-size": 8, "rho": 0.99, "num-shards": 2})
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    probe = {}
    for name in ("cross-entropy", "end"):
        model = build_model(10, 4, seed=0)
        objective = build_objective(name, ObjectiveContext(10, 10, 32, {"end-alpha": 50.0, "end-beta": 10.0}))
        train(model, data, seeds=list(range(8)), batch_size=64, objective=objective,
              optimizer=OptimizerSpec(lr=0.005).build(model, objective))
        probe[name] = linear_probe(bottleneck([model], bundle.train.x), bundle.train.private,
                                   bottleneck([model], bundle.test_unbiased.x), bundle.test_unbiased.private,
                                   10, epochs=20)["unbiased_test_accuracy"]
    assert probe["cross-entropy"] > 0.9
    assert probe["end"] < probe["cross-entropy"] - 0.25, probe


@pytest.mark.parametrize(("sets", "expected"), [
    (["objective=\"focal\""], "config key 'objective' = 'focal': must be one of cross-entropy, end,"),
    (["end-alpha=-1"], "config key 'end-alpha' = -1.0: must be >= 0"),
    (["end-refit-epochs=-5"], "config key 'end-refit-epochs' = -5: must be in [0, 100000]"),
    (["dp=true", "objective=\"end\""], "objective 'end' couples the samples of a batch"),
])
def test_the_command_refuses_bad_objective_settings_in_one_line(tmp_path, capsys, sets, expected):
    from server import cli

    code = cli.main(["simulate", "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and expected in err, err
    assert not (tmp_path / "run").exists()
