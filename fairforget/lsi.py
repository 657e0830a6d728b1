"""Laplace Sample Information (LSI; Kaiser, Schwethelm, Rueckert, Kaissis 2025): how much a record
changes the model's weight posterior, ``LSI(z) = KL( p(w | D) || p(w | D without z) )`` with both
posteriors Laplace-approximated. Large for mislabeled and atypical records, small for redundant ones.

*What is computed (a last-layer probe, as the paper suggests for speed).* The features are the shard
model's bottleneck (``features(x)``), standardised on the shard. The probe is a linear softmax head on
them (weights and bias, ``k = C (d + 1)`` parameters), fitted to its MAP under a Gaussian prior of
precision ``lambda``. ``laplace-torch`` gives the posterior: ``Laplace(probe, "classification",
subset_of_weights="all", hessian_structure="full")``, with ``lambda`` chosen by its marginal likelihood
(the probe is refitted at the chosen ``lambda`` and the Laplace fit repeated). So
``p(w | D) ~ N(theta, H^-1)`` with ``H = sum_i J_i' Lambda_i J_i + lambda I`` (the exact GGN of the
cross-entropy; ``Lambda_i = diag(p_i) - p_i p_i'``).

*Leave one out, in closed form.* Without record z, the precision loses z's rank-(C - 1) term,
``H_-z = H - J' Lambda J``, and the MAP moves by one Newton step, ``theta_-z = theta + H_-z^-1 g`` with
``g = J' (p - e_y)`` z's gradient. That is the approximation: no refit, and the features (the network
below the head, which did see z) are held fixed. The KL between the two Gaussians then needs only
C x C matrices. With ``S = J H^-1 J'`` (the logits' posterior covariance at z) and ``r = p - e_y``:

    LSI(z) = 1/2 [ -tr(Lambda S) - log det(I - Lambda S) + r' S r + (S r)' (I - Lambda S)^-1 Lambda S r ]

The first two terms are the change in the posterior's shape (0 when z adds no curvature). The last two
are ``g' H_-z^-1 g``, the shift of its mean (Woodbury). All are in nats.

*At a site.* :func:`inspect_shard` reads the site's shard (its state folder and its data, or in
simulation the run's node folder), scores every live record and writes two files into the shard's own
folder:

- ``lsi/records.csv``: one row per record, with the site's own record id. It never leaves the site.
- ``lsi/summary.json``: a histogram, class-wise figures and deciles, with no ids and no per-record
  values. The site may share it with the server.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LSI_DIR = "lsi"
RECORDS_FILE = "records.csv"
SUMMARY_FILE = "summary.json"
MIN_PER_CLASS = 2  # a class with fewer live records gives the probe no curvature to speak of
MIN_RECORDS = 20  # ... and fewer records than this in all cannot support a Laplace fit
HIST_BINS = 20


class LsiError(ValueError):
    """A shard LSI cannot be computed for; one line for the user."""


@dataclass
class LsiResult:
    """Per-record LSI (nats) in the order of the input, and how the posterior was fitted."""

    lsi: np.ndarray
    shape_term: np.ndarray  # the change in the posterior's covariance
    mean_term: np.ndarray  # the shift of its mean
    prior_precision: float
    params: int
    train_accuracy: float
    probs: np.ndarray | None = None  # the probe's softmax at its MAP (n x C)
    precision: np.ndarray | None = None  # laplace-torch's posterior precision H (k x k, weights then bias)


def check_size(y: np.ndarray, num_classes: int) -> None:
    """:class:`LsiError` unless the shard is large enough for the Laplace fit."""
    n = len(y)
    counts = np.bincount(np.asarray(y, dtype=int), minlength=num_classes)
    present = counts[counts > 0]
    if n < MIN_RECORDS or len(present) < 2 or present.min() < MIN_PER_CLASS:
        raise LsiError(f"the shard is too small for the Laplace fit: {n} live records in {len(present)} classes "
                       f"(the fewest {int(present.min()) if len(present) else 0} in a class); LSI needs at least "
                       f"{MIN_RECORDS} records, 2 classes and {MIN_PER_CLASS} records in each class present")


def _fit_map(phi: torch.Tensor, y: torch.Tensor, num_classes: int, prior_precision: float,
             init: nn.Linear | None = None) -> nn.Linear:
    """The probe's MAP: sum of cross-entropies + lambda / 2 |theta|^2, full-batch L-BFGS in float64."""
    probe = nn.Linear(phi.shape[1], num_classes).double()
    with torch.no_grad():
        if init is not None:
            probe.load_state_dict(init.state_dict())
        else:
            probe.weight.zero_()
            probe.bias.zero_()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(phi), y, reduction="sum")
        loss = loss + 0.5 * prior_precision * sum((p**2).sum() for p in probe.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def _laplace(probe: nn.Linear, phi: torch.Tensor, y: torch.Tensor, prior_precision: float) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace import Laplace

        la = Laplace(probe, "classification", subset_of_weights="all", hessian_structure="full",
                     prior_precision=prior_precision)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(phi, y), batch_size=256)
        la.fit(loader, progress_bar=False)
    return la


def lsi_scores(features: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, num_classes: int,
               prior_precision: float | None = None) -> LsiResult:
    """LSI of every row of ``features`` (a shard's bottleneck features) with labels ``y`` (see the module
    docstring). ``prior_precision`` None: chosen by laplace-torch's marginal likelihood."""
    y_np = np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y, dtype=np.int64)
    check_size(y_np, num_classes)
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)  # standardised on the shard (a fixed, public transform)
    yt = torch.as_tensor(y_np)
    lam = 1.0 if prior_precision is None else float(prior_precision)
    probe = _fit_map(x, yt, num_classes, lam)
    la = _laplace(probe, x, yt, lam)
    if prior_precision is None:  # the marginal likelihood's lambda, then the MAP and the fit again at it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.optimize_prior_precision(method="marglik", n_steps=100, lr=0.1)
        lam = float(la.prior_precision.detach().reshape(-1)[0])
        probe = _fit_map(x, yt, num_classes, lam, init=probe)
        la = _laplace(probe, x, yt, lam)
    precision = la.posterior_precision.detach().double()
    k = precision.shape[0]
    d1 = x.shape[1] + 1
    # laplace-torch's parameter vector is (weight row-major, bias); group it per class: [w_c, b_c]
    order = torch.tensor([c * (d1 - 1) + j if j < d1 - 1 else num_classes * (d1 - 1) + c
                          for c in range(num_classes) for j in range(d1)])
    cov = torch.linalg.inv(precision)[order][:, order].reshape(num_classes, d1, num_classes, d1)
    phi1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    with torch.no_grad():
        p = torch.softmax(probe(x), 1)
    s = torch.einsum("ia,cadb,ib->icd", phi1, cov, phi1)  # J H^-1 J' per record (C x C)
    lam_i = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    r = p - nn.functional.one_hot(yt, num_classes).double()
    a = lam_i @ s  # Lambda S
    eye = torch.eye(num_classes, dtype=x.dtype).expand_as(a)
    sign, logdet = torch.linalg.slogdet(eye - a)
    if bool((sign <= 0).any()):
        raise LsiError("the Laplace posterior without a record is not positive definite (raise the prior precision)")
    shape = 0.5 * (-a.diagonal(dim1=1, dim2=2).sum(1) - logdet)
    sr = (s @ r[:, :, None])
    mean = 0.5 * ((r[:, None, :] @ sr).reshape(-1)
                  + (sr.transpose(1, 2) @ torch.linalg.solve(eye - a, lam_i @ sr)).reshape(-1))
    acc = float((p.argmax(1) == yt).double().mean())
    return LsiResult((shape + mean).numpy(), shape.numpy(), mean.numpy(), lam, int(k), acc, p.numpy(),
                     precision.numpy())


# ---------------------------------------------------------------------- summaries
def summarize(lsi: np.ndarray, y: np.ndarray, num_classes: int, bins: int = HIST_BINS) -> dict[str, Any]:
    """What the site may share: a histogram of log10 LSI, deciles and class-wise figures; no ids, no
    per-record values."""
    v = np.asarray(lsi, dtype=float)
    logv = np.log10(np.clip(v, 1e-12, None))
    counts, edges = np.histogram(logv, bins=bins)
    per_class = {}
    for c in range(num_classes):
        sel = v[np.asarray(y) == c]
        if len(sel):
            per_class[str(c)] = {"records": int(len(sel)), "mean": float(sel.mean()), "median": float(np.median(sel)),
                                 "total": float(sel.sum())}
    return {"records": int(len(v)), "total_nats": float(v.sum()), "mean": float(v.mean()),
            "median": float(np.median(v)), "deciles": [float(q) for q in np.quantile(v, np.linspace(0.1, 0.9, 9))],
            "histogram_log10": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
            "classes": per_class}


def deciles(lsi: np.ndarray) -> np.ndarray:
    """Each record's LSI decile, 0 (least informative) to 9 (most), by rank (ties by order)."""
    ranks = np.argsort(np.argsort(np.asarray(lsi), kind="stable"), kind="stable")
    return (ranks * 10 // max(len(ranks), 1)).astype(int)


def records_csv(ids: Sequence[str], y: np.ndarray, result: LsiResult, samples: Sequence[int] | None = None) -> str:
    """One row per record: the site's record id, the node's sample id, label, LSI, its terms, decile."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["record", "sample", "label", "lsi", "shape_term", "mean_term", "decile"])
    dec = deciles(result.lsi)
    for i, rid in enumerate(ids):
        w.writerow([rid, "" if samples is None else int(samples[i]), int(y[i]), f"{result.lsi[i]:.6g}",
                    f"{result.shape_term[i]:.6g}", f"{result.mean_term[i]:.6g}", int(dec[i])])
    return out.getvalue()


def read_sample_lsi(folder: Path, model: nn.Module) -> dict[int, float]:
    """sample id -> LSI from ``folder/lsi`` if it was computed for ``model`` (the summary's
    ``model_hash``), else {} (no scores yet, or scores of another model: stale)."""
    from fairforget.storage import read_json, state_hash

    base = Path(folder) / LSI_DIR
    try:
        if read_json(base / SUMMARY_FILE).get("model_hash") != state_hash(model.state_dict()):
            return {}
        with (base / RECORDS_FILE).open(newline="") as fh:
            return {int(row["sample"]): float(row["lsi"]) for row in csv.DictReader(fh) if row.get("sample")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


# ---------------------------------------------------------------------- a shard
@torch.no_grad()
def shard_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model.features(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def inspect_shard(folder: Path, model: nn.Module, data: Any, num_classes: int, record_of: Any,
                  prior_precision: float | None = None) -> dict[str, Any]:
    """LSI of a shard's live records (``data``: a SampleSet) under the model it serves; writes
    ``folder/lsi/records.csv`` (``record_of(sample id)``: the site's record id) and
    ``folder/lsi/summary.json``; returns the summary."""
    from fairforget.storage import atomic_write_json, atomic_write_text, state_hash

    y = data.y.numpy()
    check_size(y, num_classes)
    result = lsi_scores(shard_features(model, data.x), y, num_classes, prior_precision)
    ids = [record_of(int(i)) for i in data.ids.tolist()]
    summary = {**summarize(result.lsi, y, num_classes), "prior_precision": result.prior_precision,
               "probe_parameters": result.params, "probe_train_accuracy": result.train_accuracy,
               "model_hash": state_hash(model.state_dict()),
               "method": "last-layer (bottleneck probe) full-GGN Laplace via laplace-torch; leave-one-out by a "
                         "rank-(C-1) precision downdate and one Newton step; nats"}
    out = Path(folder) / LSI_DIR
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECORDS_FILE, records_csv(ids, y, result, data.ids.tolist()))
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC of ``scores`` for the ``positive`` records (ties count one half)."""
    s, pos = np.asarray(scores, float), np.asarray(positive, bool)
    if pos.all() or not pos.any():
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(s)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ---------------------------------------------------------------------- at a site / in a simulation
def _served_model(state: Path, index: dict[str, Any], approx_meta: dict[str, Any] | None, num_classes: int,
                  width: int) -> nn.Module:
    """The model the shard serves: its valid approximate model, else its last trained stage's checkpoint."""
    from fairforget.model import load_model
    from fairforget.sisa import served_state
    from fairforget.storage import torch_load
    from fairforget.unlearning.approximate import APPROX_FILE

    if approx_meta is not None:
        weights = torch_load(state / APPROX_FILE)["model"]
    elif index["trained"] == 0:
        raise LsiError(f"shard {index['shard']} in {state} has no trained stage: it serves no model to inspect")
    else:
        path = state / "checkpoints" / f"stage-{index['trained']}.pt"
        try:
            weights = served_state(torch_load(path))  # with its eraser (fairforget.erasure), as it is served
        except FileNotFoundError:
            raise LsiError(f"{path} is missing: shard {index['shard']} has no model for its trained stage") from None
    return load_model(weights, num_classes, width)


def _live(node: Any) -> Any:
    """The records the served model was trained on: the trained stages' slices, less the deleted ids."""
    idx = node.index
    gone = set(idx["deleted"])
    live = sorted({i for sl in idx["slices"][:idx["trained"]] for i in sl} - gone)
    pos = np.flatnonzero(np.isin(node.pool.ids.numpy(), live))
    if len(pos) < len(live):  # the data is not the shard's (another site's folder or key), or lost rows
        raise LsiError(f"{len(live) - len(pos)} of shard {node.shard}'s {len(live)} live records are not in its "
                       "data: is the data root this shard's (its labels.csv and site key)?")
    return node.pool.subset(pos)


def _inspect(folder: Path, node: Any, cfg: Any, bundle: Any, prior_precision: float | None) -> dict[str, Any]:
    from fairforget.data.base import SYNTHETIC_ID_BASE

    model = _served_model(folder, node.index, node.approx_meta, bundle.num_classes, cfg.model_width)
    data = _live(node)

    def record_of(sample_id: int) -> str:
        return f"synthetic:{sample_id}" if sample_id >= SYNTHETIC_ID_BASE else bundle.record_of(sample_id)

    try:
        summary = inspect_shard(folder, model, data, bundle.num_classes, record_of, prior_precision)
    except LsiError as exc:
        raise LsiError(f"shard {node.shard}: {exc}") from None
    return {"shard": node.shard, "folder": str(folder), **summary}


def inspect_site(state: Path, cfg: Any, prior_precision: float | None = None) -> dict[str, Any]:
    """``fairforget inspect --state-dir STATE --data-root ROOT``: a site scores its own shard (its data is
    ``cfg.data_root``, its index and served model are in ``state``); the files go into ``state/lsi``."""
    from fairforget.data import load_dataset
    from fairforget.verify import VerifyError, read_site

    if not str(cfg.data_root).strip():
        raise LsiError("a site's inspection needs its data: --data-root (the site's image folder)")
    bundle = load_dataset(cfg)
    try:
        node = read_site(Path(state), cfg.replace(dp=False) if hasattr(cfg, "replace") else cfg, bundle.train)
    except VerifyError as exc:
        raise LsiError(str(exc)) from None
    return _inspect(Path(state), node, cfg, bundle, prior_precision)


def inspect_run(run_dir: Path, cfg: Any, shards: Sequence[int], prior_precision: float | None = None,
                ) -> list[dict[str, Any]]:
    """``fairforget inspect --run DIR``: each shard of a simulation as its site would score it, from
    ``DIR/nodes/shard-K``; the files go into that folder (the site's, not the server's)."""
    from fairforget.data import load_dataset, shard_of
    from fairforget.verify import VerifyError, node_dir, read_node

    bundle = load_dataset(cfg)
    parts = shard_of(cfg, bundle)
    out = []
    for k in shards:
        try:
            node = read_node(Path(run_dir), cfg, parts[k], k)
        except VerifyError as exc:
            raise LsiError(str(exc)) from None
        out.append(_inspect(node_dir(Path(run_dir), k), node, cfg, bundle, prior_precision))
    return out


# ---------------------------------------------------------------------- the augmentation's retire order
def lowest_first(lsi: np.ndarray, ids: Sequence[int], candidates: Sequence[int], count: int) -> list[int]:
    """The ``count`` ``candidates`` (sample ids) with the lowest LSI (``lsi[k]`` belongs to ``ids[k]``),
    ties broken by id; sorted."""
    score = {int(i): float(v) for i, v in zip(ids, lsi, strict=True)}
    ranked = sorted((int(c) for c in candidates), key=lambda c: (score[c], c))
    return sorted(ranked[:max(0, count)])


def _retire_random(count: int, candidates: list[int], rng: np.random.Generator, **_: Any) -> list[int]:
    pick = rng.permutation(len(candidates))[: min(count, len(candidates))]
    return sorted(int(candidates[p]) for p in pick)


def _retire_least_informative(count: int, candidates: list[int], rng: np.random.Generator, *, model: nn.Module,
                              data: Any, num_classes: int, **_: Any) -> list[int]:
    """The shard's lowest-LSI live originals: LSI over everything the model trains on (``data``: the
    live pool, synthetic samples included), ranked among the original ``candidates``."""
    result = lsi_scores(shard_features(model, data.x), data.y.numpy(), num_classes)
    return lowest_first(result.lsi, data.ids.tolist(), candidates, count)


# augment-retire-order -> how a step picks its originals (fairforget.config.RETIRE_ORDERS names them)
RETIRE_ORDERS = {"random": _retire_random, "least-informative": _retire_least_informative}
