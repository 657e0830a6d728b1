"""ROC figures for membership inference: AUC, balanced accuracy, attacker advantage (max TPR - FPR),
TPR at a fixed low FPR with bootstrap confidence intervals, and the curve for a log-log plot.

Higher scores mean "member". Carlini et al. 2022 argue for TPR at low FPR on a log-log ROC rather
than AUC alone; both are reported. The curves come from ``sklearn.metrics.roc_curve``; the bootstrap
intervals read each draw's TPR at low FPR in closed form (:func:`bootstrap_tpr_at`, the same value).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics

from fairforget.privacy.auditing import AUDIT_FPRS, resolvable

LOW_FPRS = (0.01, 0.001)


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every distinct threshold, from (0, 0) to (1, 1): ``sklearn.metrics.roc_curve``."""
    labels = np.asarray(is_member, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both members and non-members")
    fpr, tpr, _ = metrics.roc_curve(labels, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    return fpr, tpr


def auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    fpr, tpr = roc_curve(scores, is_member)
    return float(metrics.auc(fpr, tpr))


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR of a curve whose FPR does not exceed ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, target: float) -> float:
    """The largest TPR whose FPR does not exceed ``target``."""
    return tpr_at(*roc_curve(scores, is_member), target)


def bootstrap_tpr_at(member_scores: np.ndarray, nonmember_scores: np.ndarray, target: float) -> np.ndarray:
    """TPR at FPR <= ``target`` of every bootstrap draw (one row of scores each): the value
    :func:`tpr_at` reads off that draw's :func:`roc_curve`, without building 200 curves per figure.

    With ``n`` non-members a curve may reach ``k`` false positives, ``k / n <= target``; its best
    threshold lies just above the (k+1)-th highest non-member score, so the TPR is the fraction of
    members scoring strictly above it (every member when ``k = n``)."""
    n = nonmember_scores.shape[1]
    k = min(n, int(np.floor((target + 1e-12) * n)))
    while k < n and (k + 1) / n <= target + 1e-12:
        k += 1
    while k > 0 and k / n > target + 1e-12:
        k -= 1
    if k >= n:
        return np.ones(len(member_scores))
    kth = -np.sort(-nonmember_scores, axis=1)[:, k]
    return (member_scores > kth[:, None]).mean(1)


def summarize(scores: np.ndarray, is_member: np.ndarray, *, bootstrap: int = 200, seed: int = 0,
              curve_points: int = 200) -> dict[str, Any]:
    """Every figure the audit reports for one (attack, target)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    fpr, tpr = roc_curve(scores, labels)
    out: dict[str, Any] = {
        "auc": float(metrics.auc(fpr, tpr)),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "advantage": float(np.max(tpr - fpr)),
        "n_members": int(labels.sum()),
        "n_nonmembers": int((~labels).sum()),
    }
    rng = np.random.default_rng(seed)
    mem, non = np.flatnonzero(labels), np.flatnonzero(~labels)
    # bootstrap draws, stratified: members and non-members resampled apart
    draws = [(scores[rng.choice(mem, len(mem))], scores[rng.choice(non, len(non))]) for _ in range(bootstrap)]
    for target in LOW_FPRS:
        key = f"tpr_at_{target:g}_fpr"
        out[key] = tpr_at(fpr, tpr, target)
        if draws:
            lo, hi = np.percentile(bootstrap_tpr_at(np.stack([d[0] for d in draws]),
                                                    np.stack([d[1] for d in draws]), target), [2.5, 97.5])
        else:
            lo, hi = np.nan, np.nan
        out[key + "_ci95"] = [float(lo), float(hi)]
        # False: fewer than 1/target non-members, the threshold lies above all of them and its true FPR is
        # unknown to within several times target; the report prints "not resolvable" instead of the TPR
        out[key + "_resolvable"] = resolvable(out["n_nonmembers"], target)
    for target in AUDIT_FPRS:  # the DP audit's moderate levels too (fairforget.privacy.auditing), no interval
        out.setdefault(f"tpr_at_{target:g}_fpr", tpr_at(fpr, tpr, target))
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(curve_points, len(fpr))).astype(int))
    out["roc"] = {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}
    return out
