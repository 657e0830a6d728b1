"""Laplace Sample Information (fairforget.lsi): the closed-form leave-one-out KL against brute force on
the full Gaussians, a duplicated record is less informative than a unique one, a mislabeled record more,
and a shard too small for the Laplace fit is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest

from fairforget import lsi as L

C, D, N = 3, 4, 60
LAMBDA = 1.0


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(3)
    centres = rng.normal(0.0, 2.0, (C, D))
    y = np.arange(N) % C
    x = centres[y] + rng.normal(0.0, 1.0, (N, D))
    y = y.copy()
    y[0] = (y[0] + 1) % C  # one mislabeled record
    return x, y


@pytest.fixture(scope="module")
def scored(blobs):
    x, y = blobs
    return L.lsi_scores(x, y, C, prior_precision=LAMBDA)


def _jacobian(phi1: np.ndarray) -> np.ndarray:
    """d logits / d theta for laplace-torch's parameter order (weight row-major, then bias): C x k."""
    d = len(phi1) - 1
    j = np.zeros((C, C * (d + 1)))
    for c in range(C):
        j[c, c * d:(c + 1) * d] = phi1[:d]
        j[c, C * d + c] = 1.0
    return j


def _gauss_kl(m0, p0, m1, p1) -> float:
    """KL(N(m0, p0^-1) || N(m1, p1^-1)) with full matrices."""
    k = len(m0)
    s0 = np.linalg.inv(p0)
    dm = m1 - m0
    return 0.5 * (np.trace(p1 @ s0) - k + dm @ p1 @ dm + np.linalg.slogdet(p0)[1] - np.linalg.slogdet(p1)[1])


def test_closed_form_matches_the_full_gaussians(blobs, scored):
    x, y = blobs
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    phi1 = np.c_[z, np.ones(N)]
    p = scored.probs
    js = [_jacobian(phi1[i]) for i in range(N)]
    lams = [np.diag(p[i]) - np.outer(p[i], p[i]) for i in range(N)]
    h = sum(j.T @ lam @ j for j, lam in zip(js, lams, strict=True)) + LAMBDA * np.eye(C * (D + 1))
    assert np.allclose(scored.precision, h, atol=1e-6)  # laplace-torch's GGN is the exact one, in this order
    for i in (0, 5, 17):
        g = js[i].T @ (p[i] - np.eye(C)[y[i]])
        h_without = h - js[i].T @ lams[i] @ js[i]
        shift = np.linalg.solve(h_without, g)  # one Newton step of the MAP without record i
        brute = _gauss_kl(np.zeros(len(g)), h, shift, h_without)
        assert scored.lsi[i] == pytest.approx(brute, rel=1e-6, abs=1e-12)


def test_duplicated_record_is_less_informative_than_unique_and_mislabeled_stands_out(blobs, scored):
    x, y = blobs
    assert scored.lsi[0] > np.quantile(scored.lsi[1:], 0.95)  # the mislabeled record
    for i in (0, 7):
        dup = L.lsi_scores(np.vstack([x, x[i:i + 1]]), np.r_[y, y[i]], C, prior_precision=LAMBDA)
        assert dup.lsi[i] == pytest.approx(dup.lsi[-1], rel=1e-6)  # both copies alike
        assert dup.lsi[i] < scored.lsi[i]  # ... and each tells less than the record did alone


def test_summary_has_no_ids_and_deciles_order_the_records(scored, blobs):
    _, y = blobs
    s = L.summarize(scored.lsi, y, C)
    assert s["records"] == N and sum(s["histogram_log10"]["counts"]) == N and set(s["classes"]) == {"0", "1", "2"}
    dec = L.deciles(scored.lsi)
    assert dec[np.argmax(scored.lsi)] == 9 and dec[np.argmin(scored.lsi)] == 0
    assert L.auroc(np.r_[3.0, 1.0, 2.0], np.r_[True, False, False]) == 1.0


@pytest.mark.parametrize("n, classes", [(12, 3), (40, 1)])
def test_a_shard_too_small_for_the_laplace_fit_is_a_one_line_error(n, classes):
    from server import cli

    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    with pytest.raises(L.LsiError, match="too small for the Laplace fit") as err:
        L.lsi_scores(rng.normal(size=(n, D)), y, C)
    assert "\n" not in str(err.value) and cli._is_user_error(err.value)
    assert cli.main(["inspect"]) == cli.EXIT_USAGE  # neither --run nor --state-dir: one line, exit 2


def test_least_informative_retire_order_retires_the_lowest_lsi_originals(blobs, scored, monkeypatch):
    import torch

    from fairforget.config import RETIRE_ORDERS
    from fairforget.data.base import SYNTHETIC_ID_BASE, make_sampleset

    assert tuple(L.RETIRE_ORDERS) == RETIRE_ORDERS  # the config's choices are the registered orders
    x, y = blobs

    class Probe(torch.nn.Module):  # a "model" whose bottleneck is the blobs' features
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), -1)

    ids = np.r_[np.arange(N - 5), SYNTHETIC_ID_BASE + np.arange(5)]  # the last five are synthetic
    data = make_sampleset(torch.as_tensor(x, dtype=torch.float32).reshape(N, 1, 1, D), y, np.zeros(N), ids)
    originals = [int(i) for i in ids[:-5]]
    rng = np.random.default_rng(0)
    fit = L.lsi_scores  # at the fixture's prior precision (the marginal likelihood's fit is tested above)
    monkeypatch.setattr(L, "lsi_scores", lambda f, yy, c: fit(f, yy, c, prior_precision=LAMBDA))
    picked = L.RETIRE_ORDERS["least-informative"](6, originals, rng, model=Probe(), data=data, num_classes=C)
    assert np.allclose(L.lsi_scores(x.astype(np.float32), y, C).lsi, scored.lsi, rtol=1e-4)
    assert picked == L.lowest_first(scored.lsi, ids.tolist(), originals, 6)
    assert 0 not in picked and not set(picked) & set(ids[-5:].tolist())  # not the mislabeled one, no synthetic
    assert L.lowest_first(np.r_[0.3, 0.1, 0.2, 0.1], [7, 8, 9, 5], [7, 8, 9, 5], 2) == [5, 8]  # ties by id
    assert L.RETIRE_ORDERS["random"](3, originals, np.random.default_rng(1)) == sorted(
        originals[p] for p in np.random.default_rng(1).permutation(len(originals))[:3])  # today's order


def test_site_audit_reports_membership_success_per_lsi_decile(tmp_path):
    import torch

    from fairforget.audit.roc import auc
    from fairforget.audit.site import site_audit, split_heldout
    from fairforget.data.base import make_sampleset
    from fairforget.model import build_model

    rng = np.random.default_rng(1)
    n, m = 40, 20
    x = torch.as_tensor(rng.random((n + m, 3, 8, 8)), dtype=torch.float32)
    y = np.arange(n + m) % C
    data = make_sampleset(x, y, np.zeros(n + m), np.arange(n + m))
    members, heldout = data.subset(np.arange(n)), data.subset(np.arange(n, n + m))
    model = build_model(C, 2, seed=0, norm="group")
    L.inspect_shard(tmp_path, model, members, C, str, prior_precision=LAMBDA)  # the site's own scores

    def audit() -> dict:
        return site_audit({"shard-0": [model]}, members, heldout, attacks=["loss"], settings=None, references=0,
                          bootstrap=0, seed=0, cache_dir=tmp_path / "audit")

    out = audit()["lsi_deciles"]["shard-0"]
    assert sorted(out) == sorted(f"decile-{d}" for d in range(10)) and all(v["members"] == 4 for v in out.values())
    lsi = L.read_sample_lsi(tmp_path, model)
    top = np.flatnonzero(L.deciles(np.array([lsi[i] for i in range(n)])) == 9)  # the most informative members
    _, nonmembers = split_heldout(heldout, 0)

    def loss(d) -> np.ndarray:
        with torch.no_grad():
            p = torch.softmax(model.eval()(d.x), 1).numpy()
        return -np.log(p[np.arange(len(d)), d.y.numpy()])

    score = np.r_[-loss(members.subset(top)), -loss(nonmembers)]  # the loss attack: members lose less
    truth = np.r_[np.ones(len(top), bool), np.zeros(len(nonmembers), bool)]
    assert out["decile-9"]["loss"] == pytest.approx(auc(score, truth))
    from fairforget.report import _privacy_lines

    site = {"scope": "shard", "members": n, "nonmembers": 10, "population": 10, "references": 0, "seconds": 1.0,
            "lsi_deciles": {"shard-0": out}}
    text = "\n".join(_privacy_lines({"privacy": {"audited_at": {}, "population": 0, "attacks": ["loss"], "seconds": 1.0,
                                                 "references": {"count": 0}, "targets": {}, "sites": {"a": site}},
                                     "unlearning": []}))
    assert f"| a | shard-0 | loss | {out['decile-0']['loss']:.2f} |" in text  # the report shows it
    with torch.no_grad():  # scores of another model are stale: no breakdown
        model.fc.bias.add_(0.1)
    assert audit()["lsi_deciles"] == {}
