"""Utility and fairness figures: accuracy, accuracy per (class, private-attribute) group, the worst
group, and the bias of a group distribution as ``KL(p || uniform) = log K - H(p)``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fairforget.data.base import SampleSet


def group_counts(y: torch.Tensor, private: torch.Tensor, num_classes: int, num_private: int) -> np.ndarray:
    """(num_classes, num_private) sample counts."""
    flat = (y * num_private + private).numpy()
    return np.bincount(flat, minlength=num_classes * num_private).reshape(num_classes, num_private)


def kl_from_uniform(counts: np.ndarray) -> float:
    """``KL(p || u)`` over all K cells of ``counts``: 0 when balanced, at most ``log K``."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        raise ValueError("no samples: the bias of an empty set is undefined")
    p = counts[counts > 0] / total
    return float(np.sum(p * np.log(p * counts.size)))


def accuracy_report(pred: torch.Tensor, data: SampleSet, num_classes: int, num_private: int,
                    min_group: int = 1) -> dict[str, Any]:
    """Overall accuracy, accuracy per populated group, and the worst group among groups with at
    least ``min_group`` samples."""
    correct = (pred == data.y).float()
    groups = []
    for c in range(num_classes):
        for a in range(num_private):
            mask = (data.y == c) & (data.private == a)
            n = int(mask.sum())
            if n:
                groups.append({"class": c, "private": a, "n": n, "accuracy": float(correct[mask].mean())})
    eligible = [g for g in groups if g["n"] >= min_group] or groups
    worst = min(eligible, key=lambda g: (g["accuracy"], -g["n"]))
    return {
        "accuracy": float(correct.mean()) if len(correct) else math.nan,
        "n": len(correct),
        "worst_group": worst,
        "groups": groups,
    }
