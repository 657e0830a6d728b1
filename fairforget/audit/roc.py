"""ROC figures for membership inference: AUC, balanced accuracy, attacker advantage (max TPR - FPR),
TPR at a fixed low FPR with bootstrap confidence intervals, and the curve for a log-log plot.

Higher scores mean "member". Carlini et al. 2022 argue for TPR at low FPR on a log-log ROC rather
than AUC alone; both are reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LOW_FPRS = (0.01, 0.001)


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every threshold, from (0, 0) to (1, 1); ties handled as one step."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both members and non-members")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(~y)[distinct]
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]


def auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    fpr, tpr = roc_curve(scores, is_member)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, target: float) -> float:
    """The largest TPR whose FPR does not exceed ``target``."""
    fpr, tpr = roc_curve(scores, is_member)
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def summarize(scores: np.ndarray, is_member: np.ndarray, *, bootstrap: int = 200, seed: int = 0,
              curve_points: int = 200) -> dict[str, Any]:
    """Every figure the audit reports for one (attack, target)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    fpr, tpr = roc_curve(scores, labels)
    out: dict[str, Any] = {
        "auc": float(np.trapezoid(tpr, fpr)),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "advantage": float(np.max(tpr - fpr)),
        "n_members": int(labels.sum()),
        "n_nonmembers": int((~labels).sum()),
    }
    rng = np.random.default_rng(seed)
    mem, non = np.flatnonzero(labels), np.flatnonzero(~labels)
    for target in LOW_FPRS:
        key = f"tpr_at_{target:g}_fpr"
        out[key] = tpr_at_fpr(scores, labels, target)
        draws = []
        for _ in range(bootstrap):  # stratified: resample members and non-members separately
            idx = np.r_[rng.choice(mem, len(mem)), rng.choice(non, len(non))]
            draws.append(tpr_at_fpr(scores[idx], labels[idx], target))
        lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
        out[key + "_ci95"] = [float(lo), float(hi)]
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(curve_points, len(fpr))).astype(int))
    out["roc"] = {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}
    return out
