"""The forgetting driver (``mode = forget``): route deletion requests to the owning shards.

Reads top to bottom: restore the finished run's ensemble and its deletion budget (brought in line
with the ledger), ask every node which of the ids it holds (``query.describe``), finish any
deletion an earlier run left unfinished (:func:`reconcile`), refuse the whole request if any id is
unknown or already deleted, let the strategy decide per shard with its deletion budget, write the
ledger's **intent** line, send each owning node a ``train.unlearn`` message with its ids, and store
each reply as it is good: the shard's model, then its **completion** line, then the budget. Shards
that own none of the ids are not contacted again and their models stay byte-identical.

With an approximate ``unlearn-method`` the strategy decides per shard with its deletion budget
(:meth:`strategies.shard_ensemble.ShardEnsemble.configure_unlearn`) before anything is sent: within
budget the shard unlearns approximately and the budget is consumed; past it, ``capacity-policy =
refuse`` refuses the whole request (nothing changes but a ``refused`` ledger line) and ``retrain``
sends that shard an exact SISA retrain instead, which resets its budget.

Crash safety (:mod:`fairforget.ledger`): a shard of an intent without a completion line is pending.
Its node may have committed the deletion (it tombstones the ids at the data's owner first, then
commits its index with the retrain target) or not. :func:`reconcile` sends the same decision again;
a node that already deleted answers from its state (finishing a cut-short retrain first), one that
did not deletes now; either way the completion is recorded. A node that fails leaves its shard
pending and the run's status names it; the shards that succeeded are stored regardless.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fairforget import keys, ledger
from fairforget.audit.suite import check_audit_config, headline, unlearning_audit
from fairforget.binding import BindingError
from fairforget.capacity import BudgetExceeded
from fairforget.config import RunConfig
from fairforget.data import load_dataset
from fairforget.report import write_report
from fairforget.requests import Request
from fairforget.run import RunDir
from fairforget.schemas import payloads
from fairforget.storage import state_hash
from fairforget.tombstones import Tombstones
from server.audit import federated_audit
from server.evaluation import EVAL_CACHE, evaluate_at_sites, evaluate_states
from server.experiment import dp_metrics, evaluation_summary
from server.grid import site_grid
from strategies import build_strategy, refusal
from strategies.shard_ensemble import UnlearnOutcome

CODE_VERSION = "fairforget-sisa-1"  # bump when a change of training code changes what a replay produces


class ForgetError(ValueError):
    """A deletion request that cannot be served; nothing was changed (or, for a failed node, what
    was stored is named in the message and the run's status)."""


class Phases:
    """Where the driver's wall time goes: seconds per phase (``with phases("describe"): ...``, summed
    over the phase's calls), from the driver's start (``started_at``, epoch seconds, so that the command
    that launched Flower can place the driver in its own wait). Phases: ``restore`` (the run's models,
    data, strategy and budget), ``describe`` (which node holds which ids), ``unlearning`` (send, receive,
    store models and ledger lines), ``evaluation`` (the ensemble after, the DP figures), ``audit``,
    ``report`` (metrics.json and report.md)."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def timing(self) -> dict[str, Any]:
        """The ``timing`` block so far: the phases, the driver's wall and its start."""
        return {"phases": dict(self.seconds), "driver_seconds": time.perf_counter() - self._t0,
                "driver_started_at": self.started_at}


def run_forget(grid: Grid, cfg: RunConfig, request: Request) -> dict[str, Any]:
    """Serve one deletion ``request`` (read from the run folder by the ServerApp; no ids and no
    records: finish the unfinished deletions only). Returns what goes into the request's status
    beyond the ledger's figures: ``satisfied``, the asked ids an earlier request already deleted, and
    ``timing``, the driver's seconds per phase (:class:`Phases`; the latest request's entry in
    metrics.json has those up to the report)."""
    phases = Phases()
    out = _forget(grid, cfg, request, phases)
    return {**out, "timing": phases.timing()}


def _forget(grid: Grid, cfg: RunConfig, request: Request, phases: Phases) -> dict[str, Any]:
    with phases("restore"):
        run = RunDir(cfg.out_path)
        run.require_finished()
        grid = site_grid(grid, cfg)  # the node binding, reply timeouts, the wire log
        ids = list(request.ids)
        records = list(request.records)
        site = request.site
        pending = run.ledger.pending()
        if not ids and not records and not pending:
            raise ForgetError("no sample ids to forget")
        bundle = load_dataset(cfg) if cfg.server_has_data else None  # the data may stay at the sites
        num_classes = bundle.num_classes if bundle is not None else grid.task()[0]
        strategy = build_strategy(cfg, num_classes)
        if not strategy.exact_unlearning:
            raise ForgetError(refusal(strategy, cfg.strategy))
        strategy.load_states(run.load_models())
        run.ledger.settle(run.load_budget(strategy.budget))
        if cfg.audit and bundle is not None:
            check_audit_config(cfg, bundle)
        metrics = run.metrics()
        before = run.load_models()

    # 1. who holds what. Each node is asked only about ids that may be its own: the site a request
    #    names about that request (its records -> its sample ids); the node of an unfinished request's
    #    shard about that request's ids; in simulation (no site named) every node about the new ids.
    asks: dict[int, set[int]] = {}
    unreachable: dict[int, list[int]] = {}  # request -> shards whose node is not connected
    for request_no, plans in pending.items():
        for shard, plan in plans.items():
            try:
                asks.setdefault(grid.node_of(shard), set()).update(int(i) for i in plan["ids"])
            except BindingError:  # a lost node blocks the deletions of its own shard only
                unreachable.setdefault(request_no, []).append(shard)
    replies = []
    satisfied: list[dict[str, Any]] = []
    with phases("describe"):
        if records:
            node = grid.node_of(grid.binding.shard_of_site(site))
            replies = list(grid.send_and_receive([_describe(node, [], records)]))
            ids, gone = _site_ids(replies, records, site)
            satisfied = _satisfied(run, gone, site)
        elif ids:
            for node in grid.bound_nodes():
                asks.setdefault(node, set()).update(ids)
        replies += list(grid.send_and_receive([_describe(n, sorted(v)) for n, v in sorted(asks.items())]))
    shard_of, sizes, spent = nodes_table(replies)
    node_of = {shard: node for node, shard in shard_of.items()}

    # 2. finish what an earlier request left unfinished (where its node is connected)
    done: list[int] = []
    if pending:
        with phases("unlearning"):
            done = reconcile(grid, run, strategy, {r: p for r, p in pending.items() if r not in unreachable},
                             node_of, cfg.seed)
        for request_no in done:
            with phases("evaluation"):
                metrics = _record_figures(run, cfg, bundle, grid, strategy, metrics, request_no)
        if ids:  # the owners of this request's ids are asked again: the reconciled ids are deleted now
            targets = [node] if records else grid.bound_nodes()
            with phases("describe"):
                replies = list(grid.send_and_receive([_describe(n, ids) for n in targets]))
    if ids and not records:  # ids an earlier request (or the data's owner) deleted: satisfied, not an error
        owners, gone = route(replies, ids)
        satisfied = _satisfied(run, gone, "")
        ids = sorted({i for v in owners.values() for i in v})
    if not ids:
        if done:  # nothing new to delete: the figures change only if an unfinished deletion was finished
            _finish(run, cfg, bundle, grid, strategy, metrics, before, [i for r in done for i in _request_ids(run, r)],
                    phases, done[-1])
        _blocked(unreachable)
        return {"satisfied": satisfied} if satisfied else {}
    if records:
        owners, _ = route(replies, ids)

    # 3. the strategy decides with its deletion budget before anything is sent (refuse raises here)
    try:
        messages = strategy.configure_unlearn(owners, shard_of, sizes, cfg.unlearn_method, spent)
    except BudgetExceeded as exc:  # refused: the ledger records the decision; nothing else changes
        request_no = run.ledger.next_request()
        run.ledger.complete([{"request": request_no, "shard": shard_of[n], "ids": sorted(v),
                              "method": cfg.unlearn_method, "decision": ledger.REFUSED, "reason": str(exc)}
                             for n, v in sorted(owners.items())])
        raise ForgetError(str(exc)) from None

    # 4. intent, unlearn on the owning nodes only (with the request's own options), store each good reply
    for message in messages:
        message.content[keys.CONFIG].update({k: v for k, v in cfg.to_mapping().items() if k in keys.REQUEST_OPTIONS})
    request_no = run.ledger.next_request()
    run.ledger.intend(request_no, strategy.planned(), cfg.unlearn_method)
    with phases("unlearning"):
        failed = unlearn_and_store(grid, run, strategy, messages, request_no, cfg.seed,
                                   {"site": site, "records": records} if records else None)
    with phases("evaluation"):
        metrics = _record_figures(run, cfg, bundle, grid, strategy, metrics, request_no)
    _finish(run, cfg, bundle, grid, strategy, metrics, before, ids, phases, request_no)
    if failed:
        raise ForgetError(failed)
    _blocked(unreachable)
    shards = sorted({int(e["shard"]) for e in run.ledger.entries() if e["request"] == request_no})
    log(INFO, "fairforget: forgot %d sample(s) from shard(s) %s", len(ids), shards)
    return {"satisfied": satisfied} if satisfied else {}


def _blocked(unreachable: dict[int, list[int]]) -> None:
    """Pending deletions whose node is not connected: the rest of the request was served; these stay
    pending (a lost node blocks the deletions of its own shard only)."""
    if unreachable:
        what = "; ".join(f"request {r} at shard(s) {', '.join(map(str, sorted(s)))}"
                         for r, s in sorted(unreachable.items()))
        raise ForgetError(f"still pending, their node is not connected: {what}; start it and run the forget "
                          "resume again")


def _satisfied(run: RunDir, gone: list[int], site: str) -> list[dict[str, Any]]:
    """For each already-deleted id, the earlier deletion that satisfied it: its request and receipt
    (the model hash after it), or the data owner's tombstone when this run's ledger has none."""
    if not gone:
        return []
    receipts = {r["id"]: r for r in run.ledger.receipts(gone)}
    # an id this run's ledger never deleted was deleted by an earlier run over the same data (its tombstone)
    out = [{**receipts.get(i, {"id": i, "tombstoned": True}), **({"site": site} if site else {})} for i in sorted(gone)]
    log(INFO, "fairforget: already deleted (satisfied by an earlier request): %s",
        ", ".join(f"{r['id']} (request {r['request']})" if "request" in r else f"{r['id']} (tombstone)" for r in out))
    return out


def nodes_table(replies: list[Message]) -> tuple[dict[int, int], dict[int, int], dict[int, float]]:
    """From ``query.describe`` replies: node -> shard, shard -> live samples, shard -> DP epsilon spent."""
    for reply in replies:
        if reply.has_error():
            raise ForgetError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
    shard_of = {r.metadata.src_node_id: int(r.content[keys.METRICS][keys.SHARD]) for r in replies}
    sizes = {shard_of[r.metadata.src_node_id]: int(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies}
    spent = {shard_of[r.metadata.src_node_id]:
             payloads.decode(payloads.DpSpend, r.content[keys.CONFIG][keys.DP_JSON]).epsilon
             for r in replies if keys.DP_JSON in r.content[keys.CONFIG]}  # DP-SGD: each shard's epsilon
    return shard_of, sizes, spent


def unlearn_and_store(grid: Grid, run: RunDir, strategy: Any, messages: list[Message], request_no: int,
                      seed: int, naming: dict[str, Any] | None = None) -> str:
    """Send ``messages``; store each good reply (model, completion line), then the budget. Returns a
    one-line account of the failed shards ('' when none failed): they stay pending in the ledger."""
    failed: list[Message] = []
    failed_hash: list[int] = []
    t0 = time.perf_counter()
    outcomes = strategy.aggregate_unlearn(grid.send_and_receive(messages), failed)
    wall = time.perf_counter() - t0
    for shard, o in sorted(outcomes.items()):
        state = strategy.shard_arrays[shard].to_torch_state_dict()
        stored = state_hash(state)  # the receipt is what the server received and keeps, not what the node says
        if stored != o.result.hash_after:
            log(WARNING, "fairforget: shard %d: the weights received hash to %s, the node says %s: not stored",
                shard, stored, o.result.hash_after)
            failed_hash.append(shard)
            continue
        run.save_models({shard: state})
        site = {"site": grid.binding.site_of.get(shard, "")} if hasattr(grid, "binding") else {}
        run.ledger.complete([{**row, **site, **(naming or {})} for row in ledger_rows(request_no, {shard: o}, wall,
                                                                                     seed)])
        log(INFO, "fairforget: shard %d: %s (%s)%s, deletion capacity %d -> %d of %d", shard, o.decision,
            o.result.method, " finished after a crash" if o.result.resumed else "", o.capacity_before,
            o.capacity_after, o.capacity)
    run.save_budget(strategy.budget)
    left = run.ledger.pending().get(request_no, {})
    if not left:
        return ""
    what = "; ".join([f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed]
                     + [f"shard {k}: its weights do not match the hash it reported" for k in failed_hash]) \
        or "no reply in time"
    stored = ", ".join(str(k) for k in sorted(outcomes) if k not in failed_hash) or "none"
    log(WARNING, "fairforget: request %d: shard(s) %s failed (%s)", request_no, sorted(left), what)
    return (f"request {request_no}: deleted and stored at shard(s) {stored}; shard(s) "
            f"{', '.join(map(str, sorted(left)))} did not finish ({what}); finish them with `fairforget forget --run "
            f"{run.path} --resume` (a deployment: `fairforget request --run {run.path} --resume`, then its flwr run)")


def reconcile(grid: Grid, run: RunDir, strategy: Any, pending: dict[int, dict[int, dict[str, Any]]],
              node_of: dict[int, int], seed: int) -> list[int]:
    """Finish every pending (request, shard) of the ledger: send the recorded decision again and
    store the reply. Returns the requests that are now complete."""
    complete = []
    for request_no, plans in sorted(pending.items()):
        missing = sorted(set(plans) - set(node_of))
        if missing:
            raise ForgetError(f"request {request_no} is unfinished at shard(s) {missing}, whose node is not "
                              "connected; start it and resume (`fairforget forget --resume`, or `fairforget request "
                              "--resume` in a deployment)")
        log(INFO, "fairforget: finishing request %d at shard(s) %s (left unfinished by an earlier run)",
            request_no, sorted(plans))
        failed = unlearn_and_store(grid, run, strategy, strategy.plan_unlearn(plans, node_of), request_no, seed)
        if failed:
            raise ForgetError(failed)
        complete.append(request_no)
    return complete


def _describe(node: int, ids: list[int], records: list[str] | None = None) -> Message:
    """A ``query.describe`` to one node: which of these ids (or of its own record ids) it holds."""
    config = ConfigRecord({keys.FORGET_IDS: list(ids)})
    if records:
        config[keys.FORGET_RECORDS] = list(records)
    return Message(RecordDict({keys.CONFIG: config}), dst_node_id=node, message_type=keys.MSG_DESCRIBE)


def _site_ids(replies: list[Message], records: list[str], site: str) -> tuple[list[int], list[int]]:
    """(the sample ids a site's describe reply gives for its record ids that it holds, those it has
    already deleted); an unknown record refuses the whole request (nothing changed)."""
    (reply,) = replies
    if reply.has_error():
        raise ForgetError(f"site {site!r} failed: {reply.error.reason}")
    info = reply.content[keys.CONFIG]
    unknown = [str(r) for r in info.get(keys.UNKNOWN_RECORDS, [])]
    if unknown:
        raise ForgetError(f"unknown record id(s) at site {site!r} (not a training member there): {', '.join(unknown)}")
    return [int(i) for i in info[keys.OWNED_IDS]], [int(i) for i in info[keys.DELETED_IDS]]


def _request_ids(run: RunDir, request_no: int) -> list[int]:
    return sorted(int(i) for e in run.ledger.entries() if e["request"] == request_no for i in e["ids"])


def _record_figures(run: RunDir, cfg: RunConfig, bundle: Any, grid: Any, strategy: Any, metrics: dict[str, Any],
                    request_no: int) -> dict[str, Any]:
    """The request's entry in metrics.json, from its completion lines and the shards' replies."""
    rows = {int(e["shard"]): e for e in run.ledger.entries() if e["request"] == request_no}
    if not rows:
        return metrics
    states = run.load_models()
    evaluation = (evaluate_states(states, bundle, cfg, strategy.predictor(), cache=cfg.out_path / EVAL_CACHE)
                  if bundle is not None
                  else evaluate_at_sites(grid, cfg, strategy, states))
    wall = max(float(e.get("request_wall_seconds", e.get("wall_seconds", 0.0))) for e in rows.values())
    return updated_metrics(metrics, request_no, rows, strategy.shard_reports, evaluation, wall)


def _finish(run: RunDir, cfg: RunConfig, bundle: Any, grid: Grid, strategy: Any, metrics: dict[str, Any],
            before: dict[int, Any], ids: list[int], phases: Phases, request_no: int) -> None:
    """Figures after the deletions: DP block, the audit before and after, report; the entry of
    ``request_no`` (the last request this run completed) gets the driver's ``timing`` up to the report."""
    with phases("evaluation"):
        after = run.load_models()
        metrics["dp"] = dp_metrics(cfg, strategy, run.calibration(), metrics.get("dp"))
    with phases("audit"):
        if cfg.audit and bundle is None:  # the data stays at the sites: each site audits on its own data
            metrics["privacy"] = federated_audit(grid, run, cfg, None, after, deleted=set(), dp=metrics["dp"],
                                                 strategy=strategy)
        elif cfg.audit and ids and metrics["unlearning"]:
            deleted = run.ledger.unlearned_ids() | Tombstones.for_data(cfg, bundle.records, run_dir=run.path).ids()
            metrics["unlearning"][-1]["audit"] = {
                "deleted_vs_nonmembers_auc_before": unlearning_audit(cfg, bundle, before, ids, run,
                                                                     strategy.predictor()),
                "deleted_vs_nonmembers_auc_after": unlearning_audit(cfg, bundle, after, ids, run, strategy.predictor()),
            }
            metrics["unlearning"][-1]["privacy_before"] = headline(metrics.get("privacy"))
            metrics["privacy"] = federated_audit(grid, run, cfg, bundle, after, deleted=deleted, dp=metrics["dp"],
                                                 strategy=strategy)
            metrics["unlearning"][-1]["privacy_after"] = headline(metrics["privacy"])
    for entry in metrics["unlearning"]:
        if entry["request"] == request_no:
            entry["timing"] = phases.timing()
    with phases("report"):
        run.write_metrics(metrics)
        write_report(run.path)


def route(replies: list[Any], ids: list[int]) -> tuple[dict[int, list[int]], list[int]]:
    """(``node_id -> ids it owns``, the asked ids some node has already deleted); raises
    :class:`ForgetError` for ids no node holds or deleted."""
    owned: dict[int, list[int]] = {}
    deleted: set[int] = set()
    for reply in replies:
        if reply.has_error():
            raise ForgetError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
        info = reply.content[keys.CONFIG]
        mine = [int(i) for i in info[keys.OWNED_IDS] if int(i) in set(ids)]
        if mine:
            owned[reply.metadata.src_node_id] = mine
        deleted |= {int(i) for i in info[keys.DELETED_IDS]} & set(ids)
    held = {i for v in owned.values() for i in v}
    unknown = sorted(set(ids) - held - deleted)
    if unknown:
        raise ForgetError(f"unknown sample id(s) (in no shard): {', '.join(map(str, unknown))}")
    return owned, sorted(deleted - held)


def ledger_rows(request_no: int, outcomes: dict[int, UnlearnOutcome], wall: float, seed: int) -> list[dict[str, Any]]:
    """One completion line per shard: the decision, what it cost, the model hashes, the budget after,
    and what a replay needs (``fairforget verify``: seed, index version, code version)."""
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
            "num_examples": o.result.num_examples,
            "approx_deletions": o.result.approx_deletions,
            "restart_stage": o.result.restart_stage,
            "retrained_stages": o.result.retrained_stages,
            "seconds": o.result.seconds,
            "wall_seconds": o.result.wall_seconds,
            "request_wall_seconds": wall,
            "hash_before": o.result.hash_before,
            "hash_after": o.result.hash_after,
            "resumed": o.result.resumed,  # finished after a crash: the node had committed it before
            "seed": seed,
            "index_version": o.result.index_version,
            "code_version": CODE_VERSION,
            # augmented shards: what happened to the generator and its samples (clients/augment.py)
            **dict(o.result.augment or {}),
        }
        for shard, o in sorted(outcomes.items())
    ]


def updated_metrics(metrics: dict[str, Any], request_no: int, rows: dict[int, dict[str, Any]],
                    shard_reports: dict[int, dict[str, Any]], evaluation: dict[str, Any],
                    wall: float) -> dict[str, Any]:
    """metrics.json after request ``request_no``, from its completion lines (shard -> line)."""
    seconds = sum(float(r["seconds"]) for r in rows.values())
    full = float(metrics["timing"]["full_retrain_seconds"])
    for row in metrics["shards"]:
        line = rows.get(row["shard"])
        if line is not None:
            row.update(num_examples=line["num_examples"], model_hash=line["hash_after"])
            if row["shard"] in shard_reports:
                row["kl_bias"] = float(shard_reports[row["shard"]][keys.KL_BIAS])
        row["accuracy_unbiased"] = evaluation["unbiased"]["per_model_accuracy"].get(row["shard"])
    metrics["ensemble"] = evaluation_summary(evaluation)
    metrics["unlearning"] = [u for u in metrics["unlearning"] if u["request"] != request_no]
    metrics["unlearning"].append({
        "request": request_no,
        "ids": sorted(int(i) for r in rows.values() for i in r["ids"]),
        "shards": sorted(rows),
        "restart_stages": {str(k): r["restart_stage"] for k, r in sorted(rows.items())},
        "seconds": seconds,
        "wall_seconds": wall,
        "full_retrain_seconds": full,
        "speedup_vs_full_retrain": full / seconds if seconds > 0 else None,
        "accuracy_biased": evaluation["biased"]["accuracy"],
        "accuracy_unbiased": evaluation["unbiased"]["accuracy"],
        "worst_group_accuracy": evaluation["unbiased"]["worst_group"]["accuracy"],
        "resumed_shards": sorted(k for k, r in rows.items() if r.get("resumed")),
        "budget": {str(k): {"method": r["method"], "decision": r["decision"], "capacity_before": r["capacity_before"],
                            "capacity_after": r["capacity_after"], "capacity": r["capacity"],
                            "approx_deletions": r["approx_deletions"]}
                   for k, r in sorted(rows.items())},
    })
    return metrics
