"""The audit suite: membership and attribute inference against the ensemble and every shard model.

Reads top to bottom: pick the candidates (members sampled from the live training set, held-out
non-members), load or train the offline reference models on the population split (the biased test
split: drawn like the members, never trained on), score every attack on every target, summarise
the ROC, probe the bottleneck for the private attribute. Runs on the server in simulation, after
``simulate`` and every ``forget``, and alone as ``fairforget audit --run DIR``.

Under the deployment engine (and in simulation too) every site also audits the ensemble on its own
members and held-out data and returns ROC statistics only (:mod:`fairforget.audit.site`, asked for by
``server/audit.py``).

Reference models are trained on population data only, so they are cached in ``OUT/audit/`` and
reused; LiRA-online shadows also train on candidate members, so they are trained for the audit and
never saved (a deletion must not survive in a shadow model).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from fairforget.audit import ATTACKS, AuditError, TargetOutputs
from fairforget.audit.probe import attribute_inference, bottleneck
from fairforget.audit.references import ReferenceOutputs, predict_probs, train_references
from fairforget.audit.roc import auc, summarize
from fairforget.config import RunConfig
from fairforget.data import DataBundle, SampleSet, shard_of
from fairforget.model import load_model
from fairforget.privacy.reporting import violations
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings
from fairforget.storage import atomic_torch_save, torch_load

MIN_GROUP = 10  # members and non-members a (class, private) group needs for its own AUC


def parse_attacks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise AuditError(f"unknown attack(s): {', '.join(unknown)} (have {', '.join(sorted(ATTACKS))})")
    if not names:
        raise AuditError("no attacks chosen (audit-attacks is empty)")
    return names


def check_audit_config(cfg: RunConfig, bundle: DataBundle) -> list[str]:
    """Fail fast, before anything is written: unknown attacks, too few references, no held-out data."""
    names = parse_attacks(cfg.audit_attacks)
    if len(bundle.heldout) < 2:
        raise AuditError("the run has no held-out (non-member) data to audit against")
    for name in names:
        need = ATTACKS[name].min_references
        if need > cfg.audit_references:
            raise AuditError(f"attack '{name}' needs audit-references >= {need}, got {cfg.audit_references}")
    return names


def run_audit(run: RunDir, cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
              deleted: set[int], dp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every attack on every target; the ``privacy`` block of metrics.json. With the run's ``dp``
    block, every attack's TPR at low FPR is set against its target's mu-GDP bound: an empirical TPR
    above the bound beyond its confidence interval is listed in ``dp_bound_violations`` (a bug in
    training, accounting or the attack)."""
    t0 = time.perf_counter()
    names = check_audit_config(cfg, bundle)
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    population = bundle.test_biased
    shards = [s.subset([i for i, sid in enumerate(s.ids.tolist()) if sid not in deleted])
              for s in shard_of(cfg, bundle)]
    models = {k: load_model(state, bundle.num_classes, cfg.model_width) for k, state in states.items()}
    rng = np.random.default_rng(cfg.seed + 4242)

    targets: dict[str, tuple[list[torch.nn.Module], SampleSet]] = {}
    live = SampleSet.concat([s for s in shards])
    take = np.sort(rng.permutation(len(live))[: min(len(live), len(bundle.heldout))])
    targets["ensemble"] = (list(models.values()), live.subset(take))
    for k in sorted(models):
        if len(models) > 1:
            targets[f"shard-{k}"] = ([models[k]], shards[k])

    # bottleneck features once per model: the probes of the shards and of the ensemble share them. The
    # probe trains on live members only: a deleted (or retired) record is used by nothing after its deletion
    feats = {k: (bottleneck([m], live.x), bottleneck([m], bundle.test_unbiased.x)) for k, m in models.items()}
    refs_time = 0.0
    results: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    for tname, (tmodels, members) in targets.items():
        cand = SampleSet.concat([members, bundle.heldout])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(bundle.heldout), bool)]
        target = TargetOutputs(predict_probs(tmodels, cand.x), cand.y.numpy(),
                               predict_probs(tmodels, population.x), population.y.numpy())
        kind = "ensemble" if tname == "ensemble" else "shard"
        n_models = len(tmodels)
        refs: dict[str, ReferenceOutputs] = {}
        for mode in sorted({ATTACKS[n].reference_mode for n in names} - {None}):
            ref, secs = _references(run, cfg, settings, population, cand, kind, n_models,
                                    len(members) if kind == "shard" else len(live), mode)
            refs[mode] = ref
            refs_time += secs
        results[tname] = {}
        for name in names:
            attack = ATTACKS[name]()
            scores = attack.scores(target, refs.get(attack.reference_mode))
            summary = summarize(scores, is_member, bootstrap=cfg.audit_bootstrap, seed=cfg.seed)
            if tname == "ensemble":
                summary["groups"] = _group_aucs(scores, is_member, cand, bundle.num_private)
            results[tname][name] = summary
        shard_keys = list(models) if tname == "ensemble" else [int(tname.split("-")[1])]
        probes[tname] = attribute_inference(torch.cat([feats[k][0] for k in shard_keys], 1), live,
                                            torch.cat([feats[k][1] for k in shard_keys], 1), bundle.test_unbiased,
                                            bundle.num_private, seed=cfg.seed)
    out = {
        "attacks": names,
        "population": "test_biased",
        "references": {"count": cfg.audit_references, "train_seconds": refs_time},
        "targets": results,
        "attribute_inference": probes,
    }
    if dp:
        out["dp_bound_violations"] = violations(out, dp)
    return {
        **out,
        "seconds": time.perf_counter() - t0,
    }


def unlearning_audit(cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
                     deleted_ids: list[int], run: RunDir) -> dict[str, float]:
    """AUC of the deleted samples against held-out non-members, per reference-free attack and the
    offline reference attacks, for one state of the ensemble (about 0.5 after exact unlearning)."""
    return {n: r["auc"] for n, r in membership(cfg, bundle, states, deleted_ids, run, bootstrap=0).items()}


def membership(cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
               member_ids: list[int], run: RunDir, bootstrap: int | None = None) -> dict[str, dict[str, Any]]:
    """ROC figures (AUC, TPR at 1% FPR, ...) of the ensemble's training samples ``member_ids`` (or
    samples it forgot) against held-out non-members, per attack but the online one."""
    names = [n for n in parse_attacks(cfg.audit_attacks) if ATTACKS[n].reference_mode != "online"]
    deleted = bundle.train.select_ids(sorted(member_ids))
    cand = SampleSet.concat([deleted, bundle.heldout])
    is_member = np.r_[np.ones(len(deleted), bool), np.zeros(len(bundle.heldout), bool)]
    models = [load_model(s, bundle.num_classes, cfg.model_width) for s in states.values()]
    population = bundle.test_biased
    target = TargetOutputs(predict_probs(models, cand.x), cand.y.numpy(),
                           predict_probs(models, population.x), population.y.numpy())
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    ref = None
    if any(ATTACKS[n].reference_mode == "offline" for n in names):
        ref, _ = _references(run, cfg, settings, population, cand, "ensemble", len(models),
                             len(bundle.train), "offline")
    boot = cfg.audit_bootstrap if bootstrap is None else bootstrap
    return {n: summarize(ATTACKS[n]().scores(target, ref), is_member, bootstrap=boot, seed=cfg.seed)
            for n in names}


def headline(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """AUC and TPR at 1% FPR per (target, attack): what a forget request's record keeps of an audit."""
    if not privacy:
        return None
    return {t: {a: {"auc": r["auc"], "tpr_at_0.01_fpr": r["tpr_at_0.01_fpr"]} for a, r in attacks.items()}
            for t, attacks in privacy["targets"].items()}


# ---------------------------------------------------------------------- helpers
def _group_aucs(scores: np.ndarray, is_member: np.ndarray, cand: SampleSet, num_private: int) -> list[dict]:
    out = []
    y, a = cand.y.numpy(), cand.private.numpy()
    for c in np.unique(y):
        for p in range(num_private):
            mask = (y == c) & (a == p)
            n_in, n_out = int((mask & is_member).sum()), int((mask & ~is_member).sum())
            if n_in >= MIN_GROUP and n_out >= MIN_GROUP:
                out.append({"class": int(c), "private": p, "n_members": n_in, "n_nonmembers": n_out,
                            "auc": auc(scores[mask], is_member[mask])})
    return out


def _references(run: RunDir, cfg: RunConfig, settings: SisaSettings, population: SampleSet, cand: SampleSet,
                kind: str, n_models: int, train_size: int, mode: str) -> tuple[ReferenceOutputs, float]:
    """Offline references come from (or go to) the run's cache; online ones are trained and dropped."""
    size = min(train_size, len(population))
    seed = cfg.seed + (1 if kind == "shard" else 2)
    if mode == "online":
        ref = train_references(population, cand, count=max(cfg.audit_references, 4), members_per_model=size,
                               models_per_reference=n_models, settings=settings, seed=seed, online=True)
        return ref, ref.seconds
    key = hashlib.sha256(repr((kind, n_models, size, cfg.audit_references, settings)).encode()).hexdigest()[:16]
    path = run.path / "audit" / f"references-{kind}-{key}.pt"
    if path.is_file():
        groups = torch_load(path)["states"]
        refs_models = [[load_model(s, settings.num_classes, settings.width) for s in group] for group in groups]
        cand_probs = np.stack([predict_probs(g, cand.x) for g in refs_models])
        pop_probs = np.stack([predict_probs(g, population.x) for g in refs_models])
        return ReferenceOutputs(cand_probs, pop_probs, np.zeros(cand_probs.shape[:2], bool), 0.0), 0.0
    ref = train_references(population, cand, count=cfg.audit_references, members_per_model=size,
                           models_per_reference=n_models, settings=settings, seed=seed, online=False,
                           keep_models=True)
    atomic_torch_save(path, {"states": [[{k: v.cpu() for k, v in m.state_dict().items()} for m in group]
                                        for group in ref.models]})
    return ref, ref.seconds
