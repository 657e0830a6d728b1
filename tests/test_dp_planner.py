"""The DP-aware SISA schedule (issue 24 item 2): the planner spends no more than the target (the
accountant recomputed here), a 10% larger step count would exceed it, room is left within
dp-max-epsilon for the retrains, an unmeetable target is one line, and a planned shard trains, records
and replays exactly the schedule it was given."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch

from fairforget.data import load_dataset, shard_of
from fairforget.models import REGISTRY as MODELS
from fairforget.models.simple_conv import SimpleConvNet
from fairforget.privacy.accountant import epsilon_of
from fairforget.privacy.planner import Plan, PlanError, StagePlan, parse_plan, plan
from fairforget.privacy.reporting import calibrate, stage_sizes
from fairforget.sisa import SisaError, SisaSettings, SisaShard
from fairforget.unlearning.exact import unlearn

SIZES = stage_sizes(270, 4)  # a Biased-Digits shard of 4 at the defaults
LINEAR = {"batch_fraction": 1.0, "steps": 100, "lr": 0.02, "max_grad_norm": 1.0}


def _scaled(p: Plan, factor: float) -> Plan:
    return Plan(p.noise_multiplier, tuple(StagePlan(s.batch_size, math.ceil(factor * s.steps), s.lr, s.max_grad_norm)
                                          for s in p.stages))


@pytest.mark.parametrize(("target", "defaults"), [(4.0, LINEAR), (1.0, {"batch_fraction": 0.25})])
def test_the_plan_spends_at_most_the_target_and_ten_percent_more_steps_would_not_fit(target, defaults):
    p = plan(target, 1e-5, SIZES, accountant="rdp", defaults=defaults)
    spent = epsilon_of("rdp", p.entries(SIZES), 1e-5)
    assert spent <= target
    assert epsilon_of("rdp", _scaled(p, 1.1).entries(SIZES), 1e-5) > target
    assert [s.steps for s in p.stages] == sorted(s.steps for s in p.stages) and p.stages[0].steps >= 1
    assert all(s.batch_size == max(1, round(defaults["batch_fraction"] * n)) for s, n in zip(p.stages, SIZES,
                                                                                           strict=True))
    assert Plan.from_json(p.to_json()) == p


def test_the_plan_leaves_room_for_the_retrains_within_the_cap():
    p = plan(8.0, 1e-5, SIZES, accountant="rdp", max_epsilon=10.0, retrains=3, defaults=LINEAR)
    one = p.entries(SIZES)
    assert epsilon_of("rdp", one * 4, 1e-5) <= 10.0 < epsilon_of("rdp", _scaled(p, 1.1).entries(SIZES) * 4, 1e-5)
    assert epsilon_of("rdp", one, 1e-5) < 8.0  # the cap binds, not the target


def test_a_target_the_planner_cannot_meet_is_one_line():
    with pytest.raises(PlanError) as err:
        plan(1e-4, 1e-5, [3, 6], accountant="rdp")
    assert "cannot be met with at least one DP-SGD step per SISA stage" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="plans 1 stages"):
        parse_plan(Plan(1.0, (StagePlan(8, 3, 0.01, 1.0),)).to_json(), 2)


class ShortPlan(SimpleConvNet):
    """SimpleConvNet whose declared planner defaults ask for few steps (a test's time)."""

    dp_defaults: ClassVar[Mapping[str, float]] = {"batch_fraction": 1.0, "steps": 8, "lr": 0.01, "max_grad_norm": 1.0}


def test_a_planned_shard_trains_records_and_replays_its_schedule(tiny_cfg, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg(dp=True, **{"dp-accountant": "rdp", "dp-calibrate": "plan", "dp-target-epsilon": 6.0,
                               "dp-plan-retrains": 1})
    with MODELS.substituted("simple-conv", ShortPlan):
        _planned_shard(cfg, tmp_path)


def _planned_shard(cfg, tmp_path):
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    data = data.select_ids(sorted(data.ids.tolist())[:80])
    calibration = calibrate(cfg, [len(data)], compare=False)
    record = calibration["plan"]
    assert calibration["chosen"]["noise_multiplier"] == record["noise_multiplier"]
    assert calibration["chosen"]["epsilon"] <= 6.0 and record["epsilon_with_retrains"] <= cfg.dp_max_epsilon
    cfg = cfg.replace(dp_noise_multiplier=record["noise_multiplier"], dp_plan=record["dp_plan"], dp_calibrate="none")
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    p = Plan.from_json(record["dp_plan"])
    shard = SisaShard(tmp_path / "shard", 0, data, settings)
    shard.train_through()
    sizes = [sum(len(s) for s in shard.index["slices"][:r]) for r in (1, 2)]
    assert shard.accountant.history == p.entries(sizes)  # the planned steps, rates and noise, stage by stage
    assert shard.accountant.epsilon() <= 6.0
    victim = shard.index["slices"][1][0]
    unlearn(shard, [victim])  # stage 2 retrains with the schedule it had
    after = [sum(len(s) for s in shard.index["slices"][:r]) for r in (1, 2)]
    assert shard.accountant.history[2:] == p.entries(after, [2])
    again = SisaShard(tmp_path / "replay", 0, data, settings, slices=[list(s) for s in shard.index["slices"]],
                      replay_seeds=shard.recorded_seeds())
    again.train_through()
    assert again.model_hash() == shard.model_hash()
    with pytest.raises(SisaError, match="dp-plan"):  # a site cannot take another schedule later
        SisaShard(tmp_path / "shard", 0, data, SisaSettings.from_config(cfg.replace(dp_plan=""), bundle.num_classes))
