"""The forgetting driver (``mode = forget``): route deletion requests to the owning shards.

Reads top to bottom: restore the finished run's ensemble, ask every node which of the ids it holds
(``query.describe``), refuse the whole request if any id is unknown or already deleted, send each
owning node a ``train.unlearn`` message with its ids, then replace those shards' models and append
the ledger, the figures and the report. Shards that own none of the ids are not contacted again
and their models stay byte-identical.

With an approximate ``unlearn-method`` the strategy's deletion budget (:mod:`fairforget.capacity`)
is checked per shard before anything is sent: within budget the shard unlearns approximately and
the budget is consumed; past it, ``capacity-policy = refuse`` refuses the whole request (nothing
changes) and ``retrain`` sends that shard an exact SISA retrain instead, which resets its budget.
The budget is saved in ``OUT/budget.json``; every decision goes into the ledger.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log

from clients.unlearning import EXACT
from fairforget import keys
from fairforget.capacity import DeletionBudget, head_parameters
from fairforget.config import RunConfig, parse_ids
from fairforget.data import load_dataset
from fairforget.model import bottleneck_dim
from fairforget.report import write_report
from server.audit import check_audit_config, headline, run_audit, site_audits, unlearning_audit
from server.evaluation import evaluate_states
from server.experiment import evaluation_summary
from server.run_files import RunDir
from strategies import STRATEGIES


class ForgetError(ValueError):
    """A deletion request that cannot be served; nothing was changed."""


def run_forget(grid: Grid, cfg: RunConfig) -> None:
    run = RunDir(cfg.out_path)
    run.require_finished()
    ids = parse_ids(cfg.forget_ids)
    if not ids:
        raise ForgetError("no sample ids to forget")
    strategy = STRATEGIES[cfg.strategy].from_config(cfg)
    if not strategy.exact_unlearning:
        raise ForgetError(f"strategy '{cfg.strategy}' keeps no shard models; exact unlearning needs shard-ensemble")
    strategy.load_states(run.load_models())
    bundle = load_dataset(cfg)
    if cfg.audit:
        check_audit_config(cfg, bundle)

    # 1. who holds what
    replies = list(grid.send_and_receive(strategy.configure_describe(grid, ids)))
    requests = route(replies, ids)
    node_shard = {r.metadata.src_node_id: int(r.content[keys.METRICS][keys.SHARD]) for r in replies}
    sizes = {node_shard[r.metadata.src_node_id]: int(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies}

    # 2. the deletion budget, checked before anything changes (refuse raises here)
    d = head_parameters(bottleneck_dim(cfg.model_width), bundle.num_classes)  # SimpleConvNet.fc
    strategy.budget = DeletionBudget.load_or_new(run.budget_path, cfg.capacity_bound, cfg.capacity_eps,
                                                 cfg.capacity_delta, d, cfg.capacity_c)
    counts = {node_shard[n]: len(v) for n, v in requests.items()}
    try:
        plan = plan_unlearning(strategy.budget, counts, sizes, cfg.unlearn_method, cfg.capacity_policy)
    except ForgetError as exc:  # refused: the ledger records the decision; nothing else changes
        request_no = run.ledger.next_request()
        run.ledger.append([{"request": request_no, "shard": node_shard[n], "ids": sorted(v),
                            "method": cfg.unlearn_method, "decision": "refused", "reason": str(exc)}
                           for n, v in sorted(requests.items())])
        raise

    # 3. unlearn on the owning nodes only
    t0 = time.perf_counter()
    methods = {n: plan[node_shard[n]].method for n in requests}
    reports = strategy.aggregate_unlearn(grid.send_and_receive(
        strategy.configure_unlearn(requests, cfg.unlearn_method, methods)))
    wall = time.perf_counter() - t0
    capacity = settle_budget(strategy.budget, plan, reports, counts)
    strategy.budget.save(run.budget_path)
    for shard, c in sorted(capacity.items()):
        log(INFO, "fairforget: shard %d: %s (%s), deletion capacity %d -> %d of %d", shard, c["decision"],
            c["method"], c["capacity_before"], c["capacity_after"], c["capacity"])

    # 3. save models, ledger, figures (with the audit before and after), report
    before = run.load_models()
    run.save_models({k: strategy.shard_arrays[k].to_torch_state_dict() for k in reports})
    after = run.load_models()
    metrics = run.metrics()
    request_no = run.ledger.next_request()
    ids_by_shard = {int(r["shard"]): requests[int(r["node-id"])] for r in reports.values()}
    run.ledger.append(ledger_rows(request_no, ids_by_shard, reports, capacity))
    evaluation = evaluate_states(after, bundle, cfg)
    metrics = updated_metrics(metrics, request_no, ids_by_shard, reports, evaluation, wall)
    metrics["unlearning"][-1]["budget"] = {str(k): v for k, v in sorted(capacity.items())}
    if cfg.audit:
        metrics["unlearning"][-1]["audit"] = {
            "deleted_vs_nonmembers_auc_before": unlearning_audit(cfg, bundle, before, ids, run),
            "deleted_vs_nonmembers_auc_after": unlearning_audit(cfg, bundle, after, ids, run),
        }
        metrics["unlearning"][-1]["privacy_before"] = headline(metrics.get("privacy"))
        metrics["privacy"] = run_audit(run, cfg, bundle, after, deleted=run.ledger.unlearned_ids())
        metrics["privacy"]["sites"] = site_audits(grid, after)
        metrics["unlearning"][-1]["privacy_after"] = headline(metrics["privacy"])
    run.write_metrics(metrics)
    write_report(run.path)
    log(INFO, "fairforget: forgot %d sample(s) from shard(s) %s", len(ids), sorted(ids_by_shard))


def route(replies: list[Any], ids: list[int]) -> dict[int, list[int]]:
    """``node_id -> ids it owns``; raises :class:`ForgetError` for unknown or deleted ids."""
    owned: dict[int, list[int]] = {}
    deleted: set[int] = set()
    for reply in replies:
        if reply.has_error():
            raise ForgetError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
        info = reply.content[keys.CONFIG]
        mine = [int(i) for i in info[keys.OWNED_IDS]]
        if mine:
            owned[reply.metadata.src_node_id] = mine
        deleted |= {int(i) for i in info[keys.DELETED_IDS]}
    if deleted:
        raise ForgetError(f"sample id(s) already deleted: {', '.join(map(str, sorted(deleted)))}")
    held = {i for v in owned.values() for i in v}
    unknown = sorted(set(ids) - held)
    if unknown:
        raise ForgetError(f"unknown sample id(s) (in no shard): {', '.join(map(str, unknown))}")
    return owned


@dataclass(frozen=True)
class Decision:
    method: str  # what the shard is asked to run
    decision: str  # "approximate", "exact-retrain" (asked for) or "exact-fallback" (budget spent)


def plan_unlearning(budget: DeletionBudget, counts: dict[int, int], sizes: dict[int, int], method: str,
                    policy: str) -> dict[int, Decision]:
    """Per shard (``counts``: shard -> deletions requested), what to run. Opens a budget for a shard
    that has none (``sizes``: its current size); raises :class:`ForgetError` under ``refuse`` if any
    shard's request exceeds its remaining capacity, before anything is sent."""
    plan: dict[int, Decision] = {}
    for shard, k in sorted(counts.items()):
        budget.track(shard, sizes[shard])
        if method == EXACT:
            plan[shard] = Decision(EXACT, "exact-retrain")
        elif not budget.would_exceed(shard, k):
            plan[shard] = Decision(method, "approximate")
        elif policy == "refuse":
            b = budget.shards[shard]
            raise ForgetError(f"shard {shard}: deletion capacity exhausted: {b.remaining} of {b.capacity} left, "
                              f"request needs {k} (capacity-policy = refuse; nothing was changed)")
        else:
            plan[shard] = Decision(EXACT, "exact-fallback")
    return plan


def settle_budget(budget: DeletionBudget, plan: dict[int, Decision], reports: dict[int, dict[str, Any]],
                  counts: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Consume (approximate) or reset (exact retrain) each unlearned shard's budget; return, per
    shard, the method, the decision and the remaining capacity before and after."""
    out = {}
    for shard, rep in sorted(reports.items()):
        before = budget.remaining(shard)
        if plan[shard].decision == "approximate":
            budget.consume(shard, counts[shard])
        else:
            budget.reset(shard, int(rep[keys.NUM_EXAMPLES]))
        out[shard] = {"method": rep["method"], "decision": plan[shard].decision, "capacity_before": before,
                      "capacity_after": budget.remaining(shard), "capacity": budget.shards[shard].capacity,
                      "approx_deletions": int(rep.get(keys.APPROX_DELETIONS, 0))}
    return out


def ledger_rows(request_no: int, ids_by_shard: dict[int, list[int]], reports: dict[int, dict[str, Any]],
                capacity: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "request": request_no,
            "shard": shard,
            "ids": sorted(ids_by_shard[shard]),
            "method": reports[shard]["method"],
            "decision": capacity[shard]["decision"],
            "capacity_before": capacity[shard]["capacity_before"],
            "capacity_after": capacity[shard]["capacity_after"],
            "capacity": capacity[shard]["capacity"],
            "restart_stage": int(reports[shard][keys.RESTART_SLICE]),
            "retrained_stages": int(reports[shard]["retrained-stages"]),
            "seconds": float(reports[shard][keys.TRAIN_SECONDS]),
            "wall_seconds": float(reports[shard]["wall-seconds"]),
            "hash_before": reports[shard][keys.HASH_BEFORE],
            "hash_after": reports[shard][keys.MODEL_HASH],
            # augmented shards: what happened to the generator and its samples (clients/augment.py)
            **json.loads(reports[shard].get(keys.AUGMENT_JSON, "{}")),
        }
        for shard in sorted(ids_by_shard)
    ]


def updated_metrics(metrics: dict[str, Any], request_no: int, ids_by_shard: dict[int, list[int]],
                    reports: dict[int, dict[str, Any]], evaluation: dict[str, Any], wall: float) -> dict[str, Any]:
    seconds = sum(float(r[keys.TRAIN_SECONDS]) for r in reports.values())
    full = float(metrics["timing"]["full_retrain_seconds"])
    for row in metrics["shards"]:
        if row["shard"] in reports:
            rep = reports[row["shard"]]
            row.update(num_examples=int(rep[keys.NUM_EXAMPLES]), kl_bias=float(rep[keys.KL_BIAS]),
                       model_hash=rep[keys.MODEL_HASH])
        row["accuracy_unbiased"] = evaluation["unbiased"]["per_model_accuracy"].get(row["shard"])
    metrics["ensemble"] = evaluation_summary(evaluation)
    metrics["unlearning"].append({
        "request": request_no,
        "ids": sorted(i for v in ids_by_shard.values() for i in v),
        "shards": sorted(ids_by_shard),
        "restart_stages": {str(k): int(r[keys.RESTART_SLICE]) for k, r in sorted(reports.items())},
        "seconds": seconds,
        "wall_seconds": wall,
        "full_retrain_seconds": full,
        "speedup_vs_full_retrain": full / seconds if seconds > 0 else None,
        "accuracy_biased": evaluation["biased"]["accuracy"],
        "accuracy_unbiased": evaluation["unbiased"]["accuracy"],
        "worst_group_accuracy": evaluation["unbiased"]["worst_group"]["accuracy"],
    })
    return metrics
