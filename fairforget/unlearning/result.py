"""What every unlearner returns, and its form on the wire.

:class:`UnlearnResult` is produced by every unlearning path (exact SISA retraining, each approximate
method, an augmented shard's forget) and turned into Flower records and back in exactly one place,
:meth:`UnlearnResult.to_records` / :meth:`UnlearnResult.from_records`, under the names of
:mod:`fairforget.keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fairforget import keys
from fairforget.schemas import payloads

FIGURE_PREFIX = "figure."  # method-specific figures travel as "figure.<name>" metrics


@dataclass(frozen=True)
class UnlearnResult:
    """What a node's deletion did to its shard: the ``train.unlearn`` reply, and the ledger's
    completion line (:func:`server.forget.ledger_rows`).

    Parameters
    ----------
    shard : int
        The shard.
    method : str
        The unlearner that served it (a name of ``fairforget.unlearning.UNLEARNERS``).
    restart_stage : int
        The last clean stage, where an exact retrain starts (0: from initialisation).
    retrained_stages : int
        Stages trained again (0 for an approximate method).
    seconds : float
        Training compute, as the full-retrain figure counts it.
    wall_seconds : float
        Wall time, with the index update and checkpoint I/O.
    hash_before, hash_after : str
        The shard model's hash (SHA-256, 16 hex) before and after.
    num_examples : int
        The shard's live samples afterwards.
    full_train_seconds : float
        SISA training compute of every stage of the shard (what a full retrain costs).
    approx_deletions : int
        Deletions served approximately since the last exact retrain.
    figures : Mapping[str, float]
        Method-specific figures (``noise_sigma``, ...).
    augment : Mapping[str, Any] or None
        An augmented shard: what happened to its generator and samples (the ``augment-json`` payload).
    resumed : bool
        A re-sent deletion the node had committed before a crash: finished, not redone.
    index_version : int
        The shard index's version afterwards (a replay's starting point).
    """

    shard: int
    method: str  # a name of fairforget.unlearning.UNLEARNERS
    restart_stage: int  # the last clean stage (where an exact retrain starts)
    retrained_stages: int  # stages trained again (0 for an approximate method)
    seconds: float  # training compute, as the full-retrain figure counts it
    wall_seconds: float  # with the index update and checkpoint I/O
    hash_before: str
    hash_after: str
    num_examples: int  # live samples of the shard afterwards
    full_train_seconds: float  # SISA training compute of every stage of the shard (the full-retrain cost)
    approx_deletions: int = 0  # deletions served approximately since the last exact retrain
    figures: Mapping[str, float] = field(default_factory=dict)  # method-specific (noise_sigma, ...)
    augment: Mapping[str, Any] | None = None  # augmented shard: what happened to its generator and samples
    resumed: bool = False  # a re-sent deletion the node had committed before (a crash): finished, not redone
    index_version: int = 0  # the shard index's version afterwards (a replay's starting point)

    # ------------------------------------------------------------------ wire form
    def to_records(self) -> tuple[MetricRecord, ConfigRecord]:
        """The reply's metrics and config entries (the caller adds the model's ArrayRecord)."""
        metrics = MetricRecord({
            keys.SHARD: self.shard,
            keys.NUM_EXAMPLES: self.num_examples,
            keys.TRAIN_SECONDS: self.seconds,
            keys.RESTART_SLICE: self.restart_stage,
            keys.RETRAINED_STAGES: self.retrained_stages,
            keys.WALL_SECONDS: self.wall_seconds,
            keys.FULL_TRAIN_SECONDS: self.full_train_seconds,
            keys.APPROX_DELETIONS: self.approx_deletions,
            keys.RESUMED: int(self.resumed),
            keys.INDEX_VERSION: self.index_version,
            **{FIGURE_PREFIX + k: float(v) for k, v in self.figures.items()},
        })
        config = ConfigRecord({keys.UNLEARN_METHOD: self.method, keys.HASH_BEFORE: self.hash_before,
                               keys.MODEL_HASH: self.hash_after})
        if self.augment is not None:
            config[keys.AUGMENT_JSON] = payloads.encode(payloads.AugmentReport, self.augment)
        return metrics, config

    @classmethod
    def from_records(cls, content: RecordDict) -> UnlearnResult:
        m, c = content[keys.METRICS], content[keys.CONFIG]
        return cls(
            shard=int(m[keys.SHARD]), method=str(c[keys.UNLEARN_METHOD]),
            restart_stage=int(m[keys.RESTART_SLICE]), retrained_stages=int(m[keys.RETRAINED_STAGES]),
            seconds=float(m[keys.TRAIN_SECONDS]), wall_seconds=float(m[keys.WALL_SECONDS]),
            hash_before=str(c[keys.HASH_BEFORE]), hash_after=str(c[keys.MODEL_HASH]),
            num_examples=int(m[keys.NUM_EXAMPLES]), full_train_seconds=float(m[keys.FULL_TRAIN_SECONDS]),
            approx_deletions=int(m[keys.APPROX_DELETIONS]),
            resumed=bool(int(m.get(keys.RESUMED, 0))), index_version=int(m.get(keys.INDEX_VERSION, 0)),
            figures={k.removeprefix(FIGURE_PREFIX): float(v) for k, v in m.items() if k.startswith(FIGURE_PREFIX)},
            augment=(payloads.decode(payloads.AugmentReport, c[keys.AUGMENT_JSON]).to_json()
                     if keys.AUGMENT_JSON in c else None),
        )
