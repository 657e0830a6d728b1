"""Cross-entropy on the target label: the vanilla objective (the run config's default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.objectives.base import Objective
from fairforget.training import Batch


class CrossEntropy(Objective):
    name = "cross-entropy"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch.x), batch.y)
