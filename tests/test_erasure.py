"""LEACE erasure (fairforget/erasure.py): its guarantee on the fitting data, the eraser inside a served
model, exact unlearning replaying it bit for bit, and its refusal under DP."""

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from fairforget import erasure
from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.model import load_model
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.unlearning.exact import unlearn
from fairforget.verify import read_site, verify_shard


def _planted(n: int = 600, d: int = 12, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose first directions carry a k-valued attribute (plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, k, (n,), generator=gen)
    x = torch.randn(n, d, generator=gen)
    x[:, :k] += 3.0 * torch.nn.functional.one_hot(a, k).float()
    return x, a


def _best_linear_accuracy(x: torch.Tensor, a: torch.Tensor) -> float:
    """A linear probe trained to convergence (almost no regularisation), scored on its own training data."""
    probe = LogisticRegression(C=1e4, max_iter=5000).fit(x.double().numpy(), a.numpy())
    return float(probe.score(x.double().numpy(), a.numpy()))


def test_no_linear_probe_beats_the_majority_rate_on_the_fitting_data():
    x, a = _planted()
    majority = float(torch.bincount(a).max()) / len(a)
    assert _best_linear_accuracy(x, a) > 0.9  # the attribute is there before erasure
    eraser = erasure.fit_leace(x, a, 4)
    assert _best_linear_accuracy(eraser(x), a) <= majority + 0.02
    # an eraser fitted to other labels leaves the attribute readable (what the check above rules out)
    wrong = erasure.fit_leace(x, a[torch.randperm(len(a), generator=torch.Generator().manual_seed(1))], 4)
    assert _best_linear_accuracy(wrong(x), a) > 0.7


def test_an_eraser_in_a_model_is_saved_and_loaded_with_it():
    from fairforget.model import build_model

    model = build_model(10, 4, seed=0)
    x = torch.rand(40, 3, 8, 8)
    raw = model.eval().features(x)
    erasure.attach(model, erasure.fit_leace(raw.detach(), torch.arange(40) % 4, 4))
    state = model.state_dict()
    assert erasure.has_eraser(state)
    loaded = load_model(state, 10, 4)
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.features(x)) and not torch.equal(loaded.features(x), raw)
        assert torch.equal(loaded(x), model(x))
    assert not erasure.has_eraser(erasure.detach(model).state_dict())


@pytest.mark.parametrize("eraser", ["leace", "leace-per-stage"])
def test_exact_unlearning_replays_the_eraser_bit_for_bit(tiny_cfg, tmp_path, eraser):
    cfg = tiny_cfg(eraser=eraser)
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    shard = SisaShard(tmp_path / "shard", 0, data, settings)
    shard.train_through()
    served = shard.model_state()
    assert erasure.has_eraser(served)
    # the served model is the model as trained with the eraser and a refitted head over it
    trained = torch.load(shard.checkpoint_path(settings.slices), weights_only=True)["model"]
    assert not torch.equal(trained["fc.weight"], served["fc.weight"])
    original = [list(s) for s in shard.index["slices"]]
    forget = original[1][:2]
    before = shard.model_hash()
    unlearn(shard, forget)
    scratch = SisaShard(tmp_path / "scratch", 0, data, settings,
                        slices=[[i for i in s if i not in forget] for s in original])
    scratch.train_through()
    a, b = shard.model_state(), scratch.model_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shard.model_hash() == scratch.model_hash() != before
    # verify's replay of the site's state folder rebuilds the eraser bit for bit, and reads the served
    # model (with its eraser) off the checkpoint
    verdict = verify_shard(read_site(tmp_path / "shard", cfg, bundle.train), settings, [], set())
    assert verdict.replay_hash == verdict.served_hash == shard.model_hash()[: len(verdict.served_hash)]


def test_a_leace_fit_is_refused_under_dp(tiny_cfg):
    with pytest.raises(ConfigError, match="eraser.*dp = true.*not accounted"):
        tiny_cfg(eraser="leace", dp=True)
    with pytest.raises(ConfigError, match="eraser"):
        tiny_cfg(eraser="inlp")


def test_one_private_value_fits_no_eraser(tiny_cfg):
    cfg = tiny_cfg()
    data = shard_of(cfg, load_dataset(cfg))[0]
    one = data.subset(torch.nonzero(data.private == data.private[0]).flatten().numpy())
    assert "takes 1 value(s)" in erasure.unfit_reason(one, 10)
    assert erasure.post_hoc(torch.nn.Linear(2, 2), one, 10) == ({}, erasure.unfit_reason(one, 10))
