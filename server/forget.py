"""The forgetting driver (``mode = forget``): route deletion requests to the owning shards.

Reads top to bottom: restore the finished run's ensemble, ask every node which of the ids it holds
(``query.describe``), refuse the whole request if any id is unknown or already deleted, send each
owning node a ``train.unlearn`` message with its ids, then replace those shards' models and append
the ledger, the figures and the report. Shards that own none of the ids are not contacted again
and their models stay byte-identical.

With an approximate ``unlearn-method`` the strategy decides per shard with its deletion budget
(:meth:`strategies.shard_ensemble.ShardEnsemble.configure_unlearn`) before anything is sent: within
budget the shard unlearns approximately and the budget is consumed; past it, ``capacity-policy =
refuse`` refuses the whole request (nothing changes but a ``refused`` ledger line) and ``retrain``
sends that shard an exact SISA retrain instead, which resets its budget. This driver restores the
budget from ``OUT/budget.json`` and saves it after the strategy has settled it.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log

from fairforget import keys, ledger
from fairforget.audit.suite import check_audit_config, headline, run_audit, unlearning_audit
from fairforget.capacity import BudgetExceeded
from fairforget.config import RunConfig, parse_ids
from fairforget.data import load_dataset
from fairforget.report import write_report
from fairforget.run import RunDir
from server.audit import site_audits
from server.evaluation import evaluate_states
from server.experiment import dp_metrics, evaluation_summary
from strategies import build_strategy
from strategies.shard_ensemble import UnlearnOutcome


class ForgetError(ValueError):
    """A deletion request that cannot be served; nothing was changed."""


def run_forget(grid: Grid, cfg: RunConfig) -> None:
    run = RunDir(cfg.out_path)
    run.require_finished()
    ids = parse_ids(cfg.forget_ids)
    if not ids:
        raise ForgetError("no sample ids to forget")
    bundle = load_dataset(cfg)
    strategy = build_strategy(cfg, bundle.num_classes)
    if not strategy.exact_unlearning:
        raise ForgetError(f"strategy '{cfg.strategy}' keeps no shard models; exact unlearning needs shard-ensemble")
    strategy.load_states(run.load_models())
    run.load_budget(strategy.budget)
    if cfg.audit:
        check_audit_config(cfg, bundle)

    # 1. who holds what
    replies = list(grid.send_and_receive(strategy.configure_describe(grid, ids)))
    owners = route(replies, ids)
    shard_of = {r.metadata.src_node_id: int(r.content[keys.METRICS][keys.SHARD]) for r in replies}
    sizes = {shard_of[r.metadata.src_node_id]: int(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies}
    spent = {shard_of[r.metadata.src_node_id]: json.loads(str(r.content[keys.CONFIG][keys.DP_JSON]))["epsilon"]
             for r in replies if keys.DP_JSON in r.content[keys.CONFIG]}  # DP-SGD: each shard's epsilon

    # 2. the strategy decides with its deletion budget before anything is sent (refuse raises here)
    try:
        messages = strategy.configure_unlearn(owners, shard_of, sizes, cfg.unlearn_method, spent)
    except BudgetExceeded as exc:  # refused: the ledger records the decision; nothing else changes
        request_no = run.ledger.next_request()
        run.ledger.append([{"request": request_no, "shard": shard_of[n], "ids": sorted(v),
                            "method": cfg.unlearn_method, "decision": ledger.REFUSED, "reason": str(exc)}
                           for n, v in sorted(owners.items())])
        raise ForgetError(str(exc)) from None

    # 3. unlearn on the owning nodes only; the strategy settles the budget
    t0 = time.perf_counter()
    outcomes = strategy.aggregate_unlearn(grid.send_and_receive(messages))
    wall = time.perf_counter() - t0
    run.save_budget(strategy.budget)
    for shard, o in sorted(outcomes.items()):
        log(INFO, "fairforget: shard %d: %s (%s), deletion capacity %d -> %d of %d", shard, o.decision,
            o.result.method, o.capacity_before, o.capacity_after, o.capacity)

    # 4. save models, ledger, figures (with the audit before and after), report
    before = run.load_models()
    run.save_models({k: strategy.shard_arrays[k].to_torch_state_dict() for k in outcomes})
    after = run.load_models()
    metrics = run.metrics()
    request_no = run.ledger.next_request()
    run.ledger.append(ledger_rows(request_no, outcomes))
    evaluation = evaluate_states(after, bundle, cfg)
    metrics = updated_metrics(metrics, request_no, outcomes, strategy.shard_reports, evaluation, wall)
    metrics["dp"] = dp_metrics(cfg, strategy, run.calibration(), metrics.get("dp"))
    if cfg.audit:
        metrics["unlearning"][-1]["audit"] = {
            "deleted_vs_nonmembers_auc_before": unlearning_audit(cfg, bundle, before, ids, run),
            "deleted_vs_nonmembers_auc_after": unlearning_audit(cfg, bundle, after, ids, run),
        }
        metrics["unlearning"][-1]["privacy_before"] = headline(metrics.get("privacy"))
        metrics["privacy"] = run_audit(run, cfg, bundle, after, deleted=run.ledger.unlearned_ids(), dp=metrics["dp"])
        metrics["privacy"]["sites"] = site_audits(grid, after)
        metrics["unlearning"][-1]["privacy_after"] = headline(metrics["privacy"])
    run.write_metrics(metrics)
    write_report(run.path)
    log(INFO, "fairforget: forgot %d sample(s) from shard(s) %s", len(ids), sorted(outcomes))


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


def ledger_rows(request_no: int, outcomes: dict[int, UnlearnOutcome]) -> list[dict[str, Any]]:
    return [
        {
            "request": request_no,
            "shard": shard,
            "ids": o.ids,
            "method": o.result.method,
            "decision": o.decision,
            "capacity_before": o.capacity_before,
            "capacity_after": o.capacity_after,
            "capacity": o.capacity,
            "restart_stage": o.result.restart_stage,
            "retrained_stages": o.result.retrained_stages,
            "seconds": o.result.seconds,
            "wall_seconds": o.result.wall_seconds,
            "hash_before": o.result.hash_before,
            "hash_after": o.result.hash_after,
            # augmented shards: what happened to the generator and its samples (clients/augment.py)
            **dict(o.result.augment or {}),
        }
        for shard, o in sorted(outcomes.items())
    ]


def updated_metrics(metrics: dict[str, Any], request_no: int, outcomes: dict[int, UnlearnOutcome],
                    shard_reports: dict[int, dict[str, Any]], evaluation: dict[str, Any],
                    wall: float) -> dict[str, Any]:
    seconds = sum(o.result.seconds for o in outcomes.values())
    full = float(metrics["timing"]["full_retrain_seconds"])
    for row in metrics["shards"]:
        if row["shard"] in outcomes:
            res = outcomes[row["shard"]].result
            row.update(num_examples=res.num_examples, kl_bias=float(shard_reports[res.shard][keys.KL_BIAS]),
                       model_hash=res.hash_after)
        row["accuracy_unbiased"] = evaluation["unbiased"]["per_model_accuracy"].get(row["shard"])
    metrics["ensemble"] = evaluation_summary(evaluation)
    metrics["unlearning"].append({
        "request": request_no,
        "ids": sorted(i for o in outcomes.values() for i in o.ids),
        "shards": sorted(outcomes),
        "restart_stages": {str(k): o.result.restart_stage for k, o in sorted(outcomes.items())},
        "seconds": seconds,
        "wall_seconds": wall,
        "full_retrain_seconds": full,
        "speedup_vs_full_retrain": full / seconds if seconds > 0 else None,
        "accuracy_biased": evaluation["biased"]["accuracy"],
        "accuracy_unbiased": evaluation["unbiased"]["accuracy"],
        "worst_group_accuracy": evaluation["unbiased"]["worst_group"]["accuracy"],
        "budget": {str(k): {"method": o.result.method, "decision": o.decision, "capacity_before": o.capacity_before,
                            "capacity_after": o.capacity_after, "capacity": o.capacity,
                            "approx_deletions": o.result.approx_deletions}
                   for k, o in sorted(outcomes.items())},
    })
    return metrics
