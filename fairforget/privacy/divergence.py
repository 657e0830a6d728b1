"""The Delta-divergence between two DP mechanisms (Kaissis, Kolek, Balle, Hayes, Rueckert, "Beyond the
Calibration Point: Mechanism Comparison in Differential Privacy", ICML 2024): the worst-case excess
privacy vulnerability of choosing mechanism A over mechanism B.

*Definition.* With ``f`` and ``g`` the trade-off functions of A and B (the least type-II error of any
membership test at type-I error ``alpha``; ``f`` extended by 0 past 1),

    Delta(A || B) = inf { kappa >= 0 : f(alpha) >= g(alpha + kappa) - kappa  for every alpha in [0, 1] }

It is 0 exactly when A is at least as private as B everywhere (Blackwell: ``f >= g``), and
``max(Delta(A || B), Delta(B || A))`` is a metric between mechanisms (the Levy distance of their
trade-off curves).

*How it is computed here (from the privacy profiles).* A trade-off function is the upper envelope of
its supporting lines, so ``f(alpha) >= g(alpha + kappa) - kappa`` holds for every ``alpha`` if and only if
it holds for every supporting line of ``g``; for the line of slope ``-s`` that reads
``kappa (1 + s) >= R_g(s) - R_f(s)`` with ``R_h(s) = min_alpha (s alpha + h(alpha))``. With the prior
``pi = s / (1 + s)`` this is the paper's Bayesian reading: Delta is the largest amount by which A lowers
the Bayes error of an adversary who guesses membership at any prior,

    Delta(A || B) = sup_pi ( R_B(pi) - R_A(pi) )_+,     R_h(pi) = min_alpha  pi alpha + (1 - pi) h(alpha).

For a mechanism described by its privacy profile ``delta(eps)`` (the least delta with (eps, delta)-DP,
eps >= 0, the same for both orders of the neighbouring datasets, i.e. the symmetric trade-off function
``f = sup_eps f_{eps, delta(eps)}`` of Dong, Roth and Su's Prop. 2.12), the Bayes error at prior pi is
``min(pi, 1 - pi) (1 - delta(|ln(pi / (1 - pi))|))`` (the hockey-stick divergence at ``e^eps``), hence

    Delta(A || B) = sup_{eps >= 0} ( delta_A(eps) - delta_B(eps) )_+ / (1 + e^eps)       (:func:`delta_divergence`)

and, read as (eps, delta): whenever B is (eps, delta)-DP, A is (eps, delta + (1 + e^eps) Delta)-DP, and
no smaller constant does this for every eps.

*The profiles.* A DP-SGD setting is an accountant's history, ``(noise multiplier, sampling rate,
steps)`` per training (a SISA plan is several). ``method = "prv"`` (the default) composes Opacus'
privacy-loss random variables of the Poisson-subsampled Gaussian (Gopi et al. 2021: the discretised
privacy-loss distribution, tight up to ``eps_error`` in eps and ``delta_error`` in delta) and reads
``delta(eps)`` off it exactly for that distribution. ``method = "gdp"`` uses Bu et al.'s mu-GDP central
limit theorem (``mu = q sqrt(T (e^(1/sigma^2) - 1))``, composed in quadrature) for sampled steps, and
the exact ``sqrt(T)/sigma`` for full-batch ones (q = 1: T Gaussian steps are exactly Gaussian); for
sampled steps it is an asymptotic approximation (T large, q sqrt(T) bounded) that is optimistic for few steps or large
sampling rates, and that by construction gives Delta = 0 between any two settings of equal mu, the very
difference this divergence is meant to show. Calibration uses ``prv``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

METHODS = ("prv", "gdp")
EPS_ERROR = 0.01  # PRV discretisation: the profile's eps is exact to within this
DELTA_ERROR = 1e-10  # ... and its delta to within this
EPS_POINTS = 4001  # the eps grid the supremum is taken over (then refined around its maximiser)
DELTA_FLOOR = 1e-12  # the grid ends where both profiles are below this (their Delta there is below it too)
MAX_DOMAIN = 4_000_000  # PRV grid points beyond which a profile is refused (memory, minutes)

Entry = tuple[float, float, int]


class DivergenceError(ValueError):
    """A setting whose privacy profile cannot be computed; one line for the user."""


def _history(setting: Sequence[Entry] | Entry) -> tuple[Entry, ...]:
    """One setting, ``(sigma, q, steps)`` or a list of them, checked and normalised."""
    items = [setting] if (len(setting) == 3 and not isinstance(setting[0], (tuple, list))) else list(setting)
    out = []
    for item in items:
        try:
            sigma, q, steps = float(item[0]), float(item[1]), int(item[2])
        except (TypeError, ValueError, IndexError):
            raise DivergenceError(f"a DP-SGD setting is (noise multiplier, sampling rate, steps), "
                                  f"got {item!r}") from None
        if not (math.isfinite(sigma) and sigma > 0):
            raise DivergenceError(f"no privacy profile for noise multiplier {sigma:g}: it must be > 0 (a finite "
                                  "noise multiplier of 0 or less gives no differential privacy)")
        if not 0.0 < q <= 1.0:
            raise DivergenceError(f"no privacy profile for sampling rate {q:g}: it must be in (0, 1]")
        if steps < 0:
            raise DivergenceError(f"no privacy profile for {steps} steps: the step count must be >= 0")
        if steps > 0:
            out.append((sigma, q, steps))
    return tuple(out)


@dataclass(frozen=True)
class Profile:
    """``delta(eps)`` of one mechanism, evaluated exactly for its (discretised) privacy-loss distribution."""

    method: str
    history: tuple[Entry, ...]
    ts: np.ndarray | None = None  # privacy-loss values (PRV) ...
    tail_p: np.ndarray | None = None  # sum over t >= ts[i] of p(t)
    tail_pe: np.ndarray | None = None  # sum over t >= ts[i] of p(t) e^-t
    mu: float = 0.0  # (gdp)

    def __call__(self, eps: np.ndarray | float) -> np.ndarray:
        e = np.atleast_1d(np.asarray(eps, dtype=float))
        if not self.history:
            return np.zeros_like(e)
        if self.method == "gdp":
            if self.mu == 0:
                return np.zeros_like(e)
            with np.errstate(over="ignore", invalid="ignore"):
                d = norm.cdf(-e / self.mu + self.mu / 2) - np.exp(e + norm.logcdf(-e / self.mu - self.mu / 2))
            return np.clip(np.nan_to_num(d), 0.0, 1.0)
        i = np.searchsorted(self.ts, e, side="left")  # first loss value >= eps
        inside = i < len(self.ts)
        j = np.minimum(i, len(self.ts) - 1)
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.where(inside, self.tail_p[j] - np.exp(e) * self.tail_pe[j], 0.0)
        return np.clip(np.nan_to_num(d), 0.0, 1.0)


def profile(setting: Sequence[Entry] | Entry, method: str = "prv", eps_error: float = EPS_ERROR,
            delta_error: float = DELTA_ERROR) -> Profile:
    """The privacy profile of a DP-SGD setting (see the module docstring for the two methods)."""
    if method not in METHODS:
        raise DivergenceError(f"profile method must be one of {', '.join(METHODS)}, got {method!r}")
    history = _history(setting)
    if method == "gdp" or not history:
        from fairforget.privacy.gdp import mu_of

        # full-batch steps are exactly Gaussian (T steps: sqrt(T)/sigma); the CLT serves the sampled ones
        mu = math.sqrt(sum(t / s**2 for s, q, t in history if q == 1.0)
                       + mu_of([e for e in history if e[1] < 1.0]) ** 2)
        if not math.isfinite(mu):
            raise DivergenceError(f"no mu-GDP profile for {list(history)}: the noise is too small for a finite mu")
        return Profile("gdp" if method == "gdp" else "prv", history, mu=mu)
    return _prv_profile(history, eps_error, delta_error)


def _prv_profile(history: tuple[Entry, ...], eps_error: float, delta_error: float) -> Profile:
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    what = ", ".join(f"(sigma {s:g}, q {q:g}, {t} steps)" for s, q, t in history)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
            counts = [t for _, _, t in history]
            size = _safe_domain_size(history, eps_error, delta_error)
            mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
            if not math.isfinite(size) or 2 * size / mesh > MAX_DOMAIN:
                raise DivergenceError(f"no privacy profile for {what}: its privacy loss is too large for the PRV "
                                      f"accountant's grid ({2 * size / mesh:.3g} points; the noise is too small)")
            domain = Domain.create_aligned(-size, size, mesh)
            dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
            dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    except DivergenceError:
        raise
    except (ValueError, RuntimeError, OverflowError, MemoryError, ZeroDivisionError) as exc:
        raise DivergenceError(f"no privacy profile for {what}: the PRV accountant failed ({exc})") from None
    ts = np.asarray(dprv.domain.ts, dtype=float)
    p = np.clip(np.asarray(dprv.pmf, dtype=float), 0.0, None)
    with np.errstate(over="ignore", under="ignore"):
        tail_p = np.flip(np.cumsum(np.flip(p)))
        tail_pe = np.flip(np.cumsum(np.flip(p * np.exp(-ts))))
    return Profile("prv", history, ts=ts, tail_p=tail_p, tail_pe=tail_pe)


def _safe_domain_size(history: tuple[Entry, ...], eps_error: float, delta_error: float) -> float:
    """Opacus' ``compute_safe_domain_size`` (Gopi et al., remark 5.6, as Opacus implements it), with the
    per-step Renyi curves from the accountant's cache (Opacus recomputes them, seconds for each)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    from fairforget.privacy.accountant import RDP_ORDERS, _rdp_curve

    total = sum(t for _, _, t in history)

    def eps(curve: np.ndarray, delta: float) -> float:
        return float(rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)[0])

    size = eps(sum(t * _rdp_curve(s, q) for s, q, t in history), delta_error / 4)
    for s, q, _ in history:
        size = max(size, eps(_rdp_curve(s, q), delta_error / (8 * total)))
    return max(size, eps_error) + 3


def _eps_max(*profiles: Profile) -> float:
    """An eps past which every profile is below DELTA_FLOOR (doubling from 1)."""
    hi = 1.0
    while hi < 1e4 and any(float(p(hi)[0]) > DELTA_FLOOR for p in profiles):
        hi *= 2
    return hi


def _excess(a: Profile, b: Profile, eps: np.ndarray) -> np.ndarray:
    return (a(eps) - b(eps)) / (1.0 + np.exp(np.minimum(eps, 700.0)))


def delta_divergence_profiles(a: Profile, b: Profile) -> tuple[float, float]:
    """``(Delta(A || B), the eps where the supremum is reached)`` for two profiles."""
    hi = _eps_max(a, b)
    grid = np.linspace(0.0, hi, EPS_POINTS)
    vals = _excess(a, b, grid)
    k = int(np.argmax(vals))
    # refine around the grid maximiser (the grid step is hi / 4000)
    fine = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], 401)
    fvals = _excess(a, b, fine)
    m = int(np.argmax(fvals))
    best, at = (float(fvals[m]), float(fine[m])) if fvals[m] >= vals[k] else (float(vals[k]), float(grid[k]))
    return (best, at) if best > 0 else (0.0, 0.0)


def delta_divergence(a: Sequence[Entry] | Entry, b: Sequence[Entry] | Entry, method: str = "prv") -> float:
    """Delta(A || B): the worst-case excess vulnerability of choosing DP-SGD setting ``a`` over ``b``
    (0 when ``a`` is at least as private as ``b`` at every operating point)."""
    return delta_divergence_profiles(profile(a, method), profile(b, method))[0]


def symmetric(a: Sequence[Entry] | Entry, b: Sequence[Entry] | Entry, method: str = "prv") -> float:
    """``max(Delta(A || B), Delta(B || A))``: the distance between the two mechanisms."""
    pa, pb = profile(a, method), profile(b, method)
    return max(delta_divergence_profiles(pa, pb)[0], delta_divergence_profiles(pb, pa)[0])


def gaussian_delta(mu_a: float, mu_b: float) -> float:
    """Delta(G_mu_a || G_mu_b) between two Gaussian mechanisms, in closed form:
    ``Phi(mu_a / 2) - Phi(mu_b / 2)`` when ``mu_a > mu_b`` (else 0). The supremum is at eps = 0, where
    ``delta(0)`` is the total variation ``2 Phi(mu / 2) - 1`` (the trade-off curves' largest gap along the
    diagonal is at their fixed points ``Phi(-mu / 2)``)."""
    return max(0.0, float(norm.cdf(mu_a / 2) - norm.cdf(mu_b / 2)))


def compare(candidates: Mapping[str, Sequence[Entry]], method: str = "prv") -> dict[str, Any]:
    """Pairwise Delta between candidate settings; the least vulnerable one (the candidate whose largest
    excess over any other is smallest: 0 when it Blackwell-dominates them all) and every candidate's
    excess vulnerability over it. Returns ``{"least_vulnerable", "method", "excess": {name: Delta},
    "worst": {name: max over others}, "at_eps": {name: eps where Delta(name || least) is reached}}``."""
    names = list(candidates)
    if not names:
        raise DivergenceError("no candidate settings to compare")
    profs = {n: profile(candidates[n], method) for n in names}
    table = {(x, y): delta_divergence_profiles(profs[x], profs[y]) for x in names for y in names if x != y}
    worst = {x: max((table[x, y][0] for y in names if y != x), default=0.0) for x in names}
    best = min(names, key=lambda n: (worst[n], names.index(n)))
    return {"method": method, "least_vulnerable": best, "worst": worst,
            "excess": {n: (0.0 if n == best else table[n, best][0]) for n in names},
            "at_eps": {n: (0.0 if n == best else table[n, best][1]) for n in names}}
