"""The shard's current model after approximate unlearning, and what every approximate method shares.

SISA keeps one model per trained stage (:mod:`fairforget.sisa`). An approximate deletion first checks
everything that could refuse it (:func:`check`: unknown ids, a method DP-SGD does not cover, the DP
cap) with nothing written; holds the model *before* the deletion in memory; then does the same
bookkeeping as an exact one (:meth:`SisaShard.remove`: the ids leave the index and the index records
the stage an exact retrain must reach, ``target``, in one atomic write; every checkpoint trained on
the ids is deleted, and so is the previous ``approx.pt``, which was trained on them too), but does
not retrain: it computes an approximate model from the held one and saves it beside the checkpoints::

    STATE/approx.pt   {"model": state dict, "meta": {"method", "index_version", "target_stage",
                                                     "approx_deletions", ...}}

That file is the shard's current model while it is valid, i.e. while ``meta.index_version`` equals
the index's version. The crash rule (:func:`resume`, which a node runs before every message): a
shard whose index has a retrain target above its trained stages and no valid ``approx.pt`` finishes
the exact retrain; a stale ``approx.pt`` (older than the index) is deleted first. So a crash at any
point ends, after restart, in the exact retrained model (before the save) or the approximate one
(after it), never in the model before the deletion, and no file in the state folder holds a model
trained on the deleted ids. While an approximate model serves, the index's ``target`` keeps how many
stages the shard had trained before its first approximate deletion, so that an exact retrain
(:mod:`fairforget.unlearning.exact`) goes back through all of them; it then removes ``approx.pt``.

The methods that descend (fine-tune, NegGrad+, SCRUB, DEL) train through the training engine
(:func:`fairforget.training.train`) with an objective of their own and an optimizer built once by
:meth:`UnlearnParams.optimizer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fairforget.data.base import SampleSet
from fairforget.model import SimpleConvNet, load_model
from fairforget.objectives import Objective
from fairforget.privacy.accountant import PrivacyBudgetExceeded
from fairforget.sisa import SisaError, SisaShard, derived_seed
from fairforget.storage import atomic_torch_save, atomic_write_json, durable_unlink, state_hash, torch_load
from fairforget.training import NO_PRIVACY, Batch, OptimizerSpec, PrivacyHook, train
from fairforget.unlearning.result import UnlearnResult

APPROX_FILE = "approx.pt"


@dataclass(frozen=True)
class UnlearnParams:
    """The run-config keys the approximate methods read (``unlearn-*``, ``newton-lambda``,
    ``capacity-eps`` / ``capacity-delta`` for the Newton step's noise).

    Parameters
    ----------
    epochs : int
        ``unlearn-epochs``: epochs of the gradient-based methods (fine-tuning, gradient ascent).
    lr : float
        ``unlearn-lr``: their learning rate.
    newton_lambda : float
        ``newton-lambda``: the L2 damping of the Newton step's Hessian.
    eps : float
        ``capacity-eps``: the (epsilon, delta) certificate the Newton step's noise and the deletion
        capacity are calibrated to.
    delta : float
        ``capacity-delta``: its delta.
    options : Mapping[str, Any]
        A plugin method's own options (``unlearner-options``, keyed by the method's name), with the
        method's declared defaults filled in (:func:`fairforget.unlearning.unlearn_params`).
    """

    epochs: int
    lr: float
    newton_lambda: float
    eps: float
    delta: float
    #: a plugin method's own options (``unlearner-options``, :func:`fairforget.unlearning.unlearn_params`)
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> UnlearnParams:
        return cls(epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr, newton_lambda=cfg.newton_lambda,
                   eps=cfg.capacity_eps, delta=cfg.capacity_delta)

    @classmethod
    def defaults(cls) -> UnlearnParams:
        """The values of ``pyproject.toml`` (the one place defaults live)."""
        from fairforget.config import resolve

        return cls.from_config(resolve())

    @property
    def optimizer(self) -> OptimizerSpec:
        """Adam at ``unlearn-lr``, for every method that descends."""
        return OptimizerSpec(lr=self.lr)


# ---------------------------------------------------------------------- the shard's current model
def approx_path(shard: SisaShard) -> Path:
    return shard.dir / APPROX_FILE


def _valid(shard: SisaShard) -> dict[str, Any] | None:
    path = approx_path(shard)
    if not path.is_file():
        return None
    saved = torch_load(path)
    return saved if int(saved["meta"]["index_version"]) == int(shard.index["version"]) else None


def meta(shard: SisaShard) -> dict[str, Any] | None:
    """The valid ``approx.pt``'s metadata, or None when the shard serves its SISA checkpoint."""
    saved = _valid(shard)
    return None if saved is None else dict(saved["meta"])


def current_state(shard: SisaShard) -> dict[str, torch.Tensor]:
    """The shard's current model: the valid approximate one, else its last trained stage."""
    saved = _valid(shard)
    return dict(saved["model"]) if saved is not None else shard.model_state()


def current_hash(shard: SisaShard) -> str:
    return state_hash(current_state(shard))


def target_stage(shard: SisaShard) -> int:
    """The stages an exact retrain must go through: the index's target (those trained before the first
    approximate deletion, while one serves; a pending retrain's), else the stages trained now."""
    path = approx_path(shard)
    if path.is_file():  # a state folder from before the target moved to the index kept it here
        return max(int(torch_load(path)["meta"]["target_stage"]), shard.target)
    return shard.target


def clear(shard: SisaShard) -> None:
    durable_unlink(approx_path(shard))


def resume(shard: SisaShard) -> float:
    """Finish a deletion a crash interrupted (a node calls this before every message): a valid
    ``approx.pt`` serves the shard as it is; a stale one (older than the index: trained on ids deleted
    since) is deleted, and a retrain target above the trained stages is trained exactly. Returns the
    retrain's seconds. Under DP, a retrain past the epsilon cap is not run: the shard serves its last
    clean checkpoint (trained on none of the deleted ids) and the pending target stays in its index."""
    path = approx_path(shard)
    if path.is_file():
        saved_meta = torch_load(path)["meta"]
        if int(saved_meta["index_version"]) == int(shard.index["version"]):
            return 0.0
        old_target = int(saved_meta.get("target_stage", 0))
        if old_target > shard.target:  # a state folder of the old format: its target lived in the marker
            shard.index["target"] = old_target
            atomic_write_json(shard.index_path, shard.index)
        clear(shard)
    try:
        return shard.resume()
    except PrivacyBudgetExceeded:
        return 0.0


# ---------------------------------------------------------------------- shared by every method
def model_from(state: dict[str, torch.Tensor], shard: SisaShard) -> SimpleConvNet:
    s = shard.settings
    return load_model(state, s.num_classes, s.width).to(s.device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: SampleSet, batch_size: int = 512) -> float:
    if len(data) == 0:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        pred = model(data.x[i : i + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == data.y[i : i + batch_size]).sum())
    return correct / len(data)


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


class LossOn(Objective):
    """An unlearner's own loss as an engine objective: ``fn(model, batch)``."""

    name = "unlearner"

    def __init__(self, fn: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.fn = fn

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.fn(model, batch)


def descend(model: nn.Module, data: SampleSet, fn: Callable[[nn.Module, Batch], torch.Tensor],
            optimizer: torch.optim.Optimizer, batch_size: int, seeds: list[int],
            privacy: PrivacyHook = NO_PRIVACY) -> None:
    """``len(seeds)`` epochs of ``fn`` over ``data`` through the training engine."""
    train(model, data, seeds=seeds, batch_size=batch_size, objective=LossOn(fn), optimizer=optimizer,
          privacy=privacy)


Method = Callable[[SimpleConvNet, SampleSet, SampleSet, UnlearnParams, SisaShard, int], dict[str, float]]


def check(name: str, shard: SisaShard, ids: list[int], params: UnlearnParams | None,
          dp_epochs: int | None = None) -> None:
    """Everything that can refuse the approximate deletion, checked with nothing written (the node
    runs this before it tombstones the ids): ids not live in the shard; under DP-SGD a method that
    does not declare how many DP epochs over the retained data it trains (``dp_epochs``; 0 for one
    that does not train), or whose spend would pass the shard's epsilon cap.

    Parameters
    ----------
    name : str
        The method's registered name (for the messages).
    shard : fairforget.sisa.SisaShard
        The shard the deletion is for.
    ids : list of int
        The sample ids to delete.
    params : UnlearnParams or None
        The run's unlearning keys; None: the defaults.
    dp_epochs : int, optional
        Under DP-SGD: the DP epochs over the retained data the method trains (0: none); None: the
        method cannot run under DP-SGD.

    Raises
    ------
    fairforget.sisa.SisaError
        An id not live in the shard, or a method DP-SGD cannot cover.
    fairforget.privacy.accountant.PrivacyBudgetExceeded
        Its spend would pass the shard's epsilon cap.
    """
    params = params or UnlearnParams.defaults()
    shard.check_ids(ids)
    if shard.settings.dp is not None:
        if dp_epochs is None:
            raise SisaError(f"unlearn-method {name!r} cannot run under DP-SGD: its loss mixes the forget set or a "
                            "teacher into every step, or masks gradients, which Opacus' per-sample clipping does "
                            "not cover; use finetune, newton or exact-sisa")
        n_retain = len(shard.live_ids() - set(ids))
        planned = shard.settings.dp.planned(n_retain, shard.settings.batch_size, dp_epochs)
        shard.check_privacy(planned, f"{name} unlearning")
        # a crash mid-deletion is finished by an exact retrain (resume): that must fit the cap as well,
        # or the node would be left serving a lower stage with a retrain it may never run
        shard.check_privacy(planned + shard.planned_removal(ids, target_stage(shard)),
                            f"{name} unlearning (with the exact retrain that finishes it after a crash)")


def approximate(name: str, method: Method, shard: SisaShard, ids: list[int],
                params: UnlearnParams | None, dp_epochs: int | None = None) -> UnlearnResult:
    """Run one approximate method: :func:`check` it, hold the model before the deletion in memory, do
    the SISA bookkeeping (:meth:`SisaShard.remove`, committed with the exact retrain's target, and the
    previous approximate model removed), let ``method(model, retain, forget, params, shard, seed)``
    change the model in place (it returns its own figures), save it as the shard's current model.

    Under DP-SGD the method's spend (``dp_epochs`` over the retained data) is checked against the
    shard's epsilon cap before anything changes, and composed into its accountant.

    Parameters
    ----------
    name : str
        The method's registered name (what the ledger records).
    method : callable
        ``method(model, retain, forget, params, shard, seed) -> dict`` changing ``model`` in place and
        returning its own figures (``noise_sigma``, ...).
    shard : fairforget.sisa.SisaShard
        The shard the deletion is for.
    ids : list of int
        The sample ids to delete.
    params : UnlearnParams or None
        The run's unlearning keys; None: the defaults.
    dp_epochs : int, optional
        As for :func:`check`.

    Returns
    -------
    fairforget.unlearning.result.UnlearnResult
        What the deletion did (``retrained_stages`` 0, the method's figures, the hashes).
    """
    params = params or UnlearnParams.defaults()
    check(name, shard, ids, params, dp_epochs)
    if shard.settings.num_threads > 0:
        torch.set_num_threads(shard.settings.num_threads)
    before = current_state(shard)  # in memory only: no file ever holds it again
    previous = meta(shard)
    target = target_stage(shard)
    forget = shard.data.select_ids(sorted(ids))
    t0 = time.perf_counter()
    # committed with the exact retrain's target: a crash from here on ends in the exact retrain (resume)
    clean_stage = shard.remove(ids, retrain_to=target)
    clear(shard)  # the previous approximate model was trained on the ids too
    retain = shard.live_data()
    model = model_from(before, shard)
    seed = derived_seed(shard.settings.seed, shard.shard, 9000, int(shard.index["version"]))
    extra = method(model, retain, forget, params, shard, seed)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    deletions = (int(previous["approx_deletions"]) if previous else 0) + len(ids)
    shard.save_privacy()  # before the model: a crash may over-count the spend, never under-count it
    _save(shard, state, name, target, deletions)
    return UnlearnResult(
        shard=shard.shard, method=name, restart_stage=clean_stage, retrained_stages=0, seconds=seconds,
        wall_seconds=time.perf_counter() - t0, hash_before=state_hash(before), hash_after=state_hash(state),
        num_examples=len(retain), full_train_seconds=shard.full_train_seconds(), approx_deletions=deletions,
        figures=extra,
    )


def _save(shard: SisaShard, state: dict[str, torch.Tensor], name: str, target: int, deletions: int) -> None:
    atomic_torch_save(approx_path(shard), {"model": state, "meta": {
        "method": name, "index_version": int(shard.index["version"]), "target_stage": target,
        "approx_deletions": deletions,
    }})
