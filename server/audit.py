"""The run's privacy audit, where the data is: every site audits its own shard model (``query.audit``,
:mod:`fairforget.audit.site`: all configured attacks, reference models trained at the site on its own
held-out data, ROC statistics back) while the server audits the ensemble
(:func:`fairforget.audit.suite.run_audit`); the sites work in parallel with each other (Ray workers in
simulation) and with the server.

What travels: under ``site-audit-scope = "shard"`` (the default) the audit message carries no
weights, a site audits the model it serves and says which (its hash, checked against the model the
server holds); under ``"ensemble"`` every site receives every shard's weights and audits the ensemble
too. A strategy that keeps no shard models (``keeps_shard_models`` False: FedAvg) sends its one
global model, which every client already trains from; the message says which (``model-target``), so
a site never needs the strategy's name. The server's audit of the ensemble scores it as the
strategy's predictor combines it (:meth:`strategies.base.FairforgetStrategy.predictor`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fairforget import keys
from fairforget.audit.site import SiteAudit
from fairforget.audit.suite import run_audit, with_sites
from fairforget.config import ConfigError, RunConfig
from fairforget.data import DataBundle
from fairforget.model import num_classes_of
from fairforget.records import pack_shards
from fairforget.run import RunDir
from fairforget.schemas import payloads
from fairforget.storage import state_hash
from strategies import build_strategy, strategy_class
from strategies.base import FairforgetStrategy


def federated_audit(grid: Any, run: RunDir, cfg: RunConfig, bundle: DataBundle | None,
          states: dict[int, dict[str, torch.Tensor]], deleted: set[int],
          dp: dict[str, Any] | None = None, strategy: Any = None) -> dict[str, Any]:
    """The ``privacy`` block of metrics.json: the sites' audits of their shard models, asked for
    first and answered while the server audits the ensemble (skipped when the server holds no data,
    ``bundle`` None) with the run's ``strategy``'s predictor (none given: the one ``cfg`` builds).
    ``seconds`` is the audit's wall time; ``server_seconds`` and ``sites_seconds`` its two parts,
    which overlap."""
    t0 = time.perf_counter()
    if strategy is None:
        strategy = build_strategy(cfg, bundle.num_classes) if bundle is not None else strategy_class(cfg.strategy)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="site-audits") as pool:
        asked = pool.submit(_timed, site_audits, grid, cfg, states, strategy)
        server = None if bundle is None else run_audit(run, cfg, bundle, states, deleted=deleted, shards=False,
                                                       predictor=strategy.predictor())
        sites, sites_seconds = asked.result()
    privacy = with_sites(server, sites, cfg, dp)
    privacy["server_seconds"] = server["seconds"] if server else 0.0
    privacy["sites_seconds"] = sites_seconds
    privacy["seconds"] = time.perf_counter() - t0
    return privacy


def site_audits(grid: Any, cfg: RunConfig, states: dict[int, dict[str, torch.Tensor]],
                strategy: Any = None) -> dict[str, Any]:
    """Ask every site for its audit; ``{site name: SiteAudit fields}``, or ``{"error": ...}`` for a
    node that failed or audited another model than the one the server holds for its shard (the
    global model, for a strategy that keeps no shard models)."""
    keeps = _capabilities(cfg, strategy).keeps_shard_models
    messages = audit_messages(grid, cfg, states, strategy)
    out: dict[str, Any] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            out[f"node-{reply.metadata.src_node_id}"] = {"error": reply.error.reason}
            continue
        result = SiteAudit.from_records(reply.content)
        name = result.site or f"site-{result.shard}"
        served = states.get(result.shard) if keeps else states.get(0)
        if served is None or state_hash(served) != result.model_hash:
            out[name] = {"shard": result.shard, "error": (
                f"the site audited model {result.model_hash[:12]}, not the model the server holds for its shard")}
            continue
        out[name] = asdict(result)
    return dict(sorted(out.items()))


def audit_messages(grid: Any, cfg: RunConfig, states: dict[int, dict[str, torch.Tensor]],
                   strategy: Any = None) -> list[Message]:
    """One ``query.audit`` per node: the scope, the site's target (its own shard model, or the global
    model the message carries: the strategy's ``keeps_shard_models``), and weights only where the scope
    or the global model needs them."""
    keeps = _capabilities(cfg, strategy).keeps_shard_models
    arrays, config = None, {keys.AUDIT_SCOPE: cfg.site_audit_scope,
                            keys.MODEL_TARGET: keys.TARGET_OWN_SHARD if keeps else keys.TARGET_SENT}
    if not keeps:
        arrays = pack_shards({0: ArrayRecord(states[0])})
    elif cfg.site_audit_scope == "ensemble":
        arrays = pack_shards({k: ArrayRecord(v) for k, v in states.items()})
        config[keys.ENSEMBLE_RULE] = payloads.encode(payloads.EnsembleRule, ensemble_rule(cfg, states, strategy))
    messages = []
    for node in _audit_nodes(grid):
        content = RecordDict({keys.CONFIG: ConfigRecord(dict(config))})
        if arrays is not None:
            content[keys.ARRAYS] = arrays
        messages.append(Message(content, dst_node_id=node, message_type=keys.MSG_AUDIT))
    return messages


def ensemble_rule(cfg: RunConfig, states: dict[int, dict[str, torch.Tensor]], strategy: Any) -> dict[str, Any]:
    """How the strategy's predictor combines ``states`` (vote and weights), for the sites' audits of the
    ensemble: the same rule the server's evaluation and audit use. A predictor with its own combination
    code cannot travel: a one-line ConfigError naming ``site-audit-scope``."""
    num_classes = num_classes_of(next(iter(states.values())))
    if not isinstance(strategy, FairforgetStrategy):  # none given, or its class: the one the run config builds
        strategy = build_strategy(cfg, num_classes)
    ensemble = strategy.predictor()(states, num_classes, cfg.model_width)
    try:
        return ensemble.rule()
    except ValueError as exc:
        raise ConfigError(f"config key 'site-audit-scope' = 'ensemble': {exc}") from None


def _capabilities(cfg: RunConfig, strategy: Any) -> Any:
    """The run's strategy (or, none given, its registered class): what it declares."""
    return strategy if strategy is not None else strategy_class(cfg.strategy)


def _audit_nodes(grid: Any) -> list[int]:
    """The nodes bound to the run's shards where the grid keeps a binding (``server.grid``), else all."""
    bound = getattr(grid, "bound_nodes", None)
    return list(bound() if bound is not None else grid.get_node_ids())


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0
