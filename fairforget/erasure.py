"""Erasure of the private attribute from the features a model's head sees: LEACE (Belrose et al.,
"LEACE: Perfect linear concept erasure in closed form", NeurIPS 2023; the ``concept-erasure``
package), chosen with the run-config key ``eraser``:

* ``none`` (default): nothing is erased;
* ``leace``: **post-hoc**. After each SISA stage the site fits a LEACE eraser on the bottleneck of
  its own training data (that stage's live samples, their private labels one-hot) and serves the
  model with the eraser between the bottleneck and a head refitted on the erased features
  (:func:`fairforget.objectives.head_refit.refit_head`: full-batch Adam, (class, private) groups
  weighted equally, :data:`REFIT_EPOCHS` steps). Training goes on from the model as trained: the
  eraser and the refitted head are saved beside it in the stage's checkpoint (``"erasure"``) and
  overlaid on what :meth:`fairforget.sisa.SisaShard.model_state` serves;
* ``leace-per-stage``: **training-time** as well. Before each SISA stage trains, an eraser is refit
  on the current encoder's features of the stage's data and put in the model, so the stage's
  objective (any objective that reads ``model.features`` / ``model(x)``: every built-in) trains the
  encoder and head through it (refit per stage, the iterative use its authors suggest); after the
  stage the post-hoc step above runs, so the served eraser is fitted on the final features.

LEACE guarantees that on the data it was fitted on no *linear* classifier predicts the attribute
from the erased features better than a constant (the class-conditional means are equal). Nothing is
promised off that distribution or against a non-linear attacker: the audit's strong probes
(:mod:`fairforget.audit.probe`) measure both.

Exactness: the fit is closed form on features of a deterministic model, and the head refit draws no
random numbers, so a SISA retrain (exact unlearning) and ``fairforget verify`` replay the eraser bit
for bit; the eraser's tensors are part of the served model's state (keys ``eraser.*``), so the
model hash covers them.

Under DP-SGD the fit is refused (one line, :func:`check`): the eraser's mean and covariances are
statistics of the site's data whose privacy cost is not accounted. For a model without a learned
bottleneck (fixed features, e.g. ``scatter-linear``) the eraser acts on the features its head sees.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.config import ERASERS
from fairforget.data.base import SampleSet

REFIT_EPOCHS = 200  # full-batch steps of the head refitted on the erased features
PREFIX = "eraser."


class EraserError(ValueError):
    """An eraser that cannot be used as asked; the message is one line for the user."""


class LinearEraser(nn.Module):
    """``x -> x - ((x - bias) R^T) L^T``: a LEACE eraser (``concept_erasure.LeaceEraser``) held in
    buffers, so it is saved and loaded with the model's state."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.register_buffer("proj_left", torch.zeros(dim, rank))
        self.register_buffer("proj_right", torch.zeros(rank, dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - ((x - self.bias) @ self.proj_right.T) @ self.proj_left.T


def check(eraser: str, dp: bool) -> None:
    """One line for an unknown eraser, or a fit on the site's data under DP (its cost is not accounted)."""
    if eraser not in ERASERS:
        raise EraserError(f"config key 'eraser' = {eraser!r}: must be one of {', '.join(ERASERS)}")
    if eraser != "none" and dp:
        raise EraserError(f"config key 'eraser' = {eraser!r} with dp = true: a LEACE fit on the site's data "
                          "(its mean and covariances) spends privacy that is not accounted: refused")


def fit_leace(feats: torch.Tensor, private: torch.Tensor, num_private: int) -> LinearEraser:
    """A LEACE eraser of the one-hot ``private`` from ``feats`` (fitted in float64, kept in float32)."""
    from concept_erasure import LeaceFitter

    z = F.one_hot(private.long(), max(num_private, int(private.max()) + 1)).double()
    fitted = LeaceFitter.fit(feats.double(), z).eraser
    bias = fitted.bias if fitted.bias is not None else torch.zeros(feats.shape[1], dtype=torch.float64)
    out = LinearEraser(feats.shape[1], fitted.proj_left.shape[1]).to(feats.device)
    with torch.no_grad():
        out.proj_left.copy_(fitted.proj_left.float())
        out.proj_right.copy_(fitted.proj_right.float())
        out.bias.copy_(bias.float())
    return out


# ---------------------------------------------------------------------- an eraser inside a model
def _erased_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.eraser(type(self).features(self, x))


def _erased_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.features(x))


def attach(model: nn.Module, eraser: LinearEraser) -> nn.Module:
    """Put ``eraser`` between ``model.features`` and ``model.fc`` (any model with those two): its
    buffers become the model's ``eraser.*`` state; ``model.features`` then returns erased features."""
    detach(model)
    model.eraser = eraser
    model.features = types.MethodType(_erased_features, model)
    model.forward = types.MethodType(_erased_forward, model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Take the eraser out of ``model`` (nothing if it has none)."""
    if "eraser" in model._modules:
        del model._modules["eraser"]
    for name in ("features", "forward"):
        model.__dict__.pop(name, None)
    return model


def raw_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features before any eraser."""
    return type(model).features(model, x)


def has_eraser(state: Mapping[str, Any]) -> bool:
    return f"{PREFIX}proj_left" in state


def without_eraser(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


def prepare(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give ``model`` an eraser slot of the right shape when ``state`` holds one (before
    ``load_state_dict``), or take its eraser out when it does not."""
    if has_eraser(state):
        left = state[f"{PREFIX}proj_left"]
        attach(model, LinearEraser(int(left.shape[0]), int(left.shape[1])).to(left.device))
    else:
        detach(model)
    return model


@torch.no_grad()
def _raw(model: nn.Module, data: SampleSet, batch: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = torch.cat([raw_features(model, data.x[i : i + batch].to(device)) for i in range(0, len(data), batch)])
    model.train(was)
    return out


def fit_in_place(model: nn.Module, data: SampleSet, num_private: int) -> str:
    """Refit ``model``'s eraser on the raw features of ``data`` (training-time step); "" or why not."""
    why = unfit_reason(data, num_private)
    if why:
        detach(model)
        return why
    attach(model, fit_leace(_raw(model, data), data.private.to(next(model.parameters()).device), num_private))
    return ""


def post_hoc(model: nn.Module, data: SampleSet, num_private: int,
             refit_epochs: int = REFIT_EPOCHS) -> tuple[dict[str, torch.Tensor], str]:
    """The served overlay of a trained ``model``: an eraser fitted on ``data``'s raw features and a head
    refitted on the erased ones (``eraser.*``, ``fc.*`` tensors, on the CPU), or ``({}, why)``."""
    from fairforget.objectives.head_refit import refit_head

    why = unfit_reason(data, num_private)
    if why:
        return {}, why
    served = copy.deepcopy(model)
    fit_in_place(served, data, num_private)
    refit_head(served, data, refit_epochs)
    state = served.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith((PREFIX, "fc."))}, ""


def unfit_reason(data: SampleSet, num_private: int) -> str:
    """Why no eraser can be fitted on ``data`` ("" when one can)."""
    values = int(torch.unique(data.private).numel()) if len(data) else 0
    if num_private < 2 or values < 2:
        return f"the private attribute takes {values} value(s) in this site's data: there is nothing to erase"
    return ""
