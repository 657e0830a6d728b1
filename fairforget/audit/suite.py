"""The audit suite: membership and attribute inference against the ensemble and every shard model.

Reads top to bottom: pick the candidates (members sampled from the live training set, held-out
non-members), load or train the offline reference models on the population split (the biased test
split: drawn like the members, never trained on), score every attack on every target, summarise
the ROC, probe the bottleneck for the private attribute. Runs on the server in simulation, after
``simulate`` and every ``forget``, and alone as ``fairforget audit --run DIR``.

The drivers ask this module for the ensemble only: every site audits its own shard model, on its own
members and held-out data, with reference models it trains itself, in parallel with the other sites
and returns ROC statistics only (:mod:`fairforget.audit.site`, asked for by ``server/audit.py``);
:func:`with_sites` puts both in one block. ``fairforget audit --run DIR``, which cannot reach the
sites, audits every shard model here, one after another.

Reference models are trained on population data only, so they are cached in ``OUT/audit/`` and
reused; LiRA-online shadows also train on candidate members, so they are trained for the audit and
never saved (a deletion must not survive in a shadow model).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from fairforget.audit import AuditError, TargetOutputs, attack_class, build_attack, parse_attacks
from fairforget.audit.probe import (
    ProbeData,
    balanced_within_classes,
    bottleneck,
    feature_kind,
    run_probes,
    split_by_class,
)
from fairforget.audit.references import ReferenceOutputs, offline_references, predict_probs, train_references
from fairforget.audit.roc import auc, summarize
from fairforget.config import RunConfig
from fairforget.data import DataBundle, SampleSet, shard_of
from fairforget.ensemble import Ensemble, Predictor
from fairforget.privacy.reporting import violations
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings

MIN_GROUP = 10  # members and non-members a (class, private) group needs for its own AUC
PROBE_TEST_PER_GROUP = 10  # unbiased test samples per (class, private) group the probes are scored on
INDEPENDENT_PER_GROUP = 20  # unbiased test samples per group the strong probes train and score on (split by class)


def check_audit_config(cfg: RunConfig, bundle: DataBundle) -> list[str]:
    """Fail fast, before anything is written: unknown attacks, too few references, no held-out data."""
    names = parse_attacks(cfg.audit_attacks, cfg.attack_options)
    if len(bundle.heldout) < 2:
        raise AuditError("the run has no held-out (non-member) data to audit against")
    for name in names:
        need = attack_class(name).min_references
        if need > cfg.audit_references:
            raise AuditError(f"attack '{name}' needs audit-references >= {need}, got {cfg.audit_references}")
    return names


def run_audit(run: RunDir, cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
              deleted: set[int], dp: dict[str, Any] | None = None, shards: bool = True,
              predictor: Predictor | None = None) -> dict[str, Any]:
    """Every attack on the ensemble (as the strategy's ``predictor`` combines its models: the same
    prediction its evaluation scores; none given: the even softmax mean) and, with ``shards``, on
    every shard model; the ``privacy`` block
    of metrics.json. The drivers pass ``shards = False``: each site audits its own shard model
    (:mod:`fairforget.audit.site`) and :func:`with_sites` adds those. With the run's ``dp`` block,
    every attack's TPR at low FPR is set against its target's mu-GDP bound: an empirical TPR above the
    bound beyond its confidence interval is listed in ``dp_bound_violations`` (a bug in training,
    accounting or the attack)."""
    t0 = time.perf_counter()
    names = check_audit_config(cfg, bundle)
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    population = bundle.test_biased
    members_of = [s.subset([i for i, sid in enumerate(s.ids.tolist()) if sid not in deleted])
                  for s in shard_of(cfg, bundle)]
    ensemble = (predictor or Predictor())(states, bundle.num_classes, cfg.model_width)
    models = dict(ensemble.models)
    rng = np.random.default_rng(cfg.seed + 4242)

    targets: dict[str, tuple[list[torch.nn.Module], SampleSet]] = {}
    live = SampleSet.concat(members_of)
    take = np.sort(rng.permutation(len(live))[: min(len(live), len(bundle.heldout))])
    targets["ensemble"] = (list(models.values()), live.subset(take))
    for k in sorted(models):
        if shards and len(models) > 1:
            targets[f"shard-{k}"] = ([models[k]], members_of[k])

    # bottleneck features once per model: the probes of the shards and of the ensemble share them. The
    # probe trains on live members only: a deleted (or retired) record is used by nothing after its deletion
    probe_test = _probe_test(bundle.test_unbiased, bundle.num_private, cfg.seed)
    feats = {k: (bottleneck([m], live.x), bottleneck([m], probe_test.x)) for k, m in models.items()}
    independent, independent_missing = independent_split(bundle.test_unbiased, bundle.num_private, cfg.seed)
    ind_feats = ({k: (bottleneck([m], independent[0].x), bottleneck([m], independent[1].x)) for k, m in models.items()}
                 if independent else {})
    refs_time = 0.0
    results: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    for tname, (tmodels, members) in targets.items():
        cand = SampleSet.concat([members, bundle.heldout])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(bundle.heldout), bool)]
        scored = ensemble if tname == "ensemble" else tmodels
        target = TargetOutputs(target_probs(scored, cand.x), cand.y.numpy(),
                               target_probs(scored, population.x), population.y.numpy())
        kind = "ensemble" if tname == "ensemble" else "shard"
        n_models = len(tmodels)
        refs: dict[str, ReferenceOutputs] = {}
        for mode in sorted({attack_class(n).reference_mode for n in names} - {None}):
            ref, secs = _references(run, cfg, settings, population, cand, kind, n_models,
                                    len(members) if kind == "shard" else len(live), mode)
            refs[mode] = ref
            refs_time += secs
        results[tname] = {}
        for name in names:
            attack = build_attack(name, cfg.attack_options, names)
            scores = attack.scores(target, refs.get(attack.reference_mode))
            summary = summarize(scores, is_member, bootstrap=cfg.audit_bootstrap, seed=cfg.seed)
            if tname == "ensemble":
                summary["groups"] = _group_aucs(scores, is_member, cand, bundle.num_private)
            results[tname][name] = summary
    # the probe needs the unbiased test set, which the server holds: every model's, wherever it was audited
    for tname in ["ensemble"] + [f"shard-{k}" for k in sorted(models) if len(models) > 1]:
        shard_keys = list(models) if tname == "ensemble" else [int(tname.split("-")[1])]
        cat = lambda fs, i, keys=shard_keys: torch.cat([fs[k][i] for k in keys], 1)  # noqa: E731
        data = ProbeData(cat(feats, 0), live.private, cat(feats, 1), probe_test.private,
                         (cat(ind_feats, 0), independent[0].private, cat(ind_feats, 1), independent[1].private)
                         if independent else None, independent_missing, bundle.num_private)
        probes[tname] = run_probes(data, bootstrap=cfg.audit_bootstrap, seed=cfg.seed,
                                   features=feature_kind([models[k] for k in shard_keys]), num_threads=cfg.num_threads)
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


def with_sites(privacy: dict[str, Any] | None, sites: dict[str, dict[str, Any]], cfg: RunConfig,
               dp: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``privacy`` block: the server's audit (the ensemble; None when the server holds no data)
    and each site's audit of its own shard model, which becomes target ``shard-K`` (``audited_at``
    says where each target was audited). ``sites`` keeps what else each site returned (its counts,
    references and seconds, its ensemble audit under ``site-audit-scope = "ensemble"``, an error or
    why it skipped). The DP bound is checked on every target."""
    out = dict(privacy) if privacy else {
        "attacks": parse_attacks(cfg.audit_attacks), "population": "each site's held-out half",
        "references": {"count": cfg.audit_references, "train_seconds": 0.0}, "attribute_inference": {},
        "seconds": 0.0}
    server_targets = dict(out.get("targets") or {})
    targets = {t: r for t, r in server_targets.items() if t == "ensemble"}
    audited_at = {t: "server" for t in server_targets}
    kept: dict[str, dict[str, Any]] = {}
    for name, site in sites.items():
        site = dict(site)
        own = f"shard-{site['shard']}" if "shard" in site else None
        if own and own in site.get("targets", {}):
            site["targets"] = {t: r for t, r in site["targets"].items() if t != own}
            targets[own], audited_at[own] = sites[name]["targets"][own], name
        kept[name] = site
    # a shard no site audited keeps the server's figures, if it made any (`fairforget audit`)
    targets.update({t: r for t, r in server_targets.items() if t not in targets})
    out["targets"] = dict(sorted(targets.items(), key=lambda kv: (kv[0] != "ensemble", _shard_key(kv[0]))))
    out["audited_at"] = {t: audited_at.get(t, "server") for t in out["targets"]}
    out["sites"] = kept
    out.pop("dp_bound_violations", None)
    if dp:
        out["dp_bound_violations"] = violations(out, dp)
    return out


def _shard_key(target: str) -> int:
    return int(target.split("-")[1]) if target.startswith("shard-") else -1


def target_probs(target: Ensemble | list[torch.nn.Module], x: torch.Tensor) -> np.ndarray:
    """(N, K) outputs an attack sees: an ensemble's own prediction (:meth:`Ensemble.predict_proba`,
    its strategy's combination rule), or one model's softmax."""
    if isinstance(target, Ensemble):
        return target.predict_proba(x).numpy()
    return predict_probs(target, x)


def unlearning_audit(cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
                     deleted_ids: list[int], run: RunDir, predictor: Predictor | None = None) -> dict[str, float]:
    """AUC of the deleted samples against held-out non-members, per reference-free attack and the
    offline reference attacks, for one state of the ensemble (about 0.5 after exact unlearning)."""
    return {n: r["auc"] for n, r in membership(cfg, bundle, states, deleted_ids, run, bootstrap=0,
                                                predictor=predictor).items()}


def membership(cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]],
               member_ids: list[int], run: RunDir, bootstrap: int | None = None,
               predictor: Predictor | None = None) -> dict[str, dict[str, Any]]:
    """ROC figures (AUC, TPR at 1% FPR, ...) of the ensemble's training samples ``member_ids`` (or
    samples it forgot) against held-out non-members, per attack but the online one."""
    chosen = parse_attacks(cfg.audit_attacks, cfg.attack_options)
    names = [n for n in chosen if attack_class(n).reference_mode != "online"]
    deleted = bundle.train.select_ids(sorted(member_ids))
    cand = SampleSet.concat([deleted, bundle.heldout])
    is_member = np.r_[np.ones(len(deleted), bool), np.zeros(len(bundle.heldout), bool)]
    ensemble = (predictor or Predictor())(states, bundle.num_classes, cfg.model_width)
    models = list(ensemble.models.values())
    population = bundle.test_biased
    target = TargetOutputs(target_probs(ensemble, cand.x), cand.y.numpy(),
                           target_probs(ensemble, population.x), population.y.numpy())
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    ref = None
    if any(attack_class(n).reference_mode == "offline" for n in names):
        ref, _ = _references(run, cfg, settings, population, cand, "ensemble", len(models),
                             len(bundle.train), "offline")
    boot = cfg.audit_bootstrap if bootstrap is None else bootstrap
    return {n: summarize(build_attack(n, cfg.attack_options, chosen).scores(target, ref), is_member, bootstrap=boot,
                         seed=cfg.seed)
            for n in names}


def headline(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """AUC and TPR at 1% FPR per (target, attack): what a forget request's record keeps of an audit."""
    if not privacy:
        return None
    return {t: {a: {"auc": r["auc"], "tpr_at_0.01_fpr": r["tpr_at_0.01_fpr"]} for a, r in attacks.items()}
            for t, attacks in privacy["targets"].items()}


# ---------------------------------------------------------------------- helpers
def _probe_test(unbiased: SampleSet, num_private: int, seed: int) -> SampleSet:
    """A seeded sample of the unbiased test set, at most :data:`PROBE_TEST_PER_GROUP` per (class,
    private) group, so it stays unbiased: the probes' test set (the bottleneck passes over the whole
    set, ten colours of every test image, were the server's largest audit cost)."""
    groups = unbiased.y.numpy() * max(num_private, 1) + unbiased.private.numpy()
    rng = np.random.default_rng(seed + 77)
    keep = [rng.permutation(np.flatnonzero(groups == g))[:PROBE_TEST_PER_GROUP] for g in np.unique(groups)]
    return unbiased.subset(np.sort(np.concatenate(keep)))


def independent_split(data: SampleSet, num_private: int, seed: int,
                      per_group: int = INDEPENDENT_PER_GROUP) -> tuple[tuple[SampleSet, SampleSet] | None, str]:
    """The strong probes' data: a seeded sample of ``data`` (at most ``per_group`` per (class, private)
    group), checked to hold the private attribute balanced within each class, split by class
    (:func:`fairforget.audit.probe.split_by_class`); ``(None, why)`` when it is not such data."""
    if num_private < 2:
        return None, "the dataset has no private attribute"
    if len(data) == 0:
        return None, "no audit split whose private attribute is independent of the label"
    groups = data.y.numpy() * num_private + data.private.numpy()
    rng = np.random.default_rng(seed + 78)
    keep = [rng.permutation(np.flatnonzero(groups == g))[:per_group] for g in np.unique(groups)]
    sample = data.subset(np.sort(np.concatenate(keep)))
    why = balanced_within_classes(sample, num_private)
    if why:
        return None, f"the audit split is not independent of the label: {why}"
    if len(np.unique(sample.y.numpy())) < 2:
        return None, "the audit split holds one class: it cannot be split by class"
    return split_by_class(sample, seed), ""


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
    seed = cfg.seed + (1 if kind == "shard" else 2)
    if mode == "online":
        ref = train_references(population, cand, count=max(cfg.audit_references, 4),
                               members_per_model=min(train_size, len(population)), models_per_reference=n_models,
                               settings=settings, seed=seed, online=True)
        return ref, ref.seconds
    ref = offline_references(run.path / "audit", population, cand, kind=kind, count=cfg.audit_references,
                             train_size=train_size, models_per_reference=n_models, settings=settings, seed=seed)
    return ref, ref.seconds
