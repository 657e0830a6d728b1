"""The shard models: built by name (run-config key ``model``, :mod:`fairforget.models`), loaded from a
saved state without being told which model saved it.

* ``simple-conv`` (default): SimpleConvNet (:mod:`fairforget.models.simple_conv`), BatchNorm, or
  GroupNorm under DP-SGD (``norm="group"``);
* ``scatter-linear`` and ``scatter-cnn``: a fixed wavelet scattering front end with a private head
  (:mod:`fairforget.models.scatter_linear`, :mod:`fairforget.models.scatter_cnn`).

Every model exposes ``features(x)`` (the bottleneck), the linear head ``fc`` and ``bottleneck_dim``.
:func:`check_model` is the one-line refusal of a model that does not exist, cannot serve the run's
objective, or cannot be trained with DP-SGD (Opacus' ``ModuleValidator``), run before anything trains.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fairforget.config import ConfigError
from fairforget.erasure import prepare, without_eraser
from fairforget.models import MODELS, REGISTRY
from fairforget.models.simple_conv import NORMS, SimpleConvNet, bottleneck_dim

DEFAULT = "simple-conv"


def model_class(name: str) -> type[nn.Module]:
    """The model ``name`` names (built-in, ``package.module:Class`` or an entry point); one line otherwise."""
    return REGISTRY.resolve(name)


def model_bottleneck(name: str, width: int) -> int:
    """The bottleneck size (the ``fc`` head's input) of model ``name`` at base width ``width``."""
    return int(model_class(name).bottleneck(width))


@functools.lru_cache(maxsize=64)
def check_model(name: str, objective: str = "cross-entropy", dp: bool = False, width: int = 4) -> None:
    """One-line :class:`ConfigError` (naming the ``model`` key) for an unknown model, an objective the
    model refuses, or, with ``dp``, a model Opacus' ``ModuleValidator`` says cannot be trained with
    DP-SGD (a tiny instance is built and validated; nothing trains)."""
    cls = model_class(name)
    why = dict(getattr(cls, "refuses", {}) or {}).get(objective)
    if why:
        raise ConfigError(f"config key 'model' = {name!r}: cannot train objective {objective!r}: {why}")
    if dp:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(build_model(10, width, seed=0, norm="group", model=name), strict=False)
        if errors:
            raise ConfigError(f"config key 'model' = {name!r} cannot be trained with DP-SGD (dp = true): "
                              f"{str(errors[0]).splitlines()[0]}")


def build_model(num_classes: int, width: int, seed: int, norm: str = "batch", model: str = DEFAULT) -> nn.Module:
    """A freshly initialised ``model`` whose weights depend only on ``seed`` (and not on ``norm``: the
    norms draw no random numbers; the feature models use GroupNorm whatever ``norm`` says)."""
    cls = model_class(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return cls(num_classes=num_classes, width=width, norm=norm)
    finally:
        torch.random.set_rng_state(gen_state)


def model_of(state: Mapping[str, torch.Tensor]) -> str:
    """Which built-in model saved ``state`` (each model class says how its state looks: ``matches``)."""
    for name, cls in MODELS.items():
        if cls.matches(state):
            return name
    raise ValueError(f"a saved state of no known model (keys {sorted(state)[:4]}...)")


def norm_of(state: Mapping[str, torch.Tensor]) -> str:
    """Which norm a saved model used (SimpleConvNet: BatchNorm keeps running statistics, GroupNorm none)."""
    return "batch" if any(k.endswith("running_mean") for k in state) else "group"


def num_classes_of(state: Mapping[str, torch.Tensor]) -> int:
    """The number of classes a saved SimpleConvNet predicts (rows of its ``fc`` head)."""
    return int(state["fc.weight"].shape[0])


def load_model(state: Mapping[str, torch.Tensor], num_classes: int, width: int, model: str | None = None) -> Any:
    """The model holding ``state`` (which model, and SimpleConvNet's BatchNorm or GroupNorm, read off the
    state unless ``model`` names it), in eval mode."""
    net = build_model(num_classes, width, seed=0, norm=norm_of(state), model=model or model_of(without_eraser(state)))
    prepare(net, state)  # an eraser saved with the model (fairforget.erasure, keys eraser.*)
    net.load_state_dict(state)
    return net.eval()


__all__ = ["DEFAULT", "NORMS", "SimpleConvNet", "bottleneck_dim", "build_model", "check_model", "load_model",
           "model_bottleneck", "model_class", "model_of", "norm_of", "num_classes_of"]
