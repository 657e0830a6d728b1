"""DP-SGD with Opacus through the training engine's privacy hook: accounting that survives restarts,
the hard stop, mu-GDP bounds and calibration, exactness under DP, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.model import build_model
from fairforget.objectives import ObjectiveContext, build_objective
from fairforget.privacy import DPSGD, PrivacyBudgetExceeded, ShardAccountant, mu_of, noise_for_tpr, tpr_bound
from fairforget.privacy.gdp import epsilon_for_tpr, noise_for_epsilon, planned_sisa
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.training import NO_PRIVACY, OptimizerSpec, train
from fairforget.unlearning.exact import unlearn

DP = {"dp": True, "dp-noise-multiplier": 1.0, "slices": 2, "epochs-per-slice": 1, "dp-accountant": "rdp"}


@pytest.fixture
def dp_shard(tiny_cfg, tmp_path):
    def make(**overrides):
        cfg = tiny_cfg(**{**DP, **overrides})
        bundle = load_dataset(cfg)
        data = shard_of(cfg, bundle)[0]
        return cfg, data, SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)

    return make


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bound_against_hand_computed_values():
    # Phi(Phi^-1(FPR) + mu): mu = 1 at 1% FPR: Phi(-2.3263 + 1) = Phi(-1.3263) = 0.0924;
    # mu = 2 at 0.1% FPR: Phi(-3.0902 + 2) = Phi(-1.0902) = 0.1378; mu = 0: TPR = FPR (guessing)
    assert tpr_bound(1.0, 0.01) == pytest.approx(0.0924, abs=2e-4)
    assert tpr_bound(2.0, 0.001) == pytest.approx(0.1378, abs=2e-4)
    assert tpr_bound(0.0, 0.05) == pytest.approx(0.05)
    assert tpr_bound(math.inf, 0.01) == 1.0
    # mu of one DP-SGD run: q sqrt(T (e^(1/sigma^2) - 1)) = 0.1 sqrt(100 (e - 1)) = 1.3108 at sigma 1
    assert mu_of([(1.0, 0.1, 100)]) == pytest.approx(0.1 * math.sqrt(100 * (math.e - 1)), rel=1e-6)
    # trainings compose in quadrature
    assert mu_of([(1.0, 0.1, 100), (1.0, 0.1, 100)]) == pytest.approx(math.sqrt(2) * mu_of([(1.0, 0.1, 100)]))
    assert epsilon_for_tpr(0.05, 0.01, 0.0) == pytest.approx(math.log(5))


def test_calibration_meets_the_target_and_ten_percent_less_noise_does_not():
    sizes, bs, epochs = [135, 270, 405, 540], 32, 3
    sigma = noise_for_tpr(0.05, 0.01, sizes, bs, epochs)
    assert tpr_bound(mu_of(planned_sisa(sizes, bs, epochs, sigma)), 0.01) <= 0.05
    assert tpr_bound(mu_of(planned_sisa(sizes, bs, epochs, 0.9 * sigma)), 0.01) > 0.05
    # the epsilon-first route to the same risk (epsilon = ln((TPR - delta) / FPR)) needs more noise
    via_eps = noise_for_epsilon(epsilon_for_tpr(0.05, 0.01, 1e-5), 1e-5, sizes, bs, epochs)
    assert via_eps > sigma


def test_dp_without_noise_or_clipping_is_plain_training(tiny_cfg):
    cfg = tiny_cfg()
    data = shard_of(cfg, load_dataset(cfg))[0]
    data = data.subset(range(256))  # whole batches: DP-SGD averages over the expected batch size

    def fit(privacy):  # SGD: Adam would blow float-level differences of near-zero gradients up to lr
        model = build_model(10, 4, seed=1, norm="group")
        objective = build_objective("cross-entropy", ObjectiveContext(10))
        train(model, data, seeds=[3, 4], batch_size=32, objective=objective,
              optimizer=OptimizerSpec(lr=0.01, name="sgd").build(model), privacy=privacy)
        return model.state_dict()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every client trains (num-threads = 1): one summation order for both fits
    try:
        plain = fit(NO_PRIVACY)
        dp = fit(DPSGD(noise_multiplier=0.0, max_grad_norm=1e9, sample_seed=0, noise_seed=1, poisson=False))
    finally:
        torch.set_num_threads(threads)
    assert max((plain[k] - dp[k]).abs().max().item() for k in plain) < 1e-6
    noisy = fit(DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_seed=0, noise_seed=1, poisson=False))
    assert max((plain[k] - noisy[k]).abs().max().item() for k in plain) > 1e-3
    model = build_model(10, 4, seed=1, norm="group")
    hook = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_seed=0, noise_seed=1)
    train(model, data, seeds=[1], batch_size=32, objective=build_objective("cross-entropy", ObjectiveContext(10)),
          optimizer=OptimizerSpec(lr=0.1).build(model), privacy=hook)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # Opacus' hooks are gone
    assert hook.spent()["steps"] == 256 // 32  # Poisson: int(1 / q) batches an epoch


def test_accountant_survives_save_restart_and_reload(dp_shard, tmp_path):
    cfg, data, settings = dp_shard()
    shard = SisaShard(tmp_path / "s", 0, data, settings)
    shard.train_stage(1)
    eps1 = shard.accountant.epsilon()
    assert 0 < eps1 < math.inf and len(shard.accountant.history) == 1
    reopened = SisaShard(tmp_path / "s", 0, data, settings)  # a new message: a new object, same state
    assert reopened.accountant.history == shard.accountant.history
    reopened.train_stage(2)
    again = SisaShard(tmp_path / "s", 0, data, settings)
    assert len(again.accountant.history) == 2 and again.accountant.epsilon() > eps1
    state = again.accountant.state_dict()
    assert state["mechanism"] == "rdp" and len(state["history"]) == 2
    with pytest.raises(ValueError, match="cannot change to 'prv'"):
        ShardAccountant.load(tmp_path / "s", 0, "prv", 1e-5)
    # the PRV accountant (the default) on the same history: tighter than RDP, and finite
    prv = ShardAccountant(0, "prv", 1e-5, list(again.accountant.history))
    assert 0 < prv.epsilon() <= again.accountant.epsilon()


def test_hard_stop_fires_before_training_and_changes_nothing(dp_shard, tmp_path):
    _, data, settings = dp_shard()
    probe = SisaShard(tmp_path / "probe", 0, data, settings)
    one_stage = probe.accountant.epsilon(probe.planned([1]))
    both = probe.accountant.epsilon(probe.planned([1, 2]))
    cap = 0.5 * (one_stage + both)  # stage 1 fits, stages 1 and 2 do not
    _, data, settings = dp_shard(**{"dp-max-epsilon": cap})
    shard = SisaShard(tmp_path / "s", 0, data, settings)
    before = _files(tmp_path / "s")
    with pytest.raises(PrivacyBudgetExceeded, match=r"shard 0: DP budget exhausted: epsilon spent 0.000 of "
                                                    r"dp-max-epsilon .*training stages 1-2 .* would take it to"):
        shard.train_through()
    assert _files(tmp_path / "s") == before and shard.trained == 0  # before, not after
    shard.train_stage(1)
    with pytest.raises(PrivacyBudgetExceeded):
        shard.train_stage(2)
    assert shard.trained == 1 and not shard.checkpoint_path(2).exists()
    # a deletion whose retraining would pass the cap is refused with nothing changed
    victim = shard.index["slices"][0][0]
    before = _files(tmp_path / "s")
    with pytest.raises(PrivacyBudgetExceeded, match="retraining after this deletion"):
        unlearn(shard, [victim])
    assert _files(tmp_path / "s") == before and victim in shard.live_ids()


def test_unlearning_is_exact_under_dp(dp_shard, tmp_path):
    _, data, settings = dp_shard()
    shard = SisaShard(tmp_path / "s", 0, data, settings)
    shard.train_through()
    original = [list(s) for s in shard.index["slices"]]
    first = shard.recorded_seeds()
    victims = [original[1][0], original[1][1]]
    result = unlearn(shard, victims)
    assert result.restart_stage == 1
    seeds = shard.recorded_seeds()
    assert seeds[1] == first[1] and set(seeds[2]).isdisjoint(first[2])  # the retrain drew fresh noise
    scratch = SisaShard(tmp_path / "scratch", 0, data, settings,
                        slices=[[i for i in s if i not in victims] for s in original], replay_seeds=seeds)
    scratch.train_through()
    assert shard.model_hash() == scratch.model_hash()  # the site's recorded masks and noise: replayable there
    assert "running_mean" not in " ".join(shard.model_state())  # GroupNorm, not BatchNorm
    # the retrain composed into the shard's accountant: more spent than the from-scratch shard
    assert len(shard.accountant.history) == 3 and shard.accountant.epsilon() > scratch.accountant.epsilon()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dp-target-epsilon": 0.0}, "'dp-target-epsilon' = 0.0: must be > 0"),
    ({"dp-target-epsilon": -1.0}, "'dp-target-epsilon' = -1.0: must be > 0"),
    ({"dp-max-epsilon": 0.0}, "'dp-max-epsilon' = 0.0: must be > 0"),
    ({"dp-delta": 1.0}, "'dp-delta' = 1.0: must be in (0, 1)"),
    ({"dp-delta": 0.0}, "'dp-delta' = 0.0: must be in (0, 1)"),
    ({"dp-max-grad-norm": 0.0}, "'dp-max-grad-norm' = 0.0: must be > 0"),
    ({"dp-target-tpr": 0.005, "dp-target-fpr": 0.01}, "'dp-target-tpr' = 0.005: must be in (dp-target-fpr, 1]"),
    ({"dp-accountant": "moments"}, "'dp-accountant' = 'moments': must be one of prv, rdp, gdp"),
])
def test_bad_dp_settings_are_one_line_errors(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(**overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unlearners_that_dp_cannot_cover_are_refused(dp_shard, tmp_path):
    from fairforget.sisa import SisaError
    from fairforget.unlearning import UNLEARNERS

    _, data, settings = dp_shard()
    shard = SisaShard(tmp_path / "s", 0, data, settings)
    shard.train_through()
    before = _files(tmp_path / "s")
    with pytest.raises(SisaError, match="'neggrad' cannot run under DP-SGD"):
        UNLEARNERS["neggrad"](shard, [shard.index["slices"][0][0]])
    assert _files(tmp_path / "s") == before
    steps = len(shard.accountant.history)
    UNLEARNERS["finetune"](shard, [shard.index["slices"][0][0]])  # DP-SGD on the retained data, accounted
    assert len(SisaShard(tmp_path / "s", 0, data, settings).accountant.history) == steps + 1
    assert torch.isfinite(torch.tensor(shard.accountant.epsilon()))


def test_epsilon_of_a_nearly_non_private_mu_is_a_number_not_a_crash():
    """Opacus' eps_from_mu gives up near mu 30; a low-noise plan must still get its (huge) epsilon, so the
    hard stop refuses it as over budget instead of crashing."""
    from fairforget.privacy.gdp import _eps_from_mu_wide, _gdp_delta, epsilon_of_mu

    for mu in (1.0, 5.0, 20.0):  # where Opacus answers, the wide solver agrees with it
        assert _eps_from_mu_wide(mu, 1e-5) == pytest.approx(epsilon_of_mu(mu, 1e-5), rel=1e-9)
    eps = epsilon_of_mu(40.0, 1e-5)
    assert math.isfinite(eps) and eps > epsilon_of_mu(20.0, 1e-5)
    assert _gdp_delta(eps, 40.0) == pytest.approx(1e-5, rel=1e-6)
