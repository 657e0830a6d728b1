"""The fairness figures against hand-computed values: KL from uniform, accuracy per (class, private)
group with the worst group, and the ensemble's votes (fairforget/metrics.py, fairforget/ensemble.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairforget.data.base import make_sampleset
from fairforget.ensemble import Ensemble
from fairforget.metrics import accuracy_report, group_counts, kl_from_uniform


# ---------------------------------------------------------------------- KL(p || uniform)
@pytest.mark.parametrize(("counts", "expected"), [
    ([[1, 1], [1, 1]], 0.0),  # balanced
    ([[5, 0], [0, 0]], math.log(4)),  # one cell of four: log K
    ([[2, 0], [1, 1]], 0.5 * math.log(2)),  # p = (1/2, 0, 1/4, 1/4): 1/2 ln(2) + 1/4 ln(1) + 1/4 ln(1)
    ([3, 1], 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),  # = 0.130812
    ([[6, 3, 1, 0]], 0.6 * math.log(2.4) + 0.3 * math.log(1.2) + 0.1 * math.log(0.4)),  # = 0.488349
])
def test_kl_from_uniform_hand_computed(counts, expected):
    assert kl_from_uniform(np.array(counts)) == pytest.approx(expected, abs=1e-12)


def test_kl_from_uniform_counts_every_cell_and_refuses_an_empty_set():
    assert kl_from_uniform(np.array([3, 1])) == pytest.approx(0.130812, abs=1e-6)
    assert kl_from_uniform(np.array([3, 1, 0, 0])) == pytest.approx(math.log(4) - 0.562335, abs=1e-6)  # K = 4
    with pytest.raises(ValueError, match="empty"):
        kl_from_uniform(np.zeros(3))


def test_group_counts_by_class_and_private():
    y, a = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(group_counts(y, a, 3, 2), [[0, 2], [1, 0], [1, 2]])


# ---------------------------------------------------------------------- accuracy per group, worst group
def _data(y, private):
    n = len(y)
    return make_sampleset(torch.zeros(n, 3, 2, 2), np.asarray(y), np.asarray(private), np.arange(n))


def test_accuracy_report_hand_computed():
    #          idx:  0  1  2  3  4  5  6  7
    data = _data([0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 0, 1, 1, 0])
    pred = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0])
    # groups (class, private): (0,0) idx 0-2 right, right, wrong = 2/3; (0,1) idx 3 right = 1; (1,0) idx 4
    # right = 1; (1,1) idx 5-6 right, wrong = 1/2; (2,0) idx 7 wrong = 0; (2,1) empty: absent
    r = accuracy_report(pred, data, 3, 2)
    assert r["accuracy"] == pytest.approx(5 / 8) and r["n"] == 8
    assert [(g["class"], g["private"], g["n"]) for g in r["groups"]] == [(0, 0, 3), (0, 1, 1), (1, 0, 1), (1, 1, 2),
                                                                          (2, 0, 1)]
    assert [g["accuracy"] for g in r["groups"]] == pytest.approx([2 / 3, 1.0, 1.0, 0.5, 0.0])
    assert r["worst_group"] == {"class": 2, "private": 0, "n": 1, "accuracy": 0.0}
    # groups smaller than min_group are not eligible for the worst group: (1,1) at 1/2 is
    assert accuracy_report(pred, data, 3, 2, min_group=2)["worst_group"] == {"class": 1, "private": 1, "n": 2,
                                                                              "accuracy": 0.5}
    # no group that large: every group is eligible again
    assert accuracy_report(pred, data, 3, 2, min_group=4)["worst_group"]["accuracy"] == 0.0


def test_worst_group_tie_goes_to_the_larger_group():
    data = _data([0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0])
    pred = torch.tensor([0, 1, 1, 0, 1, 0])  # (0,0): 1/2 of 2; (1,0): 2/4
    assert accuracy_report(pred, data, 2, 1)["worst_group"] == {"class": 1, "private": 0, "n": 4, "accuracy": 0.5}


# ---------------------------------------------------------------------- the ensemble's votes
# three members' softmax outputs on three samples (K = 3)
MEMBER_PROBS = torch.tensor([
    [[0.6, 0.3, 0.1], [0.98, 0.01, 0.01], [0.1, 0.2, 0.7]],
    [[0.4, 0.5, 0.1], [0.3, 0.4, 0.3], [0.2, 0.7, 0.1]],
    [[0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.6, 0.3, 0.1]],
])
# sample 0: votes 0, 1, 1 -> (1/3, 2/3, 0); mean (0.3667, 0.5333, 0.1) -> both say 1
# sample 1: votes 0, 1, 1 -> (1/3, 2/3, 0) -> 1; mean (0.5267, 0.27, 0.2033) -> 0: the votes disagree
# sample 2: votes 2, 1, 0 -> a three-way tie -> the lower class, 0; mean (0.3, 0.4, 0.3) -> 1
MAJORITY_PROBA = [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3]]
MAJORITY_PRED = [1, 1, 0]
SOFTMAX_PRED = [1, 0, 1]


class _Fixed(torch.nn.Module):
    """A member whose logits on sample i are log(MEMBER_PROBS[m, i]) (x holds the sample index)."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.logp = MEMBER_PROBS[m].log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logp[x[:, 0].long()]


def fixed_ensemble(vote: str) -> Ensemble:
    ens = Ensemble({}, 3, 4, vote=vote)  # no states: the three fixed members are put in below
    ens.models = {m: _Fixed(m) for m in range(3)}
    return ens


SAMPLES = torch.arange(3.0).view(3, 1)


def assert_votes_hand_computed(ens_for=fixed_ensemble) -> None:
    """The majority vote's shares and predictions, and the softmax vote's, on :data:`MEMBER_PROBS`."""
    majority, soft = ens_for("majority"), ens_for("softmax")
    torch.testing.assert_close(majority.predict_proba(SAMPLES), torch.tensor(MAJORITY_PROBA))
    assert majority.predict(SAMPLES).tolist() == MAJORITY_PRED
    torch.testing.assert_close(soft.predict_proba(SAMPLES), MEMBER_PROBS.mean(0))
    assert soft.predict(SAMPLES).tolist() == SOFTMAX_PRED


def test_ensemble_votes_hand_computed():
    assert_votes_hand_computed()
    with pytest.raises(ValueError, match="unknown ensemble vote"):
        Ensemble({}, 3, 4, vote="mean")
