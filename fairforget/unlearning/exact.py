"""Exact unlearning by SISA retraining (Bourtoule et al. 2021, Sec. IV).

The deleted ids leave the shard index and every checkpoint that was trained on them is removed;
the shard is then retrained from the last clean checkpoint (the one before the earliest slice that
held a deleted id) through the stages it had trained before. Because SISA training here is
deterministic, the result equals training from scratch on the shard without those samples.

After approximate deletions (:mod:`fairforget.unlearning.approximate`) the shard serves an
approximate model and has fallen back to its last clean stage; an exact retrain then goes through
every stage trained before the first approximate deletion and removes the approximate model, so the
shard is again exactly the model trained without all the deleted samples.
"""

from __future__ import annotations

import time
from typing import Any

from fairforget.sisa import SisaShard
from fairforget.unlearning import approximate
from fairforget.unlearning.result import UnlearnResult

NAME = "exact-sisa"


def check(shard: SisaShard, ids: list[int], params: Any = None) -> None:
    """Everything that can refuse the deletion, checked with nothing written (the node runs this
    before it tombstones the ids): ids not live in the shard, a retrain past the DP epsilon cap."""
    shard.check_ids(ids)
    shard.check_privacy(shard.planned_removal(ids, approximate.target_stage(shard)),
                        "retraining after this deletion")


def unlearn(shard: SisaShard, ids: list[int], params: Any = None) -> UnlearnResult:
    check(shard, ids, params)  # before anything changes
    hash_before = approximate.current_hash(shard)
    target = approximate.target_stage(shard)
    t0 = time.perf_counter()
    clean_stage = shard.remove(ids, retrain_to=target)  # committed with its target: a crash resumes
    approximate.clear(shard)  # an approximate model was trained on the ids too
    seconds = shard.train_through(target)
    return UnlearnResult(
        shard=shard.shard, method=NAME, restart_stage=clean_stage, retrained_stages=target - clean_stage,
        seconds=seconds, wall_seconds=time.perf_counter() - t0, hash_before=hash_before,
        hash_after=shard.model_hash(), num_examples=len(shard.live_ids()),
        full_train_seconds=shard.full_train_seconds(),
    )
