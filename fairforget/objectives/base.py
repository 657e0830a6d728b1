"""The contract of a training objective (:func:`fairforget.training.train` calls ``loss``).

An objective is an ``nn.Module``: besides ``loss(model, batch)`` it may own trainable parts (a
bias-only branch, a projection head). The optimizer trains them beside the model, SISA checkpoints
save their ``state_dict`` with the model's, so exact unlearning stays exact with any objective.
Its hyper-parameters are run-config keys (``end-alpha``, ...), read with :meth:`Objective.option`:
the value in ``ctx.options``, else the app's default from ``pyproject.toml`` (the one source).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fairforget.config import ConfigError, load_defaults
from fairforget.data.base import SampleSet
from fairforget.training import Batch


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know about the task: label counts, the bottleneck's size, and
    its own hyper-parameters (run-config values)."""

    num_classes: int
    num_private: int = 1
    bottleneck_dim: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)  # the flat keys (end-alpha, ...) and objective-options


class Objective(nn.Module, ABC):
    """``loss(model, batch) -> scalar tensor``; subclasses register a ``name``.

    ``per_sample`` is False for a loss that couples the samples of a batch (EnD's Gram matrix,
    HSIC): DP-SGD's per-sample clipping then bounds no single sample's influence.

    Parameters
    ----------
    ctx : ObjectiveContext
        The task (label counts, the bottleneck's size) and the objective's own hyper-parameters.

    Attributes
    ----------
    name : str
        The objective's registered name (run-config key ``objective``).
    per_sample : bool
        Whether the loss is a mean of per-sample terms (what DP-SGD's clipping assumes).
    options : Mapping[str, Any]
        A plugin objective's own options (``objective-options``): option name -> default; the values
        in effect are in ``self.ctx.options``.
    """

    name: ClassVar[str]
    per_sample: ClassVar[bool] = True
    #: a plugin objective's own parameters, set through the run-config key ``objective-options`` (a JSON
    #: object): option name -> default; the values in effect are in ``self.ctx.options`` (the built-ins
    #: read their flat run-config keys instead, :meth:`option`)
    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.ctx = ctx

    def option(self, key: str) -> float:
        """Run-config key ``key`` (a non-negative weight): ``ctx.options`` or the app's default."""
        value = float(self.ctx.options[key] if key in self.ctx.options else load_defaults()[key])
        if not value >= 0.0:
            raise ConfigError(f"config key '{key}' = {value!r}: must be >= 0")
        return value

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The minibatch loss to descend on.

        Parameters
        ----------
        model : torch.nn.Module
            The shard model being trained (``features(x)``, ``fc``; the objective may use its
            bottleneck, of size ``self.ctx.bottleneck_dim``).
        batch : fairforget.training.Batch
            The minibatch on the model's device: images ``x``, labels ``y``, private (bias) labels
            ``private`` and sample ``ids``.

        Returns
        -------
        torch.Tensor
            A scalar (0-d) tensor; the training engine calls ``backward()`` on it. Under DP-SGD it must
            be a mean of per-sample terms unless :attr:`per_sample` is False.
        """

    def before_training(self, model: nn.Module) -> None:
        """Called by the training engine before the first step (of every SISA stage): nothing by default."""

    def after_training(self, model: nn.Module, data: SampleSet) -> dict[str, float]:
        """Called by the training engine once after the last epoch, on the data just trained on (a
        SISA stage's slices): a deterministic step on the trained model, e.g. refitting its head.
        Returns figures to report (none by default)."""
        return {}
