"""The shard models by name (issue 24 item 1): the scattering front end is fixed (no parameters, no state
from data), every model trains, unlearns exactly (bitwise) and replays under DP-SGD, and a model or
model/objective pair that cannot work is one line before anything trains."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.model import build_model, check_model, load_model, model_of
from fairforget.models import MODELS
from fairforget.models.scattering import Scattering
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.unlearning.exact import unlearn

FEATURE_MODELS = ("scatter-linear", "scatter-cnn")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the shards train (the FFTs crawl when threads fight over a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_scattering_front_end_has_no_parameters_and_no_state_from_data():
    torch.manual_seed(0)
    x, other = torch.rand(4, 3, 8, 8), torch.rand(16, 3, 8, 8) * 5
    for name in FEATURE_MODELS:
        model = build_model(10, 4, seed=0, model=name)
        front = model.scattering
        assert isinstance(front, Scattering)
        assert list(front.parameters()) == [] and front.state_dict() == {}
        assert not any(k.startswith("scattering") for k in model.state_dict())
        assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        before = model.features(x)
        model.train()
        model(other)  # data through the model in training mode: nothing may keep a statistic of it
        assert torch.equal(model.features(x), before)
        # per sample: an image's features do not depend on the batch it is in
        assert torch.allclose(model.features(torch.cat([x[:1], other]))[:1], model.features(x[:1]), atol=1e-6)
    assert set(build_model(10, 4, seed=0, model="scatter-linear").state_dict()) == {"fc.weight", "fc.bias"}
    # built on first use from the shape alone: two models' filters are the same
    a, b = Scattering(), Scattering()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_exposes_features_and_fc_and_loads_from_its_state(name):
    model = build_model(10, 4, seed=3, norm="group", model=name).eval()
    x = torch.rand(3, 3, 8, 8)
    feats = model.features(x)
    assert feats.shape == (3, model.bottleneck_dim) == (3, MODELS[name].bottleneck(4))
    assert torch.equal(model.fc(feats), model(x))
    assert model_of(model.state_dict()) == name
    assert torch.equal(load_model(model.state_dict(), 10, 4)(x), model(x))


@pytest.fixture
def shard_for(tiny_cfg, tmp_path):
    def make(model: str, dp: bool):
        extra = {"dp": True, "dp-accountant": "rdp", "dp-max-epsilon": 1e6} if dp else {}
        cfg = tiny_cfg(model=model, slices=2, **{"epochs-per-slice": 1, "batch-size": 32}, **extra)
        bundle = load_dataset(cfg)
        data = shard_of(cfg, bundle)[0]
        data = data.select_ids(sorted(data.ids.tolist())[:80])
        return data, SisaSettings.from_config(cfg, bundle.num_classes), tmp_path / f"{model}-{dp}"

    return make


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_unlearns_exactly_and_replays(shard_for, name, dp):
    data, settings, tmp = shard_for(name, dp)
    shard = SisaShard(tmp / "shard", 0, data, settings)
    shard.train_through()
    trained = shard.model_state()
    forget = shard.index["slices"][1][:2]
    result = unlearn(shard, forget)
    assert result.hash_before != result.hash_after
    slices = [list(s) for s in shard.index["slices"]]
    if dp:  # exact in distribution; bitwise with the site's recorded seeds (what verify replays)
        again = SisaShard(tmp / "replay", 0, data, settings, slices=slices, replay_seeds=shard.recorded_seeds())
        assert shard.accountant is not None and shard.accountant.history
    else:
        again = SisaShard(tmp / "scratch", 0, data, settings, slices=slices)
    again.train_through()
    assert again.model_hash() == shard.model_hash()
    after = shard.model_state()
    assert set(after) == set(trained) and any(not torch.equal(after[k], trained[k]) for k in after)


class BatchNormModel(nn.Module):
    """A plugin model DP-SGD cannot train (BatchNorm has no per-sample gradient)."""

    name = "bn-plugin"
    refuses: ClassVar[dict[str, str]] = {}

    def __init__(self, num_classes: int = 10, width: int = 4, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.BatchNorm2d(width), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten())
        self.bottleneck_dim = width
        self.fc = nn.Linear(width, num_classes)

    @staticmethod
    def bottleneck(width: int) -> int:
        return width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_bad_models_are_one_line_before_anything_trains(tiny_cfg, tmp_path):
    plugin = f"{__name__}:BatchNormModel"
    cases = [(("no-such-model",), "config key 'model' = 'no-such-model': must be one of"),
             (("scatter-linear", "end"), "cannot train objective 'end': its features are fixed"),
             ((plugin, "cross-entropy", True), "cannot be trained with DP-SGD (dp = true)")]
    for args, expected in cases:
        with pytest.raises(ConfigError) as err:
            check_model(*args)
        assert expected in str(err.value) and "\n" not in str(err.value)
    check_model(plugin)  # without DP it is a model like any other
    with pytest.raises(ConfigError, match="must be one of"):
        tiny_cfg(model="no-such-model").validate() or SisaSettings.from_config(
            tiny_cfg(model="no-such-model"), 10).build_objective()
    cfg = tiny_cfg(model="scatter-linear", objective="end")
    shard = SisaShard(tmp_path / "s", 0, shard_of(cfg, load_dataset(cfg))[0], SisaSettings.from_config(cfg, 10))
    with pytest.raises(ConfigError, match="features are fixed"):
        shard.train_through()
    assert shard.trained == 0 and not (tmp_path / "s" / "checkpoints").exists()


def test_the_deletion_budget_is_sized_by_the_runs_model():
    """The capacity bound's d (the head's parameter count) is the run's model's, not SimpleConvNet's: a
    scatter-linear head over the scattering features has far more parameters than the conv's."""
    from types import SimpleNamespace

    from fairforget.capacity import head_parameters
    from fairforget.model import model_bottleneck
    from strategies.shard_ensemble import ShardEnsemble

    for name in ("simple-conv", *FEATURE_MODELS):
        cfg = SimpleNamespace(model=name, model_width=4, capacity_bound="newton", capacity_eps=1.0,
                              capacity_delta=1e-5, capacity_c=1.0, num_shards=2, slices=2, ensemble_vote="softmax",
                              capacity_policy="retrain", required_shards=0)
        d = ShardEnsemble.from_config(cfg, 10).budget.d
        assert d == head_parameters(model_bottleneck(name, 4), 10) == head_parameters(MODELS[name].bottleneck(4), 10)
    assert model_bottleneck("scatter-linear", 4) > 10 * model_bottleneck("simple-conv", 4)
