"""A site's own audit: its shard model against its own members and its own held-out data, with every
configured attack, the reference models trained at the site.

Runs where the data is (``query.audit``, asked for by ``server/audit.py``), so the sites audit in
parallel (across Ray workers in simulation) while the server audits only the ensemble.

1. The site's held-out split (non-members, never trained on) is cut in two, seeded: the
   **population** half trains the reference models and gives RMIA its population samples z; the
   **non-member** half are the candidates the members are told apart from. No reference trains on a
   candidate, so the offline references (LiRA offline, RMIA) are cached in the site's state folder;
   LiRA-online shadows also train on candidate members (the attack needs them IN) and are discarded.
2. Members: the site's live real records (synthetic samples are not people).
3. Targets: ``shard-K``, the model the site serves (the server sends no weights for it); with
   ``site-audit-scope = "ensemble"`` also ``ensemble``, from weights the server sends (every site then
   holds every site's model: that scope is an explicit choice, see docs/explanation/audit.md).
4. The reply is a :class:`SiteAudit`: ROC statistics per (target, attack) (AUC, balanced accuracy,
   advantage, TPR at low FPR with bootstrap intervals, the curve) and counts of the three sets, never
   samples, scores, ids or per-group figures. It becomes Flower records in one place,
   :meth:`SiteAudit.to_records` / :meth:`SiteAudit.from_records`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fairforget import keys
from fairforget.audit import TargetOutputs, attack_class, build_attack
from fairforget.audit.references import ReferenceOutputs, offline_references, predict_probs, train_references
from fairforget.audit.roc import summarize
from fairforget.data.base import SampleSet
from fairforget.ensemble import Ensemble
from fairforget.schemas import payloads
from fairforget.sisa import SisaSettings, derived_seed

SCOPES = ("shard", "ensemble")
MIN_HALF = 2  # population samples and non-member candidates a site needs, each


@dataclass(frozen=True)
class SiteAudit:
    """What one site's audit returns: statistics only."""

    shard: int
    site: str  # the site's name (its node config; the server's binding checks it)
    scope: str
    model_hash: str  # the audited shard model's hash (the server checks it is the one it serves)
    targets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # target -> attack -> ROC figures
    members: int = 0
    nonmembers: int = 0
    population: int = 0
    references: int = 0  # offline reference models per target (0 if no attack needs them)
    reference_seconds: float = 0.0  # training them (0 when cached), plus any LiRA-online shadows
    seconds: float = 0.0
    skipped: str = ""
    # target -> "decile-D" -> {"members": count, attack: AUC of that LSI decile's members (0: least
    # informative) against every non-member}, when the site scored its records for the audited model
    # (`fairforget inspect`)
    lsi_deciles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_records(self) -> RecordDict:
        return RecordDict({
            keys.CONFIG: ConfigRecord({keys.AUDIT_JSON: payloads.encode(payloads.SiteAuditReport, asdict(self))}),
            keys.METRICS: MetricRecord({keys.SHARD: self.shard}),
        })

    @classmethod
    def from_records(cls, content: RecordDict) -> SiteAudit:
        return cls(**payloads.decode(payloads.SiteAuditReport, content[keys.CONFIG][keys.AUDIT_JSON]).to_json())


def site_seed(seed: int, shard: int) -> int:
    """The seed of site ``shard``'s audit (its held-out split, its references, its bootstrap)."""
    return derived_seed(seed, shard, 7331)


def split_heldout(heldout: SampleSet, seed: int) -> tuple[SampleSet, SampleSet]:
    """(population, non-member candidates): the site's held-out data in two seeded halves."""
    order = np.random.default_rng(seed).permutation(len(heldout))
    half = len(heldout) // 2
    return heldout.subset(np.sort(order[:half])), heldout.subset(np.sort(order[half:]))


def site_audit(targets: dict[str, list[torch.nn.Module] | Ensemble], members: SampleSet, heldout: SampleSet, *,
               attacks: list[str], settings: SisaSettings, references: int, bootstrap: int, seed: int,
               cache_dir: Path, attack_options: str = "") -> dict[str, Any]:
    """Every attack on every target (each with its ``attack-options``); the fields of a
    :class:`SiteAudit` but its identity."""
    t0 = time.perf_counter()
    population, nonmembers = split_heldout(heldout, seed)
    counts = {"members": len(members), "nonmembers": len(nonmembers), "population": len(population)}
    if len(members) == 0 or min(len(population), len(nonmembers)) < MIN_HALF:
        return {**counts, "skipped": f"{len(members)} members and {len(heldout)} held-out samples at this site "
                                     f"(the audit needs members and {2 * MIN_HALF} held-out samples)"}
    cand = SampleSet.concat([members, nonmembers])
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    modes = sorted({attack_class(n).reference_mode for n in attacks} - {None})
    results: dict[str, dict[str, Any]] = {}
    deciles: dict[str, dict[str, Any]] = {}
    ref_seconds = 0.0
    for tname, models in targets.items():
        kind = "ensemble" if tname == "ensemble" else "shard"
        target = TargetOutputs(predict_probs(models, cand.x), cand.y.numpy(),
                               predict_probs(models, population.x), population.y.numpy())
        refs: dict[str, ReferenceOutputs] = {}
        for mode in modes:
            ref_seed = derived_seed(seed, 1 if kind == "shard" else 2, 0 if mode == "offline" else 1)
            if mode == "offline":
                refs[mode] = offline_references(cache_dir, population, cand, kind=kind, count=references,
                                                train_size=len(members), models_per_reference=len(models),
                                                settings=settings, seed=ref_seed, replace=True)
            else:  # shadows train on candidate members: used for this audit, never kept
                refs[mode] = train_references(population, cand, count=max(references, 4),
                                              members_per_model=len(members), models_per_reference=len(models),
                                              settings=settings, seed=ref_seed, online=True)
            ref_seconds += refs[mode].seconds
        scorers = {name: build_attack(name, attack_options, attacks) for name in attacks}
        scores = {name: a.scores(target, refs.get(a.reference_mode)) for name, a in scorers.items()}
        results[tname] = {name: summarize(scores[name], is_member, bootstrap=bootstrap, seed=seed) for name in scorers}
        if kind == "shard" and not isinstance(models, Ensemble) and len(models) == 1:
            by_decile = _lsi_deciles(cache_dir.parent, models[0], members, scores, is_member)
            if by_decile:
                deciles[tname] = by_decile
    return {**counts, "targets": results, "references": references if "offline" in modes else 0,
            "reference_seconds": ref_seconds, "seconds": time.perf_counter() - t0, "lsi_deciles": deciles}


def _lsi_deciles(state: Path, model: torch.nn.Module, members: SampleSet, scores: dict[str, np.ndarray],
                 is_member: np.ndarray) -> dict[str, Any]:
    """Each attack's AUC on the members of each LSI decile against all non-members, from the site's own
    ``STATE/lsi`` (:mod:`fairforget.lsi`) when it scored this very model and every member; else {}."""
    from fairforget.audit.roc import auc
    from fairforget.lsi import deciles, read_sample_lsi

    lsi = read_sample_lsi(state, model)
    ids = members.ids.tolist()
    if not lsi or any(int(i) not in lsi for i in ids):
        return {}
    dec = deciles(np.array([lsi[int(i)] for i in ids]))
    outside = np.asarray(~is_member)
    out: dict[str, Any] = {}
    for d in range(10):  # "decile-0": {"members": count, attack: AUC, ...}: counts and rates only
        inside = dec == d
        if not inside.any():
            continue
        truth = np.r_[np.ones(int(inside.sum()), bool), np.zeros(int(outside.sum()), bool)]
        out[f"decile-{d}"] = {"members": int(inside.sum()), **{
            name: float(auc(np.r_[np.asarray(v)[:len(ids)][inside], np.asarray(v)[outside]], truth))
            for name, v in scores.items()}}
    return out
