"""SISA training of one shard (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021).

The shard's samples are assigned once to R slices. Stage r (1..R) trains on slices 1..r for
``epochs-per-slice`` epochs, starting from the stage r-1 checkpoint, and saves checkpoint r (model
and optimizer state). Everything lives in a node-local state folder that persists across Flower
rounds and runs::

    STATE/index.json              slices (ids), deleted ids, stages trained, the stage a pending
                                  retrain must reach (``target``), seconds per stage
    STATE/checkpoints/stage-R.pt  {"model", "optimizer", "ids"} after stage R

Training is deterministic: the initial weights and every epoch's batch order are seeded by
(seed, shard, stage, epoch) alone, and the batch order is a permutation of the sorted live ids. So
retraining from stage s after a deletion gives the same model as training from scratch on the
shard without the deleted samples (same slices, less those samples). The exact unlearning that
uses this is in :mod:`fairforget.unlearning.exact`.

Under DP-SGD the noise and the Poisson masks are the site's secret (:meth:`SisaShard.dp_hook`): every
training (a stage's first and every retrain, an approximate unlearner's DP epochs) draws two fresh
seeds from the operating system's secure randomness and records them before it starts::

    STATE/dp-seeds.json      mode 0600, never sent, never logged: {"shard", "stages": {"R": {"sample_seed",
                             "noise_seed", "index_version", "samples"}}, "approximate": [...]}: the
                             seeds of the training that made checkpoint R (a retrain replaces them)
    STATE/dp-settings.json   the dp-* keys and batch-size the shard first trained under DP with; a
                             later run that differs is refused here, at the site

Without that file nobody (the server, the other sites, whoever knows the run's ``seed``) can
regenerate the noise; with it the site replays its shard bit for bit (:mod:`fairforget.verify`,
``fairforget verify --state-dir``). A retrain never reuses the noise of the training it replaces:
reused noise would cancel between the models before and after a deletion, which the server holds.
Exact unlearning under DP is then exact in distribution against everyone but the site.

Retraining is resumable: :meth:`SisaShard.remove` commits the deletion and the stage the retrain
must reach (``target``) in one atomic index write, before any checkpoint is removed; a shard whose
``target`` is above its trained stage (a crash mid-retrain) finishes it in :meth:`SisaShard.resume`,
which a node calls before it handles any message. Each stage is one call of the training engine
(:func:`fairforget.training.train`) with the run's objective; an objective's own trainable parts are
checkpointed with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairforget import erasure
from fairforget.data.base import SampleSet
from fairforget.model import DEFAULT as DEFAULT_MODEL
from fairforget.model import SimpleConvNet, build_model, check_model, model_bottleneck
from fairforget.objectives import Objective, ObjectiveContext, build_objective, objective_options
from fairforget.privacy.accountant import ShardAccountant
from fairforget.privacy.dp_sgd import DPSettings
from fairforget.privacy.gdp import Entry
from fairforget.site_secret import secure_seed, write_private_json
from fairforget.storage import atomic_torch_save, atomic_write_json, durable_unlink, read_json, state_hash, torch_load
from fairforget.training import NO_PRIVACY, OptimizerSpec, PrivacyHook, train


@dataclass(frozen=True)
class SisaSettings:
    slices: int
    epochs_per_slice: int
    batch_size: int
    lr: float
    weight_decay: float
    width: int
    num_classes: int
    seed: int
    num_threads: int = 1
    device: str = "cpu"
    objective: str = "cross-entropy"
    num_private: int = 1
    dp: DPSettings | None = None  # DP-SGD for every training of the shard (fairforget/privacy/)
    objective_options: tuple[tuple[str, float], ...] = ()  # the objectives' keys (end-alpha, ...)
    plugin_options: str = ""  # objective-options: a plugin objective's own (JSON), checked by its class when built
    model: str = DEFAULT_MODEL  # the shard model (fairforget/models/): simple-conv, scatter-linear, scatter-cnn
    eraser: str = "none"  # fairforget.erasure: none, leace (post-hoc), leace-per-stage (also before each stage)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, num_private: int = 1) -> SisaSettings:
        return cls(
            slices=cfg.slices, epochs_per_slice=cfg.epochs_per_slice, batch_size=cfg.batch_size,
            lr=cfg.lr, weight_decay=cfg.weight_decay, width=cfg.model_width,
            num_classes=num_classes, seed=cfg.seed, num_threads=cfg.num_threads,
            device=cfg.torch_device(), objective=cfg.objective, num_private=num_private,
            dp=DPSettings.from_config(cfg), objective_options=objective_options(cfg),
            plugin_options=cfg.objective_options, model=cfg.model, eraser=cfg.eraser,
        )

    @property
    def norm(self) -> str:
        """GroupNorm under DP-SGD (BatchNorm has no per-sample gradients), BatchNorm otherwise."""
        return "group" if self.dp is not None else "batch"

    def privacy_hook(self, seed: int, accountant: ShardAccountant | None = None) -> PrivacyHook:
        """A DP-SGD hook seeded from ``seed`` (masks ``seed``, noise ``seed + 1``), or no privacy: for
        models trained like a shard from public seeds (the audit's reference models). A shard's own
        trainings draw secret seeds instead (:meth:`SisaShard.dp_hook`)."""
        return self.dp.hook(seed, seed + 1, accountant) if self.dp is not None else NO_PRIVACY

    @property
    def optimizer(self) -> OptimizerSpec:
        return OptimizerSpec(lr=self.lr, weight_decay=self.weight_decay)

    def build_objective(self) -> Objective:
        check_model(self.model, self.objective, self.dp is not None)  # one line before anything trains
        return build_objective(self.objective, ObjectiveContext(self.num_classes, self.num_private,
                                                                model_bottleneck(self.model, self.width),
                                                                dict(self.objective_options)),
                               self.plugin_options)


class SisaError(ValueError):
    """A request the shard cannot serve (unknown or already deleted ids, corrupt state)."""


DP_SEEDS_FILE = "dp-seeds.json"  # the site's secret DP-SGD seeds (mode 0600)
DP_SETTINGS_FILE = "dp-settings.json"  # the privacy settings fixed at the shard's first DP training


def read_dp_seeds(state_dir: Path) -> dict[str, Any]:
    """``STATE/dp-seeds.json`` (an empty record when there is none); :class:`SisaError` if unreadable."""
    path = Path(state_dir) / DP_SEEDS_FILE
    if not path.is_file():
        return {"stages": {}, "approximate": []}
    try:
        record = read_json(path)
        stages = {str(int(k)): {**v, "sample_seed": int(v["sample_seed"]), "noise_seed": int(v["noise_seed"])}
                  for k, v in dict(record.get("stages", {})).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SisaError(f"{path} is not a DP seed record: {type(exc).__name__}") from None
    return {**record, "stages": stages, "approximate": list(record.get("approximate", []))}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def assign_slices(ids: list[int], num_slices: int, seed: int, shard: int) -> list[list[int]]:
    """A seeded random assignment of ids to ``num_slices`` near-equal slices (sorted ids each)."""
    order = np.random.default_rng(derived_seed(seed, shard, 77)).permutation(np.asarray(sorted(ids)))
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_slices)]


class SisaShard:
    """One shard's SISA state: slices, checkpoints and the deleted ids, in ``state_dir``.

    An existing state folder is resumed (its stale checkpoints dropped); a new one assigns the
    shard's samples to slices and trains nothing yet (:meth:`train_through`).

    Parameters
    ----------
    state_dir : pathlib.Path
        The node-local folder of the shard's ``index.json``, ``checkpoints/stage-R.pt`` and, under DP,
        its accountant; it persists across Flower runs.
    shard : int
        The shard's number; a state folder of another shard (or slice count) is a :class:`SisaError`.
    data : fairforget.data.base.SampleSet
        The shard's samples (deleted ones may be in it: the index leaves them out).
    settings : SisaSettings
        Slices, epochs per slice, optimiser, model, objective, seed and DP settings.
    slices : list of list of int, optional
        The slices' sample ids for a new state folder; default: assigned from (seed, shard, id).
    privacy : fairforget.training.PrivacyHook, optional
        The DP-SGD hook of every training; default no privacy (``settings.dp`` makes one).
    replay_seeds : dict of int to (int, int), optional
        Verification only: stage -> the DP seeds a site recorded, to replay its training.

    Raises
    ------
    SisaError
        The state folder belongs to another shard or slice count.
    """

    def __init__(self, state_dir: Path, shard: int, data: SampleSet, settings: SisaSettings,
                 slices: list[list[int]] | None = None, privacy: PrivacyHook = NO_PRIVACY,
                 replay_seeds: dict[int, tuple[int, int]] | None = None) -> None:
        self.dir = Path(state_dir)
        self.shard = shard
        self.data = data
        self.settings = settings
        self.privacy = privacy
        self.replay_seeds = replay_seeds  # verification only: stage -> the DP seeds a site recorded
        self.index_path = self.dir / "index.json"
        # the last checkpoint this instance wrote or read, keyed (stage, index version): a train message's
        # reply and the next stage's start read it from memory (every checkpoint write bumps the version)
        self._memo: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._check_privacy_settings()  # before anything is read into or written to the state
        self.accountant = (ShardAccountant.load(self.dir, shard, settings.dp.accountant, settings.dp.delta)
                           if settings.dp is not None else None)
        if self.index_path.exists():
            self.index = read_json(self.index_path)
            if self.index.get("shard") != shard or len(self.index.get("slices", [])) != settings.slices:
                raise SisaError(
                    f"state folder {self.dir} belongs to shard {self.index.get('shard')} with "
                    f"{len(self.index.get('slices', []))} slices, not shard {shard} with {settings.slices}"
                )
            self._drop_stale_checkpoints()
        else:
            ids = [int(i) for i in data.ids.tolist()]
            self.index = {
                "shard": shard,
                "slices": slices if slices is not None else assign_slices(ids, settings.slices, settings.seed, shard),
                "deleted": [],
                "trained": 0,
                "target": 0,
                "stage_seconds": [0.0] * settings.slices,
                "version": 0,
            }
            self._save_index()

    # ------------------------------------------------------------------ state
    @property
    def trained(self) -> int:
        return int(self.index["trained"])

    @property
    def deleted(self) -> set[int]:
        return set(self.index["deleted"])

    def live_ids(self) -> set[int]:
        return {i for s in self.index["slices"] for i in s}

    def slice_of(self, sample_id: int) -> int:
        for s, members in enumerate(self.index["slices"]):
            if sample_id in members:
                return s
        raise SisaError(f"sample {sample_id} is not in shard {self.shard}")

    def live_data(self) -> SampleSet:
        return self.data.select_ids(sorted(self.live_ids()))

    def checkpoint_path(self, stage: int) -> Path:
        return self.dir / "checkpoints" / f"stage-{stage}.pt"

    def _save_index(self) -> None:
        atomic_write_json(self.index_path, self.index)

    def _drop_stale_checkpoints(self) -> None:
        """Remove checkpoints past the committed stage count (left by a crash mid-unlearning)."""
        for path in (self.dir / "checkpoints").glob("stage-*.pt"):
            if int(path.stem.split("-")[1]) > self.trained:
                durable_unlink(path)
        self._drop_stale_seeds()

    @property
    def target(self) -> int:
        """The stage count the shard is committed to reach (above ``trained`` while a retrain is pending)."""
        return max(int(self.index.get("target", self.trained)), self.trained)

    def resume(self) -> float:
        """Finish a retrain a crash interrupted (``target`` above the trained stages); returns seconds."""
        return self.train_through(self.target) if self.target > self.trained else 0.0

    # ------------------------------------------------------------------ training
    def _fresh(self) -> tuple[SimpleConvNet, Objective, torch.optim.Optimizer]:
        s = self.settings
        model = build_model(s.num_classes, s.width, seed=derived_seed(s.seed, self.shard, 0), norm=s.norm,
                            model=s.model).to(s.device)
        with torch.random.fork_rng(devices=[]):  # an objective's own parts start seeded too
            torch.manual_seed(derived_seed(s.seed, self.shard, 1) % (1 << 63))
            objective = s.build_objective().to(s.device)
        if s.dp is not None and not getattr(objective, "per_sample", True):
            raise SisaError(f"objective {s.objective!r} couples the samples of a batch, so DP-SGD's per-sample "
                            "clipping bounds no sample's influence: use it without dp")
        if s.dp is not None and any(True for _ in objective.parameters()):
            raise SisaError(f"objective {s.objective!r} trains parts of its own, which DP-SGD does not cover here; "
                            "use it without dp")
        return model, objective, s.optimizer.build(model, objective)

    def load_stage(self, stage: int) -> tuple[SimpleConvNet, Objective, torch.optim.Optimizer]:
        """Model, objective and optimizer after ``stage`` (0: freshly initialised)."""
        model, objective, opt = self._fresh()
        if stage > 0:
            ckpt = self.checkpoint(stage)
            erasure.prepare(model, ckpt["model"])  # a training-time eraser (leace-per-stage) is part of the model
            model.load_state_dict(ckpt["model"])
            objective.load_state_dict(ckpt.get("objective", {}))
            opt.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        return model, objective, opt

    def checkpoint(self, stage: int) -> dict[str, Any]:
        """Checkpoint ``stage`` as saved (a copy the caller may change): from memory when it is the last
        one this instance wrote or read at the index's current version, else from disk."""
        key = (stage, int(self.index["version"]))
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, torch_load(self.checkpoint_path(stage)))
        return _copied(self._memo[1])

    def model_state(self, stage: int | None = None) -> dict[str, torch.Tensor]:
        """The model after ``stage`` (default: the last trained stage)."""
        stage = self.trained if stage is None else stage
        if stage > 0:  # the checkpoint as trained, the post-hoc eraser and its refitted head over it
            return served_state(self.checkpoint(stage))
        return {k: v.detach().cpu() for k, v in self._fresh()[0].state_dict().items()}

    def train_stage(self, stage: int, checked: bool = False) -> dict[str, Any]:
        """Train SISA stage ``stage`` (1-based) from checkpoint ``stage - 1`` (``checked``: the DP
        spend was already checked against the cap, with the stages after it)."""
        s = self.settings
        if not 1 <= stage <= s.slices:
            raise SisaError(f"stage {stage} out of range 1..{s.slices}")
        if stage > self.trained + 1:
            raise SisaError(f"stage {stage} needs stage {stage - 1} first (trained: {self.trained})")
        if not checked:
            self.check_privacy(self.planned([stage]), f"SISA stage {stage}")
        if s.num_threads > 0:
            torch.set_num_threads(s.num_threads)
        model, objective, opt = self.load_stage(stage - 1)
        ids = sorted(i for sl in self.index["slices"][:stage] for i in sl)
        data = self.data.select_ids(ids)
        seeds = [derived_seed(s.seed, self.shard, stage, e + 1) for e in range(s.epochs_per_slice)]
        batch_size, planned = s.batch_size, s.dp.stage_plan(stage) if s.dp is not None else None
        if planned is not None:  # the DP planner's schedule: one pass of its steps, its batch, lr and clip
            seeds, batch_size = seeds[:1], planned.batch_size
            for group in opt.param_groups:
                group["lr"] = planned.lr
        privacy = self.dp_hook(stage, len(data))  # under DP: fresh secret seeds, recorded first
        if s.eraser == "leace-per-stage":  # training-time: the stage trains through an eraser refit on its data
            erasure.fit_in_place(model, data, s.num_private)
        result = train(model, data, seeds=seeds, batch_size=batch_size, objective=objective, optimizer=opt,
                       privacy=privacy)
        overlay, unfit = erasure.post_hoc(model, data, s.num_private) if s.eraser != "none" else ({}, "")
        self.save_privacy()  # before the checkpoint: a crash may over-count the spend, never under-count it
        ckpt = {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "objective": {k: v.cpu() for k, v in objective.state_dict().items()},
            "optimizer": _to_cpu(opt.state_dict()),
            "ids": torch.as_tensor(ids, dtype=torch.long),
            **({"erasure": overlay} if overlay else {}),
        }
        atomic_torch_save(self.checkpoint_path(stage), ckpt)
        self._memo = None
        self.index["trained"] = stage
        self.index["stage_seconds"][stage - 1] = result.seconds
        self.index["version"] += 1
        self._save_index()
        self._memo = ((stage, int(self.index["version"])), _copied(ckpt))  # what the disk now holds
        return {"stage": stage, "loss": result.loss, "seconds": result.seconds, "num_examples": len(data),
                "privacy": result.privacy, **({"eraser_not_fitted": unfit} if unfit else {})}

    def train_through(self, last_stage: int | None = None) -> float:
        """Train every stage not yet trained up to ``last_stage`` (default R); returns seconds. Under DP
        the whole plan is checked against the shard's epsilon cap before the first stage trains.

        Parameters
        ----------
        last_stage : int, optional
            The last stage to train (1..R); default R, every slice.

        Returns
        -------
        float
            The training compute of the stages trained, seconds.
        """
        target = self.settings.slices if last_stage is None else last_stage
        stages = list(range(self.trained + 1, target + 1))
        self.check_privacy(self.planned(stages), f"training stages {stages[0]}-{stages[-1]}" if stages else "")
        return sum(self.train_stage(st, checked=True)["seconds"] for st in stages)

    # ------------------------------------------------------------------ privacy (DP-SGD)
    def privacy_hook(self, seed: int) -> PrivacyHook:
        """The hook an approximate unlearner's training of this shard runs with: DP-SGD into the
        shard's accountant with fresh secret seeds (``seed``, public, is not used under DP), the hook
        given to the constructor (tests), or none."""
        return self.dp_hook(None)

    def dp_hook(self, stage: int | None, samples: int | None = None) -> PrivacyHook:
        """The privacy hook of one training: SISA stage ``stage`` (on ``samples`` samples) or, with
        ``stage`` None, an approximate unlearner's epochs. Under DP its Poisson masks and noise are
        seeded by two fresh draws of the operating system's secure randomness (the recorded ones of
        ``replay_seeds`` when verifying), written to ``STATE/dp-seeds.json`` (mode 0600) before the
        training starts, and the shard's privacy settings are fixed in ``STATE/dp-settings.json`` at
        its first DP training. Without DP: the constructor's hook (none, or a test's)."""
        dp = self.settings.dp
        if dp is None:
            return self.privacy
        if self.replay_seeds is not None:
            if stage not in self.replay_seeds:
                what = "an approximate training" if stage is None else f"stage {stage}"
                raise SisaError(f"no recorded DP seeds for {what} of shard {self.shard}: it cannot be replayed")
            sample_seed, noise_seed = self.replay_seeds[stage]
        else:
            sample_seed, noise_seed = secure_seed(), secure_seed()
        path = self.dir / DP_SETTINGS_FILE
        if not path.is_file():
            atomic_write_json(path, dp.fixed(self.settings.batch_size))
        record = read_dp_seeds(self.dir)
        entry = {"sample_seed": sample_seed, "noise_seed": noise_seed, "index_version": int(self.index["version"])}
        if stage is None:
            record["approximate"].append(entry)
        else:
            record["stages"][str(stage)] = {**entry, "samples": samples}
            record["approximate"] = []  # a SISA stage trains: no approximate model is served any more
        record["shard"] = self.shard
        write_private_json(self.dir / DP_SEEDS_FILE, record)  # before the training: never an unrecorded one
        return dp.hook(sample_seed, noise_seed, self.accountant, stage=dp.stage_plan(stage))

    def recorded_seeds(self) -> dict[int, tuple[int, int]]:
        """stage -> (sample seed, noise seed) of the trainings that made the current checkpoints."""
        stages = read_dp_seeds(self.dir)["stages"]
        return {int(k): (v["sample_seed"], v["noise_seed"]) for k, v in stages.items() if int(k) <= self.trained}

    def _drop_stale_seeds(self) -> None:
        """Forget the seeds of checkpoints that were dropped (a deletion, a crash mid-training): they
        belong to models no longer served, whose noise must not outlive them at the site either."""
        path = self.dir / DP_SEEDS_FILE
        if not path.is_file():
            return
        record = read_dp_seeds(self.dir)
        stale = [k for k in record["stages"] if int(k) > self.trained]
        if stale:
            for k in stale:
                del record["stages"][k]
            write_private_json(path, record)

    def _check_privacy_settings(self) -> None:
        """Refuse (one line, nothing read or written) a run whose privacy settings differ from those
        this shard first trained under DP with (``STATE/dp-settings.json``), a run without DP on a
        shard trained with it, and a DP run on a shard trained without it."""
        dp, path = self.settings.dp, self.dir / DP_SETTINGS_FILE
        want = dp.fixed(self.settings.batch_size) if dp is not None else {"dp": False}
        if path.is_file():
            try:
                fixed = read_json(path)
            except ValueError as exc:
                raise SisaError(f"{path} is not readable: {exc}") from None
            for key in [*fixed, *(k for k in want if k not in fixed)]:
                if fixed.get(key) != want.get(key):
                    raise SisaError(
                        f"shard {self.shard}: this site's privacy settings were fixed at its first DP training "
                        f"({path}: {key} = {_show(fixed.get(key))}); this run asks {key} = {_show(want.get(key))}: "
                        "refused, nothing changed (a site's privacy settings cannot change after it trained)")
        elif dp is not None and self.index_path.is_file() and not (self.dir / ShardAccountant.FILE).is_file():
            try:
                index = read_json(self.index_path)
            except ValueError:
                return  # the index's own check reports it
            if int(index.get("version", 0)) > 0:
                raise SisaError(f"shard {self.shard}: the state folder {self.dir} holds a shard trained without DP; "
                                "a run with dp = true would report an epsilon its models do not have: refused, "
                                "nothing changed (train a new state folder with dp = true)")

    def planned(self, stages: list[int], slices: list[list[int]] | None = None) -> list[Entry]:
        """The DP-SGD entries training ``stages`` would add (empty without DP)."""
        s = self.settings
        if s.dp is None:
            return []
        slices = self.index["slices"] if slices is None else slices
        return [e for st in stages for e in s.dp.planned(sum(len(sl) for sl in slices[:st]), s.batch_size,
                                                         s.epochs_per_slice, stage=st)]

    def planned_removal(self, ids: list[int], target: int) -> list[Entry]:
        """What retraining after removing ``ids`` (through stage ``target``) would add."""
        if self.settings.dp is None or not ids:
            return []
        drop = set(ids)
        clean = min(min(self.slice_of(i) for i in ids), self.trained)
        slices = [[i for i in sl if i not in drop] for sl in self.index["slices"]]
        return self.planned(list(range(clean + 1, target + 1)), slices)

    def check_privacy(self, planned: list[Entry], what: str) -> None:
        """The hard stop: refuse (nothing trained, nothing changed) a training past ``dp-max-epsilon``."""
        if self.accountant is not None and self.settings.dp is not None:
            self.accountant.check(planned, self.settings.dp.max_epsilon, what)

    def save_privacy(self) -> None:
        if self.accountant is not None:
            self.accountant.save(self.dir)

    def privacy_summary(self) -> dict[str, Any] | None:
        return self.accountant.summary() if self.accountant is not None else None

    def full_train_seconds(self) -> float:
        return float(sum(self.index["stage_seconds"]))

    # ------------------------------------------------------------------ deletion bookkeeping
    def check_ids(self, ids: list[int]) -> None:
        already = sorted(set(ids) & self.deleted)
        if already:
            raise SisaError(f"sample id(s) already deleted from shard {self.shard}: {_fmt(already)}")
        unknown = sorted(set(ids) - self.live_ids())
        if unknown:
            raise SisaError(f"sample id(s) not in shard {self.shard}: {_fmt(unknown)}")

    def remove(self, ids: list[int], retrain_to: int | None = None) -> int:
        """Drop ``ids`` from the index and every checkpoint trained on them; returns the last clean
        stage (the one retraining starts from). The index is committed first, atomically, with the
        stage a retrain must reach (``retrain_to``; None: no retrain, an approximate unlearner serves
        the shard), so a crash afterwards leaves the deletion in force, the stale checkpoints are
        removed on next load and the retrain is finished by :meth:`resume`.

        Parameters
        ----------
        ids : list of int
            Live sample ids of this shard (an unknown or already deleted id is a :class:`SisaError`).
        retrain_to : int, optional
            The stage a retrain must reach afterwards; None: no retrain.

        Returns
        -------
        int
            The last clean stage (0: retraining starts from initialisation).
        """
        self.check_ids(ids)
        first_slice = min(self.slice_of(i) for i in ids)
        clean_stage = min(first_slice, self.trained)
        drop = set(ids)
        self.index["slices"] = [[i for i in sl if i not in drop] for sl in self.index["slices"]]
        self.index["deleted"] = sorted(self.deleted | drop)
        self.index["trained"] = clean_stage
        self.index["target"] = max(clean_stage, retrain_to if retrain_to is not None else clean_stage)
        self.index["version"] += 1
        self._save_index()
        self._drop_stale_checkpoints()
        return clean_stage

    def add(self, ids: list[int], data: SampleSet, retrain_to: int | None = None) -> int:
        """Add new samples (synthetic ones) to the shard; ``data`` is the shard's sample pool with
        them. Each id goes to a slice drawn from (seed, shard, id) alone, so a from-scratch run with
        the same ids builds the same slices. Checkpoints from the earliest slice that grew on are
        removed; returns the last clean stage (retraining starts there)."""
        have = self.live_ids() | self.deleted
        clash = sorted(set(ids) & have)
        if clash:
            raise SisaError(f"sample id(s) already used in shard {self.shard}: {_fmt(clash)}")
        if not ids:
            return self.trained
        self.data = data
        touched = []
        for i in ids:
            s = derived_seed(self.settings.seed, self.shard, 91, int(i)) % self.settings.slices
            self.index["slices"][s].append(int(i))
            touched.append(s)
        self.index["slices"] = [sorted(sl) for sl in self.index["slices"]]
        clean_stage = min(min(touched), self.trained)
        self.index["target"] = max(self.target, retrain_to if retrain_to is not None else 0)
        self.index["trained"] = clean_stage
        self.index["version"] += 1
        self._save_index()
        self._drop_stale_checkpoints()
        return clean_stage

    def model_hash(self) -> str:
        return state_hash(self.model_state())


def _copied(obj: Any) -> Any:
    """A copy of a checkpoint (dicts, lists, tuples of tensors and plain values) sharing no tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copied(v) for v in obj)
    return obj


def served_state(ckpt: dict[str, Any], trained: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model a stage checkpoint serves: the model as trained (``trained``, default ``ckpt["model"]``)
    with the post-hoc eraser and the head refitted on its output (``ckpt["erasure"]``,
    :mod:`fairforget.erasure`) over it, when there is one."""
    model = ckpt["model"] if trained is None else trained
    overlay = ckpt.get("erasure")
    return {**erasure.without_eraser(model), **overlay} if overlay else dict(model)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _fmt(ids: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, ids[:limit]))
    return text + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _show(value: Any) -> str:
    """A settings value as the run config writes it (``true``, ``1e-05``, ``'prv'``; ``unset``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
