"""DP-SGD through the drivers (in-process grid): the guarantee in metrics.json, the report and the
CLI; the audit set against the mu-GDP bound; calibration before the run; the DP capacity bound."""

from __future__ import annotations

import json

import pytest

from fairforget.capacity import dp_capacity, head_parameters
from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.privacy.reporting import violations
from fairforget.run import RunDir
from server import cli
from server.experiment import run_training
from server.forget import run_forget
from tests.conftest import forget_request

DP_RUN = {"dp": True, "dp-accountant": "rdp", "dp-noise-multiplier": 1.5, "audit-attacks": "loss,rmia",
          "audit-bootstrap": 20}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # module scope: before autouse
    cfg = resolve({**TINY, **DP_RUN, "out-dir": str(tmp_path_factory.mktemp("dp") / "run")})
    run_training(InProcessGrid(cfg), cfg)
    return cfg


def test_metrics_report_and_cli_state_the_guarantee(dp_run, capsys):
    run = RunDir(dp_run.out_path)
    m = run.metrics()
    dp = m["dp"]
    assert set(dp["shards"]) == {"0", "1"} and dp["accountant"] == "rdp" and "GroupNorm" in dp["model"]
    for v in dp["shards"].values():
        assert 0 < v["epsilon"] < 1e3 and v["mu"] > 0 and v["steps"] > 0
        assert 0.001 <= v["tpr_bound"]["0.001"] <= v["tpr_bound"]["0.01"] <= 1
    worst = max(dp["shards"].values(), key=lambda v: v["epsilon"])
    assert dp["ensemble"]["epsilon"] == worst["epsilon"] and "disjoint" in dp["ensemble"]["note"]
    assert m["privacy"]["dp_bound_violations"] == []  # the attacks stay within the bound
    report = run.report_path.read_text()
    assert "## Differential privacy" in report and "mu-GDP bound" in report
    cli._print_summary(run.path)
    out = capsys.readouterr().out
    assert "DP: ensemble (worst shard) epsilon" in out and "TPR <=" in out


def test_forget_under_dp_composes_the_retraining(dp_run, grid_for):
    run = RunDir(dp_run.out_path)
    before = run.metrics()["dp"]["shards"]
    victim = shard_of(dp_run, load_dataset(dp_run))[1].ids[0].item()
    grid = grid_for(dp_run)
    run_forget(grid, grid.cfg, forget_request(ids=str(victim)))
    after = run.metrics()["dp"]["shards"]
    assert after["0"] == before["0"]  # not contacted
    assert after["1"]["epsilon"] > before["1"]["epsilon"] and after["1"]["trainings"] > before["1"]["trainings"]


def test_bound_violations_are_flagged_and_fail_the_audit(dp_run, monkeypatch, capsys):
    dp = {"ensemble": {"mu": 0.1, "tpr_bound": {"0.01": 0.012, "0.001": 0.0012}}, "shards": {}}
    privacy = {"targets": {"ensemble": {"loss": {"tpr_at_0.01_fpr": 0.05, "tpr_at_0.001_fpr": 0.0,
                                                 "n_members": 1000, "n_nonmembers": 1000}}}}
    found = violations(privacy, dp)  # 50 of 1000 members above a threshold that passes 10 of 1000 non-members
    assert len(found) == 1 and "exceeds the mu-GDP bound (mu = 0.100)" in found[0]
    privacy["targets"]["ensemble"]["loss"]["n_nonmembers"] = 90  # its true FPR may be several percent: no flag
    assert violations(privacy, dp) == []
    real = cli.run_audit

    def beaten(*args, **kwargs):  # an audit that beats the bound (a mock of a broken accountant)
        out = real(*args, **kwargs)
        return {**out, "dp_bound_violations": ["ensemble loss: TPR 0.300 at 1.0% FPR exceeds the bound"]}

    monkeypatch.setattr(cli, "run_audit", beaten)
    assert cli.main(["audit", "--run", str(dp_run.out_path), "--set", 'audit-attacks="loss"']) == cli.EXIT_RUN
    err = capsys.readouterr().err
    assert "proves more than the differential-privacy claim allows" in err
    assert "**Empirical TPR above the DP bound" in RunDir(dp_run.out_path).report_path.read_text()


def test_calibration_is_resolved_before_the_run(tiny_cfg, grid_for):
    cfg = tiny_cfg(**{**DP_RUN, "dp-calibrate": "attack-risk"})
    with pytest.raises(ConfigError, match="resolved before the run starts"):
        run_training(grid_for(cfg), cfg)
    assert not (cfg.out_path / "metrics.json").exists()


def test_dp_capacity_uses_each_shards_spent_epsilon(dp_run, grid_for):
    """capacity-bound = "dp" under DP-SGD: a shard's capacity is the DP baseline at its own epsilon."""
    run = RunDir(dp_run.out_path)
    eps = run.metrics()["dp"]["shards"]["0"]["epsilon"]
    victim = shard_of(dp_run, load_dataset(dp_run))[0].ids[1].item()
    cfg = dp_run.replace(capacity_bound="dp", unlearn_method="finetune")
    run.budget_path.unlink(missing_ok=True)
    grid = grid_for(cfg)
    run_forget(grid, grid.cfg, forget_request(str(victim)))
    row = run.ledger.entries()[-1]
    n = len(shard_of(dp_run, load_dataset(dp_run))[0])
    d = head_parameters(8 * dp_run.model_width, 10)
    assert row["capacity"] == dp_capacity(eps, dp_run.dp_delta, n, d, dp_run.capacity_c)
    assert json.loads(run.budget_path.read_text())["bound"] == "dp"


# ---------------------------------------------------------------------- the alarm on real runs
LEAKY = {"num-shards": 2, "slices": 1, "epochs-per-slice": 40, "model-width": 16, "batch-size": 8, "lr": 0.01,
         "audit": False, "audit-attacks": "loss", "audit-bootstrap": 50}
LEAKY_TRAIN = 134  # two shards of 67 samples with random labels: only memorising fits them


def _random_label_digits(monkeypatch):
    """Biased-Digits with every label drawn at random (seeded) and the training set cut to
    :data:`LEAKY_TRAIN` samples: a model that fits its shard has memorised it, so the LOSS attack tells
    its members from held-out samples (seen on the shards: AUC about 0.8, TPR at 1% FPR about 0.13)."""
    import copy

    import torch

    from fairforget import data

    real = data.DATASETS["biased-digits"]

    def load(cfg):
        bundle = copy.copy(real(cfg))
        gen = torch.Generator().manual_seed(5)
        for part in ("train", "heldout", "test_biased", "test_unbiased"):
            s = copy.copy(getattr(bundle, part))
            if part == "train":
                s = s.subset(range(LEAKY_TRAIN))
            s.y = torch.randint(0, bundle.num_classes, (len(s),), generator=gen)
            setattr(bundle, part, s)
        return bundle

    data._load_cached.cache_clear()
    monkeypatch.setitem(data.DATASETS, "biased-digits", load)


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    """A real run trained WITHOUT DP on shards it memorises, whose metrics.json is then given the DP
    block an accountant would write had every shard trained with noise multiplier 50 (mu about 0.04):
    accounting that does not match the training. Its data stay patched for the module's tests."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget import data
    from fairforget.config import resolve
    from fairforget.privacy.accountant import summarize
    from fairforget.privacy.gdp import planned_sisa
    from fairforget.privacy.reporting import dp_block, stage_sizes
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # module scope: before autouse
    with pytest.MonkeyPatch.context() as mp:
        _random_label_digits(mp)
        cfg = resolve({**TINY, **LEAKY, "out-dir": str(tmp_path_factory.mktemp("leaky") / "run")})
        run_training(InProcessGrid(cfg), cfg)
        run = RunDir(cfg.out_path)
        shards = {}
        for k, shard in enumerate(shard_of(cfg, load_dataset(cfg))):
            history = planned_sisa(stage_sizes(len(shard), cfg.slices), cfg.batch_size, cfg.epochs_per_slice, 50.0)
            shards[k] = {"shard": k, **summarize(history, "rdp", cfg.dp_delta)}
        metrics = run.metrics()
        metrics["dp"] = dp_block(cfg.replace(dp=True, dp_noise_multiplier=50.0, dp_accountant="rdp"), shards, None)
        run.write_metrics(metrics)
        yield cfg
    data._load_cached.cache_clear()  # the next test loads the real data again


def assert_audit_alarm(out, expect_violation: bool, capsys) -> list[str]:
    """``fairforget audit`` on the run: exit 1 with the DP-bound error and the violations listed iff
    ``expect_violation``."""
    code = cli.main(["audit", "--run", str(out), "--set", 'audit-attacks="loss"'])
    err = capsys.readouterr().err
    found = RunDir(out).metrics()["privacy"].get("dp_bound_violations")
    if expect_violation:
        assert code == cli.EXIT_RUN and "proves more than the differential-privacy claim allows" in err, (code, err)
        assert found and all("prove epsilon >=" in v and "exceeds the" in v for v in found), found
    else:
        assert code == 0 and "proves more than the differential-privacy claim allows" not in err, (code, err)
        assert found == [], found
    return found


def test_alarm_fires_on_a_real_run_whose_accounting_understates_the_leak(leaky_run, capsys):
    # seen: shard-0 loss: 65 of 67 members vs at most 179 of 359 non-members above its 50.0% FPR threshold prove
    # epsilon >= 1.074 and mu >= 0.868 at 95% confidence (Bonferroni over 12 tests): exceeds the claimed epsilon
    # 0.161 and the mu-GDP bound (mu = 0.043). At 1% FPR 67 members resolve nothing (2 of 67 above it).
    found = assert_audit_alarm(leaky_run.out_path, True, capsys)
    assert any(v.startswith("shard-") and "loss" in v for v in found)  # the memorising shard models
    dp = RunDir(leaky_run.out_path).metrics()["dp"]
    assert max(v["mu"] for v in dp["shards"].values()) < 0.05  # what the tampered accounting claimed


def test_alarm_stays_quiet_on_the_real_dp_run(dp_run, capsys):
    """The same audit on a run really trained with DP-SGD (sigma 1.5) and accounted for it: no alarm."""
    assert_audit_alarm(dp_run.out_path, False, capsys)


def test_planted_a_detector_that_never_fires_fails_the_alarm_check(leaky_run, capsys, monkeypatch):
    """Planted defect (issue 28; kept beside the run it needs, built once): the bound check replaced by
    one that never reports a violation. The alarm check on the leaky run must then fail."""
    from fairforget.audit import suite

    monkeypatch.setattr(suite, "violations", lambda privacy, dp: [])
    with pytest.raises(AssertionError):
        assert_audit_alarm(leaky_run.out_path, True, capsys)
