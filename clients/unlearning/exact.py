"""Exact unlearning by SISA retraining (Bourtoule et al. 2021, Sec. IV).

The deleted ids leave the shard index and every checkpoint that was trained on them is removed;
the shard is then retrained from the last clean checkpoint (the one before the earliest slice that
held a deleted id) through the stages it had trained before. Because SISA training here is
deterministic, the result equals training from scratch on the shard without those samples.

After approximate deletions (:mod:`clients.unlearning.approx_state`) the shard serves an approximate
model and has fallen back to its last clean stage; an exact retrain then goes through every stage
trained before the first approximate deletion and removes the approximate model, so the shard is
again exactly the model trained without all the deleted samples.
"""

from __future__ import annotations

import time
from typing import Any

from clients.sisa import SisaShard
from clients.unlearning import approx_state


def unlearn(shard: SisaShard, ids: list[int], params: Any = None) -> dict[str, Any]:
    shard.check_ids(ids)
    hash_before = approx_state.current_hash(shard)
    target = approx_state.target_stage(shard)
    t0 = time.perf_counter()
    clean_stage = shard.remove(ids)
    seconds = shard.train_through(target)
    approx_state.clear(shard)
    return {
        "method": "exact-sisa",
        "restart_stage": clean_stage,
        "retrained_stages": target - clean_stage,
        "seconds": seconds,  # training compute, as the full-retrain figure counts it
        "wall_seconds": time.perf_counter() - t0,  # with the index update and checkpoint I/O
        "hash_before": hash_before,
        "hash_after": shard.model_hash(),
        "num_examples": len(shard.live_ids()),
    }
