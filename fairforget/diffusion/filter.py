"""Rejection filtering of generated samples by a site classifier that does not read the private attribute.

A shard at rho = 0.99 asks its generator for a digit on a colour it has (almost) never seen with that
digit; the compositional sampler then often draws the colour's *own* digit (the colour and the digit
are confounded in everything the generator saw). The filter keeps a candidate only when a classifier
labels it as the class it was asked for, and draws again for the groups still short, within a cap.

The classifier is the site's own: trained on the site's originals through the training engine with a
registered objective (``augment-filter``). With ``end`` (EnD, Tartaglione et al. 2021) its bottleneck
is trained not to carry the private attribute, so it labels a digit by its shape, not its background;
a ``cross-entropy`` filter reads the colour shortcut and keeps mostly the colour's own digit. Either
way the filter needs no knowledge of what the bias looks like, only the site's (class, private)
labels. Pixel noise in training (as for the fidelity classifiers) makes it judge the digit, not how
clean the pixels are. It is retrained from the site's live originals whenever it is used (a few
seconds), so a deleted original never survives in it.

Cost: a group whose keep rate is ``k`` costs about ``1 / k`` draws per kept sample, at most
``max_draws``; a group still short after the cap is filled with its rejected candidates that the
classifier scores highest for the requested class (the report counts them apart), so the bias plan's
counts are met.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet, bottleneck_dim, build_model
from fairforget.objectives import ObjectiveContext, build_objective
from fairforget.training import Batch, OptimizerSpec, train

FILTER_WIDTH = 8
FILTER_EPOCHS = 40
FILTER_NOISE = 0.3  # largest pixel-noise sigma in the filter's training
MAX_ROUNDS = 6  # re-draw rounds for the short groups


@dataclass(frozen=True)
class FilterSettings:
    objective: str  # a registered objective name (fairforget.objectives)
    max_draws: int = 8  # candidates per requested sample, at most
    epochs: int = FILTER_EPOCHS
    width: int = FILTER_WIDTH

    def __post_init__(self) -> None:
        if self.max_draws < 1 or self.epochs < 1 or self.width < 1:
            raise ValueError(f"filter needs max_draws, epochs and width >= 1, got {self.max_draws}, "
                             f"{self.epochs}, {self.width}")

    @classmethod
    def from_config(cls, cfg) -> FilterSettings | None:
        """None when ``augment-filter = "none"``."""
        if cfg.augment_filter == "none":
            return None
        return cls(objective=cfg.augment_filter, max_draws=cfg.augment_filter_max_draws)


class NoisyInputs(nn.Module):
    """An objective applied to inputs with Gaussian pixel noise (sigma uniform in [0, FILTER_NOISE])."""

    def __init__(self, inner: nn.Module, seed: int) -> None:
        super().__init__()
        self.inner = inner
        self.gen = torch.Generator().manual_seed(seed)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        sigma = torch.rand(len(batch), 1, 1, 1, generator=self.gen) * FILTER_NOISE
        noise = (sigma * torch.randn(batch.x.shape, generator=self.gen)).to(batch.x.device)
        return self.inner.loss(model, Batch((batch.x + noise).clamp(0, 1), batch.y, batch.private, batch.ids))

    def before_training(self, model: nn.Module) -> None:
        self.inner.before_training(model)

    def after_training(self, model: nn.Module, data: SampleSet) -> dict[str, float]:
        return self.inner.after_training(model, data)  # on the clean originals (EnD: its head refit)


def train_filter(data: SampleSet, settings: FilterSettings, num_classes: int, num_private: int,
                 seed: int, device: str = "cpu") -> SimpleConvNet:
    """The site's filter classifier on its own originals (Adam, lr 2e-3, batches of 32), through the
    training engine with the objective ``settings.objective``; a one-line ConfigError if it is unknown."""
    objective = build_objective(settings.objective, ObjectiveContext(num_classes, num_private,
                                                                     bottleneck_dim(settings.width)))
    model = build_model(num_classes, settings.width, seed=seed).to(device)
    objective.to(device)
    train(model, data, seeds=[seed + 1 + e for e in range(settings.epochs)], batch_size=32,
          objective=NoisyInputs(objective, seed), optimizer=OptimizerSpec(lr=2e-3).build(model, objective))
    return model.eval()


@dataclass
class FilterResult:
    """The samples (group order) and what it took: per group, candidates drawn, candidates kept (labelled
    as asked) and, with ``fill``, the best-scored rejected candidates that filled a group left short."""

    x: torch.Tensor
    y: torch.Tensor
    private: torch.Tensor
    requested: np.ndarray  # per group (flat index class * num_private + private)
    drawn: np.ndarray
    kept: np.ndarray
    filled: np.ndarray
    rounds: int = 0

    @property
    def keep_rate(self) -> float:
        return float(self.kept.sum() / max(self.drawn.sum(), 1))

    @property
    def shortfall(self) -> int:
        return int((self.requested - self.kept - self.filled).sum())

    def summary(self) -> dict[str, float]:
        return {"requested": int(self.requested.sum()), "drawn": int(self.drawn.sum()), "kept": int(self.kept.sum()),
                "filled": int(self.filled.sum()), "keep_rate": self.keep_rate, "shortfall": self.shortfall,
                "rounds": self.rounds}


def filtered_sample(draw: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                    classifier: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, private: torch.Tensor,
                    seed: int, num_private: int, max_draws: int, max_rounds: int = MAX_ROUNDS,
                    fill: bool = True) -> FilterResult:
    """Draw candidates for labels ``(y, private)`` with ``draw(y, private, seed)`` and keep those
    ``classifier`` (images -> class logits) labels as their ``y``, until every group has as many as
    asked or has used ``max_draws`` candidates per requested sample. With ``fill``, a group still
    short then takes its rejected candidates with the highest ``p(y | x)``, so the bias plan's counts
    are met (a filter that starves the rare groups leaves the shard biased).

    Round 1 draws once per requested sample; each later round draws, for every short group, what it
    still needs divided by the group's keep rate so far (at least what it needs), within its budget."""
    groups = (y.long() * num_private + private.long()).numpy()
    size = int(groups.max()) + 1 if len(groups) else 0
    requested = np.bincount(groups, minlength=size).astype(np.int64)
    budget = requested * max_draws
    drawn = np.zeros(size, dtype=np.int64)
    kept: list[list[torch.Tensor]] = [[] for _ in range(size)]
    rejected: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(size)]  # (scores, images)
    rounds, shape = 0, (0,)
    while rounds < max_rounds:
        have = np.array([sum(len(k) for k in kept[g]) for g in range(size)], dtype=np.int64)
        short = requested - have
        if rounds == 0:
            ask = requested.copy()
        else:
            rate = np.where(drawn > 0, have / np.maximum(drawn, 1), 1.0)
            ask = np.ceil(short / np.maximum(rate, 1.0 / max_draws)).astype(np.int64)
        ask = np.clip(np.where(short > 0, ask, 0), 0, budget - drawn)
        if ask.sum() == 0:
            break
        cand = np.repeat(np.arange(size), ask)
        cy = torch.as_tensor(cand // num_private, dtype=torch.long)
        ca = torch.as_tensor(cand % num_private, dtype=torch.long)
        x = draw(cy, ca, (seed + 7_919 * rounds) % (1 << 63))
        shape = tuple(x.shape[1:])
        with torch.no_grad():
            probs = classifier(x).softmax(1).cpu()
        ok = (probs.argmax(1) == cy).numpy()
        score = probs.gather(1, cy.view(-1, 1)).flatten()
        for g in np.unique(cand):
            rows = np.nonzero((cand == g) & ok)[0][: max(short[g], 0)]
            if len(rows):
                kept[g].append(x[torch.as_tensor(rows)])
            other = torch.as_tensor(np.nonzero((cand == g) & ~ok)[0])
            if fill and len(other):
                rejected[g].append((score[other], x[other]))
        drawn += ask
        rounds += 1
    counts = np.array([sum(len(k) for k in kept[g]) for g in range(size)], dtype=np.int64)
    filled = np.zeros(size, dtype=np.int64)
    out = []
    for g in range(size):
        out += kept[g]
        need = int(requested[g] - counts[g])
        if fill and need > 0 and rejected[g]:
            scores = torch.cat([r[0] for r in rejected[g]])
            best = torch.argsort(scores, descending=True, stable=True)[:need]
            out.append(torch.cat([r[1] for r in rejected[g]])[best])
            filled[g] = len(best)
    flat = np.repeat(np.arange(size), counts + filled)
    return FilterResult(
        x=torch.cat(out) if out else torch.empty(0, *shape),
        y=torch.as_tensor(flat // num_private, dtype=torch.long),
        private=torch.as_tensor(flat % num_private, dtype=torch.long),
        requested=requested, drawn=drawn, kept=counts, filled=filled, rounds=rounds,
    )


def keep_rate_by_kind(result: FilterResult, num_private: int) -> dict[str, float]:
    """Keep rate on the diagonal groups (class == private: the bias-aligned pairs of Biased-Digits)
    and off it; for reporting only (the filter itself knows nothing of which pairs are aligned)."""
    g = np.arange(len(result.drawn))
    diag = (g // num_private) == (g % num_private)
    out = {}
    for name, mask in (("aligned", diag), ("conflicting", ~diag)):
        d = int(result.drawn[mask].sum())
        out[name] = float(result.kept[mask].sum() / d) if d else math.nan
    return out
