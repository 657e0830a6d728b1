"""Membership and attribute inference: the attacks detect what they should and nothing else."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fairforget.audit import ATTACKS, AuditError, TargetOutputs
from fairforget.audit.probe import bottleneck, linear_probe
from fairforget.audit.references import ReferenceOutputs, predict_probs, train_references, train_sisa_model
from fairforget.audit.roc import auc, roc_curve, summarize, tpr_at_fpr
from fairforget.audit.suite import check_audit_config
from fairforget.config import resolve
from fairforget.data import SampleSet, load_dataset
from fairforget.sisa import SisaSettings
from server import cli

N = 100  # members and non-members of the overfit target
ONLINE_REFS = 8


# ---------------------------------------------------------------------- ROC arithmetic
def test_auc_matches_sklearn_and_low_fpr_is_exact():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    s = rng.normal(size=400) + y
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s))
    perfect = np.r_[np.ones(50), np.zeros(50)]
    labels = perfect.astype(bool)
    assert auc(perfect + np.linspace(0, 0.1, 100), labels) == 1.0
    assert tpr_at_fpr(np.arange(100.0), np.arange(100) >= 50, 0.01) == 1.0
    fpr, tpr = roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and (np.diff(fpr) >= 0).all()
    r = summarize(s, y, bootstrap=50)
    lo, hi = r["tpr_at_0.01_fpr_ci95"]
    assert lo <= r["tpr_at_0.01_fpr"] <= hi
    assert 0.5 <= r["balanced_accuracy"] <= 1.0 and r["advantage"] == pytest.approx(2 * r["balanced_accuracy"] - 1)


# ---------------------------------------------------------------------- attacks on real models
@pytest.fixture(scope="module")
def setting():
    """Fixed seeds throughout. An overfit target (100 members, 60 epochs at lr 0.005), a target
    trained on 100 other members, offline references on the population split and online shadows
    (each candidate IN for half of them). The unseen target is scored on 350 + 350 candidates, so
    its AUC's standard error is about 0.02."""
    cfg = resolve({"rho": 0.5, "slices": 1, "epochs-per-slice": 60, "lr": 0.005, "model-width": 8,
                   "image-size": 8, "device": "cpu"})
    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, 10)
    rng = np.random.default_rng(12)  # random subsets: the digits' row order follows their writers
    order, held = rng.permutation(len(bundle.train)), rng.permutation(len(bundle.heldout))
    pop = bundle.test_biased
    small = SampleSet.concat([bundle.train.subset(np.sort(order[:N])), bundle.heldout.subset(np.sort(held[:N]))])
    large = SampleSet.concat([bundle.train.subset(np.sort(order[2 * N : 2 * N + 350])),
                     bundle.heldout.subset(np.sort(held[:350]))])
    overfit = train_sisa_model(bundle.train.subset(np.sort(order[:N])), settings, seed=123)
    unseen = train_sisa_model(bundle.train.subset(np.sort(order[N : 2 * N])), settings, seed=321)
    common = dict(members_per_model=N, models_per_reference=1, settings=settings, seed=7)
    offline = train_references(pop, small, count=4, online=False, keep_models=True, **common)
    online = train_references(pop, small, count=ONLINE_REFS, online=True, **common)
    offline_large = ReferenceOutputs(np.stack([predict_probs(m, large.x) for m in offline.models]),
                                     offline.pop_probs, np.zeros((4, len(large)), bool), 0.0)

    def outputs(model, cand):
        return TargetOutputs(predict_probs([model], cand.x), cand.y.numpy(), predict_probs([model], pop.x),
                             pop.y.numpy())

    return {
        "overfit": (outputs(overfit, small), {"offline": offline, "online": online}, np.r_[[True] * N, [False] * N]),
        "unseen": (outputs(unseen, large), {"offline": offline_large}, np.r_[[True] * 350, [False] * 350]),
        "unseen-small": (outputs(unseen, small), {"online": online}, np.r_[[True] * N, [False] * N]),
    }


def _run(setting, case, name):
    target, refs, is_member = setting[case]
    attack = ATTACKS[name]()
    return summarize(attack.scores(target, refs.get(attack.reference_mode)), is_member, bootstrap=0)


@pytest.mark.parametrize("name", ["lira-offline", "lira-online", "rmia"])
def test_overfit_model_is_detected(setting, name):
    r = _run(setting, "overfit", name)
    # seen with these seeds (1 torch thread): AUC lira-offline 0.634, lira-online 0.695, rmia 0.673;
    # TPR at 1% FPR 0.01, 0.04, 0.07 (100 non-members: 1% FPR is one false positive)
    assert r["auc"] > 0.6
    assert r["tpr_at_0.01_fpr"] >= (0.01 if name == "lira-offline" else 0.03)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_model_that_never_saw_the_members_is_at_chance(setting, name):
    case = "unseen-small" if ATTACKS[name].reference_mode == "online" else "unseen"
    assert abs(_run(setting, case, name)["auc"] - 0.5) < 0.05


def test_too_few_references_is_a_clear_error(setting):
    with pytest.raises(AuditError, match="needs at least 4 reference models, got 0"):
        ATTACKS["lira-online"]().scores(setting["overfit"][0], None)


# ---------------------------------------------------------------------- attribute inference
def test_probe_reads_the_colour_off_a_biased_model():
    cfg = resolve({"rho": 0.99, "slices": 1, "epochs-per-slice": 4, "model-width": 8, "device": "cpu"})
    bundle = load_dataset(cfg)
    model = train_sisa_model(bundle.train, SisaSettings.from_config(cfg, 10), seed=1)
    vanilla = linear_probe(bottleneck([model], bundle.train.x), bundle.train.private,
                           bottleneck([model], bundle.test_unbiased.x), bundle.test_unbiased.private, 10)
    assert vanilla["unbiased_test_accuracy"] > 0.9  # seen: 1.00 (chance 0.10)
    # features that carry the class and no colour predict the colour on biased data only
    label_only = linear_probe(F.one_hot(bundle.train.y, 10).float(), bundle.train.private,
                              F.one_hot(bundle.test_unbiased.y, 10).float(), bundle.test_unbiased.private, 10)
    assert label_only["train_accuracy"] > 0.9
    assert abs(label_only["unbiased_test_accuracy"] - 0.1) < 0.05


# ---------------------------------------------------------------------- bad input
def test_audit_config_checks(tiny_cfg):
    cfg = tiny_cfg()
    bundle = load_dataset(cfg)
    with pytest.raises(AuditError, match="needs audit-references >= 2, got 1"):
        check_audit_config(cfg.replace(audit_references=1), bundle)
    empty = type(bundle)(bundle.name, bundle.train, bundle.heldout.subset([]), bundle.test_biased,
                         bundle.test_unbiased, bundle.num_classes, bundle.num_private)
    with pytest.raises(AuditError, match="no held-out"):
        check_audit_config(cfg, empty)


def test_audit_cli_bad_input_writes_nothing(tiny_cfg, grid_for, capsys):
    from server.experiment import run_training

    cfg = tiny_cfg(audit=False)
    run_training(grid_for(cfg), cfg)
    before = (cfg.out_path / "metrics.json").read_bytes()
    for args, expected in [(["--set", "audit-attacks=foo"], "unknown attack(s): foo"),
                           (["--set", "audit-references=1"], "needs audit-references >= 2"),
                           (["--set", "num-shards=3"], "audit --set takes only")]:
        code = cli.main(["audit", "--run", str(cfg.out_path), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("fairforget: error:") and expected in err and "\n" not in err
    assert (cfg.out_path / "metrics.json").read_bytes() == before
    assert not (cfg.out_path / "audit").exists()
    assert cli.main(["audit", "--run", str(cfg.out_path), "--set", 'audit-attacks="loss,rmia"',
                     "--set", "audit-references=1"]) == 0
    privacy = __import__("json").loads((cfg.out_path / "metrics.json").read_text())["privacy"]
    assert set(privacy["targets"]) == {"ensemble", "shard-0", "shard-1"}
    assert set(privacy["targets"]["ensemble"]) == {"loss", "rmia"}
    assert torch.tensor(privacy["targets"]["ensemble"]["loss"]["auc"]).isfinite()


@pytest.mark.parametrize("n_mem,n_non,levels", [(270, 45, 7), (359, 359, 1000), (50, 1000, 3), (30, 200, 10**6)])
def test_bootstrap_tpr_matches_each_draws_curve(n_mem, n_non, levels):
    from fairforget.audit.roc import bootstrap_tpr_at, roc_curve, tpr_at

    rng = np.random.default_rng(n_mem + n_non)
    mem = np.round(rng.normal(0.3, 1, (20, n_mem)) * levels) / levels  # few levels: many ties across both sets
    non = np.round(rng.normal(0.0, 1, (20, n_non)) * levels) / levels
    labels = np.r_[np.ones(n_mem, bool), np.zeros(n_non, bool)]
    for target in (0.0, 0.001, 0.01, 0.1, 0.5, 1.0):
        fast = bootstrap_tpr_at(mem, non, target)
        slow = [tpr_at(*roc_curve(np.r_[m, x], labels), target) for m, x in zip(mem, non, strict=True)]
        np.testing.assert_allclose(fast, slow, atol=1e-12)


# ---------------------------------------------------------------------- detection, on constructed cases
# Every attack must DETECT membership where members are separable, far from chance (AUC >= 0.95 and
# TPR >= 0.5 at 1% FPR: tests/oracles.py); a sign-flipped, constant or reference-blind score fails
# (tests/test_planted_defects.py plants each of those and expects these same checks to fail).
@pytest.mark.parametrize("name", ["loss", "confidence", "entropy"])
def test_reference_free_attacks_detect_confident_members(name):
    from tests.oracles import assert_detects, separable_case

    case = separable_case()
    got = assert_detects(ATTACKS[name]().scores(case.target, None), case.is_member, name)
    assert got["auc"] == 1.0  # the case is separable: seen 1.000 and TPR 1.00 for all three


@pytest.mark.parametrize("name", ["lira-offline", "lira-online"])
def test_lira_detects_members_only_its_references_reveal(name):
    """Per-sample difficulty swamps the membership shift in the raw statistic (LOSS: AUC about 0.58);
    measured against the references' statistic for the same sample it is plain (seen: AUC 0.998 and
    1.000, TPR at 1% FPR 0.98 and 1.00)."""
    from tests.oracles import assert_detects, difficulty_case

    case = difficulty_case(online=ATTACKS[name].reference_mode == "online")
    raw = auc(ATTACKS["loss"]().scores(case.target, None), case.is_member)
    assert raw < 0.7  # the references carry the signal: without them an attack is weak here
    assert_detects(ATTACKS[name]().scores(case.target, case.refs), case.is_member, name)


def test_rmia_detects_members_through_its_reference_ratio():
    """RMIA on a case where the references' Pr(x) matters: the target's raw probability gives AUC
    0.896 and TPR 0.34 at 1% FPR, below the detection bar; RMIA's ratio to the references' (seen:
    AUC 0.986, TPR 0.87) clears it."""
    from tests.oracles import assert_detects, difficulty_case

    case = difficulty_case(spread=1.5, shift=3.0)
    with pytest.raises(AssertionError):
        assert_detects(ATTACKS["loss"]().scores(case.target, None), case.is_member, "loss")
    assert_detects(ATTACKS["rmia"]().scores(case.target, case.refs), case.is_member, "rmia")


# ---------------------------------------------------------------------- the scores, by hand
def _k2(phi):
    """Two-class softmax outputs whose LiRA statistic is ``phi`` (label 0): p_0 = sigmoid(phi)."""
    from tests.oracles import probs_from_phi

    phi = np.asarray(phi, dtype=np.float64)
    return probs_from_phi(phi, np.zeros(phi.shape[-1], dtype=int), 2)


def test_lira_scores_by_hand():
    from scipy.stats import norm

    y = np.zeros(2, dtype=int)
    # offline: references' phi (0, 2) for candidate 0 and (1, 1) for candidate 1: mu_out = (1, 1); the fixed
    # variance pools the residuals (-1, 1, 0, 0) over 4 - 2 degrees of freedom: s = 1
    refs = ReferenceOutputs(_k2([[0.0, 1.0], [2.0, 1.0]]), _k2([[0.0], [0.0]]), np.zeros((2, 2), bool), 0.0)
    target = TargetOutputs(_k2([2.0, 0.0]), y, _k2([0.0]), np.zeros(1, int))
    np.testing.assert_allclose(ATTACKS["lira-offline"]().scores(target, refs), [norm.logcdf(1.0), norm.logcdf(-1.0)],
                               atol=1e-6)
    # online: candidate 0 IN for references 0, 1 (phi 3, 5) and OUT for 2, 3 (0, 2); candidate 1 IN for 0, 2
    # (2, 4) and OUT for 1, 3 (0, 1): mu_in (4, 3), mu_out (1, 0.5); pooled s_in^2 = 4 / 2, s_out^2 = 2.5 / 2
    phi = np.array([[3.0, 2.0], [5.0, 0.0], [0.0, 4.0], [2.0, 1.0]])
    in_mask = np.array([[True, True], [True, False], [False, True], [False, False]])
    refs = ReferenceOutputs(_k2(phi), _k2(np.zeros((4, 1))), in_mask, 0.0)
    target = TargetOutputs(_k2([4.0, 0.5]), y, _k2([0.0]), np.zeros(1, int))
    s_in, s_out = np.sqrt(2.0), np.sqrt(1.25)
    expected = [norm.logpdf(4.0, 4.0, s_in) - norm.logpdf(4.0, 1.0, s_out),
                norm.logpdf(0.5, 3.0, s_in) - norm.logpdf(0.5, 0.5, s_out)]
    np.testing.assert_allclose(ATTACKS["lira-online"]().scores(target, refs), expected, atol=1e-6)


def test_rmia_scores_by_hand():
    """a = 0.3, gamma = 2. Pr(x) = ((1 + a) Pr_OUT(x) + 1 - a) / 2 = (0.675, 0.74, 0.415) for references'
    p_y (0.5, 0.6, 0.1); target p_y (0.8, 0.3, 0.9) gives ratios (1.185, 0.405, 2.169). Population ratios
    p_y / Pr(z) (0.3, 0.45, 0.62, 0.8, 1.1, 1.6, 2.5, 4.0); the score is the share of z with ratio_z <=
    ratio_x / 2: 2/8, 0/8, 4/8."""
    def probs(p):  # true class 0 with probability p, of two classes
        p = np.asarray(p, dtype=np.float64)
        return np.stack([p, 1 - p], -1)

    ratio_z = np.array([0.3, 0.45, 0.62, 0.8, 1.1, 1.6, 2.5, 4.0])
    refs = ReferenceOutputs(probs([[0.5, 0.6, 0.1]]), probs([np.full(8, 0.2)]), np.zeros((1, 3), bool), 0.0)
    target = TargetOutputs(probs([0.8, 0.3, 0.9]), np.zeros(3, int), probs(0.2 * ratio_z), np.zeros(8, int))
    np.testing.assert_allclose(ATTACKS["rmia"]().scores(target, refs), [0.25, 0.0, 0.5])
    # a = 0, gamma = 1: Pr(x) = (0.75, 0.8, 0.55), ratios (1.067, 0.375, 1.636): 4/8, 1/8, 6/8
    np.testing.assert_allclose(type(ATTACKS["rmia"]())(a=0.0, gamma=1.0).scores(target, refs), [0.5, 0.125, 0.75])
    for bad in ({"a": -0.1}, {"a": 1.1}, {"gamma": 0.0}):
        with pytest.raises(ValueError, match="RMIA needs 0 <= a <= 1 and gamma > 0"):
            type(ATTACKS["rmia"]())(**bad)
    type(ATTACKS["rmia"]())(a=1.0, gamma=1e-3)  # the edges are allowed


def test_summary_reports_its_counts_and_curve():
    scores = np.array([0.9, 0.8, 0.7, 0.35, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01])
    labels = np.r_[np.ones(4, bool), np.zeros(6, bool)]  # one pair of 24 misordered: member 0.35 < 0.4
    r = summarize(scores, labels, bootstrap=0, curve_points=3)
    assert r["auc"] == pytest.approx(23 / 24) and (r["n_members"], r["n_nonmembers"]) == (4, 6)
    # best threshold 0.35: TPR 1, FPR 1/6
    assert r["advantage"] == pytest.approx(5 / 6) and r["balanced_accuracy"] == pytest.approx(11 / 12)
    assert r["tpr_at_0.01_fpr"] == 0.75 and np.isnan(r["tpr_at_0.01_fpr_ci95"]).all()
    assert len(r["roc"]["fpr"]) == 3 and r["roc"]["fpr"][0] == 0.0 and r["roc"]["tpr"][-1] == 1.0
