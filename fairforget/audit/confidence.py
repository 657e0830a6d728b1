"""Confidence and entropy attacks (Salem et al., NDSS 2019; Song and Mittal, USENIX Sec. 2021):
models are more confident, and their outputs less uncertain, on the data they were trained on.
``confidence`` scores the top softmax probability; ``entropy`` scores minus the output entropy."""

from __future__ import annotations

import numpy as np

from fairforget.audit.base import Attack, TargetOutputs
from fairforget.audit.signals import entropy


class ConfidenceAttack(Attack):
    name = "confidence"

    def scores(self, target: TargetOutputs, refs=None) -> np.ndarray:
        return target.cand_probs.max(-1)


class EntropyAttack(Attack):
    name = "entropy"

    def scores(self, target: TargetOutputs, refs=None) -> np.ndarray:
        return -entropy(target.cand_probs)
