"""The training engine: every model in the project is trained here.

One function, :func:`train`, runs epochs of minibatch descent on a :class:`SampleSet`:

* the **objective** (:mod:`fairforget.objectives`, chosen by name with the ``objective`` key) gives
  ``loss(model, batch)``; it is an ``nn.Module`` and may own trainable parts of its own (a bias-only
  branch, a projection head), which the optimizer then trains beside the model and a checkpoint saves;
  one that defines ``before_training(model)`` / ``after_training(model, data)`` gets the model once
  before the first step and once after the last epoch (EnD serves a head refitted on the frozen
  bottleneck and trains on with its own: :mod:`fairforget.objectives.head_refit`);
* the **optimizer** is built once by an :class:`OptimizerSpec` (SISA stages restore its state from
  the previous checkpoint, so it is built by the caller and handed in);
* the **privacy hook** (:class:`PrivacyHook`) may wrap model, optimizer and data loader before the
  first step (a DP-SGD engine such as Opacus' ``PrivacyEngine``) and reports what it spent.

Determinism: epoch ``e`` visits the samples in the order ``torch.randperm(n)`` drawn on the CPU from
a generator seeded with ``seeds[e]``, cut into consecutive batches. So the same data, seeds, initial
weights and optimizer state give the same model on every run; SISA's exact unlearning relies on it.
A DP-SGD hook replaces the batches by Poisson ones and adds noise, both from its own two seeds (a
SISA shard's are the site's secret: :meth:`fairforget.sisa.SisaShard.dp_hook`).

Callers: SISA stages (:mod:`fairforget.sisa`), FedAvg local epochs (``clients/handlers.py``), the
approximate unlearners (:mod:`fairforget.unlearning`), reference and shadow models
(:mod:`fairforget.audit.references`) and the fidelity classifiers (:mod:`fairforget.diffusion.quality`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from fairforget.data.base import SampleSet


# ---------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One minibatch on the model's device: images, labels, private (bias) labels, sample ids.

    Parameters
    ----------
    x : torch.Tensor
        (B, C, H, W) images.
    y : torch.Tensor
        (B,) class labels.
    private : torch.Tensor
        (B,) private (bias) attribute values.
    ids : torch.Tensor
        (B,) sample ids.
    """

    x: torch.Tensor
    y: torch.Tensor
    private: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


class SampleDataset(Dataset):
    """A :class:`SampleSet` held on one device, fetched a whole batch at a time (``__getitems__``)."""

    def __init__(self, data: SampleSet, device: torch.device | str = "cpu") -> None:
        self.x, self.y = data.x.to(device), data.y.to(device)
        self.private, self.ids = data.private.to(device), data.ids.to(device)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, index: Sequence[int] | torch.Tensor) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long).to(self.x.device)
        return Batch(self.x[idx], self.y[idx], self.private[idx], self.ids[idx])


def _collate(batch: Any) -> Any:
    """``__getitems__`` already returns a whole :class:`Batch`; a list of them (a sampler that asks
    one sample at a time) is concatenated."""
    if isinstance(batch, Batch):
        return batch
    return Batch(*(torch.cat([getattr(b, f) for b in batch]) for f in ("x", "y", "private", "ids")))


class SeededEpochs:
    """Batch sampler: epoch ``e`` is ``randperm(n)`` from a CPU generator seeded ``seeds[e]``, cut into
    batches of ``batch_size``. Each ``iter()`` is the next epoch."""

    def __init__(self, n: int, batch_size: int, seeds: Sequence[int]) -> None:
        self.n, self.batch_size, self.seeds = n, batch_size, list(seeds)
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        seed = self.seeds[min(self.epoch, len(self.seeds) - 1)]
        self.epoch += 1
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(int(seed)))
        return iter(perm.split(self.batch_size))


class BatchLoader:
    """The engine's loader: batches of ``dataset`` as ``batch_sampler`` draws them, fetched whole.

    It has what a privacy hook reads off a ``torch.utils.data.DataLoader`` (``dataset``,
    ``batch_sampler``, ``collate_fn``, ``len``) without its per-batch machinery, which costs more
    than these small models' steps: :class:`fairforget.privacy.dp_sgd.DPSGD` builds a real
    DataLoader with Opacus' Poisson sampler from the same parts."""

    def __init__(self, dataset: SampleDataset, batch_sampler: SeededEpochs) -> None:
        self.dataset, self.batch_sampler, self.collate_fn = dataset, batch_sampler, _collate
        self.batch_size = None  # batches come from the batch sampler, as with a DataLoader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        for index in self.batch_sampler:
            yield self.dataset.__getitems__(index)


def make_loader(data: SampleSet, batch_size: int, seeds: Sequence[int], device: torch.device | str) -> BatchLoader:
    """The engine's data loader (a privacy hook may replace it, e.g. by Poisson sampling)."""
    return BatchLoader(SampleDataset(data, device), SeededEpochs(len(data), batch_size, seeds))


# ---------------------------------------------------------------------- optimizers
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                                                       "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build an optimizer: a name of :data:`OPTIMIZERS`, learning rate, weight decay."""

    lr: float
    weight_decay: float = 0.0
    name: str = "adam"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r} (have {', '.join(sorted(OPTIMIZERS))})")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    def build(self, *modules_or_params: nn.Module | Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """One optimizer over the parameters of every module given (the model first, then an
        objective's own parts, each its own parameter group)."""
        groups = []
        for m in modules_or_params:
            params = list(m.parameters()) if isinstance(m, nn.Module) else list(m)
            if params:
                groups.append({"params": params})
        return OPTIMIZERS[self.name](groups, lr=self.lr, weight_decay=self.weight_decay)


# ---------------------------------------------------------------------- privacy
class PrivacyHook(Protocol):
    """Wraps model, optimizer and loader before training (DP-SGD) and reports what it spent. A hook
    whose loader may draw empty batches that count as steps (Poisson sampling) sets
    ``steps_on_empty = True``: the engine then steps on them too (default: skipped)."""

    name: str

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               loader: BatchLoader) -> tuple[nn.Module, torch.optim.Optimizer, Iterable[Batch]]: ...

    def spent(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class NoPrivacy:
    """Plain training: nothing wrapped, nothing spent."""

    name: ClassVar[str] = "none"

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               loader: BatchLoader) -> tuple[nn.Module, torch.optim.Optimizer, Iterable[Batch]]:
        return model, optimizer, loader

    def spent(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


NO_PRIVACY = NoPrivacy()


# ---------------------------------------------------------------------- the loop
class Objective(Protocol):
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


@dataclass
class TrainResult:
    loss: float  # mean loss of the last epoch
    seconds: float
    steps: int
    samples: int
    privacy: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)  # what the objective's after_training reported


def train(model: nn.Module, data: SampleSet, *, seeds: Sequence[int], batch_size: int, objective: Objective,
          optimizer: torch.optim.Optimizer, privacy: PrivacyHook = NO_PRIVACY) -> TrainResult:
    """``len(seeds)`` epochs of ``objective`` on ``data`` with ``optimizer`` (built once by the caller),
    on the model's device. Returns the last epoch's mean loss, the seconds and the steps taken."""
    t0 = time.perf_counter()
    if len(data) == 0 or not seeds:
        return TrainResult(float("nan"), 0.0, 0, 0, privacy.spent())
    device = next(model.parameters()).device
    loader = make_loader(data, batch_size, seeds, device)
    model.train()
    if hasattr(objective, "before_training"):
        objective.before_training(model)
    plain = model  # the hooks get the model itself, not the privacy hook's wrapper
    model, optimizer, loader = privacy.attach(model, optimizer, loader)
    # DP-SGD's Poisson sampling may draw an empty batch: the accountant counts it as a step, so it is
    # one (Opacus' optimizer clips no sample and adds the noise); other hooks skip empty batches
    empty_steps = bool(getattr(privacy, "steps_on_empty", False))
    try:
        if isinstance(objective, nn.Module):
            objective.train()
        steps, last = 0, float("nan")
        for _ in seeds:
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for batch in loader:
                if len(batch) == 0 and not empty_steps:  # (a plain loader draws no empty batch)
                    continue
                loss = objective.loss(model, batch)  # empty under DP: no sample's gradient, the noise only
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if len(batch):
                    total += loss.detach().double() * len(batch)
                    count += len(batch)
                steps += 1
            last = float(total) / max(count, 1)
        after = objective.after_training(plain, data) if hasattr(objective, "after_training") else {}
        return TrainResult(last, time.perf_counter() - t0, steps, len(data), privacy.spent(), after)
    finally:
        privacy.close()
