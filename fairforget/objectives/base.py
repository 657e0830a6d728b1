"""The contract of a training objective (:func:`fairforget.training.train` calls ``loss``).

An objective is an ``nn.Module``: besides ``loss(model, batch)`` it may own trainable parts (a
bias-only branch, a projection head). The optimizer trains them beside the model, SISA checkpoints
save their ``state_dict`` with the model's, so exact unlearning stays exact with any objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fairforget.training import Batch


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know about the task: label counts, the bottleneck's size, and
    its own hyper-parameters (run-config values)."""

    num_classes: int
    num_private: int = 1
    bottleneck_dim: int = 0
    options: Mapping[str, float] = field(default_factory=dict)


class Objective(nn.Module, ABC):
    """``loss(model, batch) -> scalar tensor``; subclasses register a ``name``."""

    name: ClassVar[str]

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.ctx = ctx

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The minibatch loss to descend on."""
