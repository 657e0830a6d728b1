"""The JSON payloads the ServerApp and the ClientApp exchange inside a message's ``ConfigRecord``
(the ``*-json`` keys of :mod:`fairforget.keys`), as typed records: one class each, written with
:func:`encode` and read with :func:`decode`, so both sides agree on each field's name and type.

A payload that does not match its record is a one-line :class:`~fairforget.schemas.base.SchemaError`
naming the message key and the field (the handler's error, which Flower returns to the sender).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from fairforget import keys
from fairforget.schemas.base import Record, SchemaError, doc
from fairforget.schemas.metrics import Evaluation

Num = float | None


@dataclass(frozen=True)
class DpSpend(Record):
    """``dp-json``: a shard's cumulative DP-SGD spend, as its node's accountant sums it up
    (:func:`fairforget.privacy.accountant.summarize`)."""

    TITLE: ClassVar[str] = f"fairforget message payload {keys.DP_JSON}"
    KEY: ClassVar[str] = keys.DP_JSON

    shard: int | None = doc("the shard")
    accountant: str | None = doc("the accountant (`prv`, `rdp`, `gdp`)")
    epsilon: Num = doc("epsilon spent so far (at `delta`)")
    delta: Num = doc("the delta epsilon is stated at")
    mu: Num = doc("the mu of mu-GDP spent so far")
    tpr_bound: dict[str, Num] = doc("FPR -> the highest TPR any membership attack can reach at it", factory=dict)
    steps: int | None = doc("DP-SGD steps taken")
    trainings: int | None = doc("trainings (each a run of steps at one noise and sampling rate)")


@dataclass(frozen=True)
class SiteEvaluation(Record):
    """``eval-json``: a site's evaluation of the model it serves on its own test split: accuracies
    and each group's accuracy as fractions, never counts per group, samples or ids."""

    TITLE: ClassVar[str] = f"fairforget message payload {keys.EVAL_JSON}"
    KEY: ClassVar[str] = keys.EVAL_JSON

    biased: Evaluation | None = doc("on the site's biased test split")
    unbiased: Evaluation | None = doc("on its unbiased test split (every group subsampled to one size)")


@dataclass(frozen=True)
class EnsembleRule(Record):
    """``ensemble-rule``: how the models an ensemble audit sends combine
    (:meth:`fairforget.ensemble.Ensemble.rule`)."""

    TITLE: ClassVar[str] = f"fairforget message payload {keys.ENSEMBLE_RULE}"
    KEY: ClassVar[str] = keys.ENSEMBLE_RULE

    vote: str | None = doc("`softmax` (mean probabilities) or `majority`", "softmax")
    weights: dict[str, float] | None = doc("shard -> weight; null: even")


@dataclass(frozen=True)
class AugmentReport(Record):
    """``augment-json``: an augmentation step's report (`train.augment`), or what a deletion did to an
    augmented shard's generator (`train.unlearn`, then a ledger line's fields)."""

    TITLE: ClassVar[str] = f"fairforget message payload {keys.AUGMENT_JSON}"
    KEY: ClassVar[str] = keys.AUGMENT_JSON

    step: int | None = doc("the augmentation step (0: the first)")
    shard: int | None = doc("the shard")
    kl_before: Num = doc("KL of the shard's groups from the target before the step")
    kl_after: Num = doc("the same after it (the groups asked of the generator)")
    kl_after_judged: Num = doc("the same, groups as the fidelity classifiers judge the samples")
    hash_before: str | None = doc("the shard model's hash before")
    hash_after: str | None = doc("its hash after")
    retired_ids: list[int] = doc("originals retired (exact SISA unlearning) in this step", factory=list)
    generator_trained: bool | None = doc("whether a generator was trained in this step")
    generator_seconds: Num = doc("its training, seconds")
    sampling_seconds: Num = doc("sampling, seconds")
    generated: int | None = doc("synthetic samples drawn")
    filter: Any = doc("what the augmentation filter kept and dropped")
    restart_stage: int | None = doc("the stage retraining started from")
    retrain_seconds: Num = doc("retraining, seconds")
    num_originals: int | None = doc("live original samples after")
    num_synthetic: int | None = doc("live synthetic samples after")
    generator_version: int | None = doc("the generator's version")
    quality: Any = doc("label fidelity and Frechet distances of the samples")
    seconds: Num = doc("the step's wall time")
    generator_invalidated: bool | None = doc("a deletion: the generator had trained on a deleted original")
    policy: str | None = doc("a deletion: `augment-on-delete` (`drop` or `regenerate`)")
    synthetic_dropped: int | None = doc("a deletion: the invalid generator's samples removed")
    synthetic_regenerated: int | None = doc("a deletion: samples a new generator drew in their place")
    old_generator_version: int | None = doc("a deletion: the invalidated generator's version")
    new_generator_version: int | None = doc("a deletion: the new generator's version")
    generator_kept: str | None = doc("a deletion: why the generator was kept (`dp`: its DP guarantee covers it)")
    retire_order: str | None = doc("`augment-retire-order`: which originals were retired first")


@dataclass(frozen=True)
class SiteAuditReport(Record):
    """``audit-json``: one site's audit (:class:`fairforget.audit.site.SiteAudit`): ROC statistics per
    (target, attack) and counts, never samples, scores, ids or per-group figures."""

    TITLE: ClassVar[str] = f"fairforget message payload {keys.AUDIT_JSON}"
    KEY: ClassVar[str] = keys.AUDIT_JSON

    shard: int | None = doc("the site's shard")
    site: str | None = doc("the site's name")
    scope: str | None = doc("`shard` or `ensemble`")
    model_hash: str | None = doc("the audited shard model's hash")
    targets: dict[str, dict[str, dict[str, Any]]] = doc("target -> attack -> ROC figures", factory=dict)
    members: int | None = doc("members audited")
    nonmembers: int | None = doc("non-member candidates")
    population: int | None = doc("population samples (reference training, RMIA's z)")
    references: int | None = doc("offline reference models per target")
    reference_seconds: Num = doc("training them, seconds (0 when cached)")
    seconds: Num = doc("the audit's wall time")
    skipped: str | None = doc("why the site skipped its audit ('' if it did not)")
    lsi_deciles: dict[str, dict[str, Any]] = doc("target -> `decile-D` -> members and each attack's AUC on that "
                                                 "LSI decile (`fairforget inspect`; empty: not scored)", factory=dict)


PAYLOADS: tuple[type[Record], ...] = (DpSpend, SiteEvaluation, EnsembleRule, AugmentReport, SiteAuditReport)
BY_KEY = {cls.KEY: cls for cls in PAYLOADS}  # type: ignore[attr-defined]


def encode(cls: type[Record], payload: Any) -> str:
    """``payload`` (a mapping, or a record of ``cls``) as the JSON text of its message key, checked
    against ``cls`` first."""
    obj = payload.to_json() if isinstance(payload, Record) else dict(payload)
    cls.parse(obj, f"message payload {cls.KEY!r}")  # type: ignore[attr-defined]
    return json.dumps(obj)


def decode(cls: type[Record], text: Any) -> Any:
    """The record of ``cls`` a message's JSON text holds; text that is no JSON object, or a field of
    another type, is a one-line :class:`~fairforget.schemas.base.SchemaError`."""
    where = f"message payload {cls.KEY!r}"  # type: ignore[attr-defined]
    try:
        obj = json.loads(str(text))
    except ValueError as exc:
        raise SchemaError(f"{where}: not JSON ({exc})") from None
    return cls.parse(obj, where)

