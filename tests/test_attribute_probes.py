"""The audit's attribute-inference probes (fairforget/audit/probe.py): the strong probes (trained where
the private attribute is independent of the label, linear and MLP) separate a model that encodes the
attribute from one that cannot see it, a probe that cannot be trained is "not measured" with one line,
and the report and compare name the strongest."""

import math

import pytest
import torch
from torch import nn

from fairforget.audit.probe import PROBES, ProbeData, bottleneck, describe, run_probes, split_by_class, strongest
from fairforget.audit.suite import independent_split
from fairforget.data import load_dataset
from fairforget.model import build_model
from fairforget.training import OptimizerSpec, train


class Grey(nn.Module):
    """A model that turns its input grey before its first layer, each image's grey levels stretched to
    0-1 (white strokes on a coloured background: the grey level is affine in the stroke, so the
    stretch leaves the stroke alone and the colour's brightness does not survive): it cannot encode colour."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.fc = inner, inner.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1, keepdim=True)
        low = grey.amin(dim=(2, 3), keepdim=True)
        grey = (grey - low) / (grey.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)
        return self.inner.features(grey.expand_as(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PrivateAsLabel:
    """Trains the model to predict the private attribute (so its bottleneck encodes it)."""

    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch.x), batch.private)


@pytest.fixture(scope="module")
def setting():
    from clients.testing import TINY
    from fairforget.config import resolve

    cfg = resolve(dict(TINY))
    bundle = load_dataset(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a shared machine: one thread is the fastest)
    encoder = build_model(10, 4, seed=0)
    train(encoder, bundle.train, seeds=[1, 2], batch_size=64, objective=PrivateAsLabel(),
          optimizer=OptimizerSpec(lr=0.01, weight_decay=0.0).build(encoder))
    grey = Grey(build_model(10, 4, seed=0))
    train(grey, bundle.train, seeds=[1, 2], batch_size=64, objective=PrivateAsLabel(),
          optimizer=OptimizerSpec(lr=0.01, weight_decay=0.0).build(grey))
    yield cfg, bundle, {"encoder": encoder, "grey": grey}
    torch.set_num_threads(threads)


def _data(bundle, model) -> ProbeData:
    (tr, te), why = independent_split(bundle.test_unbiased, bundle.num_private, seed=0, per_group=6)
    assert why == ""
    f = lambda s: bottleneck([model], s.x)  # noqa: E731
    return ProbeData(f(bundle.train), bundle.train.private, f(te), te.private,
                     (f(tr), tr.private, f(te), te.private), "", bundle.num_private)


@pytest.fixture(scope="module")
def probed(setting):
    _, bundle, models = setting
    return {name: run_probes(_data(bundle, m), bootstrap=50, seed=0) for name, m in models.items()}


def test_the_strong_probes_separate_a_model_that_encodes_the_attribute_from_one_that_cannot(probed):
    out = probed
    for name in ("independent-linear", "independent-mlp"):
        enc, grey = out["encoder"]["probes"][name], out["grey"]["probes"][name]
        assert enc["accuracy"] > 0.6, name
        assert grey["accuracy"] < 0.1 + 0.08, name  # chance 0.10
        assert enc["ci_low"] <= enc["accuracy"] <= enc["ci_high"] and grey["ci_high"] < enc["ci_low"]
        # the split is by class: no class (and so no image) is in both parts
        assert enc["n_train"] > 0 and enc["n_scored"] > 0
    assert out["encoder"]["strongest"]["accuracy"] == max(p["accuracy"] for p in out["encoder"]["probes"].values())
    assert out["encoder"]["strongest"]["probe"] in PROBES


def test_the_split_by_class_shares_no_class_and_is_seeded(setting):
    _, bundle, _ = setting
    tr, te = split_by_class(bundle.test_unbiased, seed=3)
    assert not set(tr.y.tolist()) & set(te.y.tolist())
    assert len(tr) + len(te) == len(bundle.test_unbiased)
    assert torch.equal(split_by_class(bundle.test_unbiased, seed=3)[0].ids, tr.ids)


def test_a_probe_that_cannot_be_trained_is_not_measured_with_one_line(setting):
    _, bundle, models = setting
    d = _data(bundle, models["encoder"])
    # one private value in the data the probes train on
    one = ProbeData(d.biased_x, torch.zeros_like(d.biased_a), d.unbiased_x, d.unbiased_a,
                    (d.independent[0], torch.zeros_like(d.independent[1]), *d.independent[2:]), "", 10)
    out = run_probes(one, bootstrap=10, seed=0)
    for name, p in out["probes"].items():
        assert "accuracy" not in p and "takes 1 value(s)" in p["not_measured"] and "\n" not in p["not_measured"], name
    assert out["strongest"] is None and math.isnan(out["unbiased_test_accuracy"])
    assert "not measured" in describe(out)
    # a held-out split too small for the strong probes: the seed's probe is still measured
    small = ProbeData(d.biased_x, d.biased_a, d.unbiased_x, d.unbiased_a,
                      tuple(t[:12] for t in d.independent), "", 10)
    out = run_probes(small, bootstrap=10, seed=0)
    assert "too small" in out["probes"]["independent-mlp"]["not_measured"]
    assert out["strongest"]["probe"] == "biased-linear"
    # biased data is no independent audit split (deployment: a site without a balanced split)
    split, why = independent_split(bundle.train, bundle.num_private, seed=0)
    assert split is None and "not balanced" in why


def test_report_and_compare_show_the_strongest_named(probed):
    from fairforget.compare import _strongest
    from fairforget.report import probe_lines

    entry = probed["encoder"]
    probes = {"a": {"accuracy": 0.2, "ci_low": 0.1, "ci_high": 0.3},
              "b": {"accuracy": 0.7, "ci_low": 0.6, "ci_high": 0.8}, "c": {"not_measured": "too small"}}
    assert strongest(probes) == {"probe": "b", "accuracy": 0.7, "ci_low": 0.6, "ci_high": 0.8}
    best = entry["strongest"]
    assert _strongest(entry) == (best["accuracy"], best["probe"])
    text = "\n".join(probe_lines({"ensemble": entry}))
    assert f"**{best['accuracy']:.3f}** ({best['probe']})" in text
    assert f"({best['probe']}" in describe(entry)
