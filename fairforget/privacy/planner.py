"""A DP-aware SISA schedule: the step count, batch size (sampling rate), learning rate and clipping norm
of every SISA stage, and the noise multiplier, chosen for a target epsilon and the stage sizes
(``dp-calibrate = "plan"``).

Why: the non-private schedule (``epochs-per-slice`` epochs of ``batch-size`` batches) gives a ~270-sample
shard 60 small noisy steps; at any useful epsilon the noise on each averaged gradient drowns the clipped
signal. DP-SGD on small data does better with large batches (the noise is shared by more samples) and
as many steps as the budget allows at a moderate noise multiplier (Tramer and Boneh 2021; De et al.
2022).

How (:func:`plan`), from **public quantities only** (the stage sizes, the target, delta, the accountant,
``dp-max-epsilon`` and the model's declared defaults; never a site's data, which would leak privacy no
accountant counts):

1. the model's defaults (``dp_defaults`` on its class, :mod:`fairforget.models`): expected batch as a
   share of the stage (``batch_fraction``; 1.0 is full-batch noisy gradient descent), a nominal step
   count, learning rate and clipping norm. They were tuned on the embedded Biased-Digits data (rho 0.1,
   4 shards; ``simulations/dp_study.py``), which is public, not on a site's data;
2. the steps are dealt to the stages in proportion to their sizes (stage r trains on slices 1..r;
   every stage at least one step);
3. the noise multiplier is the smallest (to two significant digits, rounded up) at which the nominal
   step count meets the budget;
4. at that noise, the total step count is the largest that meets the budget (bisection over integers,
   the accountant recomputed each time): so a 10% larger step count would exceed it.

The **budget** of one training is the target epsilon, and also what leaves room within
``dp-max-epsilon`` for ``retrains`` full retrains of the shard (``dp-plan-retrains``): a deletion
retrains stages with fresh noise and the accountant composes every training that touched the data, so
the planned training composed ``1 + retrains`` times must stay within the cap.

The plan is fixed once (the run config's ``dp-plan`` key, written by ``fairforget simulate`` /
``fairforget calibrate`` and fixed in each site's ``STATE/dp-settings.json``): a deletion replays the
stages it retrains with the schedule they had, and ``fairforget verify`` replays it bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fairforget.config import ConfigError
from fairforget.privacy.accountant import epsilon_of
from fairforget.privacy.gdp import Entry

#: what a model class declares when it has no ``dp_defaults`` (SimpleConvNet's)
DEFAULTS: Mapping[str, float] = {"batch_fraction": 0.25, "steps": 60, "lr": 0.002, "max_grad_norm": 1.0}
MAX_STEPS = 100_000


class PlanError(ConfigError):
    """A target the planner cannot meet, or a ``dp-plan`` that is not one; one line for the user."""


@dataclass(frozen=True)
class StagePlan:
    """One SISA stage's schedule: expected Poisson batch (rate ``batch_size / n``), DP-SGD steps,
    learning rate and per-sample clipping norm."""

    batch_size: int
    steps: int
    lr: float
    max_grad_norm: float


@dataclass(frozen=True)
class Plan:
    noise_multiplier: float
    stages: tuple[StagePlan, ...]

    def entries(self, sizes: Sequence[int], stages: Sequence[int] | None = None) -> list[Entry]:
        """The accountant entries of training ``stages`` (1-based; default all) on stages of ``sizes``."""
        chosen = range(1, len(self.stages) + 1) if stages is None else stages
        return [entry(self.noise_multiplier, sizes[r - 1], self.stages[r - 1]) for r in chosen]

    def to_json(self) -> str:
        """The ``dp-plan`` run-config value."""
        return json.dumps({"noise_multiplier": self.noise_multiplier, "stages": [asdict(s) for s in self.stages]},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        value = json.loads(text)
        return cls(float(value["noise_multiplier"]), tuple(
            StagePlan(int(s["batch_size"]), int(s["steps"]), float(s["lr"]), float(s["max_grad_norm"]))
            for s in value["stages"]))


def entry(sigma: float, n: int, stage: StagePlan) -> Entry:
    """What one stage of ``stage.steps`` Poisson steps at rate ``batch_size / n`` adds to the accountant."""
    return (float(sigma), min(1.0, stage.batch_size / max(n, 1)), int(stage.steps))


def parse_plan(text: str, slices: int) -> Plan | None:
    """The ``dp-plan`` key's plan (``""``: none); a one-line :class:`PlanError` if it is not one for
    ``slices`` stages."""
    if not text.strip():
        return None
    try:
        plan = Plan.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"config key 'dp-plan' is not a plan written by the planner: {type(exc).__name__}") from None
    if len(plan.stages) != slices or any(s.steps < 1 or s.batch_size < 1 for s in plan.stages):
        raise PlanError(f"config key 'dp-plan' plans {len(plan.stages)} stages (at least one step and one sample "
                        f"each), the run has slices = {slices}")
    return plan


def _deal(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` steps dealt to the stages in proportion to their sizes, at least one each (each
    stage's count is non-decreasing in ``total``)."""
    weight = sum(sizes)
    return [max(1, round(total * n / weight)) for n in sizes]


def _schedule(total: int, sizes: Sequence[int], d: Mapping[str, float]) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(max(1, round(d["batch_fraction"] * n)), t, float(d["lr"]), float(d["max_grad_norm"]))
                 for n, t in zip(sizes, _deal(total, sizes), strict=True))


def plan(target_epsilon: float, delta: float, sizes: Sequence[int], *, accountant: str = "prv",
         max_epsilon: float = math.inf, retrains: int = 0, defaults: Mapping[str, float] | None = None) -> Plan:
    """The schedule of a shard whose SISA stages see ``sizes`` samples (see the module docstring)."""
    d = {**DEFAULTS, **(defaults or {})}
    if target_epsilon <= 0:
        raise PlanError(f"dp-target-epsilon must be > 0, got {target_epsilon}")
    sizes = [int(n) for n in sizes]

    def spend(p: Plan) -> tuple[float, float]:
        one = p.entries(sizes)
        return epsilon_of(accountant, one, delta), epsilon_of(accountant, one * (1 + retrains), delta)

    def ok(p: Plan) -> bool:
        eps, with_retrains = spend(p)
        return eps <= target_epsilon and with_retrains <= max_epsilon

    nominal = max(int(d["steps"]), len(sizes))
    # 3. the noise: the smallest two-digit sigma at which the nominal steps fit (bisection, then rounded up)
    lo, hi = 0.05, 2000.0
    if not ok(Plan(hi, _schedule(len(sizes), sizes, d))):
        raise PlanError(_cannot(target_epsilon, max_epsilon, retrains, delta, sizes))
    if ok(Plan(hi, _schedule(nominal, sizes, d))):
        while hi - lo > 1e-3 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if ok(Plan(mid, _schedule(nominal, sizes, d))) else (mid, hi)
        digits = 10 ** (math.floor(math.log10(hi)) - 1)
        sigma = math.ceil(hi / digits) * digits
        sigma = float(f"{sigma:.6g}")
    else:
        sigma = hi  # not even the nominal steps fit at the largest noise: fewer steps below
    # 4. the steps: the most that fit at that noise
    if not ok(Plan(sigma, _schedule(len(sizes), sizes, d))):
        raise PlanError(_cannot(target_epsilon, max_epsilon, retrains, delta, sizes))
    low, high = len(sizes), max(nominal, len(sizes))
    while ok(Plan(sigma, _schedule(high, sizes, d))) and high < MAX_STEPS:
        low, high = high, min(2 * high, MAX_STEPS)
    if ok(Plan(sigma, _schedule(high, sizes, d))):
        low = high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(Plan(sigma, _schedule(mid, sizes, d))) else (low, mid)
    return Plan(sigma, _schedule(low, sizes, d))


def _cannot(target: float, cap: float, retrains: int, delta: float, sizes: Sequence[int]) -> str:
    return (f"dp-target-epsilon {target:g} (delta {delta:g}; dp-max-epsilon {cap:g} for 1 + {retrains} trainings) "
            f"cannot be met with at least one DP-SGD step per SISA stage (stage sizes {list(sizes)}): raise the "
            "target, dp-max-epsilon or the shard size, or lower dp-plan-retrains")


def describe(p: Plan, sizes: Sequence[int], *, accountant: str, delta: float, target_epsilon: float,
             max_epsilon: float, retrains: int) -> dict[str, Any]:
    """The plan as ``calibration.json`` and the report state it: per stage its size, expected batch,
    sampling rate, steps, lr and clipping norm; the epsilon of one training and with the retrains."""
    one = p.entries(sizes)
    return {
        "noise_multiplier": p.noise_multiplier,
        "target_epsilon": target_epsilon,
        "max_epsilon": max_epsilon,
        "retrains": retrains,
        "epsilon": epsilon_of(accountant, one, delta),
        "epsilon_with_retrains": epsilon_of(accountant, one * (1 + retrains), delta),
        "steps": sum(s.steps for s in p.stages),
        "stages": [{"samples": int(n), "sample_rate": entry(p.noise_multiplier, n, s)[1], **asdict(s)}
                   for n, s in zip(sizes, p.stages, strict=True)],
        "dp_plan": p.to_json(),
        "basis": "public quantities only: stage sizes, target, delta, accountant, dp-max-epsilon and the model's "
                 "declared defaults (tuned on the embedded Biased-Digits data), never a site's data",
    }


def plan_for(cfg: Any, sizes: Sequence[int]) -> dict[str, Any]:
    """:func:`plan` for a run config (``dp-target-epsilon``, ``dp-delta``, ``dp-accountant``,
    ``dp-max-epsilon``, ``dp-plan-retrains``, the model's declared ``dp_defaults``) and the stage sizes
    of its smallest shard; the :func:`describe` record, with the figures ``calibration.json``'s
    ``chosen`` holds (mu, the mu-GDP bound on any attack's TPR at ``dp-target-fpr``)."""
    from fairforget.model import model_class
    from fairforget.privacy.gdp import mu_of, tpr_bound

    defaults = dict(getattr(model_class(cfg.model), "dp_defaults", {}) or {})
    p = plan(cfg.dp_target_epsilon, cfg.dp_delta, sizes, accountant=cfg.dp_accountant,
             max_epsilon=cfg.dp_max_epsilon, retrains=cfg.dp_plan_retrains, defaults=defaults)
    record = describe(p, sizes, accountant=cfg.dp_accountant, delta=cfg.dp_delta,
                      target_epsilon=cfg.dp_target_epsilon, max_epsilon=cfg.dp_max_epsilon,
                      retrains=cfg.dp_plan_retrains)
    mu = mu_of(p.entries(sizes))
    record["chosen"] = {"noise_multiplier": p.noise_multiplier, "epsilon": record["epsilon"], "mu": mu,
                        f"tpr_bound_at_{cfg.dp_target_fpr:g}_fpr": tpr_bound(mu, cfg.dp_target_fpr)}
    record["model"] = cfg.model
    return record
