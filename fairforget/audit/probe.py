"""Attribute inference: three probes for the private attribute on the features a model's head sees.

The seed's attack (Barbano et al., "Bridging the gap between debiasing and privacy for deep
learning", ICCVW 2021, Sec. 3): freeze the encoder, train ``Linear(bottleneck, n_private)`` to
predict the private attribute from the bottleneck on the *biased training data* (SGD, lr 0.01, 50
epochs, on standardised features), score it on the unbiased test set. Trained where the attribute
and the label go together, it understates the leak: an eraser fitted on that distribution (LEACE,
:mod:`fairforget.erasure`) makes it read chance by construction while the attribute stays readable
elsewhere. So the audit runs two stronger attackers beside it (:data:`PROBES`, by name):

* ``biased-linear``: the seed's probe, as above;
* ``independent-linear``: the same linear probe trained on data whose private attribute is
  independent of the label. In simulation: the unbiased test set split *by class* (a seeded half of
  the classes trains the probe, the other half scores it), so no image (each unbiased image is one
  digit in every colour) is in both parts. In deployment: an audit split a site supplies with the
  attribute balanced within each class (:func:`balanced_within_classes`); without one the figure
  is reported as not measured;
* ``independent-mlp``: a small MLP (one hidden layer of :data:`MLP_HIDDEN` ReLU units, Adam,
  full batch) on the same split: a non-linear attacker, which no linear eraser is guaranteed against.

Every figure comes with a bootstrap interval (resampling the scored samples, ``audit-bootstrap``
times, 2.5-97.5 percentiles). A probe that cannot be trained (one private value in its training
data, a split too small) is *not measured*, with a one-line reason, never a number. The strongest
(highest accuracy) measured probe is named in ``strongest``: what the report and ``fairforget
compare`` show. For a model without a learned bottleneck (fixed features), the probes read the
features its head sees, and ``features`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fairforget.data.base import SampleSet

MLP_HIDDEN = 64  # hidden units of the non-linear probe
MLP_STEPS = 300  # its full-batch Adam steps
MIN_PER_VALUE = 5  # samples of every private value a probe's training part (and its scored part) needs
BALANCE_RATIO = 1.5  # an audit split is "balanced within each class": largest / smallest (class, value) count


@torch.no_grad()
def bottleneck(models: list[torch.nn.Module], x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Concatenated features the heads of ``models`` see (an ensemble's joint representation): the
    bottleneck, after the model's eraser if it has one."""
    feats = []
    for model in models:
        model.eval()
        feats.append(torch.cat([model.features(x[i : i + batch]) for i in range(0, len(x), batch)]))
    return torch.cat(feats, dim=1)


def feature_kind(models: list[torch.nn.Module]) -> str:
    """What the probes read: ``bottleneck`` (a learned one), or the fixed features a head sees."""
    erased = " after the eraser" if any(getattr(m, "eraser", None) is not None for m in models) else ""
    if any(fixed_features(m) for m in models):
        return f"head input (fixed features: the model has no learned bottleneck){erased}"
    return f"bottleneck{erased}"


def fixed_features(model: torch.nn.Module) -> bool:
    """Whether ``model`` has no learned bottleneck: nothing trainable but its head ``fc``."""
    return not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(train_x: torch.Tensor, train_a: torch.Tensor, test_x: torch.Tensor, test_a: torch.Tensor,
                 num_private: int, *, epochs: int = 50, lr: float = 0.01, batch_size: int = 128,
                 seed: int = 0, hits: bool = False) -> dict[str, Any]:
    """The seed's linear probe; ``hits``: also the per-sample hits on the scored part (for a bootstrap)."""
    tr, te = _standardise(train_x, test_x)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(tr.shape[1], num_private)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
        probe.bias.zero_()
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(probe(tr[idx]), train_a[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = _scored(probe, tr, train_a, te, test_a, num_private)
    return out if hits else {k: v for k, v in out.items() if k != "hits"}


def mlp_probe(train_x: torch.Tensor, train_a: torch.Tensor, test_x: torch.Tensor, test_a: torch.Tensor,
              num_private: int, *, hidden: int = MLP_HIDDEN, steps: int = MLP_STEPS, lr: float = 0.01,
              weight_decay: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """A one-hidden-layer MLP probe, full-batch Adam on standardised features (seeded: deterministic)."""
    tr, te = _standardise(train_x, test_x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Sequential(torch.nn.Linear(tr.shape[1], hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(hidden, num_private))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(probe(tr), train_a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _scored(probe, tr, train_a, te, test_a, num_private)


def _scored(probe: torch.nn.Module, tr: torch.Tensor, train_a: torch.Tensor, te: torch.Tensor, test_a: torch.Tensor,
            num_private: int) -> dict[str, Any]:
    """A trained probe's accuracy on its training part and its scoring part, chance, and the per-sample
    hits on the scoring part (for the bootstrap)."""
    with torch.no_grad():
        train_hit = probe(tr).argmax(1) == train_a
        test_hit = probe(te).argmax(1) == test_a
    return {"train_accuracy": float(train_hit.float().mean()), "unbiased_test_accuracy": float(test_hit.float().mean()),
            "chance": 1.0 / num_private, "hits": test_hit.numpy()}


def bootstrap_interval(hits: np.ndarray, resamples: int, seed: int) -> tuple[float, float] | None:
    """95% percentile interval of the mean of ``hits`` over ``resamples`` bootstrap resamples."""
    if resamples <= 0 or len(hits) == 0:
        return None
    rng = np.random.default_rng(seed + 9090)
    means = hits.astype(float)[rng.integers(0, len(hits), size=(resamples, len(hits)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def balanced_within_classes(data: SampleSet, num_private: int, ratio: float = BALANCE_RATIO) -> str:
    """Why ``data`` is not an audit split whose private attribute is independent of the label ("" if it
    is): every class must hold every private value, the largest (class, value) count at most ``ratio``
    times the smallest within each class."""
    y, a = data.y.numpy(), data.private.numpy()
    for c in np.unique(y):
        counts = np.bincount(a[y == c], minlength=num_private)
        if counts.min() == 0:
            return f"class {int(c)} lacks private value {int(np.argmin(counts))} (the attribute is not balanced)"
        if counts.max() > ratio * counts.min():
            return (f"class {int(c)}: private values {counts.min()}-{counts.max()} samples, more than {ratio:g}x "
                    "apart (the attribute is not balanced within the class)")
    return ""


def split_by_class(data: SampleSet, seed: int) -> tuple[SampleSet, SampleSet]:
    """(training part, scored part): a seeded half of the classes each, so no image (an unbiased
    image is one digit in every colour) is in both."""
    classes = np.unique(data.y.numpy())
    order = np.random.default_rng(seed + 313).permutation(classes)
    train_classes = set(order[: len(order) // 2].tolist())
    mask = np.isin(data.y.numpy(), list(train_classes))
    return data.subset(np.flatnonzero(mask)), data.subset(np.flatnonzero(~mask))


# ---------------------------------------------------------------------- the probes
@dataclass
class ProbeData:
    """The features and private labels a probe may use; ``None`` where that data is missing."""

    biased_x: torch.Tensor | None  # the live training data's features (biased)
    biased_a: torch.Tensor | None
    unbiased_x: torch.Tensor | None  # the unbiased test sample's features (scores the seed's probe)
    unbiased_a: torch.Tensor | None
    independent: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # train x, a, score x, a
    independent_missing: str  # why there is no independent split ("" when there is)
    num_private: int


class Probe:
    """One attribute-inference attacker: trains on some of :class:`ProbeData`, scores on another part."""

    name: ClassVar[str]
    trained_on: ClassVar[str]

    def parts(self, d: ProbeData) -> tuple[tuple[torch.Tensor, ...] | None, str]:
        raise NotImplementedError

    def fit(self, tr_x: torch.Tensor, tr_a: torch.Tensor, te_x: torch.Tensor, te_a: torch.Tensor, num_private: int,
            seed: int) -> dict[str, Any]:
        return linear_probe(tr_x, tr_a, te_x, te_a, num_private, seed=seed, hits=True)

    def run(self, d: ProbeData, *, bootstrap: int, seed: int) -> dict[str, Any]:
        parts, missing = self.parts(d)
        base = {"trained_on": self.trained_on, "chance": 1.0 / max(d.num_private, 1)}
        if parts is None:
            return {**base, "not_measured": missing}
        tr_x, tr_a, te_x, te_a = parts
        why = _too_small(tr_a, "training part", d.num_private) or _too_small(te_a, "scored part", d.num_private)
        if why:
            return {**base, "not_measured": why}
        r = self.fit(tr_x, tr_a, te_x, te_a, d.num_private, seed)
        ci = bootstrap_interval(r.pop("hits"), bootstrap, seed)
        return {**base, "accuracy": r["unbiased_test_accuracy"], "train_accuracy": r["train_accuracy"],
                "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                "n_train": len(tr_a), "n_scored": len(te_a)}


def _too_small(a: torch.Tensor, part: str, num_private: int) -> str:
    counts = torch.bincount(a, minlength=num_private)
    values = int((counts > 0).sum())
    if values < 2:
        return f"the private attribute takes {values} value(s) in the probe's {part}: there is nothing to infer"
    if int(counts[counts > 0].min()) < MIN_PER_VALUE:
        return (f"the probe's {part} has {len(a)} samples, fewer than {MIN_PER_VALUE} of some private value: "
                "too small for this probe")
    return ""


class BiasedLinear(Probe):
    name = "biased-linear"
    trained_on = "the live training data (biased); scored on the unbiased test sample"

    def parts(self, d: ProbeData) -> tuple[tuple[torch.Tensor, ...] | None, str]:
        if d.biased_x is None or d.unbiased_x is None:
            return None, "no unbiased test sample to score the probe on"
        return (d.biased_x, d.biased_a, d.unbiased_x, d.unbiased_a), ""


class IndependentLinear(Probe):
    name = "independent-linear"
    trained_on = "an audit split whose private attribute is independent of the label, split by class"

    def parts(self, d: ProbeData) -> tuple[tuple[torch.Tensor, ...] | None, str]:
        return d.independent, d.independent_missing


class IndependentMLP(IndependentLinear):
    name = "independent-mlp"
    trained_on = "as independent-linear, a one-hidden-layer MLP"

    def fit(self, tr_x: torch.Tensor, tr_a: torch.Tensor, te_x: torch.Tensor, te_a: torch.Tensor, num_private: int,
            seed: int) -> dict[str, Any]:
        return mlp_probe(tr_x, tr_a, te_x, te_a, num_private, seed=seed)


PROBES: dict[str, type[Probe]] = {cls.name: cls for cls in (BiasedLinear, IndependentLinear, IndependentMLP)}


def strongest(probes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The measured probe with the highest accuracy: its name, accuracy and interval (None if none was)."""
    measured = {n: p for n, p in probes.items() if "accuracy" in p}
    if not measured:
        return None
    name = max(measured, key=lambda n: (measured[n]["accuracy"], n))
    p = measured[name]
    return {"probe": name, "accuracy": p["accuracy"], "ci_low": p["ci_low"], "ci_high": p["ci_high"]}


def run_probes(d: ProbeData, *, bootstrap: int, seed: int, features: str = "bottleneck",
               num_threads: int = 0) -> dict[str, Any]:
    """Every probe of :data:`PROBES` on ``d``: one target's ``attribute_inference`` entry. The seed's
    probe keeps its flat figures (``unbiased_test_accuracy``, ``train_accuracy``, ``chance``; NaN
    when not measured) beside ``probes`` (each probe's figures or ``not_measured``) and
    ``strongest``. ``num_threads``: torch threads while the probes train (0: as they are)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(num_threads, 1) if num_threads else threads)  # the run's num-threads, as training
    try:
        probes = {name: cls().run(d, bootstrap=bootstrap, seed=seed) for name, cls in PROBES.items()}
    finally:
        torch.set_num_threads(threads)
    seed_probe = probes[BiasedLinear.name]
    nan = float("nan")
    out = {"train_accuracy": seed_probe.get("train_accuracy", nan),
           "unbiased_test_accuracy": seed_probe.get("accuracy", nan), "chance": 1.0 / max(d.num_private, 1),
           "features": features, "probes": probes, "strongest": strongest(probes)}
    if d.num_private < 2:
        out["skipped"] = "the dataset has no private attribute"
    return out


def describe(entry: dict[str, Any]) -> str:
    """One line for a target's ``attribute_inference`` entry: the strongest probe, named, with its
    interval, and each probe not measured with why."""
    if "probes" not in entry:
        return f"private-attribute probe {entry['unbiased_test_accuracy']:.3f} (chance {entry['chance']:.3f})"
    best = entry.get("strongest")
    text = (f"strongest private-attribute probe {best['accuracy']:.3f} ({best['probe']}"
            + (f", 95% CI {best['ci_low']:.3f}-{best['ci_high']:.3f}" if best.get("ci_low") is not None else "")
            + f"; chance {entry['chance']:.3f})" if best else "private-attribute probes: not measured")
    missing = [f"{n} not measured: {p['not_measured']}" for n, p in entry["probes"].items() if "not_measured" in p]
    return "; ".join([text, *missing])


def attribute_inference(train_feats: torch.Tensor, biased: SampleSet, test_feats: torch.Tensor,
                        unbiased: SampleSet, num_private: int, seed: int = 0) -> dict[str, Any]:
    """The seed's probe alone: frozen features of ``biased`` data (training), ``unbiased`` (test)."""
    if num_private < 2:
        return {"train_accuracy": float("nan"), "unbiased_test_accuracy": float("nan"), "chance": 1.0,
                "skipped": "the dataset has no private attribute"}
    return linear_probe(train_feats, biased.private, test_feats, unbiased.private, num_private, seed=seed)
