"""How many synthetic samples each group needs so that the shard's bias falls below a threshold.

Bias is ``KL(p || q)`` of the shard's group distribution ``p`` from a target ``q`` (uniform by default,
where ``KL(p || u) = log K - H(p)``). Augmentation can only add samples, so the plan is water-filling
towards the target: with ``N`` the final size, group ``k`` is raised to ``max(n_k, floor(q_k N))`` and
``N`` is the smallest size whose filled distribution has KL <= the threshold. The deficit is largest
for the most under-represented groups, so they are filled first and most. A group whose target share
is zero is never generated. This is the project's reading of the bias-aware augmentation of Pan et
al. 2024 (their text gives KL as the bias metric, not the algorithm).
"""

from __future__ import annotations

import numpy as np


class PlanError(ValueError):
    """A plan that cannot be made; the message is one line for the user."""


def kl_to_target(counts: np.ndarray, target: np.ndarray | None = None) -> float:
    """``KL(p || q)`` with ``p = counts / sum(counts)``; ``q`` uniform when ``target`` is None."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    if counts.sum() <= 0:
        raise PlanError("no samples: the bias of an empty set is undefined")
    q = _target(counts.size, target)
    p = counts / counts.sum()
    live = p > 0
    if np.any(q[live] <= 0):
        return float("inf")
    return float(np.sum(p[live] * np.log(p[live] / q[live])))


def plan_counts(counts: np.ndarray, threshold: float, target: np.ndarray | None = None,
                max_total: int = 1_000_000) -> np.ndarray:
    """Samples to add per group (same shape as ``counts``) so that KL <= ``threshold``."""
    if not threshold >= 0:
        raise PlanError(f"KL threshold must be >= 0, got {threshold}")
    shape = np.shape(counts)
    n = np.asarray(counts, dtype=np.int64).ravel()
    q = _target(n.size, target)
    if n.sum() == 0:
        raise PlanError("no real samples to plan from")
    if kl_to_target(n, q) <= threshold:
        return np.zeros(shape, dtype=np.int64)

    def filled(total: int) -> np.ndarray:
        return np.maximum(n, np.floor(q * total).astype(np.int64))

    lo, hi = int(n.sum()), int(n.sum())
    while kl_to_target(filled(hi), q) > threshold:  # grow until feasible
        if hi >= max_total:
            raise PlanError(f"KL <= {threshold} needs more than {max_total} samples")
        lo, hi = hi, min(2 * hi, max_total)
    while hi - lo > 1:  # smallest feasible size (KL of the filled counts falls as the size grows)
        mid = (lo + hi) // 2
        if kl_to_target(filled(mid), q) <= threshold:
            hi = mid
        else:
            lo = mid
    return (filled(hi) - n).reshape(shape)


def _target(size: int, target: np.ndarray | None) -> np.ndarray:
    if target is None:
        return np.full(size, 1.0 / size)
    q = np.asarray(target, dtype=np.float64).ravel()
    if q.size != size or np.any(q < 0) or q.sum() <= 0:
        raise PlanError(f"target distribution must have {size} non-negative entries with a positive sum")
    return q / q.sum()
