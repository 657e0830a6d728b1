"""What a membership attack's counts prove about a run's privacy claim, at a stated confidence: the
DP-auditing decision of Jagielski, Ullman and Oprea 2020 ("Auditing differentially private machine
learning: how private is private SGD?") and Nasr et al. 2021 ("Adversary instantiation: lower bounds
for differentially private machine learning").

An attack's "TPR at FPR f" is read at a threshold set on the N non-members alone: the one that lets
``k = floor(f N)`` of them through (:func:`false_positives_allowed`, the rule of
``fairforget.audit.roc``), at each level f of :data:`AUDIT_FPRS`. For one (target, attack, threshold):

1. Counts. At most k of N non-members score above the threshold; TP of the M members do, FN = M - TP.
   With k = 0 (fewer than 1/f non-members) the threshold lies above every non-member, whose true FPR
   is anywhere up to a few times 1/N: the TPR at f is *not resolvable with N non-members*, and the
   report says so instead of printing the number.
2. Clopper-Pearson upper bounds, each at level ``a`` (:func:`clopper_pearson_upper`)::

       FPR_hi = Beta^-1(1 - a; k + 1, N - k),      FNR_hi = Beta^-1(1 - a; FN + 1, M - FN)

   The first is exact, not only conservative: the true FPR of a threshold just above the (k+1)-th
   highest of N continuous non-member scores is Beta(k + 1, N - k) distributed. The threshold depends
   on the non-members only, so FN is Binomial(M, FNR) given it.
3. An (epsilon, delta)-DP mechanism forces ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 -
   delta`` on any test, and a mu-GDP one ``1 - FNR <= Phi(Phi^-1(FPR) + mu)``; so whenever both rates lie
   below their bounds (:func:`epsilon_lower_bound`, :func:`mu_lower_bound`)::

       eps_lb = max(0, log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))
       mu_lb  = max(0, Phi^-1(1 - FNR_hi) - Phi^-1(FPR_hi))

4. Correction (Bonferroni). With m tests (every target with a claim x attack x distinct threshold; two
   FPR levels that give the same k are one test), ``a = alpha / (2 m)``: over the tests and the two
   bounds of each, the chance that any bound fails is at most alpha.
5. Decision: a violation when ``eps_lb > claimed epsilon`` (the accountant's, at its delta) or ``mu_lb >
   claimed mu``. The run states both (the report prints epsilon and the mu-GDP TPR bound); one
   confidence event covers both, so checking both needs no further correction. If the claims hold, the
   audit raises a false alarm with probability at most alpha (:data:`ALPHA`). The mu is the central
   limit approximation (:mod:`.gdp`): an alarm on mu alone refutes that approximation, not the accountant.
6. Resolution: no attack can prove more than eps_lb at FP = FN = 0 (:func:`max_provable_epsilon`), a
   property of N, M and the confidence alone: with 90 non-members and 90 members, at 95% for a single
   test, about 3.2, and less after the correction (the first inequality is capped by N, the second by
   M). A claim above it cannot be refuted by this audit whatever the model leaks; the report says so
   beside the claim.

Pooling the candidates of one training treats their outcomes as independent trials, as
membership-inference audits do; Steinke, Nasr and Jagielski 2023 ("Privacy auditing with one (1)
training run") give the analysis that makes such a one-run audit rigorous under random inclusion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import beta

from fairforget.privacy.accountant import BOUND_FPRS
from fairforget.privacy.gdp import mu_through

ALPHA = 0.05  # the audit's family-wise false-alarm rate: every figure is stated at 1 - ALPHA confidence
# the FPR levels tested: the report's (1%, 0.1%), where a strong leak of a few records shows, and two moderate
# ones, where many records leaking a little show and small counts still resolve the rates (a claim of
# epsilon 0.2 cannot be refuted at 1% FPR with a few hundred candidates, but can at 50%)
AUDIT_FPRS = (0.5, 0.1) + tuple(sorted(BOUND_FPRS, reverse=True))


def false_positives_allowed(n_nonmembers: int, fpr: float) -> int:
    """``floor(fpr N)``: the non-members a threshold at FPR <= ``fpr`` may let through."""
    return min(int(n_nonmembers), int(math.floor(fpr * n_nonmembers + 1e-9)))


def resolvable(n_nonmembers: int, fpr: float) -> bool:
    """Whether N non-members resolve ``fpr``: a threshold at it may let at least one through."""
    return false_positives_allowed(n_nonmembers, fpr) >= 1


def clopper_pearson_upper(k: int, n: int, a: float) -> float:
    """The exact one-sided upper bound, at level ``a``, on a rate seen ``k`` times in ``n`` trials:
    ``Beta^-1(1 - a; k + 1, n - k)`` (1 when k = n)."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k = {k}, n = {n}")
    return 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))


def _uppers(fp: int, n_nonmembers: int, fn: int, n_members: int, alpha: float) -> tuple[float, float]:
    """(FPR_hi, FNR_hi), each at ``alpha / 2``: both hold together with probability >= 1 - alpha."""
    return clopper_pearson_upper(fp, n_nonmembers, alpha / 2), clopper_pearson_upper(fn, n_members, alpha / 2)


def _eps(fpr_hi: float, fnr_hi: float, delta: float) -> float:
    def term(a: float, b: float) -> float:
        return math.log((1.0 - delta - a) / b) if 1.0 - delta - a > 0 else -math.inf

    return max(0.0, term(fnr_hi, fpr_hi), term(fpr_hi, fnr_hi))


def _mu(fpr_hi: float, fnr_hi: float) -> float:
    return mu_through(fpr_hi, 1.0 - fnr_hi)


def epsilon_lower_bound(fp: int, n_nonmembers: int, fn: int, n_members: int, *, alpha: float,
                        delta: float = 0.0) -> float:
    """The epsilon that ``fp`` false positives of ``n_nonmembers`` and ``fn`` false negatives of
    ``n_members`` prove at confidence ``1 - alpha`` (step 3 of the module docstring; 0: nothing)."""
    return _eps(*_uppers(fp, n_nonmembers, fn, n_members, alpha), delta)


def mu_lower_bound(fp: int, n_nonmembers: int, fn: int, n_members: int, *, alpha: float) -> float:
    """The mu the same counts prove at confidence ``1 - alpha`` (0: nothing)."""
    return _mu(*_uppers(fp, n_nonmembers, fn, n_members, alpha))


def max_provable_epsilon(n_nonmembers: int, n_members: int, *, alpha: float, delta: float = 0.0) -> float:
    """The most any attack, a perfect one included, can prove with these counts at ``1 - alpha``."""
    return epsilon_lower_bound(0, n_nonmembers, 0, n_members, alpha=alpha, delta=delta)


@dataclass(frozen=True)
class Check:
    """One (target, attack, FPR level): its counts, what they prove, and the decision."""

    target: str
    attack: str
    fpr: float
    nonmembers: int
    members: int
    false_positives_allowed: int
    true_positives: int
    resolvable: bool
    tested: bool  # False: the same threshold as a higher FPR level, tested there
    fpr_upper: float
    fnr_upper: float
    epsilon_lower_bound: float
    mu_lower_bound: float
    max_provable_epsilon: float
    claimed_epsilon: float | None
    claimed_mu: float | None
    delta: float
    exceeds: tuple[str, ...] = ()  # "epsilon" and / or "mu"

    def message(self, alpha: float, tests: int) -> str:
        what = " and ".join(f"the claimed epsilon {self.claimed_epsilon:.3f}" if e == "epsilon" else
                            f"the mu-GDP bound (mu = {self.claimed_mu:.3f})" for e in self.exceeds)
        k = self.false_positives_allowed
        above = f"at most {k} of {self.nonmembers}" if k else f"none of {self.nonmembers}"
        return (f"{self.target} {self.attack}: {self.true_positives} of {self.members} members vs {above} "
                f"non-members above its {self.fpr:.1%} FPR threshold prove epsilon >= {self.epsilon_lower_bound:.3f} "
                f"and mu >= {self.mu_lower_bound:.3f} at {1 - alpha:.0%} confidence (Bonferroni over {tests} "
                f"test{'s' if tests != 1 else ''}): exceeds {what}")


@dataclass(frozen=True)
class Audit:
    """Every check of a privacy block against its DP claims; ``violations`` are the alarms."""

    alpha: float
    tests: int
    checks: list[Check] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # "target attack": figures with no counts

    @property
    def violations(self) -> list[str]:
        return [c.message(self.alpha, self.tests) for c in self.checks if c.exceeds]


def _claim(dp: Mapping[str, Any], target: str) -> Mapping[str, Any] | None:
    shards = dp.get("shards") or {}
    return dp.get("ensemble") if target == "ensemble" else shards.get(target.removeprefix("shard-"))


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def audit(privacy: Mapping[str, Any], dp: Mapping[str, Any], *, alpha: float = ALPHA,
          levels: tuple[float, ...] = AUDIT_FPRS) -> Audit:
    """Every (target, attack, FPR level) of ``privacy`` set against its target's claim in ``dp``
    (the module docstring's decision). A figure without ``n_members`` / ``n_nonmembers`` cannot be
    judged at any confidence: it is listed in ``unchecked``, never flagged."""
    planned: list[dict[str, Any]] = []
    unchecked: list[str] = []
    for target, attacks in (privacy.get("targets") or {}).items():
        claim = _claim(dp, target)
        if not claim:
            continue
        eps, mu = _finite(claim.get("epsilon")), _finite(claim.get("mu"))
        if eps is None and mu is None:
            continue
        delta = float(claim.get("delta", dp.get("delta", 0.0)) or 0.0)
        for name, r in attacks.items():
            n, m = r.get("n_nonmembers"), r.get("n_members")
            if not n or not m:
                unchecked.append(f"{target} {name}")
                continue
            seen: set[int] = set()
            for f in sorted(levels, reverse=True):
                tpr = r.get(f"tpr_at_{f:g}_fpr")
                if tpr is None:
                    continue
                k = false_positives_allowed(n, f)
                planned.append({"target": target, "attack": name, "fpr": f, "nonmembers": int(n),
                                "members": int(m), "false_positives_allowed": k,
                                "true_positives": int(round(float(tpr) * m)), "resolvable": k >= 1,
                                "tested": k not in seen, "claimed_epsilon": eps, "claimed_mu": mu, "delta": delta})
                seen.add(k)
    tests = sum(p["tested"] for p in planned)
    a = alpha / max(tests, 1)
    checks = []
    for p in planned:
        fpr_hi, fnr_hi = _uppers(p["false_positives_allowed"], p["nonmembers"], p["members"] - p["true_positives"],
                                 p["members"], a)
        eps_lb, mu_lb = _eps(fpr_hi, fnr_hi, p["delta"]), _mu(fpr_hi, fnr_hi)
        exceeds = () if not p["tested"] else tuple(
            what for what, lb, claimed in (("epsilon", eps_lb, p["claimed_epsilon"]), ("mu", mu_lb, p["claimed_mu"]))
            if claimed is not None and lb > claimed)
        checks.append(Check(**p, fpr_upper=fpr_hi, fnr_upper=fnr_hi, epsilon_lower_bound=eps_lb, mu_lower_bound=mu_lb,
                            max_provable_epsilon=max_provable_epsilon(p["nonmembers"], p["members"], alpha=a,
                                                                      delta=p["delta"]),
                            exceeds=exceeds))
    return Audit(alpha=alpha, tests=tests, checks=checks, unchecked=unchecked)
