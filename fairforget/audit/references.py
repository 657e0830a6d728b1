"""Reference (shadow) models an auditor trains on population data disjoint from the members.

A reference mimics its target: for a shard model, one SimpleConvNet trained with the shard's SISA
recipe (same slices, epochs, optimizer); for the ensemble, an ensemble of S such models on disjoint
parts of the reference's data. ``offline`` references train on random subsets of the population
only (every candidate is OUT); ``online`` references (LiRA online) train on random halves of the
population plus the candidates, so each candidate is IN for about half of them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fairforget.data.base import SampleSet
from fairforget.ensemble import Ensemble
from fairforget.model import build_model, load_model
from fairforget.sisa import SisaSettings, assign_slices, derived_seed
from fairforget.storage import atomic_torch_save, torch_load
from fairforget.training import train


@dataclass
class ReferenceOutputs:
    """Softmax outputs of M reference models on the candidates and on population samples.

    Parameters
    ----------
    cand_probs : numpy.ndarray
        (M, N, K) each reference's softmax on the N candidates.
    pop_probs : numpy.ndarray
        (M, Z, K) each reference's softmax on the Z population samples.
    in_mask : numpy.ndarray
        (M, N) bool, True where the candidate was in that reference's training data (online).
    seconds : float
        Training the references, seconds (0 when cached).
    models : list of list of torch.nn.Module
        The reference models themselves, kept only when asked.
    trained_on : list of list of int
        Each reference's training ids (empty if unknown).
    """

    cand_probs: np.ndarray  # (M, N, K)
    pop_probs: np.ndarray  # (M, Z, K)
    in_mask: np.ndarray  # (M, N) True where the candidate was in that reference's training data
    seconds: float
    models: list[list[torch.nn.Module]] = field(default_factory=list)  # kept only when asked
    trained_on: list[list[int]] = field(default_factory=list)  # each reference's training ids (None if unknown)

    @property
    def count(self) -> int:
        return int(self.cand_probs.shape[0])


def train_sisa_model(data: SampleSet, settings: SisaSettings, seed: int) -> torch.nn.Module:
    """A model trained exactly like a SISA shard (stages over slices, DP-SGD if the shards use it), in
    memory, no checkpoints,
    on ``settings.num_threads`` torch threads like the shards themselves (so results do not depend
    on what ran before in the process)."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    model = build_model(settings.num_classes, settings.width, seed=derived_seed(seed, 0), norm=settings.norm,
                        model=settings.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, 1) % (1 << 63))
        objective = settings.build_objective()
    opt = settings.optimizer.build(model, objective)
    slices = assign_slices(data.ids.tolist(), settings.slices, seed, 0)
    for stage in range(1, settings.slices + 1):
        part = data.select_ids(sorted(i for s in slices[:stage] for i in s))
        seeds = [derived_seed(seed, stage, e) for e in range(settings.epochs_per_slice)]
        train(model, part, seeds=seeds, batch_size=settings.batch_size, objective=objective, optimizer=opt,
              privacy=settings.privacy_hook(derived_seed(seed, stage, 4242)))  # DP-SGD too when the target had it
    return model.eval()


@torch.no_grad()
def predict_probs(models: list[torch.nn.Module] | Ensemble, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Mean softmax of ``models`` (one model, or an ensemble's members) on ``x`` -> (N, K); an
    :class:`fairforget.ensemble.Ensemble` predicts by its own rule (vote, weights)."""
    if isinstance(models, Ensemble):
        return torch.cat([models.predict_proba(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()
    out = []
    for model in models:
        model.eval()
        out.append(torch.cat([model(x[i : i + batch]).softmax(-1) for i in range(0, len(x), batch)]))
    return torch.stack(out).mean(0).numpy()


def train_references(population: SampleSet, candidates: SampleSet, *, count: int, members_per_model: int,
                     models_per_reference: int, settings: SisaSettings, seed: int, online: bool,
                     keep_models: bool = False) -> ReferenceOutputs:
    """Train ``count`` references and collect their outputs."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    cand_probs, pop_probs, in_masks, kept, trained_on = [], [], [], [], []
    n_cand = len(candidates)
    # online: every candidate is IN for exactly half of the references (count // 2 of them)
    balanced = np.argsort(rng.random((count, n_cand)), axis=0) < count // 2
    for m in range(count):
        if online:
            in_mask = balanced[m]
            pop_take = rng.permutation(len(population))[: max(0, members_per_model - int(in_mask.sum()))]
            train = SampleSet.concat([candidates.subset(np.flatnonzero(in_mask)), population.subset(pop_take)])
        else:
            in_mask = np.zeros(n_cand, dtype=bool)
            take = rng.permutation(len(population))[: min(members_per_model, len(population))]
            train = population.subset(np.sort(take))
        parts = np.array_split(rng.permutation(len(train)), models_per_reference)
        models = [train_sisa_model(train.subset(np.sort(p)), settings, derived_seed(seed, m, j))
                  for j, p in enumerate(parts)]
        cand_probs.append(predict_probs(models, candidates.x))
        pop_probs.append(predict_probs(models, population.x))
        in_masks.append(in_mask)
        trained_on.append(sorted(int(i) for i in train.ids.tolist()))
        if keep_models:
            kept.append(models)
    return ReferenceOutputs(np.stack(cand_probs), np.stack(pop_probs), np.stack(in_masks),
                            time.perf_counter() - t0, kept, trained_on)


def offline_references(cache_dir: Path, population: SampleSet, candidates: SampleSet, *, kind: str, count: int,
                       train_size: int, models_per_reference: int, settings: SisaSettings,
                       seed: int, replace: bool = False) -> ReferenceOutputs:
    """Offline references (trained on ``population`` only), from or to ``cache_dir``.

    They never see a candidate, so they can be kept and reused across audits: the cache file is keyed
    by everything they depend on, the population's ids included, and records each reference's
    training ids. With ``replace``, writing a new file for ``kind`` removes that kind's older files (a
    site's population that lost a record must not survive in a cached model). ``seconds`` is 0 for a
    cache hit."""
    size = min(train_size, len(population))
    pop_key = hashlib.sha256(np.asarray(population.ids.tolist(), dtype=np.int64).tobytes()).hexdigest()
    key = hashlib.sha256(repr((kind, models_per_reference, size, count, settings, seed, pop_key)).encode())
    path = Path(cache_dir) / f"references-{kind}-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch_load(path)
        groups = [[load_model(s, settings.num_classes, settings.width) for s in group]
                  for group in saved["states"]]
        cand_probs = np.stack([predict_probs(g, candidates.x) for g in groups])
        pop_probs = np.stack([predict_probs(g, population.x) for g in groups])
        return ReferenceOutputs(cand_probs, pop_probs, np.zeros(cand_probs.shape[:2], bool), 0.0,
                                trained_on=saved["trained_on"])
    ref = train_references(population, candidates, count=count, members_per_model=size,
                           models_per_reference=models_per_reference, settings=settings, seed=seed, online=False,
                           keep_models=True)
    atomic_torch_save(path, {"states": [[{k: v.cpu() for k, v in m.state_dict().items()} for m in group]
                                        for group in ref.models], "trained_on": ref.trained_on})
    for old in Path(cache_dir).glob(f"references-{kind}-*.pt") if replace else ():
        if old != path:
            old.unlink(missing_ok=True)
    ref.models.clear()
    return ref
