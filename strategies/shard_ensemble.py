"""ShardEnsemble: SISA's constituent models, one per shard, never averaged.

Bourtoule et al., "Machine Unlearning", IEEE S&P 2021. Round r asks every node to train SISA stage
r (slices 1..r) from its own node-local checkpoint, so no weights travel to the clients; each reply's
model replaces that shard's constituent. The ensemble predicts by mean softmax or majority vote
(:class:`fairforget.ensemble.Ensemble`). Deletion requests travel as ``train.unlearn`` messages
to the owning nodes only (:meth:`configure_unlearn` / :meth:`aggregate_unlearn`). Site audits
(``server/audit.py``) send no weights either: each site audits the model it serves, unless the run
sets ``site-audit-scope = "ensemble"``, which sends every shard's weights to every site.

The strategy owns the per-shard deletion budget (:attr:`budget`, a
:class:`fairforget.capacity.DeletionBudget`, Sekhari et al. 2021) the way Flower's DP strategies own
their accountant (``dp_fixed_clipping.py``): :meth:`configure_unlearn` decides per shard with it and
raises :class:`fairforget.capacity.BudgetExceeded` before any message is sent when the request does
not fit (``capacity-policy = refuse``) or sends an exact retrain instead (``retrain``);
:meth:`aggregate_unlearn` settles it (an approximate deletion consumes, an exact retrain resets).
Augmentation retirements are granted from the same budget (:meth:`configure_augment`) and settled
in :meth:`aggregate_augment`. Saving it is the caller's job (``state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fairforget import keys, ledger
from fairforget.capacity import BudgetExceeded, DeletionBudget, head_parameters
from fairforget.ensemble import Predictor
from fairforget.model import model_bottleneck
from fairforget.records import pack_shards, unpack_shards
from fairforget.schemas import payloads
from fairforget.unlearning import EXACT, UnlearnResult, is_exact
from strategies.base import FairforgetStrategy, StrategyReplyError, mean_metrics

POLICIES = ("retrain", "refuse")


@dataclass(frozen=True)
class Planned:
    """What :meth:`ShardEnsemble.configure_unlearn` decided for one shard."""

    node_id: int
    ids: list[int]
    method: str  # what the shard is asked to run
    decision: str  # fairforget.ledger.APPROXIMATE, EXACT_RETRAIN or EXACT_FALLBACK


@dataclass(frozen=True)
class UnlearnOutcome:
    """One shard's unlearning, settled: the node's result and the budget before and after."""

    ids: list[int]
    decision: str
    result: UnlearnResult
    capacity_before: int
    capacity_after: int
    capacity: int


class ShardEnsemble(FairforgetStrategy, Strategy):
    """SISA's constituents, one model per shard, combined by vote, never averaged (the module
    docstring says how training, deletions and audits travel).

    Parameters
    ----------
    num_shards : int
        Shards, one node each (>= 1).
    num_slices : int
        SISA slices per shard (>= 1): round r trains stage r, so the run has this many rounds.
    vote : str
        How the ensemble predicts: ``"softmax"`` (mean probabilities) or ``"majority"``.
    budget : fairforget.capacity.DeletionBudget, optional
        The per-shard deletion budget of approximate unlearning; default an empty Newton budget.
    policy : str
        A request past a shard's budget: ``"retrain"`` (exact SISA retrain instead, which resets the
        budget) or ``"refuse"`` (the whole request, before anything is sent).
    required : int, optional
        Shards a round needs to go on (``min-shards``); default all of them.

    Raises
    ------
    ValueError
        A count below 1, or an unknown ``vote`` or ``policy``.
    """

    name = "shard-ensemble"
    keeps_shard_models = True
    exact_unlearning = True
    dp_mechanism = "dp-sgd"  # each site's SISA training, calibrated before the run
    supports_augment = True

    def __init__(self, num_shards: int, num_slices: int, vote: str = "softmax",
                 budget: DeletionBudget | None = None, policy: str = "retrain", required: int | None = None) -> None:
        FairforgetStrategy.__init__(self)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        if vote not in ("softmax", "majority"):
            raise ValueError(f"vote must be 'softmax' or 'majority', got {vote!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.num_shards = num_shards
        self.num_slices = num_slices
        self.vote = vote
        self.shard_arrays: dict[int, ArrayRecord] = {}
        self.budget = budget if budget is not None else DeletionBudget("newton", 1.0, 1e-5, 1)
        self.policy = policy
        self.required = num_shards if not required else int(required)  # shards a round needs (min-shards)
        self.last_round: dict[int, int] = {}  # shard -> the last training round it replied to
        self._planned: dict[int, Planned] = {}  # shard -> decision, between configure and aggregate
        self._originals: dict[int, int] = {}  # shard -> originals left (augmentation)
        self._granted: dict[int, int] = {}  # shard -> retirements granted this augmentation step
        self._dp_epsilons: dict[int, float] = {}  # shard -> DP-SGD epsilon spent (capacity-bound = "dp")

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int) -> ShardEnsemble:
        d = head_parameters(model_bottleneck(cfg.model, cfg.model_width), num_classes)  # the run's model's fc
        budget = DeletionBudget(cfg.capacity_bound, cfg.capacity_eps, cfg.capacity_delta, d, cfg.capacity_c)
        return cls(cfg.num_shards, cfg.slices, cfg.ensemble_vote, budget, cfg.capacity_policy, cfg.required_shards)

    def num_rounds(self) -> int:
        return self.num_slices  # one SISA stage per round

    def summary(self) -> None:
        log(INFO, "\t├── Shards (one node each): %d", self.num_shards)
        log(INFO, "\t├── SISA slices (one per round): %d", self.num_slices)
        log(INFO, "\t└── Ensemble vote: %s", self.vote)

    def _all_nodes(self, grid: Grid) -> list[int]:
        """The node of every shard: the run's bound nodes (``server.grid.SiteGrid``: identified, at most
        one per shard, waited for up to the reply timeout), else the first ``num_shards`` to connect."""
        bound = getattr(grid, "bound_nodes", None)
        if bound is not None:
            return sorted(bound())
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
        """Keep each replying shard's model. A shard whose node failed or did not reply in time keeps
        its model of an earlier round (stale) or has none (missing); with fewer than ``min-shards``
        replies the run stops with a one-line :class:`StrategyReplyError`."""
        failed: list[Message] = []
        ok = self.record_replies(replies, failed)
        for reply in ok:
            shard = int(reply.content[keys.METRICS][keys.SHARD])
            self.shard_arrays[shard] = reply.content[keys.ARRAYS]
            self.last_round[shard] = server_round
        why = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed) or "no reply in time"
        self._require_replies(f"round {server_round}", len(ok), self.num_shards, self.lagging(server_round), why)
        if not ok:
            return None, None
        return pack_shards(self.shard_arrays), mean_metrics(ok)

    def _require_replies(self, what: str, replied: int, asked: int, lost: list[int], why: str) -> None:
        """Fewer than ``min-shards`` of the ``asked`` shards replied: a one-line :class:`StrategyReplyError`;
        some shards lost but enough replied: a warning, and the caller goes on without them."""
        if lost and replied < min(self.required, asked):
            raise StrategyReplyError(f"{what}: {replied} of {asked} shards replied (shard(s) "
                                     f"{', '.join(map(str, lost))} lost: {why}); min-shards = {self.required}")
        if lost:
            log(WARNING, "%s: going on without shard(s) %s (min-shards = %d)", what, lost, self.required)

    def lagging(self, server_round: int) -> list[int]:
        """Shards that did not reply to round ``server_round`` (missing, or stale from an earlier round)."""
        return [k for k in range(self.num_shards) if self.last_round.get(k, 0) < server_round]

    def federation_report(self, rounds: int) -> dict[str, Any]:
        """Which shards the run ended without (``missing``) or with a model of an earlier round (``stale``)."""
        return {"missing": [k for k in range(self.num_shards) if k not in self.last_round],
                "stale": {str(k): r for k, r in sorted(self.last_round.items()) if r < rounds},
                "min_shards": self.required}

    # ------------------------------------------------------------------ evaluation happens on the server
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def ensemble_states(self, arrays: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
        return unpack_shards(arrays)

    def predictor(self) -> Predictor:
        return Predictor(self.vote)  # ensemble-vote: mean softmax or majority, every shard alike

    # ------------------------------------------------------------------ unlearning
    def configure_describe(self, grid: Grid, ids: list[int]) -> list[Message]:
        """Ask every node which of ``ids`` it holds (and which it already deleted)."""
        content = RecordDict({keys.CONFIG: ConfigRecord({keys.FORGET_IDS: list(ids)})})
        return [Message(content, dst_node_id=n, message_type=keys.MSG_DESCRIBE) for n in self._all_nodes(grid)]

    def configure_unlearn(self, owners: Mapping[int, list[int]], shard_of: Mapping[int, int],
                          sizes: Mapping[int, int], method: str,
                          dp_epsilons: Mapping[int, float] | None = None) -> list[Message]:
        """Decide, per owning node (``owners``: node id -> ids; ``shard_of``: node id -> shard;
        ``sizes``: shard -> live samples), what it runs, and return one ``train.unlearn`` message each.

        An exact ``method`` (one that declares it: :func:`fairforget.unlearning.is_exact`) is sent as it
        is. An approximate one is sent where the shard's deletion
        budget covers the request; where it does not, ``policy = "refuse"`` raises
        :class:`BudgetExceeded` before any message exists, ``"retrain"`` sends an exact retrain.

        With DP-SGD training and ``capacity-bound = "dp"`` (``dp_epsilons``: shard -> epsilon spent),
        a shard's capacity is the DP baseline at the epsilon that shard's training has spent: a DP
        learner is its own unlearner for that many deletions (Sekhari et al. 2021)."""
        self._dp_epsilons = dict(dp_epsilons or {}) if self.budget.bound == "dp" else {}
        exact = is_exact(method)  # what the method declares (a plugin's EXACT), resolved here: before any message
        planned: dict[int, Planned] = {}
        for node_id, ids in sorted(owners.items()):
            shard, k = shard_of[node_id], len(ids)
            self.budget.track(shard, sizes[shard], self._dp_epsilons.get(shard))
            if exact:  # exact-sisa, or a plugin that declares EXACT: resets the budget, never charged
                planned[shard] = Planned(node_id, sorted(ids), method, ledger.EXACT_RETRAIN)
            elif not self.budget.would_exceed(shard, k):
                planned[shard] = Planned(node_id, sorted(ids), method, ledger.APPROXIMATE)
            elif self.policy == "refuse":
                b = self.budget.shards[shard]
                raise BudgetExceeded(shard, b.remaining, b.capacity, k,
                                     " (capacity-policy = refuse; nothing was changed)")
            else:
                planned[shard] = Planned(node_id, sorted(ids), EXACT, ledger.EXACT_FALLBACK)
        self._planned = planned
        return [
            Message(RecordDict({keys.CONFIG: ConfigRecord({keys.FORGET_IDS: p.ids, keys.UNLEARN_METHOD: p.method})}),
                    dst_node_id=p.node_id, message_type=keys.MSG_UNLEARN)
            for _, p in sorted(planned.items())
        ]

    def plan_unlearn(self, plans: Mapping[int, Mapping[str, Any]], node_of: Mapping[int, int]) -> list[Message]:
        """The ``train.unlearn`` messages of decisions taken before (a ledger intent's ``shards``:
        shard -> {"ids", "method", "decision"}), sent again to each shard's node (``node_of``) when
        reconciling a deletion a crash or a failed node left unfinished; no new budget decision."""
        self._planned = {int(k): Planned(node_of[int(k)], sorted(int(i) for i in p["ids"]), str(p["method"]),
                                         str(p["decision"])) for k, p in plans.items()}
        return [
            Message(RecordDict({keys.CONFIG: ConfigRecord({keys.FORGET_IDS: p.ids, keys.UNLEARN_METHOD: p.method})}),
                    dst_node_id=p.node_id, message_type=keys.MSG_UNLEARN)
            for _, p in sorted(self._planned.items())
        ]

    def planned(self) -> dict[int, dict[str, Any]]:
        """The decisions of the last :meth:`configure_unlearn`: shard -> {"ids", "method", "decision"}
        (what the ledger's intent line records)."""
        return {k: {"ids": p.ids, "method": p.method, "decision": p.decision} for k, p in sorted(self._planned.items())}

    def aggregate_unlearn(self, replies: Iterable[Message],
                          failed: list[Message] | None = None) -> dict[int, UnlearnOutcome]:
        """Replace the unlearned shards' constituents and settle their budgets: an approximate
        deletion consumes, an exact retrain resets. Returns each shard's outcome; error replies go to
        ``failed`` (given) or raise."""
        out: dict[int, UnlearnOutcome] = {}
        for reply in self.record_replies(replies, failed):
            result = UnlearnResult.from_records(reply.content)
            plan = self._planned.pop(result.shard)
            self.shard_arrays[result.shard] = reply.content[keys.ARRAYS]
            self.budget.track(result.shard, result.num_examples + len(plan.ids))
            before = self.budget.remaining(result.shard)
            decision = plan.decision
            if plan.decision == ledger.APPROXIMATE and result.method == EXACT:
                decision = ledger.EXACT_FALLBACK  # a crashed approximate deletion the node finished exactly
            if decision == ledger.APPROXIMATE:
                self.budget.consume(result.shard, len(plan.ids))
            else:
                self.budget.reset(result.shard, result.num_examples, self._dp_epsilons.get(result.shard))
            out[result.shard] = UnlearnOutcome(plan.ids, decision, result, before,
                                               self.budget.remaining(result.shard),
                                               self.budget.shards[result.shard].capacity)
        return out

    # ------------------------------------------------------------------ augmentation
    def configure_augment(self, step: int, retire_per_step: int, fidelity: ArrayRecord) -> list[Message]:
        """One ``train.augment`` message per trained shard's node: the step, how many originals it may
        retire (step 0: none; later steps: ``retire_per_step``, granted from the shard's deletion
        budget for its current number of originals), and the server's fidelity classifiers (for
        the sample-quality figures)."""
        messages = []
        self._granted = {}
        for shard, report in sorted(self.shard_reports.items()):
            n = self._originals.setdefault(shard, int(report[keys.NUM_EXAMPLES]))
            self.budget.track(shard, n)
            self._granted[shard] = 0 if step == 0 else self.budget.grant(shard, retire_per_step)
            cfg = ConfigRecord({keys.STEP: step, keys.RETIRE: self._granted[shard]})
            messages.append(Message(RecordDict({keys.CONFIG: cfg, keys.ARRAYS: fidelity}),
                                    dst_node_id=int(report[keys.NODE_ID]), message_type=keys.MSG_AUGMENT))
        return messages

    def granted(self) -> dict[int, int]:
        """Retirements granted per shard in the step last configured."""
        return dict(self._granted)

    def aggregate_augment(self, replies: Iterable[Message]) -> dict[int, dict[str, Any]]:
        """Replace every augmented shard's constituent and settle its budget (the retirements are
        spent, then the exact retrain resets it for the originals left); return each shard's step report.
        A shard that did not reply keeps its model; with fewer than ``min-shards`` replies this raises
        a one-line :class:`StrategyReplyError` (never a run that quietly left shards unaugmented)."""
        out: dict[int, dict[str, Any]] = {}
        for reply in self.record_replies(replies):
            shard = int(reply.content[keys.METRICS][keys.SHARD])
            report = payloads.decode(payloads.AugmentReport, reply.content[keys.CONFIG][keys.AUGMENT_JSON]).to_json()
            self.shard_arrays[shard] = reply.content[keys.ARRAYS]
            self.budget.consume(shard, len(report["retired_ids"]))
            self._originals[shard] = int(report["num_originals"])
            self.budget.reset(shard, self._originals[shard])
            out[shard] = report
        self._require_replies("augmentation", len(out), len(self._granted), sorted(set(self._granted) - set(out)),
                              "no reply in time")
        return out

    def load_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Restore the constituents of a finished run (before a forget request)."""
        self.shard_arrays = {k: ArrayRecord(v) for k, v in states.items()}
