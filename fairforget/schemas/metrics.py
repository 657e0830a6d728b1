"""``OUT/metrics.json`` as typed records: what a run measured, read through :func:`parse_metrics`.

The top level and the figures every run has (the run, its rounds, the ensemble's evaluation, the
shards, the timing, each deletion request) are declared field by field. The blocks written by optional
parts (``privacy``, ``dp``, ``augmentation``, ``unlearning_methods``) declare their top-level fields;
what lies below them, and any key a newer writer or a plugin adds, is kept as it is (:attr:`extra`).

``schema_version`` is checked first (:func:`fairforget.schemas.check_metrics_version`): a file of
another version is one line saying which version it is and what to do. A file of this version whose
field has another type is one line naming the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from fairforget.schemas.base import Record, SchemaError, doc

Num = float | None  # a figure (null where it could not be measured: strict JSON has no NaN)


@dataclass(frozen=True)
class RunInfo(Record):
    """What was run: the data, the strategy, the split sizes."""

    dataset: str | None = doc("the dataset's registered name")
    strategy: str | None = doc("the strategy's registered name")
    num_shards: int | None = doc("shards (one per node)")
    slices: int | None = doc("SISA slices per shard")
    rho: Num = doc("the bias: the fraction of samples whose private attribute follows the class")
    class_imbalance: Num = doc("the class imbalance of the training split")
    seed: int | None = doc("the run's seed")
    num_train: int | None = doc("training samples")
    num_heldout: int | None = doc("held-out samples (the audit's non-members)")
    num_test_biased: int | None = doc("biased test samples")
    num_test_unbiased: int | None = doc("unbiased test samples")
    num_classes: int | None = doc("classes")
    num_private: int | None = doc("values of the private attribute")


@dataclass(frozen=True)
class RoundRow(Record):
    """One training round's evaluation by the server."""

    round: int | None = doc("the round (1-based)")
    accuracy_biased: Num = doc("accuracy on the biased test split")
    accuracy_unbiased: Num = doc("accuracy on the unbiased test split")
    worst_group_accuracy: Num = doc("the lowest (class, private value) group's unbiased accuracy")


@dataclass(frozen=True)
class GroupAccuracy(Record):
    """One (class, private value) group's accuracy."""

    class_: int | None = doc("the class", key="class")
    private: int | None = doc("the private attribute's value")
    n: int | None = doc("samples in the group")
    accuracy: Num = doc("the group's accuracy")


@dataclass(frozen=True)
class Evaluation(Record):
    """The ensemble's evaluation on one test split."""

    accuracy: Num = doc("accuracy")
    n: int | None = doc("samples")
    worst_group: GroupAccuracy | None = doc("the group with the lowest accuracy")
    groups: list[GroupAccuracy] = doc("every populated (class, private value) group", factory=list)


@dataclass(frozen=True)
class ShardRow(Record):
    """One shard model (constituent) after the last change."""

    shard: int | None = doc("the shard")
    num_examples: int | None = doc("its live training samples")
    kl_bias: Num = doc("KL(p_group || uniform) over every class x private value: how biased its data is")
    train_seconds: Num = doc("its SISA training compute, seconds")
    model_hash: str | None = doc("SHA-256 (16 hex) of its model")
    accuracy_unbiased: Num = doc("its own accuracy on the unbiased test split")


@dataclass(frozen=True)
class Timing(Record):
    """Wall and compute times of the run, seconds."""

    train_wall_seconds: Num = doc("Flower's strategy loop: training rounds and the server's per-round evaluation")
    full_retrain_seconds: Num = doc("the sum of every shard's SISA training compute (what a full retrain costs)")
    audit_seconds: Num = doc("the privacy audit's wall time")
    augmentation_seconds: Num = doc("diffusion augmentation's wall time")


@dataclass(frozen=True)
class UnlearningRow(Record):
    """One deletion request's figures."""

    request: int | None = doc("the ledger's request number")
    ids: list[int] = doc("the ids deleted", factory=list)
    shards: list[int] = doc("the shards that retrained or unlearned", factory=list)
    restart_stages: dict[str, int | None] = doc("shard -> the stage retraining started from", factory=dict)
    seconds: Num = doc("retraining compute, seconds (comparable to `full_retrain_seconds`)")
    wall_seconds: Num = doc("the request's wall time, seconds")
    full_retrain_seconds: Num = doc("what retraining every shard from scratch costs, seconds")
    speedup_vs_full_retrain: Num = doc("`full_retrain_seconds` / `seconds`")
    accuracy_biased: Num = doc("the ensemble's biased accuracy after")
    accuracy_unbiased: Num = doc("the ensemble's unbiased accuracy after")
    worst_group_accuracy: Num = doc("the worst group's unbiased accuracy after")
    resumed_shards: list[int] = doc("shards finished after a crash", factory=list)
    budget: dict[str, Any] = doc("shard -> method, decision and deletion capacity before and after", factory=dict)
    audit: Any = doc("deleted-vs-non-member AUC per attack, before and after")
    privacy_before: Any = doc("the audit's headline (AUC, TPR at low FPR per target and attack) before")
    privacy_after: Any = doc("the same after")
    timing: Any = doc("the driver's phases, seconds")


@dataclass(frozen=True)
class Federation(Record):
    """Which node served which shard, and the shards the run ended without."""

    missing: list[Any] = doc("shards with no model at the end", factory=list)
    stale: dict[str, Any] = doc("shard -> the round its model is from, where older than the last", factory=dict)
    min_shards: int | None = doc("the fewest shards a round needs")
    binding: dict[str, Any] = doc("shard -> its node id and site", factory=dict)


@dataclass(frozen=True)
class Privacy(Record):
    """The privacy audit (membership inference) of the run's models."""

    attacks: list[str] = doc("the attacks run", factory=list)
    population: Any = doc("the population the audit drew members and non-members from")
    references: Any = doc("the reference models: count and training seconds")
    targets: dict[str, Any] = doc("target (`ensemble`, `shard-K`) -> attack -> AUC, TPR at low FPR, their CIs, ROC",
                                  factory=dict)
    attribute_inference: Any = doc("target -> the private attribute's probe accuracy and chance")
    seconds: Num = doc("the audit's wall time")
    audited_at: dict[str, str] = doc("target -> where it was audited (`server` or `site-K`)", factory=dict)
    sites: dict[str, Any] = doc("site -> its own audit (or `error` / `skipped`)", factory=dict)
    server_seconds: Num = doc("the server's part of `seconds`")
    sites_seconds: Num = doc("the sites' part of `seconds` (overlapping the server's)")


@dataclass(frozen=True)
class DpBlock(Record):
    """With ``dp = true``: how the run's differential privacy was applied and what it spent (DP-SGD
    per shard, or an averaging strategy's user-level DP)."""

    mechanism: str | None = doc("the mechanism: DP-SGD per shard, or user-level DP through Flower's wrappers")
    noise_multiplier: Num = doc("the noise multiplier (sigma / clipping norm)")
    max_grad_norm: Num = doc("DP-SGD: the per-sample clipping norm")
    clipping_norm: Num = doc("user-level DP: the clipping norm of a client's update")
    accountant: str | None = doc("the accountant (`prv`, `rdp`, `gdp`)")
    delta: Num = doc("the delta epsilon is stated at")
    epsilon: Num = doc("user-level DP: epsilon spent")
    mu: Num = doc("user-level DP: the mu of mu-GDP spent")
    max_epsilon: Num = doc("DP-SGD: the epsilon cap no shard may pass (`dp-max-epsilon`)")
    secure_mode: bool | None = doc("DP-SGD: cryptographically secure noise (`dp-secure-mode`)")
    randomness: Any = doc("where the noise and the sampling come from")
    model: str | None = doc("DP-SGD: the model as DP-SGD sees it")
    sampling: str | None = doc("DP-SGD: how batches are drawn (Poisson)")
    shards: dict[str, Any] = doc("DP-SGD: shard -> its cumulative spend (the `dp-json` payload)", factory=dict)
    ensemble: dict[str, Any] = doc("the ensemble's spend (the worst shard's), with a note on what it covers",
                                   factory=dict)
    calibration: Any = doc("how the noise was chosen (`OUT/calibration.json`)")


@dataclass(frozen=True)
class Augmentation(Record):
    """With ``augment = true``: the diffusion augmentation's figures."""

    groups: Any = doc("the groups the generator was asked for (`augment-groups`)")
    kl_threshold: Num = doc("the KL above which a shard is augmented (`augment-kl-threshold`)")
    fidelity_classifiers_accuracy_unbiased: Any = doc("the fidelity classifiers' unbiased accuracy (class, private)")
    rows: list[dict[str, Any]] = doc("vanilla, augmented, augmented + step-wise unlearning: accuracies, worst "
                                     "group, KL per shard, membership inference", factory=list)
    steps: list[dict[str, Any]] = doc("per step: originals retired, accuracies, membership inference, per shard "
                                      "the `augment-json` report", factory=list)
    retired_ids: list[int] = doc("every original retired", factory=list)
    seconds: Num = doc("its wall time")


@dataclass(frozen=True)
class Metrics(Record):
    """``OUT/metrics.json``: what a run measured (written by `fairforget simulate`, updated by every
    `forget`, `audit` and augmentation step)."""

    TITLE: ClassVar[str] = "fairforget metrics.json"
    REQUIRED: ClassVar[tuple[str, ...]] = ("schema_version",)

    schema_version: int | None = doc("the file's format version (checked on read)")
    run: RunInfo | None = doc("what was run")
    rounds: list[RoundRow] = doc("per training round: the server's evaluation", factory=list)
    ensemble: dict[str, Evaluation] = doc("`biased`, `unbiased` -> the ensemble's evaluation", factory=dict)
    shards: list[ShardRow] = doc("per shard model", factory=list)
    timing: Timing | None = doc("seconds spent")
    unlearning: list[UnlearningRow] = doc("per deletion request", factory=list)
    federation: Federation | None = doc("which node served which shard")
    dp: DpBlock | None = doc("with `dp = true`: each shard's and the ensemble's DP spend (epsilon, delta, mu)")
    privacy: Privacy | None = doc("with `audit = true`: the membership-inference audit")
    augmentation: Augmentation | None = doc("with `augment = true`: the diffusion augmentation's rows and steps")
    unlearning_methods: dict[str, Any] | None = doc("after `simulations/unlearning_compare.py --run`: every "
                                                    "unlearner on one request")


def parse_metrics(data: Any, path: str, text: str | None = None) -> Metrics:
    """``data`` (``path``'s JSON) as :class:`Metrics`; a field of another type is a one-line
    :class:`SchemaError` naming the file, the line (where ``text``, the file as read, is as fairforget
    wrote it) and the field."""
    try:
        return Metrics.parse(data, path)
    except SchemaError as exc:
        raise SchemaError(_with_line(str(exc), path, data, text)) from None


def _with_line(message: str, path: str, data: Any, text: str | None) -> str:
    """``message`` with ``line N`` after the file name: the line of the field it names, found by
    writing ``data`` again as fairforget writes it (indent 2) with that field's value marked."""
    field = message[len(path) + 2:].split("'")[1] if message.startswith(f"{path}: field '") else ""
    if not field or text is None or json.dumps(data, indent=2) + "\n" != text:
        return message
    marker = "\x00fairforget-field\x00"
    try:
        marked = _mark(json.loads(text), _path_parts(field), marker)
    except (KeyError, IndexError, TypeError, ValueError):
        return message
    for n, line in enumerate(json.dumps(marked, indent=2).split("\n"), 1):
        if json.dumps(marker)[1:-1] in line:
            return f"{path} line {n}: {message[len(path) + 2:]}"
    return message


def _path_parts(field: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in field.split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        for idx in filter(None, rest.replace("]", "").split("[")) if rest else []:
            parts.append(int(idx))
    return parts


def _mark(obj: Any, parts: list[str | int], marker: str) -> Any:
    if not parts:
        return marker
    head, rest = parts[0], parts[1:]
    obj[head] = _mark(obj[head], rest, marker)  # type: ignore[index]
    return obj
