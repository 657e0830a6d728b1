"""The DP audit's decision (issue 24, item 5): Clopper-Pearson bounds on both error rates, an epsilon
(and mu) lower bound set against the claim, a Bonferroni correction, and figures an audit of N
non-members cannot resolve said so. Scores come from known distributions: members N(shift, 1),
non-members N(0, 1), which is exactly shift-GDP, so a claim of mu = shift is true."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom, binomtest

from fairforget.audit.roc import summarize
from fairforget.privacy.auditing import (
    ALPHA,
    AUDIT_FPRS,
    audit,
    clopper_pearson_upper,
    epsilon_lower_bound,
    max_provable_epsilon,
    mu_lower_bound,
)
from fairforget.privacy.gdp import epsilon_of_mu, mu_through, tpr_bound
from fairforget.privacy.reporting import violations
from fairforget.report import _audit_lines, tpr_cell

DELTA = 1e-5
SEEDS = 50


def figure(seed: int, shift: float, nonmembers: int, members: int, memorised: float = 0.0) -> dict:
    """One attack's ROC summary on Gaussian scores; a ``memorised`` share of members scores far above all."""
    rng = np.random.default_rng(seed)
    mem = rng.normal(shift, 1.0, members)
    mem[: int(memorised * members)] = 10.0
    scores = np.r_[mem, rng.normal(0.0, 1.0, nonmembers)]
    return summarize(scores, np.r_[np.ones(members, bool), np.zeros(nonmembers, bool)], bootstrap=0)


def claim(mu: float | None = None, epsilon: float | None = None) -> dict:
    c = {"delta": DELTA, "mu": mu, "epsilon": epsilon_of_mu(mu, DELTA) if epsilon is None else epsilon}
    return {"ensemble": c, "shards": {"0": c}}


def flagged(seed: int, shift: float, nonmembers: int, members: int, dp: dict, **kw) -> bool:
    """Two attacks (independent draws) on two targets: eight figures, as a small audit has."""
    targets = {t: {a: figure(seed * 7 + i, shift, nonmembers, members, **kw) for i, a in enumerate(("loss", "rmia"))}
               for t in ("ensemble", "shard-0")}
    return bool(violations({"targets": targets}, dp))


def test_clopper_pearson_bound_against_beta_quantiles():
    for k, n, a in ((0, 90, 0.025), (3, 90, 0.01), (20, 2000, 0.05 / 16), (89, 90, 0.025)):
        hand = beta.ppf(1 - a, k + 1, n - k)
        assert clopper_pearson_upper(k, n, a) == pytest.approx(hand, rel=1e-12)
        # the upper end of scipy's exact two-sided interval at confidence 1 - 2a
        assert clopper_pearson_upper(k, n, a) == pytest.approx(
            binomtest(k, n).proportion_ci(confidence_level=1 - 2 * a, method="exact").high, rel=1e-9)
    assert clopper_pearson_upper(0, 90, 0.025) == pytest.approx(1 - 0.025 ** (1 / 90))  # closed form at k = 0
    assert clopper_pearson_upper(90, 90, 0.025) == 1.0
    with pytest.raises(ValueError):
        clopper_pearson_upper(5, 4, 0.05)


def test_lower_bounds_by_hand():
    fp, n, fn, m, alpha = 4, 1000, 300, 1000, 0.01
    fpr_hi, fnr_hi = beta.ppf(1 - alpha / 2, fp + 1, n - fp), beta.ppf(1 - alpha / 2, fn + 1, m - fn)
    eps = max(math.log((1 - DELTA - fnr_hi) / fpr_hi), math.log((1 - DELTA - fpr_hi) / fnr_hi))
    assert epsilon_lower_bound(fp, n, fn, m, alpha=alpha, delta=DELTA) == pytest.approx(eps, rel=1e-12)
    # the second inequality: an attack whose errors are mostly false positives proves the same, roles swapped
    assert epsilon_lower_bound(fn, m, fp, n, alpha=alpha, delta=DELTA) == pytest.approx(eps, rel=1e-12)
    assert mu_lower_bound(fp, n, fn, m, alpha=alpha) == pytest.approx(mu_through(fpr_hi, 1 - fnr_hi), rel=1e-12)
    # mu_through inverts the mu-GDP bound
    assert tpr_bound(mu_through(0.01, 0.3), 0.01) == pytest.approx(0.3)
    assert epsilon_lower_bound(30, 100, 70, 100, alpha=alpha) == 0.0  # below the diagonal proves nothing


def test_the_most_90_nonmembers_can_prove():
    """With 90 non-members and 90 members even a perfect attack proves at most log(1 / FPR_hi(0 of 90))
    (the second inequality gives the same with as many members): about 3.2 at 95% for one test."""
    a = ALPHA / 2
    hand = math.log((1 - DELTA - (1 - a ** (1 / 90))) / (1 - a ** (1 / 90)))
    assert max_provable_epsilon(90, 90, alpha=ALPHA, delta=DELTA) == pytest.approx(hand, rel=1e-9)
    assert 3.0 < hand < 3.4
    # a perfect attack reaches it, corrected for the audit's tests; a claim above it is never refuted
    perfect = {"targets": {"shard-0": {"loss": figure(0, 50.0, 90, 90)}}}
    result = audit(perfect, claim(mu=0.5, epsilon=50.0))
    check, twin = (c for c in result.checks if c.fpr in (0.01, 0.001))
    assert check.tested and not twin.tested  # 1% and 0.1% of 90: one threshold, above all 90, one test
    assert check.epsilon_lower_bound == pytest.approx(check.max_provable_epsilon)
    assert check.max_provable_epsilon == pytest.approx(
        max_provable_epsilon(90, 90, alpha=ALPHA / result.tests, delta=DELTA))
    assert check.exceeds == ("mu",) and not violations(perfect, claim(epsilon=hand + 0.01))
    # the report states it beside the claim, at the corrected level of the tests it made
    most = max_provable_epsilon(90, 90, alpha=ALPHA / audit(perfect, claim(epsilon=4.0)).tests, delta=DELTA)
    lines = "\n".join(_audit_lines(perfect, claim(epsilon=4.0)))
    assert f"with 90 non-members and 90 members no attack can prove epsilon above {most:.2f}" in lines


def test_bonferroni_counts_targets_attacks_and_distinct_thresholds():
    fig = figure(1, 0.5, 1000, 1000)
    privacy = {"targets": {t: {"loss": fig, "rmia": fig} for t in ("ensemble", "shard-0")}}
    result = audit(privacy, claim(mu=0.5))
    tests = 2 * 2 * len(AUDIT_FPRS)
    assert result.tests == tests and all(c.tested for c in result.checks)
    for c in result.checks:
        k = math.floor(c.fpr * 1000 + 1e-9)
        assert c.false_positives_allowed == k
        assert c.fpr_upper == pytest.approx(beta.ppf(1 - ALPHA / (2 * tests), k + 1, 1000 - k))
    small = {"targets": {"ensemble": {"loss": figure(1, 0.5, 90, 200)}, "shard-7": {"loss": fig}}}
    # 1% and 0.1% of 90 non-members: one threshold, one test; shard-7 claims nothing
    assert audit(small, claim(mu=0.5)).tests == len(AUDIT_FPRS) - 1


def test_a_shift_at_the_claim_is_rarely_flagged():
    """True shift = claimed mu = 0.5 (and the epsilon that mu gives): at most what alpha allows, in 50 seeds."""
    dp = claim(mu=0.5)
    hits = sum(flagged(s, 0.5, 1000, 1000, dp) for s in range(SEEDS))
    assert hits <= binom.ppf(0.99, SEEDS, ALPHA), hits


def test_a_shift_far_above_the_claim_is_flagged():
    assert all(flagged(s, 4.0, 2000, 2000, claim(mu=0.5)) for s in range(10))
    assert sum(flagged(s, 1.0, 3000, 3000, claim(mu=0.5)) for s in range(10)) >= 8  # twice the claim


def test_a_small_correctly_trained_run_is_not_flagged_and_says_what_it_cannot_resolve():
    """Issue 24's run: mu 0.76, about 90 non-members. The old rule (the TPR's interval against the bound at
    the nominal FPR) flagged it; at the claim, in 50 seeds, no more flags than alpha allows."""
    dp = claim(mu=0.76)
    hits = sum(flagged(s, 0.76, 90, 135, dp) for s in range(SEEDS))
    assert hits <= binom.ppf(0.99, SEEDS, ALPHA), hits
    fig = figure(0, 0.76, 90, 135)
    assert fig["tpr_at_0.001_fpr_resolvable"] is False and fig["tpr_at_0.01_fpr_resolvable"] is False
    assert tpr_cell(fig, 0.001) == "not resolvable with 90 non-members"
    big = figure(0, 0.76, 1000, 1000)
    assert big["tpr_at_0.001_fpr_resolvable"] is True and tpr_cell(big, 0.001) == f"{big['tpr_at_0.001_fpr']:.3f}"


def test_a_memorising_model_claiming_epsilon_one_is_flagged_with_enough_candidates():
    """A fifth of the members memorised (scored above every non-member): epsilon <= 1 is refuted with
    1000 candidates a side; 90 non-members cannot refute a claim of epsilon 4, and the report says so."""
    dp = {"ensemble": {"epsilon": 1.0, "delta": DELTA}, "shards": {}}
    for seed in range(5):
        privacy = {"targets": {"ensemble": {"loss": figure(seed, 0.0, 1000, 1000, memorised=0.2)}}}
        found = violations(privacy, dp)
        assert found and "exceeds the claimed epsilon 1.000" in found[0], found
    small = {"targets": {"ensemble": {"loss": figure(0, 0.0, 90, 90, memorised=0.5)}}}
    dp4 = {"ensemble": {"epsilon": 4.0, "delta": DELTA}, "shards": {}}
    assert not violations(small, dp4) and "can refute" in "\n".join(_audit_lines(small, dp4))


def test_figures_without_counts_are_listed_not_judged():
    privacy = {"targets": {"ensemble": {"loss": {"tpr_at_0.01_fpr": 0.9, "tpr_at_0.001_fpr": 0.9}}}}
    result = audit(privacy, claim(mu=0.1))
    assert result.unchecked == ["ensemble loss"] and not result.violations and result.tests == 0
