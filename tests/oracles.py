"""Checks that must fail on a wrong implementation, and the small constructed cases they run on.

Each ``assert_*`` helper is the acceptance check of one claim (an attack detects membership, an
unlearner forgets like retraining, guidance pushes towards the requested class, ...). The tests of
the claim call it on the product; ``tests/test_planted_defects.py`` plants a known defect into the
product (a sign-flipped score, a LiRA that ignores its references, a no-op unlearner, ...) and
expects the same helper to raise ``AssertionError``. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fairforget.audit.base import TargetOutputs
from fairforget.audit.references import ReferenceOutputs
from fairforget.audit.roc import auc, tpr_at_fpr

# ---------------------------------------------------------------------- membership inference
DETECT_AUC = 0.95  # a detector must reach this AUC on a separable case (chance: 0.5)
DETECT_TPR = 0.5  # ... and this TPR at 1% FPR (chance: 0.01)


def assert_detects(scores: np.ndarray, is_member: np.ndarray, what: str = "attack",
                   min_auc: float = DETECT_AUC, min_tpr: float = DETECT_TPR) -> dict[str, float]:
    """The attack's scores separate members from non-members, far from chance (a sign-flipped score
    has AUC 1 - AUC, a constant one 0.5: both fail)."""
    scores = np.asarray(scores, dtype=np.float64)
    assert np.isfinite(scores).all(), f"{what}: non-finite scores"
    got = {"auc": auc(scores, is_member), "tpr_at_0.01_fpr": tpr_at_fpr(scores, is_member, 0.01)}
    assert got["auc"] >= min_auc, f"{what}: AUC {got['auc']:.3f} < {min_auc} on a separable case"
    assert got["tpr_at_0.01_fpr"] >= min_tpr, f"{what}: TPR at 1% FPR {got['tpr_at_0.01_fpr']:.3f} < {min_tpr}"
    return got


def probs_from_phi(phi: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Softmax outputs (..., N, K) whose LiRA statistic ``log p_y - log(1 - p_y)`` is ``phi``: ``p_y =
    sigmoid(phi)``, the rest spread evenly over the other classes."""
    p_y = 1.0 / (1.0 + np.exp(-phi))
    out = np.repeat(((1.0 - p_y) / (k - 1))[..., None], k, axis=-1)
    np.put_along_axis(out, np.broadcast_to(y.reshape((1,) * (phi.ndim - 1) + (-1, 1)), phi.shape + (1,)),
                      p_y[..., None], axis=-1)
    return out


@dataclass
class MembershipCase:
    target: TargetOutputs
    refs: ReferenceOutputs | None
    is_member: np.ndarray


def separable_case(n: int = 200, k: int = 10, seed: int = 0) -> MembershipCase:
    """No references; members get confident, low-loss, low-entropy outputs (true-class probability
    about 0.9), non-members flat ones (about 0.35): LOSS, confidence and entropy must all see it."""
    rng = np.random.default_rng(seed)
    is_member = np.r_[np.ones(n // 2, bool), np.zeros(n - n // 2, bool)]
    y = rng.integers(0, k, n)
    margin = np.where(is_member, 4.5, 1.5) + rng.normal(0, 0.3, n)  # true-class logit above the rest
    logits = rng.normal(0, 0.2, (n, k))
    logits[np.arange(n), y] += margin
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pop_y = rng.integers(0, k, n)
    return MembershipCase(TargetOutputs(probs, y, probs[~is_member][: n // 2], pop_y[: n // 2]), None, is_member)


def difficulty_case(n: int = 300, refs: int = 8, k: int = 10, online: bool = False, seed: int = 0,
                    spread: float = 3.0, shift: float = 1.5, noise: float = 0.3) -> MembershipCase:
    """Per-sample difficulty that only the reference models reveal. Each candidate (and population
    sample) has its own level ``d ~ N(0, spread)`` of the LiRA statistic on any model that did not
    train on it; training on it raises it by ``shift``; every model adds ``N(0, noise)``. The raw
    statistic barely separates members (AUC about 0.64: the spread swamps the shift), the statistic
    measured against the references' (``(phi - mu_out) / s``) almost perfectly. Offline references never
    saw a candidate; online ones each saw a random half."""
    rng = np.random.default_rng(seed)
    is_member = np.r_[np.ones(n // 2, bool), np.zeros(n - n // 2, bool)]
    y = rng.integers(0, k, n)
    d = rng.normal(0, spread, n)
    in_mask = (rng.random((refs, n)) < 0.5) if online else np.zeros((refs, n), bool)
    if online:  # every candidate IN and OUT at least once
        in_mask[0], in_mask[1] = True, False
    phi_t = d + shift * is_member + rng.normal(0, noise, n)
    phi_r = d + shift * in_mask + rng.normal(0, noise, (refs, n))
    z = 2 * n
    pop_y, dz = rng.integers(0, k, z), rng.normal(0, spread, z)
    target = TargetOutputs(probs_from_phi(phi_t, y, k), y, probs_from_phi(dz + rng.normal(0, noise, z), pop_y, k),
                           pop_y)
    ref = ReferenceOutputs(probs_from_phi(phi_r, y, k),
                           probs_from_phi(dz + rng.normal(0, noise, (refs, z)), pop_y, k), in_mask, 0.0)
    return MembershipCase(target, ref, is_member)


# ---------------------------------------------------------------------- unlearning
@dataclass
class ForgetFigures:
    """Accuracy and mean loss of one model on the forget set and on matched held-out non-members."""

    forget_acc: float
    forget_loss: float
    nonmember_acc: float
    nonmember_loss: float


EXACT_ACC_TOL = 0.15  # |forget acc - non-member acc| after exact unlearning
EXACT_LOSS_TOL = 0.5  # forget loss may lie this far (nats) below the non-members' (sampling: 10 samples)


def assert_forgets_like_nonmembers(fig: ForgetFigures, what: str = "exact unlearning",
                                   acc_tol: float = EXACT_ACC_TOL, loss_tol: float = EXACT_LOSS_TOL) -> None:
    """After unlearning, the forget set looks like data the model never saw: its accuracy within
    ``acc_tol`` of matched non-members', its loss no further than ``loss_tol`` below theirs."""
    assert abs(fig.forget_acc - fig.nonmember_acc) <= acc_tol, (
        f"{what}: forget accuracy {fig.forget_acc:.2f} vs non-members {fig.nonmember_acc:.2f}")
    assert fig.forget_loss >= fig.nonmember_loss - loss_tol, (
        f"{what}: forget loss {fig.forget_loss:.3f} below non-members' {fig.nonmember_loss:.3f} - {loss_tol}")


def assert_forgets_like_retraining(fig: ForgetFigures, retrained: ForgetFigures, what: str,
                                   acc_margin: float) -> None:
    """An approximate method's forget accuracy is within ``acc_margin`` of the retrained model's."""
    assert fig.forget_acc <= retrained.forget_acc + acc_margin, (
        f"{what}: forget accuracy {fig.forget_acc:.2f} vs {retrained.forget_acc:.2f} after exact retraining "
        f"(margin {acc_margin})")


def gap_closed(after: ForgetFigures, before: ForgetFigures, retrained: ForgetFigures) -> tuple[float, float]:
    """The share of the way from the original model to exact retraining an unlearner went on the forget
    set, in accuracy and in loss (0: did nothing, 1: as far as retraining)."""
    acc_gap, loss_gap = before.forget_acc - retrained.forget_acc, retrained.forget_loss - before.forget_loss
    assert acc_gap >= 0.5 and loss_gap >= 1.0, "the case must memorise its forget set and retraining forget it"
    return ((before.forget_acc - after.forget_acc) / acc_gap, (after.forget_loss - before.forget_loss) / loss_gap)


def assert_moves_towards_retraining(after: ForgetFigures, before: ForgetFigures, retrained: ForgetFigures,
                                    what: str, min_acc: float, min_loss: float) -> tuple[float, float]:
    """An approximate unlearner closes at least ``min_acc`` of the forget-accuracy gap and ``min_loss``
    of the forget-loss gap between the original model and the exactly retrained one."""
    acc, loss = gap_closed(after, before, retrained)
    assert acc >= min_acc, (f"{what}: forget accuracy {after.forget_acc:.2f} closes {acc:.0%} of the way from "
                            f"{before.forget_acc:.2f} to retraining's {retrained.forget_acc:.2f} (< {min_acc:.0%})")
    assert loss >= min_loss, (f"{what}: forget loss {after.forget_loss:.3f} closes {loss:.0%} of the way from "
                              f"{before.forget_loss:.3f} to retraining's {retrained.forget_loss:.3f} "
                              f"(< {min_loss:.0%})")
    return acc, loss


# ---------------------------------------------------------------------- guidance
def toy_colour_classifier(x: torch.Tensor) -> torch.Tensor:
    """Class c's logit is the mean of colour channel c (images in [0, 1]), times 8: a classifier whose
    gradient says plainly which way "more class c" lies."""
    return 8.0 * x.mean(dim=(2, 3))


def mean_log_prob(classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.log_softmax(classifier(x), 1).gather(1, y.view(-1, 1)).mean())


def assert_guidance_raises(plain: torch.Tensor, guided: torch.Tensor, classifier, y: torch.Tensor,
                           min_gain: float = 0.05) -> float:
    """Classifier guidance towards ``y`` raises the classifier's mean log-probability of ``y`` over
    the unguided samples drawn from the same noise (guidance the wrong way lowers it)."""
    gain = mean_log_prob(classifier, guided, y) - mean_log_prob(classifier, plain, y)
    assert gain >= min_gain, f"guidance moved log p(requested class) by {gain:+.3f} (< {min_gain})"
    return gain


# ---------------------------------------------------------------------- augmentation
def assert_generated_match_requested(fidelity: dict[str, float], min_class: float, min_private: float) -> None:
    """The fidelity classifiers see the requested class AND the requested private attribute (colour)
    in the generated samples (noise shows neither: chance is 1 / K)."""
    assert fidelity["class"] >= min_class, f"class fidelity {fidelity['class']:.2f} < {min_class}"
    assert fidelity["private"] >= min_private, f"private-attribute fidelity {fidelity['private']:.2f} < {min_private}"


JUDGED_CLOSED = 0.9  # share of the planned KL reduction the generated samples must achieve as judged


def assert_debiased(report: dict, threshold: float, min_closed: float = JUDGED_CLOSED) -> float:
    """An augmentation step's shard report: the plan brings KL under the threshold, and what was
    generated, as the fidelity classifiers see it (``kl_after_judged``), achieves at least
    ``min_closed`` of the planned reduction (the classifiers err on some real images too: seen 0.31
    judged for 0.26 planned from 2.24 with real images of the requested groups, 0.98 of the reduction;
    noise: 2.41, below zero)."""
    assert report["kl_after"] <= threshold, f"planned KL {report['kl_after']:.3f} > {threshold}"
    closed = (report["kl_before"] - report["kl_after_judged"]) / (report["kl_before"] - report["kl_after"])
    assert closed >= min_closed, (
        f"the generated samples as judged leave KL at {report['kl_after_judged']:.3f} (planned "
        f"{report['kl_after']:.3f}, before {report['kl_before']:.3f}): {closed:.0%} of the planned reduction")
    return closed


@functools.lru_cache(maxsize=1)
def tiny_fidelity():
    """The fidelity classifiers of a TINY run (8 px Biased-Digits, trained on its held-out split as the
    server trains them) and the real unbiased test set, which has every (class, colour) group."""
    from fairforget.config import resolve
    from fairforget.data import load_dataset
    from fairforget.diffusion.quality import FidelityClassifiers
    from tests.conftest import TINY

    bundle = load_dataset(resolve(dict(TINY)))
    return FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=0, epochs=15), \
        bundle.test_unbiased


def real_group_sampler(pool, colour=None):
    """A stand-in for the generator's ``sample`` that returns real images of the requested (class,
    private) group from ``pool`` (``colour``: a function of the class giving the colour it draws instead)."""
    groups = (pool.y * 10 + pool.private).numpy()

    def draw(model, y, a, seed, **kw):
        rng = np.random.default_rng(seed)
        a = a if colour is None else colour(y)
        return pool.x[[int(rng.choice(np.flatnonzero(groups == g))) for g in (y * 10 + a).tolist()]]

    return draw


def noise_sampler(model, y, a, seed, **kw):
    """A generator that outputs noise."""
    return torch.rand(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def augment_step_report(root, sampler, monkeypatch) -> dict:
    """One augmentation step (step 0: generate, no retirement) of shard 0 of a TINY augmented run, with
    ``sampler`` in place of the generator's sampling and the TINY fidelity classifiers judging."""
    import clients.augment
    from clients.node import Node
    from fairforget import keys
    from fairforget.config import resolve
    from tests.conftest import TINY
    from tests.test_augment import TINY_AUG

    fidelity, _ = tiny_fidelity()
    monkeypatch.setattr(clients.augment, "sample", sampler)
    # the sampler is stubbed: one generator training step is enough
    cfg = resolve({**TINY, **TINY_AUG, "diffusion-train-steps": 1, "out-dir": str(root / "run")})
    node = Node.from_context(cfg.to_mapping(), {keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: cfg.num_shards})
    return node.augmenter.step(0, 0, fidelity)
