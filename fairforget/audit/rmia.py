"""RMIA, the robust membership inference attack (Zarifzadeh et al., "Low-Cost High-Power Membership
Inference Attacks", ICML 2024), offline.

1. ``Pr(x | theta)`` is the target's probability of x's label; ``Pr(x)`` its average over
   reference models. Offline (references never saw x), Pr(x) is corrected towards the IN/OUT mixture
   as in the paper: ``Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2`` with ``a`` (default 0.3).
2. ``LR(x, z) = [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)]`` against population samples z.
3. Score(x) = fraction of z with ``LR(x, z) >= gamma`` (default gamma = 2).
"""

from __future__ import annotations

import numpy as np

from fairforget.audit.base import Attack, TargetOutputs
from fairforget.audit.references import ReferenceOutputs
from fairforget.audit.signals import EPS, true_class_prob


class RmiaOffline(Attack):
    name = "rmia"
    reference_mode = "offline"
    min_references = 1

    def __init__(self, a: float = 0.3, gamma: float = 2.0) -> None:
        if not 0.0 <= a <= 1.0 or gamma <= 0:
            raise ValueError("RMIA needs 0 <= a <= 1 and gamma > 0")
        self.a, self.gamma = a, gamma

    def scores(self, target: TargetOutputs, refs: ReferenceOutputs | None) -> np.ndarray:
        self.check(refs)
        p_x_out = true_class_prob(refs.cand_probs, target.y).mean(0)
        p_x = 0.5 * ((1 + self.a) * p_x_out + (1 - self.a))
        ratio_x = true_class_prob(target.cand_probs, target.y) / (p_x + EPS)
        p_z = true_class_prob(refs.pop_probs, target.pop_y).mean(0)
        ratio_z = true_class_prob(target.pop_probs, target.pop_y) / (p_z + EPS)
        # fraction of z with ratio_x / ratio_z >= gamma, for every x at once (sorted ratio_z)
        sorted_z = np.sort(ratio_z)
        return np.searchsorted(sorted_z, ratio_x / self.gamma, side="right") / len(sorted_z)
