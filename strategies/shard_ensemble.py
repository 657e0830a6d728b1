"""ShardEnsemble: SISA's constituent models, one per shard, never averaged.

Bourtoule et al., "Machine Unlearning", IEEE S&P 2021. Round r asks every node to train SISA stage
r (slices 1..r) from its own node-local checkpoint, so no weights travel to the clients; each reply's
model replaces that shard's constituent. The ensemble predicts by mean softmax or majority vote
(:class:`fairforget.ensemble.Ensemble`). Deletion requests travel as ``train.unlearn`` messages
to the owning nodes only (:meth:`configure_unlearn` / :meth:`aggregate_unlearn`).

The strategy also holds the per-shard deletion budget (:attr:`budget`, a
:class:`fairforget.capacity.DeletionBudget`, Sekhari et al. 2021) the way a DP strategy holds its
accountant: the forget driver checks it before every request, approximate deletions consume it, an
exact retrain resets it, and it is saved with the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fairforget import keys
from fairforget.capacity import DeletionBudget
from strategies.base import FairforgetStrategy, mean_metrics, pack_shards, unpack_shards


class ShardEnsemble(FairforgetStrategy, Strategy):
    name = "shard-ensemble"
    exact_unlearning = True

    def __init__(self, num_shards: int, num_slices: int, vote: str = "softmax") -> None:
        FairforgetStrategy.__init__(self)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        if vote not in ("softmax", "majority"):
            raise ValueError(f"vote must be 'softmax' or 'majority', got {vote!r}")
        self.num_shards = num_shards
        self.num_slices = num_slices
        self.vote = vote
        self.shard_arrays: dict[int, ArrayRecord] = {}
        self.budget: DeletionBudget | None = None  # opened by the forget driver

    @classmethod
    def from_config(cls, cfg: Any) -> ShardEnsemble:
        return cls(cfg.num_shards, cfg.slices, cfg.ensemble_vote)

    def num_rounds(self) -> int:
        return self.num_slices  # one SISA stage per round

    def summary(self) -> None:
        log(INFO, "\t├── Shards (one node each): %d", self.num_shards)
        log(INFO, "\t├── SISA slices (one per round): %d", self.num_slices)
        log(INFO, "\t└── Ensemble vote: %s", self.vote)

    def _all_nodes(self, grid: Grid) -> list[int]:
        node_ids, _ = sample_nodes(grid, self.num_shards, self.num_shards)
        return sorted(node_ids)

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        stage = min(server_round, self.num_slices)
        messages = []
        for node_id in self._all_nodes(grid):
            cfg = ConfigRecord(dict(config))
            cfg.update({keys.TRAIN_MODE: keys.TRAIN_MODE_SISA, keys.STAGE: stage, keys.SERVER_ROUND: server_round})
            messages.append(Message(RecordDict({keys.CONFIG: cfg}), dst_node_id=node_id,
                                    message_type=keys.MSG_TRAIN))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = self.record_replies(replies)
        for reply in ok:
            shard = int(reply.content[keys.METRICS][keys.SHARD])
            self.shard_arrays[shard] = reply.content[keys.ARRAYS]
        if not ok:
            return None, None
        return pack_shards(self.shard_arrays), mean_metrics(ok)

    # ------------------------------------------------------------------ evaluation happens on the server
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def ensemble_states(self, arrays: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
        return unpack_shards(arrays)

    # ------------------------------------------------------------------ unlearning
    def configure_describe(self, grid: Grid, ids: list[int]) -> list[Message]:
        """Ask every node which of ``ids`` it holds (and which it already deleted)."""
        content = RecordDict({keys.CONFIG: ConfigRecord({keys.FORGET_IDS: list(ids)})})
        return [Message(content, dst_node_id=n, message_type=keys.MSG_DESCRIBE) for n in self._all_nodes(grid)]

    def configure_unlearn(self, requests: dict[int, list[int]], method: str = "exact-sisa",
                          methods: dict[int, str] | None = None) -> list[Message]:
        """One ``train.unlearn`` message per owning node (``node_id -> ids``), with ``method`` or the
        node's own entry in ``methods`` (``node_id -> method``, e.g. an exact fallback)."""
        methods = methods or {}
        return [
            Message(RecordDict({keys.CONFIG: ConfigRecord({
                keys.FORGET_IDS: ids, keys.UNLEARN_METHOD: methods.get(node_id, method)})}),
                dst_node_id=node_id, message_type=keys.MSG_UNLEARN)
            for node_id, ids in sorted(requests.items())
        ]

    def aggregate_unlearn(self, replies: Iterable[Message]) -> dict[int, dict[str, Any]]:
        """Replace the unlearned shards' constituents; return each shard's report."""
        ok = self.record_replies(replies)
        for reply in ok:
            shard = int(reply.content[keys.METRICS][keys.SHARD])
            self.shard_arrays[shard] = reply.content[keys.ARRAYS]
        return {int(r.content[keys.METRICS][keys.SHARD]): self.shard_reports[int(r.content[keys.METRICS][keys.SHARD])]
                for r in ok}

    # ------------------------------------------------------------------ augmentation
    def configure_augment(self, grid: Grid, step: int, retire: dict[int, int],
                          fidelity: ArrayRecord) -> list[Message]:
        """One ``train.augment`` message per node: the step, how many originals it may retire
        (``node_id -> count``, the deletion budget granted for this step), and the server's fidelity
        classifiers (for the sample-quality figures)."""
        return [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STEP: step, keys.RETIRE: retire.get(n, 0)}),
                                    keys.ARRAYS: fidelity}), dst_node_id=n, message_type=keys.MSG_AUGMENT)
                for n in self._all_nodes(grid)]

    def aggregate_augment(self, replies: Iterable[Message]) -> dict[int, dict[str, Any]]:
        """Replace every augmented shard's constituent; return each shard's report."""
        return self.aggregate_unlearn(replies)

    def load_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Restore the constituents of a finished run (before a forget request)."""
        self.shard_arrays = {k: ArrayRecord(v) for k, v in states.items()}
