"""Gaussian differential privacy (Dong, Roth, Su 2019; Bu et al. 2020) as the report's language.

A mechanism is mu-GDP when telling two neighbouring datasets apart is no easier than telling
N(0, 1) from N(mu, 1). Any membership attack on its output then has

    TPR <= Phi(Phi^-1(FPR) + mu)                                                    (:func:`tpr_bound`)

at every FPR, the bound the audit sets its empirical ROC against. DP-SGD with Poisson sampling at
rate q, noise multiplier sigma and T steps is asymptotically mu-GDP with
``mu = q sqrt(T (e^(1/sigma^2) - 1))`` (Bu et al.'s central limit theorem, Opacus'
``compute_mu_poisson``); trainings of different rates compose to ``sqrt(sum mu_i^2)``.

Calibration (seed 002, "noise calibrated to attack risk"): :func:`noise_for_tpr` solves for the
smallest sigma whose bound meets a target TPR at a target FPR for the planned training;
:func:`noise_for_epsilon` is the usual epsilon-first route, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants.analysis import gdp as opacus_gdp
from scipy.stats import norm

# One training as an accountant records it: (noise multiplier, sample rate, steps).
Entry = tuple[float, float, int]


def tpr_bound(mu: float, fpr: float) -> float:
    """``Phi(Phi^-1(fpr) + mu)``: the most any attack can reach at ``fpr`` against a mu-GDP mechanism."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    if fpr in (0.0, 1.0) or math.isinf(mu):
        return fpr if not math.isinf(mu) else 1.0
    return float(norm.cdf(norm.ppf(fpr) + mu))


def mu_through(fpr: float, tpr: float) -> float:
    """``Phi^-1(tpr) - Phi^-1(fpr)``: the mu whose bound :func:`tpr_bound` passes through (fpr, tpr), so
    the smallest mu a mechanism must have for some attack to reach that point (0 on or below the
    diagonal, inf at fpr = 0 < tpr or tpr = 1 > fpr)."""
    if not (0.0 <= fpr <= 1.0 and 0.0 <= tpr <= 1.0):
        raise ValueError(f"fpr and tpr must be in [0, 1], got {fpr}, {tpr}")
    if tpr <= fpr:
        return 0.0
    return float(norm.ppf(tpr) - norm.ppf(fpr))


def mu_of(history: Sequence[Entry]) -> float:
    """mu of the composition of ``history`` (CLT approximation per entry, composed in quadrature)."""
    total = 0.0
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if sigma <= 0:
            return math.inf
        if (1.0 / sigma**2) > 700:  # e^(1/sigma^2) overflows: no meaningful privacy
            return math.inf
        mu = opacus_gdp.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q)
        total += mu**2
    return math.sqrt(total)


def epsilon_of_mu(mu: float, delta: float) -> float:
    """The epsilon of a mu-GDP mechanism at ``delta`` (Opacus' ``eps_from_mu``)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    try:
        return float(opacus_gdp.eps_from_mu(mu=mu, delta=delta))
    except ValueError:  # Opacus' root bracket ends near mu 30: a nearly non-private plan, solved here
        return _eps_from_mu_wide(mu, delta)


def _gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP (Dong et al. 2019, Cor. 2.13), its second term in log space (no overflow)."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def _eps_from_mu_wide(mu: float, delta: float) -> float:
    """The epsilon at which mu-GDP's delta(eps) falls to ``delta``, by bisection on a bracket that grows
    until it holds the root (delta(eps) decreases in eps)."""
    lo, hi = 0.0, max(1.0, mu * mu)
    while _gdp_delta(hi, mu) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gdp_delta(mid, mu) > delta else (lo, mid)
    return hi


def dp_sgd_entry(n: int, batch_size: int, epochs: int, sigma: float) -> list[Entry]:
    """What ``epochs`` epochs of DP-SGD on ``n`` samples add to an accountant: Poisson sampling at
    ``batch_size / n`` and ``int(n / batch_size)`` steps an epoch (Opacus' uniform-with-replacement
    sampler, as :class:`fairforget.privacy.dp_sgd.DPSGD` draws them)."""
    if n <= 0 or epochs <= 0:
        return []
    q = min(1.0, batch_size / n)
    return [(sigma, q, epochs * max(1, int(1.0 / q)))]


def planned_sisa(n_per_stage: Sequence[int], batch_size: int, epochs: int, sigma: float) -> list[Entry]:
    """The accountant entries of SISA training a shard whose stages see ``n_per_stage`` samples."""
    return [e for n in n_per_stage for e in dp_sgd_entry(n, batch_size, epochs, sigma)]


def _bisect(ok, low: float = 0.05, high: float = 64.0, tol: float = 1e-3) -> float:
    """The smallest sigma in [low, high] with ``ok(sigma)`` (``ok`` monotone in sigma)."""
    if not ok(high):
        raise ValueError(f"no noise multiplier up to {high} meets the target")
    if ok(low):
        return low
    while high - low > tol * max(1.0, low):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if ok(mid) else (mid, high)
    return high


def noise_for_tpr(target_tpr: float, fpr: float, n_per_stage: Sequence[int], batch_size: int,
                  epochs: int) -> float:
    """The smallest sigma whose mu-GDP bound keeps every attack at or below ``target_tpr`` at ``fpr``
    over the planned SISA training."""
    if not 0.0 < fpr < target_tpr <= 1.0:
        raise ValueError(f"need 0 < fpr < target TPR <= 1, got fpr {fpr}, TPR {target_tpr}")
    return _bisect(lambda s: tpr_bound(mu_of(planned_sisa(n_per_stage, batch_size, epochs, s)), fpr) <= target_tpr)


def noise_for_epsilon(epsilon: float, delta: float, n_per_stage: Sequence[int], batch_size: int, epochs: int,
                      accountant: str = "prv") -> float:
    """The smallest sigma whose (epsilon, delta) after the planned SISA training stays within ``epsilon``."""
    from fairforget.privacy.accountant import epsilon_of

    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return _bisect(lambda s: epsilon_of(accountant, planned_sisa(n_per_stage, batch_size, epochs, s), delta) <= epsilon)


def epsilon_for_tpr(target_tpr: float, fpr: float, delta: float) -> float:
    """The epsilon-first route to the same risk target: (epsilon, delta)-DP gives
    ``TPR <= e^epsilon FPR + delta``, so ``epsilon = ln((TPR - delta) / FPR)``."""
    return math.log(max(target_tpr - delta, 1e-300) / fpr)
