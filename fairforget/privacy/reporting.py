"""What a run says about its differential privacy: the noise it chose and why, each shard's
cumulative spend, and the ensemble's guarantee.

*Calibration* (:func:`calibrate`). For a shard's planned SISA training (stage r sees the first r of
R slices; Poisson sampling at ``batch-size / n_r``; ``epochs-per-slice`` epochs a stage) it solves
for the noise multiplier three ways: directly for the attack-risk target (``dp-target-tpr`` at
``dp-target-fpr``, through the mu-GDP bound), epsilon-first for the same risk (epsilon = ln((TPR -
delta) / FPR), since (epsilon, delta)-DP bounds TPR by e^epsilon FPR + delta), and epsilon-first for
epsilon = 1, 4, 8. The smallest shard binds (the fewer samples, the larger the sampling rate), so
its noise serves every shard.

*The ensemble*. Shards are disjoint: a record is in exactly one shard, so every model trained
without it is independent of it, and the ensemble is exactly as private, for any one record, as the
shard that held it. The ensemble's guarantee is the worst shard's (largest epsilon and mu).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fairforget.privacy.accountant import epsilon_of
from fairforget.privacy.auditing import audit
from fairforget.privacy.gdp import (
    epsilon_for_tpr,
    mu_of,
    noise_for_epsilon,
    noise_for_tpr,
    planned_sisa,
    tpr_bound,
)

EPSILON_FIRST = (1.0, 4.0, 8.0)
ENSEMBLE_NOTE = ("shards are disjoint, so for any one record the ensemble is as private as the shard that "
                 "held it: its guarantee is the worst shard's")


def stage_sizes(n: int, slices: int) -> list[int]:
    """Samples SISA stage r trains on, for a shard of ``n`` samples in ``slices`` near-equal slices."""
    return [int(v) for v in np.cumsum([len(p) for p in np.array_split(np.arange(n), slices)])]


def _plan_figures(sizes: list[int], cfg: Any, sigma: float) -> dict[str, float]:
    plan = planned_sisa(sizes, cfg.batch_size, cfg.epochs_per_slice, sigma)
    mu = mu_of(plan)
    return {"noise_multiplier": sigma, "epsilon": epsilon_of(cfg.dp_accountant, plan, cfg.dp_delta), "mu": mu,
            f"tpr_bound_at_{cfg.dp_target_fpr:g}_fpr": tpr_bound(mu, cfg.dp_target_fpr)}


def calibrate(cfg: Any, shard_sizes: Sequence[int], compare: bool = True) -> dict[str, Any]:
    """The calibration record (see the module docstring); ``chosen`` is the noise the run uses.
    ``compare = False`` leaves out the epsilon-first alternatives (each is a bisection over the
    accountant, seconds to a minute with PRV)."""
    n = int(min(shard_sizes))
    sizes = stage_sizes(n, cfg.slices)
    args = (sizes, cfg.batch_size, cfg.epochs_per_slice)
    direct = noise_for_tpr(cfg.dp_target_tpr, cfg.dp_target_fpr, *args)
    chosen = {"none": lambda: cfg.dp_noise_multiplier,
              "epsilon": lambda: noise_for_epsilon(cfg.dp_target_epsilon, cfg.dp_delta, *args,
                                                   accountant=cfg.dp_accountant),
              "attack-risk": lambda: direct}[cfg.dp_calibrate]()
    out: dict[str, Any] = {
        "mode": cfg.dp_calibrate,
        "smallest_shard": n,
        "stage_sizes": sizes,
        "target": {"tpr": cfg.dp_target_tpr, "fpr": cfg.dp_target_fpr, "epsilon": cfg.dp_target_epsilon,
                   "delta": cfg.dp_delta},
        "chosen": _plan_figures(sizes, cfg, chosen),
        "attack_risk": _plan_figures(sizes, cfg, direct),
    }
    if compare:
        eps_route = epsilon_for_tpr(cfg.dp_target_tpr, cfg.dp_target_fpr, cfg.dp_delta)
        via_eps = noise_for_epsilon(eps_route, cfg.dp_delta, *args, accountant=cfg.dp_accountant)
        # "epsilon" is what the plan reaches (as in every other entry); "target_epsilon" the route's target
        out["attack_risk_via_epsilon"] = {**_plan_figures(sizes, cfg, via_eps), "target_epsilon": eps_route}
        out["epsilon_first"] = {f"{e:g}": _plan_figures(sizes, cfg, noise_for_epsilon(e, cfg.dp_delta, *args,
                                                                                        accountant=cfg.dp_accountant))
                                for e in EPSILON_FIRST}
    return out


RANDOMNESS = ("the noise and Poisson masks of every training are seeded at its site from the operating system's "
              "secure randomness and kept there (STATE/dp-seeds.json, mode 0600): the guarantee holds against the "
              "server and the other sites in a deployment; in simulation every site's state sits beside the "
              "server's run folder")


def dp_block(cfg: Any, shard_summaries: Mapping[int, Mapping[str, Any]],
             calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``dp`` block of metrics.json: mechanism, per-shard spend, the ensemble's (worst shard)."""
    shards = {str(k): dict(v) for k, v in sorted(shard_summaries.items())}
    worst = max(shards.values(), key=lambda v: (v["epsilon"], v["mu"])) if shards else None
    return {
        "mechanism": "DP-SGD (Opacus), per shard",
        "noise_multiplier": cfg.dp_noise_multiplier,
        "max_grad_norm": cfg.dp_max_grad_norm,
        "accountant": cfg.dp_accountant,
        "delta": cfg.dp_delta,
        "max_epsilon": cfg.dp_max_epsilon,
        "secure_mode": cfg.dp_secure_mode,
        "randomness": RANDOMNESS,
        "model": "SimpleConvNet with GroupNorm (BatchNorm has no per-sample gradients)",
        "sampling": "Poisson, rate batch-size / stage size",
        "shards": shards,
        "ensemble": {**(dict(worst) if worst else {}), "note": ENSEMBLE_NOTE},
        "calibration": dict(calibration) if calibration else None,
    }


def violations(privacy: Mapping[str, Any], dp: Mapping[str, Any]) -> list[str]:
    """Attacks whose counts prove, at 95% confidence over every test made, more than their target
    claims (an epsilon lower bound above the accountant's epsilon, or a mu lower bound above the
    mu-GDP figure): a bug in training, accounting or the attack. The decision, with Clopper-Pearson
    bounds on both error rates and a Bonferroni correction, is :func:`fairforget.privacy.auditing.audit`'s;
    a figure an audit of N non-members cannot resolve raises no alarm that is only its own noise."""
    return audit(privacy, dp).violations
