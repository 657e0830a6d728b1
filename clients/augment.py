"""Bias-aware diffusion augmentation on one shard, with step-wise retirement of the originals.

One augmentation step on a node (``train.augment``):

1. *retire* a batch of original samples: they leave the shard's SISA index and every checkpoint
   trained on them (exact unlearning from the classifier); the site keeps them, so the generator may
   still learn from them (a user's deletion request, :func:`forget`, removes a sample from the
   generator too);
2. train the conditional DDPM on the site's originals if there is no valid generator
   (:mod:`fairforget.diffusion.generator`), saved atomically beside the SISA checkpoints;
3. plan per-group counts so that ``KL(p_group || target)`` of the shard's training set falls below the
   threshold (:mod:`fairforget.diffusion.planner`), generate them with DDIM and guidance, and tag each
   with its provenance (shard, generator version, group);
4. add them to the SISA index and retrain the shard from the last clean checkpoint.

State, in ``STATE/augment/`` next to the SISA state::

    state.json     generator version and the ids it was trained on, retired and deleted originals,
                   provenance counters, history of steps
    generator/     the diffusers UNet (save_pretrained) and the label embedding
    synthetic.pt   every live synthetic sample: x, y, private, ids, generator version

Deleting an original the generator was trained on invalidates the generator and every sample it
produced: policy ``regenerate`` retrains the generator without the deleted samples and regenerates
the same number of samples per group; ``drop`` removes the samples and the generator.

With ``dp`` on, the generator is trained with DP-SGD (:func:`fairforget.diffusion.generator.train_generator`)
into the SISA shard's accountant, under the same ``dp-max-epsilon`` hard stop as the shard's own
trainings (one budget per shard: they learn from the same people). Its weights, and every sample
drawn from them, are then (epsilon, delta)-DP with respect to each original it was trained on, so a
deletion leaves it and its samples in place (``generator_kept = "dp"`` in the ledger line); the
deleted original still leaves the SISA index and checkpoints by exact retraining. What the
guarantee does not cover: which groups and how many samples of each were asked for (the planner
reads the shard's live counts), and the statistics a node reports (counts, KL, the real-vs-real
Frechet distance), as without augmentation.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairforget.data.base import SYNTHETIC_ID_BASE, SampleSet, is_synthetic, make_sampleset
from fairforget.diffusion.filter import FilterSettings, filtered_sample, train_filter
from fairforget.diffusion.generator import (
    ConditionalGenerator,
    GeneratorError,
    GeneratorSettings,
    generator_planned,
    sample,
    train_generator,
)
from fairforget.diffusion.planner import kl_to_target, plan_counts
from fairforget.diffusion.quality import FidelityClassifiers, frechet_distance
from fairforget.metrics import group_counts
from fairforget.sisa import SisaShard, derived_seed
from fairforget.storage import (
    atomic_torch_save,
    atomic_write_json,
    durable_rmtree,
    read_json,
    recover_dir,
    replace_dir,
    torch_load,
)
from fairforget.unlearning import EXACT, UnlearnResult


class AugmentStore:
    """A node's augmentation state (``STATE/augment``)."""

    def __init__(self, state_dir: Path, shard: int) -> None:
        self.dir = Path(state_dir) / "augment"
        self.shard = shard
        self.state_path = self.dir / "state.json"
        self.synthetic_path = self.dir / "synthetic.pt"
        self.generator_dir = self.dir / "generator"
        self.grids_dir = self.dir / "grids"
        recover_dir(self.generator_dir)  # a crash between the two renames of a generator save
        self.state: dict[str, Any] = read_json(self.state_path) if self.state_path.exists() else {
            "shard": shard, "generator_version": 0, "generator_valid": False, "generator_trained_on": [],
            "next_serial": 0, "retired": [], "deleted": [], "steps": [],
        }

    @property
    def active(self) -> bool:
        return self.state_path.exists()

    @property
    def retired(self) -> set[int]:
        return set(self.state["retired"])

    @property
    def deleted(self) -> set[int]:
        return set(self.state["deleted"])

    def save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    # ------------------------------------------------------------------ synthetic samples
    def synthetic(self, image_shape: tuple[int, ...]) -> tuple[SampleSet, torch.Tensor]:
        """The live synthetic samples and the generator version of each."""
        if not self.synthetic_path.exists():
            empty = make_sampleset(torch.empty(0, *image_shape), np.zeros(0), np.zeros(0), np.zeros(0))
            return empty, torch.zeros(0, dtype=torch.long)
        blob = torch_load(self.synthetic_path)
        data = make_sampleset(blob["x"], blob["y"].numpy(), blob["private"].numpy(), blob["ids"].numpy())
        return data, blob["version"]

    def write_synthetic(self, data: SampleSet, version: torch.Tensor) -> None:
        atomic_torch_save(self.synthetic_path, {"x": data.x, "y": data.y, "private": data.private,
                                                "ids": data.ids, "version": version})

    def new_ids(self, n: int) -> list[int]:
        start = int(self.state["next_serial"])
        self.state["next_serial"] = start + n
        return [SYNTHETIC_ID_BASE + self.shard * (1 << 28) + start + k for k in range(n)]


class Augmenter:
    """Augmentation steps and deletions for one node: its originals, its SISA shard, its store."""

    def __init__(self, originals: SampleSet, sisa: SisaShard, store: AugmentStore, settings: GeneratorSettings,
                 seed: int, kl_threshold: float, on_delete: str = "regenerate",
                 heldout: SampleSet | None = None, filter_settings: FilterSettings | None = None,
                 retire_order: str = "random") -> None:
        self.originals = originals
        self.retire_order = retire_order  # augment-retire-order (fairforget.lsi.RETIRE_ORDERS)
        self.retire_note = ""  # why a step retired in another order than asked (a shard too small for LSI)
        self.filter = filter_settings  # rejection filtering of generated samples (augment-filter)
        self.last_filter: dict[str, Any] | None = None  # what the last filtered generation drew and kept
        self.heldout = heldout if heldout is not None else originals.subset(np.arange(0))
        self.sisa = sisa
        self.store = store
        self.settings = settings
        self.seed = seed
        self.kl_threshold = kl_threshold
        self.on_delete = on_delete
        self.shape = tuple(originals.x.shape[1:])

    # ------------------------------------------------------------------ views
    def pool(self) -> SampleSet:
        """Originals and live synthetic samples: what the SISA shard draws its slices from."""
        synth, _ = self.store.synthetic(self.shape)
        return SampleSet.concat([self.originals, synth]) if len(synth) else self.originals

    def counts(self, data: SampleSet) -> np.ndarray:
        s = self.settings
        if s.uses_private:
            return group_counts(data.y, data.private, s.num_classes, s.num_private)
        return np.bincount(data.y.numpy(), minlength=s.num_classes)

    def judged(self, data: SampleSet, fidelity: FidelityClassifiers) -> SampleSet:
        """``data`` with each synthetic sample's class (and, in class-private mode, private attribute)
        replaced by what the fidelity classifiers see in it: the bias of what was generated, not of what
        was asked for (a generator that draws noise or the wrong colour shows here, not in ``kl_after``)."""
        synth = torch.as_tensor(is_synthetic(data.ids))
        if not bool(synth.any()):
            return data
        y, a = data.y.clone(), data.private.clone()
        pred_y, pred_a = fidelity.predict(data.x[synth])
        y[synth] = pred_y.to(y.dtype)
        if self.settings.uses_private:
            a[synth] = pred_a.to(a.dtype)
        return make_sampleset(data.x, y.numpy(), a.numpy(), data.ids.numpy())

    def generator_data(self) -> SampleSet:
        """The site's originals the generator may learn from: all of them but the deleted ones."""
        keep = [i for i, sid in enumerate(self.originals.ids.tolist()) if sid not in self.store.deleted]
        return self.originals.subset(keep)

    # ------------------------------------------------------------------ one step
    def step(self, step: int, retire: int, fidelity: FidelityClassifiers | None) -> dict[str, Any]:
        t_start = time.perf_counter()
        report: dict[str, Any] = {"step": step, "shard": self.store.shard}
        target_stage = self.sisa.settings.slices
        live = self.sisa.live_data()
        report["kl_before"] = kl_to_target(self.counts(live))
        report["hash_before"] = self.sisa.model_hash() if self.sisa.trained else ""
        self._check_step_budget()  # the DP budget first: refuse before anything changes

        # 1. retire originals (exact unlearning from the classifier; the site keeps them)
        retired = self._choose_retirees(retire, step)
        restart = self.sisa.trained
        if retired:
            restart = min(restart, self.sisa.remove(retired, retrain_to=target_stage))
            self.store.state["retired"] = sorted(self.store.retired | set(retired))
            self.store.save()
        report["retired_ids"] = retired
        if retired:
            report["retire_order"] = self.retire_note or self.retire_order

        # 2. a valid generator
        t0 = time.perf_counter()
        report["generator_trained"] = False
        if not self.store.state["generator_valid"]:
            self._train_generator()
            report["generator_trained"] = True
        report["generator_seconds"] = time.perf_counter() - t0
        generator, _ = ConditionalGenerator.load(self.store.generator_dir, self.settings.device)

        # 3. plan and generate
        live = self.sisa.live_data()
        add = plan_counts(self.counts(live), self.kl_threshold)
        t0 = time.perf_counter()
        new = self._generate(generator, add, fidelity, tag=step)
        report["sampling_seconds"] = time.perf_counter() - t0
        report["generated"] = len(new)
        if self.last_filter is not None:
            report["filter"] = self.last_filter

        # 4. add to the shard, retrain from the last clean checkpoint
        if len(new):
            restart = min(restart, self.sisa.add([int(i) for i in new.ids.tolist()], self.pool(),
                                                 retrain_to=target_stage))
        report["restart_stage"] = restart
        report["retrain_seconds"] = self.sisa.train_through(target_stage)
        live = self.sisa.live_data()
        report["kl_after"] = kl_to_target(self.counts(live))  # the groups requested of the generator
        if fidelity is not None:  # ... and the groups the fidelity classifiers see in what it generated
            report["kl_after_judged"] = kl_to_target(self.counts(self.judged(live, fidelity)))
        report["num_originals"] = int((~is_synthetic(live.ids)).sum())
        report["num_synthetic"] = int(is_synthetic(live.ids).sum())
        report["generator_version"] = int(self.store.state["generator_version"])
        report["hash_after"] = self.sisa.model_hash()
        if fidelity is not None and len(new):
            report["quality"] = self._quality(generator, new, fidelity)
        report["seconds"] = time.perf_counter() - t_start
        self.store.state["steps"].append({k: v for k, v in report.items() if k not in ("retired_ids",)}
                                         | {"retired": len(retired)})
        self.store.save()
        if len(new):
            self._write_grids(generator, fidelity)
        return report

    def _quality(self, generator: ConditionalGenerator, new: SampleSet,
                 fidelity: FidelityClassifiers) -> dict[str, Any]:
        """Label fidelity of the new samples; Frechet distance of samples drawn with the held-out
        samples' own labels to those held-out samples (matched groups), next to the distance of the
        real originals to them (real vs real, for scale)."""
        ref = self.heldout
        with_private = self.settings.uses_private
        out: dict[str, Any] = {"n": len(new), "label_fidelity": fidelity.fidelity(
            new.x, new.y, new.private if with_private else None), "n_reference": len(ref)}
        if len(ref) >= 2:
            mirror = sample(generator, ref.y, ref.private if with_private else torch.zeros_like(ref.y),
                            derived_seed(self.seed, self.store.shard, 4321))
            real = fidelity.features(ref.x)
            out["frechet_distance"] = frechet_distance(fidelity.features(mirror), real)
            out["frechet_distance_real_vs_real"] = frechet_distance(fidelity.features(self.generator_data().x), real)
        return out

    def _choose_retirees(self, count: int, step: int) -> list[int]:
        """``count`` live originals in ``augment-retire-order``: ``random`` seeded by (seed, shard, step);
        ``least-informative`` the lowest Laplace Sample Information under the shard's current model
        (:mod:`fairforget.lsi`; a shard too small for its Laplace fit retires at random, said in the
        step's report)."""
        from fairforget.lsi import RETIRE_ORDERS, LsiError

        if count <= 0:
            return []
        live = sorted(i for i in self.sisa.live_ids() if i < SYNTHETIC_ID_BASE)
        rng = np.random.default_rng(derived_seed(self.seed, self.store.shard, 313, step))
        self.retire_note = ""
        if self.retire_order != "random" and self.sisa.trained:
            from fairforget.unlearning.approximate import current_state, model_from

            try:
                return RETIRE_ORDERS[self.retire_order](count, live, rng, model=model_from(
                    current_state(self.sisa), self.sisa), data=self.sisa.live_data(),
                    num_classes=self.settings.num_classes)
            except LsiError as exc:
                self.retire_note = f"retired at random: {exc}"
        return RETIRE_ORDERS["random"](count, live, rng)

    def _check_step_budget(self) -> None:
        """Under DP: raise ``PrivacyBudgetExceeded`` if this step could pass the shard's cap: the
        generator's training (when it needs one) and a retrain of every SISA stage at today's stage
        sizes (an upper bound: retraining starts at the last clean stage, and the synthetic samples it
        adds lower every stage's sampling rate)."""
        dp = self.sisa.settings.dp
        if dp is None:
            return
        planned = [] if self.store.state["generator_valid"] else generator_planned(
            len(self.generator_data()), self.settings, dp)
        planned += self.sisa.planned(list(range(1, self.sisa.settings.slices + 1)))
        self.sisa.check_privacy(planned, "this augmentation step (generator and SISA retraining)")

    def _train_generator(self) -> None:
        data = self.generator_data()
        self._check_learnable(data)
        version = int(self.store.state["generator_version"]) + 1
        model = train_generator(data.x, data.y, data.private, self.settings,
                                seed=derived_seed(self.seed, self.store.shard, 555, version),
                                progress=_progress(self.store.shard, self.settings.train_steps),
                                dp=self.sisa.settings.dp, accountant=self.sisa.accountant)
        self.sisa.save_privacy()  # before the generator: a crash may over-count the spend, never under-count it
        trained_on = sorted(int(i) for i in data.ids.tolist())
        model.save(self.store.generator_dir, {"version": version, "shard": self.store.shard,
                                              "num_trained_on": len(trained_on)})
        privacy = model.privacy or {}
        self.store.state.update(generator_version=version, generator_valid=True, generator_trained_on=trained_on,
                                generator_dp=bool(privacy.get("dp")), generator_epsilon=privacy.get("epsilon"),
                                generator_delta=privacy.get("delta"))
        self.store.save()

    def _check_learnable(self, data: SampleSet) -> None:
        s = self.settings
        factors = [("class", data.y, s.num_classes)]
        if s.uses_private:
            factors.append(("private attribute", data.private, s.num_private))
        for name, labels, k in factors:
            missing = sorted(set(range(k)) - set(labels.tolist()))
            if missing:
                raise GeneratorError(f"shard {self.store.shard}: {name} {', '.join(map(str, missing))} has no "
                                     f"real samples to learn from (use augment-groups = \"class\", or more data)")

    def _generate(self, generator: ConditionalGenerator, add: np.ndarray, fidelity: FidelityClassifiers | None,
                  tag: int, private_hint: torch.Tensor | None = None) -> SampleSet:
        s = self.settings
        flat = add.ravel()
        groups = np.repeat(np.arange(flat.size), flat)
        if not len(groups):
            return make_sampleset(torch.empty(0, *self.shape), np.zeros(0), np.zeros(0), np.zeros(0))
        y = torch.as_tensor(groups // s.num_private if s.uses_private else groups, dtype=torch.long)
        a = torch.as_tensor(groups % s.num_private if s.uses_private else np.zeros_like(groups), dtype=torch.long)
        version = int(self.store.state["generator_version"])
        seed = derived_seed(self.seed, self.store.shard, 777, version, tag)
        self.last_filter = None
        if self.filter is not None:
            x, y, a = self._filtered(generator, y, a, seed)
        else:
            x = sample(generator, y, a, seed, classifier=fidelity.target_logits if fidelity is not None else None)
        if not s.uses_private:  # class mode: the private attribute is whatever the generator drew
            if fidelity is not None:
                a = fidelity.predict(x)[1]
            elif private_hint is not None and len(private_hint) == len(y):
                a = private_hint  # regenerated replacements keep the labels of the samples they replace
            else:
                a = torch.zeros_like(y)
        ids = self.store.new_ids(len(y))
        new = make_sampleset(x, y.numpy(), a.numpy(), np.asarray(ids))
        synth, versions = self.store.synthetic(self.shape)
        self.store.write_synthetic(SampleSet.concat([synth, new]) if len(synth) else new,
                                   torch.cat([versions, torch.full((len(new),), version, dtype=torch.long)]))
        self.store.save()
        return new

    def _filtered(self, generator: ConditionalGenerator, y: torch.Tensor, a: torch.Tensor,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw with the site's filter classifier (trained now on the site's originals) keeping what it
        labels as the requested class; it also guides the sampler when ``classifier-guidance`` > 0."""
        s, t0 = self.settings, time.perf_counter()
        data = self.generator_data()
        clf = train_filter(data, self.filter, s.num_classes, s.num_private,
                           derived_seed(self.seed, self.store.shard, 888, len(data)), s.device)
        train_seconds = time.perf_counter() - t0
        device = next(clf.parameters()).device
        result = filtered_sample(lambda yy, aa, sd: sample(generator, yy, aa, sd, classifier=clf),
                                 lambda x: clf(x.to(device)), y, a, seed,
                                 s.num_private if s.uses_private else 1, self.filter.max_draws)
        self.last_filter = {**result.summary(), "objective": self.filter.objective, "train_seconds": train_seconds,
                            "seconds": time.perf_counter() - t0}
        return result.x, result.y, result.private

    def _write_grids(self, generator: ConditionalGenerator, fidelity: FidelityClassifiers | None) -> None:
        """``grids/class-C[_private-A].png`` (8 samples of each group) and ``grids/overview.png`` (the
        first sample of each group: a row per class, a column per private value; in class mode the 8
        samples of each class in a row), all drawn in one batch."""
        from torchvision.utils import save_image

        s = self.settings
        per = 8
        groups = [(c, p) for c in range(s.num_classes) for p in range(s.num_private if s.uses_private else 1)]
        y = torch.tensor([c for c, _ in groups]).repeat_interleave(per)
        a = torch.tensor([p for _, p in groups]).repeat_interleave(per)
        images = sample(generator, y, a, derived_seed(self.seed, self.store.shard, 999),
                        classifier=fidelity.target_logits if fidelity is not None else None)
        tmp = self.store.grids_dir.with_name(".grids.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, (c, p) in enumerate(groups):
            name = f"class-{c}_private-{p}.png" if s.uses_private else f"class-{c}.png"
            save_image(images[k * per : (k + 1) * per], tmp / name, nrow=per, padding=1)
        overview = images[::per] if s.uses_private else images
        save_image(overview, tmp / "overview.png", nrow=s.num_private if s.uses_private else per, padding=1)
        replace_dir(tmp, self.store.grids_dir)

    # ------------------------------------------------------------------ deletion requests
    def owned(self, asked: list[int]) -> tuple[list[int], list[int]]:
        """(ids this node holds: live or retired originals; ids it already deleted)."""
        live = self.sisa.live_ids()
        retired = self.store.retired - self.store.deleted
        deleted = self.store.deleted | (self.sisa.deleted - self.store.retired)
        deleted = {i for i in deleted if i < SYNTHETIC_ID_BASE}
        return [i for i in asked if i in live or i in retired], [i for i in asked if i in deleted]

    def forget(self, ids: list[int]) -> UnlearnResult:
        """A user's deletion request: gone from the shard index and checkpoints (exact retraining),
        from the generator and from every synthetic sample it produced; a generator trained with DP
        (and its samples) is kept, its guarantee covering the deleted original.

        Crash-safe in this order: (1) one atomic write of the augmentation state records the ids as
        deleted and, when the generator learnt from them, the generator as invalid with what must be
        regenerated; (2) the SISA index drops the ids (committed with its retrain target); (3) the
        invalid generator, its samples and its sample grids are removed (and, with ``regenerate``, a
        new generator trained without the ids draws replacements); (4) the shard retrains. A node
        that starts with an unfinished invalidation or retrain finishes it (:meth:`resume`)."""
        t0 = time.perf_counter()
        target = self.sisa.target
        hash_before = self.sisa.model_hash()
        live_ids = [i for i in ids if i in self.sisa.live_ids()]
        self.sisa.check_ids(live_ids)
        state = self.store.state
        report: dict[str, Any] = {"generator_invalidated": False, "synthetic_dropped": 0, "synthetic_regenerated": 0,
                                  "policy": self.on_delete}
        trained_on = bool(set(ids) & set(state["generator_trained_on"])) and state["generator_version"] > 0
        if trained_on and state.get("generator_dp"):  # DP: the guarantee covers the deleted original; keep both
            report.update(generator_kept="dp", generator_version=int(state["generator_version"]),
                          generator_epsilon=state.get("generator_epsilon"),
                          generator_delta=state.get("generator_delta"))
        elif trained_on and not state.get("invalidated"):
            synth, _ = self.store.synthetic(self.shape)
            state["invalidated"] = {
                "old_version": int(state["generator_version"]),
                "counts": self.counts(synth).tolist() if len(synth) else None,
                # class order, as _generate draws them: regenerated replacements keep the private labels
                "hint": synth.private[torch.argsort(synth.y, stable=True)].tolist(),
            }
            state.update(generator_valid=False)
        state["deleted"] = sorted(self.store.deleted | set(ids))
        self.store.save()  # (1)
        restart = self.sisa.remove(live_ids, retrain_to=target) if live_ids else self.sisa.trained  # (2)
        report.update(self._finish_invalidation(target))  # (3)
        restart = min(restart, report.pop("restart", restart))
        self.sisa.data = self.pool()
        seconds = self.sisa.train_through(target)  # (4)
        return UnlearnResult(
            shard=self.store.shard, method=EXACT, restart_stage=restart, retrained_stages=target - restart,
            seconds=seconds, wall_seconds=time.perf_counter() - t0, hash_before=hash_before,
            hash_after=self.sisa.model_hash(), num_examples=len(self.sisa.live_ids()),
            full_train_seconds=self.sisa.full_train_seconds(), augment=report,
        )

    def _finish_invalidation(self, target: int) -> dict[str, Any]:
        """Remove an invalidated generator, its synthetic samples (from the SISA index too) and its
        grids; with ``regenerate``, train a new generator and draw the same number per group. Idempotent:
        a crash part-way leaves ``invalidated`` in the state, and the next call goes on from there."""
        state = self.store.state
        inv = state.get("invalidated")
        if not inv:
            return {}
        report: dict[str, Any] = {"generator_invalidated": True, "old_generator_version": int(inv["old_version"])}
        synth, versions = self.store.synthetic(self.shape)
        live_synth = sorted(i for i in synth.ids.tolist() if i in self.sisa.live_ids())
        restart = self.sisa.trained
        if live_synth:
            restart = min(restart, self.sisa.remove(live_synth, retrain_to=target))
        self.store.write_synthetic(synth.subset(np.arange(0)), versions[:0])
        durable_rmtree(self.store.generator_dir)
        durable_rmtree(self.store.grids_dir)  # the grids were drawn by the invalid generator
        state["generator_trained_on"] = []
        self.store.save()
        report["synthetic_dropped"] = len(live_synth)
        if self.on_delete == "regenerate" and inv.get("counts") is not None:
            self._train_generator()
            generator, _ = ConditionalGenerator.load(self.store.generator_dir, self.settings.device)
            counts = np.asarray(inv["counts"])
            new = self._generate(generator, counts, None, tag=10_000 + len(state["deleted"]),
                                 private_hint=torch.as_tensor(inv["hint"], dtype=torch.long))
            if len(new):
                restart = min(restart, self.sisa.add([int(i) for i in new.ids.tolist()], self.pool(),
                                                     retrain_to=target))
            self._write_grids(generator, None)  # redrawn by the new generator
            report["synthetic_regenerated"] = len(new)
            report["new_generator_version"] = int(state["generator_version"])
        state.pop("invalidated", None)
        self.store.save()
        report["restart"] = restart
        return report

    def resume(self) -> None:
        """Finish what a crash interrupted: an invalidated generator's removal (and regeneration),
        then the shard's retrain."""
        if self.store.state.get("invalidated"):
            self._finish_invalidation(self.sisa.target)
            self.sisa.data = self.pool()
        self.sisa.resume()


def _progress(shard: int, total: int):
    """A progress line every 10% of the generator's training (a bar in the node's log)."""
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)}

    def report(step: int, loss: float) -> None:
        if step in marks:
            done = int(10 * step / total)
            print(f"shard {shard} diffusion [{'#' * done}{'.' * (10 - done)}] {step}/{total} loss {loss:.4f}",
                  flush=True)

    return report
