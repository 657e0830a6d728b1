"""The Delta-divergence between DP-SGD settings (fairforget.privacy.divergence): zero for identical
mechanisms, the hand-computed Gaussian case (through the PRV profiles of full-batch DP-SGD, which is
exactly Gaussian), the definition itself on trade-off curves, the (eps, delta) reading, the calibration's
candidate list, and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import norm

from fairforget.privacy import divergence as D


def _gaussian_tradeoff(mu: float, alpha: np.ndarray) -> np.ndarray:
    return norm.cdf(norm.ppf(1 - alpha) - mu)


def _by_definition(mu_a: float, mu_b: float) -> float:
    """inf kappa with f(alpha) >= g(alpha + kappa) - kappa on a fine alpha grid (g = 0 past 1), by bisection."""
    alpha = np.linspace(0.0, 1.0, 100_001)
    f = _gaussian_tradeoff(mu_a, alpha)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        k = (lo + hi) / 2
        x = alpha + k
        g = np.where(x <= 1, _gaussian_tradeoff(mu_b, np.minimum(x, 1.0)), 0.0)
        lo, hi = (lo, k) if np.all(f >= g - k - 1e-12) else (k, hi)
    return hi


def test_hand_computed_gaussian_case_and_zero_for_identical_mechanisms():
    # full-batch DP-SGD (q = 1): T Gaussian steps of noise sigma are exactly sqrt(T)/sigma-GDP
    a, b = (1.0, 1.0, 4), (2.0, 1.0, 4)  # mu 2 and mu 1
    hand = norm.cdf(1.0) - norm.cdf(0.5)  # Phi(mu_a / 2) - Phi(mu_b / 2) = 0.14988...
    assert D.gaussian_delta(2.0, 1.0) == pytest.approx(hand, abs=1e-12)
    assert _by_definition(2.0, 1.0) == pytest.approx(hand, abs=1e-6)  # the definition itself, on the curves
    pa, pb = D.profile(a), D.profile(b)  # PRV profiles
    eps = np.linspace(0.0, 4.0, 9)  # ... are the Gaussian's delta(eps) (Balle and Wang 2018)
    gauss = norm.cdf(-eps / 2.0 + 1.0) - np.exp(eps) * norm.cdf(-eps / 2.0 - 1.0)
    assert np.abs(pa(eps) - gauss).max() < 1e-3
    assert D.delta_divergence_profiles(pa, pb)[0] == pytest.approx(hand, abs=1e-5)
    assert D.delta_divergence_profiles(pb, pa)[0] < 1e-7  # more noise: Blackwell-dominates, no excess
    assert D.delta_divergence(a, b, method="gdp") == pytest.approx(hand, abs=1e-9)
    # identical mechanisms: the same setting, and the same mechanism written as two trainings
    assert D.delta_divergence_profiles(pa, pa)[0] == 0.0
    split = D.profile([(1.0, 1.0, 1), (1.0, 1.0, 3)])
    assert max(D.delta_divergence_profiles(pa, split)[0], D.delta_divergence_profiles(split, pa)[0]) < 1e-7
    assert D.symmetric(a, a) == 0.0


def test_subsampled_settings_read_as_eps_delta():
    """Delta is the least kappa with delta_A(eps) <= delta_B(eps) + (1 + e^eps) kappa at every eps."""
    a, b = (0.9, 0.25, 8), (1.6, 0.5, 8)
    pa, pb = D.profile(a), D.profile(b)
    delta, at = D.delta_divergence_profiles(pa, pb)
    assert 1e-4 < delta < 0.5
    eps = np.linspace(0.0, 12.0, 3001)
    slack = pb(eps) + (1 + np.exp(eps)) * delta - pa(eps)
    assert slack.min() > -1e-9  # it bounds A's profile ...
    smaller = pb(eps) + (1 + np.exp(eps)) * 0.98 * delta - pa(eps)
    assert smaller.min() < 0  # ... and 2% less would not
    assert pa(at)[0] - pb(at)[0] == pytest.approx((1 + math.exp(at)) * delta, rel=1e-6)


def test_calibration_lists_the_settings_that_meet_the_target_with_their_delta(monkeypatch):
    from fairforget.privacy.gdp import mu_of, planned_sisa, tpr_bound
    from fairforget.privacy.reporting import calibrate

    cfg = SimpleNamespace(slices=1, batch_size=8, epochs_per_slice=1, dp_target_tpr=0.2, dp_target_fpr=0.05,
                          dp_target_epsilon=3.0, dp_delta=1e-5, dp_accountant="rdp", dp_noise_multiplier=1.0,
                          dp_calibrate="attack-risk")
    out = calibrate(cfg, [16, 20], compare=False, candidates=True)  # one stage of 16: q = 0.5, 0.25, 1
    k = out["candidates"]
    rows = k["settings"]
    assert len(rows) == 4 and rows[k["chosen"]]["noise_multiplier"] == out["chosen"]["noise_multiplier"]
    assert rows[k["least_vulnerable"]]["delta_excess"] == 0.0
    least = rows[k["least_vulnerable"]]
    for r in rows.values():
        plan = planned_sisa(out["stage_sizes"], r["batch_size"], r["epochs_per_slice"], r["noise_multiplier"])
        assert tpr_bound(mu_of(plan), 0.05) <= 0.2 + 1e-9  # each meets the target
        other = planned_sisa(out["stage_sizes"], least["batch_size"], least["epochs_per_slice"],
                             least["noise_multiplier"])
        assert r["delta_excess"] == pytest.approx(D.delta_divergence(plan, other), abs=1e-12)
    assert k["chosen_delta_excess"] == rows[k["chosen"]]["delta_excess"]
    from fairforget.report import _candidate_lines

    table = "\n".join(_candidate_lines(k))  # the report shows the chosen setting's Delta
    assert f"This run's Delta: {k['chosen_delta_excess']:.4f}" in table and "(least vulnerable)" in table

    def no_profile(*_a, **_k):
        raise D.DivergenceError("no privacy profile for (sigma 0.001, q 0.5, 4 steps): too large")

    monkeypatch.setattr(D, "compare", no_profile)  # a profile that cannot be computed is said, the run goes on
    k = calibrate(cfg, [16, 20], compare=False, candidates=True)["candidates"]
    assert k["error"].startswith("no privacy profile") and k["least_vulnerable"] is None
    assert "no Delta-divergence (no privacy profile" in "\n".join(_candidate_lines(k))


@pytest.mark.parametrize("setting, match", [
    ((0.0, 0.1, 10), "noise multiplier 0"),
    ((1.0, 1.5, 10), "sampling rate 1.5"),
    ((1.0, 0.1, -1), "-1 steps"),
    ((1e-3, 0.5, 100), "too large"),
    (("x", 0.1), "noise multiplier, sampling rate, steps"),
])
def test_settings_whose_profiles_cannot_be_computed_are_one_line_errors(setting, match):
    from server import cli

    with pytest.raises(D.DivergenceError, match=match) as err:
        D.delta_divergence(setting, (1.0, 0.1, 10))
    assert "\n" not in str(err.value) and cli._is_user_error(err.value)
