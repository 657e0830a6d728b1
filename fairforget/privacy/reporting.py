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
from fairforget.privacy.planner import plan_for

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


def calibrate(cfg: Any, shard_sizes: Sequence[int], compare: bool = True, candidates: bool = False) -> dict[str, Any]:
    """The calibration record (see the module docstring); ``chosen`` is the noise the run uses.
    ``compare = False`` leaves out the epsilon-first alternatives (each is a bisection over the
    accountant, seconds to a minute with PRV); ``candidates = True`` adds :func:`candidate_settings`
    (other schedules meeting the same target, with their Delta-divergence)."""
    n = int(min(shard_sizes))
    sizes = stage_sizes(n, cfg.slices)
    args = (sizes, cfg.batch_size, cfg.epochs_per_slice)
    direct = noise_for_tpr(cfg.dp_target_tpr, cfg.dp_target_fpr, *args)
    planned = plan_for(cfg, sizes) if cfg.dp_calibrate == "plan" else None  # the DP-aware schedule (planner.py)
    chosen = {"none": lambda: cfg.dp_noise_multiplier,
              "epsilon": lambda: noise_for_epsilon(cfg.dp_target_epsilon, cfg.dp_delta, *args,
                                                   accountant=cfg.dp_accountant),
              "attack-risk": lambda: direct,
              "plan": lambda: planned["noise_multiplier"]}[cfg.dp_calibrate]()
    out: dict[str, Any] = {
        "mode": cfg.dp_calibrate,
        "smallest_shard": n,
        "stage_sizes": sizes,
        "target": {"tpr": cfg.dp_target_tpr, "fpr": cfg.dp_target_fpr, "epsilon": cfg.dp_target_epsilon,
                   "delta": cfg.dp_delta},
        "chosen": _plan_figures(sizes, cfg, chosen),
        "attack_risk": _plan_figures(sizes, cfg, direct),
    }
    if planned is not None:  # the planner's schedule, not the non-private one, is what the run trains with
        out["chosen"], out["plan"] = planned.pop("chosen"), planned
    if compare:
        eps_route = epsilon_for_tpr(cfg.dp_target_tpr, cfg.dp_target_fpr, cfg.dp_delta)
        via_eps = noise_for_epsilon(eps_route, cfg.dp_delta, *args, accountant=cfg.dp_accountant)
        # "epsilon" is what the plan reaches (as in every other entry); "target_epsilon" the route's target
        out["attack_risk_via_epsilon"] = {**_plan_figures(sizes, cfg, via_eps), "target_epsilon": eps_route}
        out["epsilon_first"] = {f"{e:g}": _plan_figures(sizes, cfg, noise_for_epsilon(e, cfg.dp_delta, *args,
                                                                                        accountant=cfg.dp_accountant))
                                for e in EPSILON_FIRST}
    if candidates:  # under dp-calibrate = plan the planner's own schedule is the run's setting
        own = [(float(out["plan"]["noise_multiplier"]), float(st["sample_rate"]), int(st["steps"]))
               for st in out["plan"]["stages"]] if "plan" in out else None
        out["candidates"] = candidate_settings(cfg, sizes, out["chosen"], own_plan=own)
    return out


# (batch-size factor, epochs-per-slice factor) of the schedules compared with the config's own (the first)
CANDIDATE_SCHEDULES = ((1.0, 1), (0.5, 1), (2.0, 1), (1.0, 2))


def candidate_settings(cfg: Any, sizes: list[int], chosen: Mapping[str, Any],
                       own_plan: list[tuple[float, float, int]] | None = None) -> dict[str, Any]:
    """DP-SGD settings that meet the same target as the run's (other batch sizes, i.e. sampling rates,
    and step counts, each with the noise that meets it: the attack-risk target for ``dp-calibrate =
    attack-risk``, ``dp-target-epsilon`` for ``epsilon``, the chosen noise's own epsilon for ``none``),
    compared by the Delta-divergence of their PRV privacy profiles
    (:mod:`fairforget.privacy.divergence`): the least vulnerable one, and each one's worst-case excess
    vulnerability over it. The config's own schedule keeps the chosen noise; ``own_plan`` (the DP
    planner's accountant entries, ``dp-calibrate = plan``) is the run's setting instead of it."""
    from fairforget.privacy.divergence import DivergenceError
    from fairforget.privacy.divergence import compare as delta_compare

    if cfg.dp_calibrate == "attack-risk":
        target = f"TPR <= {cfg.dp_target_tpr:g} at FPR {cfg.dp_target_fpr:g} (mu-GDP)"
        solve = lambda b, e: noise_for_tpr(cfg.dp_target_tpr, cfg.dp_target_fpr, sizes, b, e)  # noqa: E731
    else:
        eps = cfg.dp_target_epsilon if cfg.dp_calibrate == "epsilon" else chosen["epsilon"]
        target = f"epsilon <= {eps:.3f} at delta {cfg.dp_delta:g} ({cfg.dp_accountant})"
        solve = lambda b, e: noise_for_epsilon(eps, cfg.dp_delta, sizes, b, e, accountant=cfg.dp_accountant)  # noqa: E731
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for bf, ef in CANDIDATE_SCHEDULES:
        b, e = max(1, int(round(cfg.batch_size * bf))), cfg.epochs_per_slice * ef
        name = f"batch {b}, {e} epoch(s) a slice"
        if name in rows:
            continue
        own = (bf, ef) == CANDIDATE_SCHEDULES[0]
        try:
            sigma = chosen["noise_multiplier"] if own else solve(b, e)
        except ValueError as exc:  # no noise up to the bisection's bound meets the target
            skipped[name] = str(exc)
            continue
        plan = planned_sisa(sizes, b, e, sigma)
        if own and own_plan is not None:
            name, plan = "the DP planner's schedule", list(own_plan)
            b, e = None, None  # per stage, in the calibration record's "plan"
        rows[name] = {"batch_size": b, "epochs_per_slice": e, "noise_multiplier": sigma,
                      "epsilon": epsilon_of(cfg.dp_accountant, plan, cfg.dp_delta), "mu": mu_of(plan),
                      "steps": int(sum(t for _, _, t in plan)), "chosen": own, "plan": plan}
    chosen_name = next(n for n, r in rows.items() if r["chosen"])
    out = {"target": target, "method": "Delta-divergence of PRV privacy profiles (Kaissis et al. 2024)",
           "chosen": chosen_name, "settings": rows, "skipped": skipped}
    try:
        div = delta_compare({n: r.pop("plan") for n, r in rows.items()}, method="prv")
    except DivergenceError as exc:  # a profile the PRV accountant cannot grid: said, not fatal to the run
        return {**out, "error": str(exc), "least_vulnerable": None, "chosen_delta_excess": None}
    for n, r in rows.items():
        r["delta_excess"] = div["excess"][n]
    return {**out, "least_vulnerable": div["least_vulnerable"],
            "chosen_delta_excess": rows[chosen_name]["delta_excess"]}


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
        "model": ("SimpleConvNet with GroupNorm (BatchNorm has no per-sample gradients)"
                  if getattr(cfg, "model", "simple-conv") == "simple-conv" else
                  f"{cfg.model}: a fixed scattering front end (no parameters, not seen by DP-SGD) and a GroupNorm "
                  "head, the only part DP-SGD trains"),
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
