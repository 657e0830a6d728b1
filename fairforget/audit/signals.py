"""Per-sample signals an auditor reads off a model's softmax output.

``lira_statistic`` is Carlini et al.'s logit-scaled confidence ``log p_y - log sum_{k != y} p_k``,
the statistic whose distribution over models is close to Gaussian.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def true_class_prob(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``p_y`` for (..., N, K) probabilities and (N,) labels -> (..., N)."""
    return np.take_along_axis(probs, y.reshape((1,) * (probs.ndim - 2) + (-1, 1)), axis=-1)[..., 0]


def log_loss(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(true_class_prob(probs, y) + EPS)


def lira_statistic(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    p_y = true_class_prob(probs, y)
    rest = np.clip(probs.sum(-1) - p_y, 0.0, None)
    return np.log(p_y + EPS) - np.log(rest + EPS)


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(probs + EPS)).sum(-1)
