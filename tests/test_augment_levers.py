"""The augmentation levers of issue 12: the generator's group reweighting, the rejection filter, the
presets and their run-config keys (tiny and fast: seconds each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fairforget.config import ConfigError, read_toml, resolve
from fairforget.data.base import make_sampleset
from fairforget.diffusion.filter import FilterSettings, filtered_sample, keep_rate_by_kind, train_filter
from fairforget.diffusion.generator import GeneratorError, GeneratorSettings, group_weights, sample, train_generator
from fairforget.diffusion.quality import FidelityClassifiers
from fairforget.privacy.dp_sgd import DPSettings

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def _settings(**kw) -> GeneratorSettings:
    base = dict(image_size=8, num_classes=3, num_private=3, width=8, train_steps=4, batch_size=8, ddim_steps=2)
    return GeneratorSettings(**{**base, **kw})


# ---------------------------------------------------------------------- upweighting the conflicting originals
def test_group_weights_are_inverse_group_frequency():
    # 9 bias-aligned samples (class == private) and one conflicting (class 0 on private 2)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    a = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    w = group_weights(y, a, _settings(group_reweight=1.0))
    assert w.sum().item() == pytest.approx(1.0)
    assert w[9].item() == pytest.approx(3 * w[0].item())  # its group has 1 sample, the others 3
    groups = y * 3 + a
    totals = {int(g): float(w[groups == g].sum()) for g in groups.unique()}
    assert all(t == pytest.approx(0.25) for t in totals.values())  # every present group weighs the same
    torch.testing.assert_close(group_weights(y, a, _settings(group_reweight=0.0)), torch.full((10,), 0.1))
    # class mode: groups are classes, the private label is ignored
    w_class = group_weights(y, a, _settings(group_reweight=1.0, groups="class"))
    assert w_class[9].item() == pytest.approx(w_class[6].item() * 3 / 4)  # class 0 has 4 samples, class 2 has 3


def test_reweighted_training_differs_and_refuses_dp():
    x = torch.rand(12, 3, 8, 8)
    y, a = torch.arange(12) % 3, torch.zeros(12, dtype=torch.long)
    a[0] = 1
    plain = train_generator(x, y, a, _settings(), seed=0)
    weighted = train_generator(x, y, a, _settings(group_reweight=1.0), seed=0)
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), weighted.parameters(), strict=True))
    with pytest.raises(GeneratorError, match="diffusion-group-reweight = 0 with dp"):
        train_generator(x, y, a, _settings(group_reweight=1.0), seed=0, dp=DPSettings(1.0, 1.0, 1e-5, "rdp", 50.0))



def test_the_private_factor_can_be_guided_apart_from_the_class_factor():
    x = torch.rand(12, 3, 8, 8)
    y, a = torch.arange(12) % 3, (torch.arange(12) // 3) % 3
    model = train_generator(x, y, a, _settings(), seed=0)
    ty, ta = torch.tensor([0, 1]), torch.tensor([2, 0])
    same = sample(model, ty, ta, seed=3, guidance_scale=2.0)
    torch.testing.assert_close(sample(model, ty, ta, seed=3, guidance_scale=2.0, private_scale=2.0), same)
    assert not torch.allclose(sample(model, ty, ta, seed=3, guidance_scale=2.0, private_scale=5.0), same)


def test_fidelity_both_counts_samples_right_on_class_and_private_at_once():
    class Fixed(FidelityClassifiers):
        def predict(self, x):
            return torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 0])

    fid = Fixed.__new__(Fixed).fidelity(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 0, 0]))
    assert fid == {"class": 0.75, "private": 0.75, "both": 0.5}

# ---------------------------------------------------------------------- the rejection filter
def _draw(y: torch.Tensor, a: torch.Tensor, seed: int) -> torch.Tensor:
    """Candidates whose first pixel encodes the class they show: the requested one with probability
    0.5 (group (2, *): never), otherwise another class, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    shown = torch.randint(0, 3, (len(y),), generator=gen)
    right = torch.rand(len(y), generator=gen) < 0.5
    shown = torch.where(right & (y != 2), y, shown)
    shown = torch.where(y == 2, (y + 1) % 3, shown)
    x = torch.zeros(len(y), 3, 4, 4)
    x[:, 0, 0, 0] = shown.float()
    return x


def _reader(x: torch.Tensor) -> torch.Tensor:
    """Class logits: one-hot of the class the first pixel encodes."""
    return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()


def test_filter_keeps_only_what_the_classifier_labels_as_requested():
    y = torch.tensor([0] * 10 + [1] * 6 + [2] * 4)
    a = torch.tensor([1] * 10 + [0] * 6 + [0] * 4)
    result = filtered_sample(_draw, _reader, y, a, seed=0, num_private=3, max_draws=8, fill=False)
    assert len(result.x) == len(result.y) == len(result.private) == int(result.kept.sum())
    assert torch.equal(_reader(result.x).argmax(1), result.y)  # every kept sample is labelled as asked
    groups = (result.y * 3 + result.private).numpy()
    np.testing.assert_array_equal(np.bincount(groups, minlength=len(result.kept)), result.kept)
    assert result.kept[1] == 10 and result.kept[3] == 6  # the passable groups reach their quotas
    assert result.kept[6] == 0 and result.drawn[6] == 8 * 4  # a group that never passes stops at the cap
    assert (result.drawn <= 8 * result.requested).all()
    assert result.shortfall == 4 and 0 < result.keep_rate < 1
    rates = keep_rate_by_kind(result, 3)
    assert np.isnan(rates["aligned"]) and rates["conflicting"] == pytest.approx(result.keep_rate)  # all off-diagonal


def test_filter_fills_a_short_group_with_its_best_scored_rejects():
    y, a = torch.tensor([2] * 4), torch.tensor([0] * 4)

    def soft_reader(x: torch.Tensor) -> torch.Tensor:  # class 0 (what group (2, 0) shows) wins; pixel 1 scores class 2
        logits = torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * 5
        logits[:, 2] = x[:, 0, 0, 1] * 4
        return logits

    def draw(yy: torch.Tensor, aa: torch.Tensor, seed: int) -> torch.Tensor:
        x = _draw(yy, aa, seed)
        x[:, 0, 0, 1] = torch.rand(len(yy), generator=torch.Generator().manual_seed(seed))
        return x

    result = filtered_sample(draw, soft_reader, y, a, seed=1, num_private=2, max_draws=3)
    assert result.kept[4] == 0 and result.filled[4] == 4 and result.shortfall == 0  # group (2, 0): class 2 on 0
    filled = result.x[result.y == 2]
    candidates = torch.cat([draw(torch.tensor([2] * n), torch.zeros(n, dtype=torch.long), (1 + 7_919 * r) % (1 << 63))
                            for r, n in ((0, 4), (1, 8))])  # round 2 asks 12 - 4 = 8 (keep rate 0: the cap)
    assert int(result.drawn.sum()) == 12
    top = torch.sort(candidates[:, 0, 0, 1], descending=True).values[:4]
    torch.testing.assert_close(torch.sort(filled[:, 0, 0, 1], descending=True).values, top)


def test_filter_is_seeded_and_cap_one_draws_once():
    y, a = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    first = filtered_sample(_draw, _reader, y, a, seed=3, num_private=2, max_draws=4)
    again = filtered_sample(_draw, _reader, y, a, seed=3, num_private=2, max_draws=4)
    assert torch.equal(first.x, again.x) and (first.drawn == again.drawn).all()
    once = filtered_sample(_draw, _reader, y, a, seed=3, num_private=2, max_draws=1)
    assert once.rounds == 1 and int(once.drawn.sum()) == 4


def test_filter_classifier_trains_through_the_engine_and_unknown_objective_is_one_line():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 8, 8, generator=gen)
    y = torch.arange(24) % 3
    data = make_sampleset(x, y.numpy(), (torch.arange(24) % 2).numpy(), np.arange(24))
    settings = FilterSettings(objective="cross-entropy", epochs=2, width=4)
    clf = train_filter(data, settings, 3, 2, seed=0)
    assert clf(x).shape == (24, 3) and not clf.training
    again = train_filter(data, settings, 3, 2, seed=0)
    torch.testing.assert_close(clf(x), again(x))  # seeded
    with pytest.raises(ConfigError, match="'objective' = 'nope': must be one of") as err:
        train_filter(data, FilterSettings(objective="nope", epochs=1, width=4), 3, 2, seed=0)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- presets and config keys
def test_presets_load_into_a_valid_config():
    gpu = resolve(read_toml(PRESETS / "augment-gpu.toml"))
    cpu = resolve(read_toml(PRESETS / "augment-cpu.toml"))
    defaults = resolve()
    assert gpu.augment and cpu.augment
    assert gpu.diffusion_width > defaults.diffusion_width and gpu.diffusion_train_steps > defaults.diffusion_train_steps
    assert cpu.diffusion_width == defaults.diffusion_width  # the CPU preset keeps the default generator
    assert FilterSettings.from_config(defaults) is None
    assert FilterSettings.from_config(defaults.replace(augment_filter="end")).objective == "end"
    assert GeneratorSettings.from_config(gpu, 10, 10).group_reweight == gpu.diffusion_group_reweight


@pytest.mark.parametrize(("key", "value", "match"), [
    ("diffusion-group-reweight", -1.0, "'diffusion-group-reweight' = -1.0: must be in \\[0, 2\\]"),
    ("augment-filter-max-draws", 0, "'augment-filter-max-draws' = 0: must be in \\[1, 100\\]"),
    ("augment-filter", " ", "'augment-filter'"),
    ("diffusion-group-reweight", "lots", "expected float"),
])
def test_bad_lever_value_is_a_one_line_config_error(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        resolve({key: value})
    assert "\n" not in str(err.value)


def test_reweighting_with_dp_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="diffusion-group-reweight' must be 0 with dp"):
        resolve({"dp": True, "augment": True, "diffusion-group-reweight": 0.5})


# ---------------------------------------------------------------------- guidance goes the right way
class _LabelCoded:
    """A stand-in denoiser whose output codes its labels: ``eps(x; y, a) = x + (y + 1) [y real] + 10 (a + 1)
    [a real]`` (null labels: class 3, private 2), so guided outputs can be computed by hand."""

    def __init__(self, groups: str = "class-private") -> None:
        self.settings = _settings(num_private=2, groups=groups)

    def null_labels(self, n, device):
        return torch.full((n,), 3), torch.full((n,), 2)

    def __call__(self, x, t, y, a):
        code = (y + 1) * (y != 3) + 10 * (a + 1) * (a != 2)
        return x + code.float().view(-1, 1, 1, 1)


def assert_classifier_free_guidance_hand_computed() -> None:
    """eps = eps(0) + w (eps(y, 0) - eps(0)) + w_a (eps(0, a) - eps(0)): here x + w (y + 1) + 10 w_a (a + 1)."""
    from fairforget.diffusion import generator

    x, t = torch.zeros(2, 3, 2, 2), torch.zeros(2, dtype=torch.long)
    y, a = torch.tensor([0, 2]), torch.tensor([1, 0])
    model = _LabelCoded()

    def at(w, w_a=None, m=model):
        return generator._guided_eps(m, x, t, y, a, w, w_a)[:, 0, 0, 0].tolist()

    assert at(1.5) == pytest.approx([1.5 * 1 + 15 * 2, 1.5 * 3 + 15 * 1])  # w_a = w
    assert at(2.0, 0.5) == pytest.approx([2 + 5 * 2, 6 + 5 * 1])
    assert at(1.0, 1.0) == pytest.approx([1 + 20, 3 + 10])  # w = 1: the conditional itself
    assert at(0.0, 0.0) == pytest.approx([0.0, 0.0])  # unconditional
    assert at(3.0, m=_LabelCoded("class")) == pytest.approx([3.0, 9.0])  # class mode: no private term


def test_classifier_free_guidance_matches_the_hand_computed_composition():
    assert_classifier_free_guidance_hand_computed()


def _untrained_generator():
    from fairforget.diffusion.generator import ConditionalGenerator

    torch.manual_seed(0)
    return ConditionalGenerator(_settings()).eval()


def test_classifier_guidance_raises_the_requested_class_probability():
    """Guided towards class c, the samples look more like class c to the guiding classifier than the
    unguided samples drawn from the same noise (seen: mean log p(y) up by 0.77 at scale 5)."""
    from tests.oracles import assert_guidance_raises, toy_colour_classifier

    model = _untrained_generator()  # the direction of the guidance needs no trained denoiser
    y, a = torch.arange(3).repeat(4), torch.zeros(12, dtype=torch.long)
    plain = sample(model, y, a, seed=3)
    guided = sample(model, y, a, seed=3, classifier=toy_colour_classifier, classifier_scale=5.0)
    assert_guidance_raises(plain, guided, toy_colour_classifier, y, min_gain=0.2)
    # classifier guidance alone (no classifier-free term), towards other classes: they gain too
    other = (y + 1) % 3
    unconditional = sample(model, other, a, seed=3, guidance_scale=0.0)
    guided = sample(model, other, a, seed=3, guidance_scale=0.0, classifier=toy_colour_classifier,
                    classifier_scale=5.0)
    assert_guidance_raises(unconditional, guided, toy_colour_classifier, other, min_gain=0.2)
