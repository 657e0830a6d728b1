"""Planted defects: each test monkeypatches a known defect into the product and shows that the check
meant to catch it (the helpers of tests/oracles.py, called by the tests of the claim) fails.

A check that still passes with the defect in place would let a wrong implementation through; these
tests keep every such check honest. Each is small: synthetic inputs or the tiny settings of conftest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fairforget.audit import ATTACKS
from tests import oracles


# ---------------------------------------------------------------------- 1. membership attacks
def _case_for(name: str) -> oracles.MembershipCase:
    mode = ATTACKS[name].reference_mode
    if mode is None:
        return oracles.separable_case()
    if name == "rmia":
        return oracles.difficulty_case(spread=1.5, shift=3.0)
    return oracles.difficulty_case(online=mode == "online")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_sign_flipped_attack_score_fails_the_detection_check(name, monkeypatch):
    case = _case_for(name)
    attack = ATTACKS[name]
    oracles.assert_detects(attack().scores(case.target, case.refs), case.is_member, name)  # the real one passes
    real = attack.scores
    monkeypatch.setattr(attack, "scores", lambda self, target, refs=None: -real(self, target, refs))
    with pytest.raises(AssertionError, match="AUC"):
        oracles.assert_detects(attack().scores(case.target, case.refs), case.is_member, name)


def test_constant_attack_score_fails_the_detection_check():
    case = oracles.separable_case()
    with pytest.raises(AssertionError, match="AUC 0.500"):
        oracles.assert_detects(np.zeros(len(case.is_member)), case.is_member)


@pytest.mark.parametrize("name", ["lira-offline", "lira-online"])
def test_lira_that_ignores_its_references_fails_the_detection_check(name, monkeypatch):
    """The references' per-sample mean and spread replaced by a global N(0, 1): the score becomes a
    monotone function of the raw statistic, which the difficulty case hides."""
    from fairforget.audit import lira

    case = _case_for(name)
    monkeypatch.setattr(lira, "_moments", lambda phi, mask, fixed: (np.zeros(phi.shape[1]), np.ones(phi.shape[1])))
    with pytest.raises(AssertionError):
        oracles.assert_detects(ATTACKS[name]().scores(case.target, case.refs), case.is_member, name)


def test_rmia_that_ignores_its_references_fails_the_detection_check(monkeypatch):
    """Every reference's softmax replaced by the uniform one: Pr(x) and Pr(z) become constants."""
    from fairforget.audit.rmia import RmiaOffline

    case = _case_for("rmia")
    real = RmiaOffline.scores

    def blind(self, target, refs):
        flat = dataclasses.replace(refs, cand_probs=np.full_like(refs.cand_probs, 0.1),
                                   pop_probs=np.full_like(refs.pop_probs, 0.1))
        return real(self, target, flat)

    monkeypatch.setattr(RmiaOffline, "scores", blind)
    with pytest.raises(AssertionError):
        oracles.assert_detects(RmiaOffline().scores(case.target, case.refs), case.is_member, "rmia")


# ---------------------------------------------------------------------- 9. fairness figures
def test_majority_vote_that_averages_probabilities_fails_the_hand_computed_votes(monkeypatch):
    from fairforget.ensemble import Ensemble
    from tests.test_fairness_figures import assert_votes_hand_computed

    assert_votes_hand_computed()
    monkeypatch.setattr(Ensemble, "predict_proba", lambda self, x: self.member_probs(x).mean(0))
    with pytest.raises(AssertionError):
        assert_votes_hand_computed()


def test_majority_vote_whose_ties_go_to_the_higher_class_fails(monkeypatch):
    from fairforget.ensemble import Ensemble
    from tests.test_fairness_figures import assert_votes_hand_computed

    def last_max(self, x):  # ties resolved towards the higher class
        p = self.predict_proba(x).flip(-1)
        return self.num_classes - 1 - p.argmax(-1)

    monkeypatch.setattr(Ensemble, "predict", last_max)
    with pytest.raises(AssertionError):
        assert_votes_hand_computed()


def test_worst_group_that_ignores_min_group_fails_the_hand_computed_report(monkeypatch):
    from fairforget import metrics
    from tests import test_fairness_figures as figures

    figures.test_accuracy_report_hand_computed()
    real = metrics.accuracy_report
    monkeypatch.setattr(metrics, "accuracy_report", lambda pred, data, k, p, min_group=1: real(pred, data, k, p))
    monkeypatch.setattr(figures, "accuracy_report", metrics.accuracy_report)
    with pytest.raises(AssertionError):
        figures.test_accuracy_report_hand_computed()


# ---------------------------------------------------------------------- 11. guidance direction
def test_classifier_guidance_with_the_wrong_sign_fails_the_direction_check(monkeypatch):
    import torch

    from fairforget.diffusion import generator
    from tests.test_augment_levers import _untrained_generator

    model = _untrained_generator()
    y, a = torch.arange(3).repeat(4), torch.zeros(12, dtype=torch.long)
    plain = generator.sample(model, y, a, seed=3)

    def guided():
        return generator.sample(model, y, a, seed=3, classifier=oracles.toy_colour_classifier, classifier_scale=5.0)

    oracles.assert_guidance_raises(plain, guided(), oracles.toy_colour_classifier, y, min_gain=0.2)
    real = generator._classifier_grad
    monkeypatch.setattr(generator, "_classifier_grad", lambda *args: -real(*args))
    with pytest.raises(AssertionError, match="guidance moved"):
        oracles.assert_guidance_raises(plain, guided(), oracles.toy_colour_classifier, y, min_gain=0.2)


@pytest.mark.parametrize("defect", ["negated", "private-as-class", "no-private-term"])
def test_classifier_free_guidance_defects_fail_the_hand_computed_check(monkeypatch, defect):
    from fairforget.diffusion import generator
    from tests.test_augment_levers import assert_classifier_free_guidance_hand_computed

    real = generator._guided_eps

    def wrong(model, x, t, y, private, w, w_private=None):
        if defect == "negated":  # pushes away from the conditional
            return real(model, x, t, y, private, -w, None if w_private is None else -w_private)
        if defect == "private-as-class":  # the private factor weighted with the class factor's scale
            return real(model, x, t, y, private, w, w)
        return real(model, x, t, y, private, w, 0.0)

    monkeypatch.setattr(generator, "_guided_eps", wrong)
    with pytest.raises(AssertionError):
        assert_classifier_free_guidance_hand_computed()


# ---------------------------------------------------------------------- 7. unlearners forget
from tests.test_unlearners import memorised  # noqa: E402,F401 - the memorising shard (module-scoped fixture)


@pytest.mark.parametrize("name", ["finetune", "neggrad"])
def test_an_approximate_unlearner_that_does_nothing_fails_the_forgetting_check(memorised, name, monkeypatch):  # noqa: F811
    """The method's work replaced by nothing (the SISA bookkeeping still runs, approx.pt is written):
    the forget set is still memorised and the check fails."""
    import importlib

    from fairforget.unlearning import UNLEARNERS, approximate
    from fairforget.unlearning.approximate import UnlearnParams, model_from
    from tests.test_unlearners import GAP_CLOSED, _copy, _figures

    m = memorised
    monkeypatch.setattr(importlib.import_module(f"fairforget.unlearning.{name}"), "_method", lambda *a, **k: {})
    shard = _copy(m["root"], f"noop-{name}", m["data"], m["settings"])
    UNLEARNERS[name](shard, m["ids"], UnlearnParams.from_config(m["cfg"]))
    after = _figures(model_from(approximate.current_state(shard), shard), m["data"].select_ids(m["ids"]),
                     m["nonmembers"])
    assert after.forget_acc == m["before"].forget_acc  # nothing was unlearned
    with pytest.raises(AssertionError, match="closes 0%"):
        oracles.assert_moves_towards_retraining(after, m["before"], m["retrained"], name, *GAP_CLOSED[name])


def test_an_exact_unlearner_that_does_nothing_fails_the_non_member_check(memorised):  # noqa: F811
    """A no-op exact unlearner serves the model before the deletion: its forget set is not like non-members."""
    with pytest.raises(AssertionError, match="forget accuracy 0.80 vs non-members"):
        oracles.assert_forgets_like_nonmembers(memorised["before"])


# ---------------------------------------------------------------------- 2. augmentation
AUG_THRESHOLD = 0.3  # tests/test_augment.py TINY_AUG's augment-kl-threshold


def test_a_generator_that_outputs_noise_fails_the_debiasing_check(tmp_path, monkeypatch):
    report = oracles.augment_step_report(tmp_path, oracles.noise_sampler, monkeypatch)
    assert report["kl_after"] <= AUG_THRESHOLD  # the plan alone (requested labels) would pass
    with pytest.raises(AssertionError, match="of the planned reduction"):
        oracles.assert_debiased(report, AUG_THRESHOLD)


def test_a_generator_that_draws_the_biased_colour_fails_the_debiasing_check(tmp_path, monkeypatch):
    """The right class in the colour the class is biased towards (class c in colour c, as the shard's
    majority): the class fidelity is fine, the colour is not, and the judged bias stays high."""
    pool = oracles.tiny_fidelity()[1]
    report = oracles.augment_step_report(tmp_path, oracles.real_group_sampler(pool, colour=lambda y: y), monkeypatch)
    assert report["quality"]["label_fidelity"]["class"] > 0.7
    with pytest.raises(AssertionError, match="of the planned reduction"):
        oracles.assert_debiased(report, AUG_THRESHOLD)


def test_a_figure_taken_from_the_requested_labels_fails_the_augmentation_check(tmp_path, monkeypatch):
    """The planted defect of issue 28 item 2: the judged figure computed from the labels requested of the
    generator (the classifiers' view ignored). The check that noise is caught then fails."""
    from clients.augment import Augmenter
    from tests.test_augment import check_reported_bias_follows_generation

    monkeypatch.setattr(Augmenter, "judged", lambda self, data, fidelity: data)
    with pytest.raises(AssertionError, match="noise passed the debiasing check"):
        check_reported_bias_follows_generation(tmp_path, monkeypatch)


def test_noise_fails_the_class_and_colour_check_of_the_trained_generator_test():
    """The check of tests/test_augment.py's slow trained-generator test, on what a noise generator draws
    (and, for scale, on real images of the requested groups, which pass it)."""
    import torch

    fidelity, pool = oracles.tiny_fidelity()
    y = torch.arange(10).repeat_interleave(10)
    a = torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(0))
    real = oracles.real_group_sampler(pool)(None, y, a, seed=1)
    oracles.assert_generated_match_requested(fidelity.fidelity(real, y, a), min_class=0.5, min_private=0.5)
    noise = oracles.noise_sampler(None, y, a, seed=1)
    with pytest.raises(AssertionError, match="fidelity"):
        oracles.assert_generated_match_requested(fidelity.fidelity(noise, y, a), min_class=0.5, min_private=0.5)
