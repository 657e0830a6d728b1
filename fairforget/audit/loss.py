"""LOSS threshold attack (Yeom et al., CSF 2018): a sample is a member if its loss is low.
Score = ``-loss = log p_y``; the ROC sweeps every threshold."""

from __future__ import annotations

import numpy as np

from fairforget.audit.base import Attack, TargetOutputs
from fairforget.audit.signals import log_loss


class LossAttack(Attack):
    name = "loss"

    def scores(self, target: TargetOutputs, refs=None) -> np.ndarray:
        return -log_loss(target.cand_probs, target.y)
