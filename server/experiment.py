"""The training driver (``mode = simulate``): train the shards, evaluate, write the run's files.

Reads top to bottom: build the data and the strategy, run Flower's strategy loop (one SISA slice
per round for the shard ensemble), save the constituent models, then the figures and the report.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fairforget import keys
from fairforget.audit.suite import check_audit_config
from fairforget.config import ConfigError, RunConfig
from fairforget.data import DataBundle, load_dataset
from fairforget.privacy.accountant import BOUND_FPRS
from fairforget.privacy.gdp import tpr_bound
from fairforget.privacy.reporting import dp_block
from fairforget.report import write_report
from fairforget.run import RunDir
from fairforget.schemas import METRICS_SCHEMA_VERSION, payloads
from fairforget.tombstones import Tombstones
from server.audit import federated_audit
from server.augment import run_augmentation
from server.evaluation import EVAL_CACHE, RoundEvaluator, evaluate_at_sites, evaluate_states
from server.grid import SiteGrid, site_grid
from strategies import build_strategy, check_config, strategy_class


def run_training(grid: Grid, cfg: RunConfig) -> None:
    run = RunDir(cfg.out_path)
    if cfg.dp and cfg.dp_calibrate != "none":
        raise ConfigError(f"dp-calibrate = {cfg.dp_calibrate!r} is resolved before the run starts: use `fairforget "
                          "simulate`, or `fairforget calibrate` and pass the dp-noise-multiplier it prints")
    check_config(strategy_class(cfg.strategy), cfg)  # what the strategy supports (augment, dp): before any write
    grid = site_grid(grid, cfg)  # the node binding (a bad binding file: one line, nothing written), timeouts, wire log
    run.write_config(cfg)
    if not cfg.server_has_data:  # sites with their own data: the server keeps none
        return run_training_at_sites(grid, cfg, run)
    bundle = load_dataset(cfg)
    if cfg.audit:
        check_audit_config(cfg, bundle)
    strategy = build_strategy(cfg, bundle.num_classes)
    evaluator = RoundEvaluator(strategy, bundle, cfg)

    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(bundle.num_classes),
        num_rounds=strategy.num_rounds(),
        train_config=ConfigRecord({keys.SEED: cfg.seed}),
        evaluate_fn=evaluator,
        timeout=cfg.reply_timeout,
    )
    train_wall = time.perf_counter() - t0

    states = strategy.ensemble_states(result.arrays)
    run.save_models(states)
    # each model's test outputs kept in the run folder: a later deletion scores only the shards it retrained
    evaluation = evaluate_states(states, bundle, cfg, strategy.predictor(), cache=run.path / EVAL_CACHE)
    augmentation = None
    if cfg.augment:  # diffusion augmentation, then step-wise unlearning of the originals
        augmentation, states, evaluation = run_augmentation(grid, cfg, strategy, bundle, run, states, evaluation)
    metrics = training_metrics(cfg, data_summary(bundle), strategy.shard_reports, evaluator.history, evaluation,
                               train_wall)
    metrics["federation"] = federation(strategy, grid)
    metrics["dp"] = dp_metrics(cfg, strategy, run.calibration())
    if augmentation is not None:
        metrics["augmentation"] = augmentation
        metrics["timing"]["augmentation_seconds"] = augmentation["seconds"]
        run.save_budget(strategy.budget)  # the retirements' spend, where a later forget goes on from
    if cfg.audit:
        retired = set(augmentation["retired_ids"]) if augmentation else set()
        deleted = retired | Tombstones.for_data(cfg, bundle.records, run_dir=run.path).ids()  # replaced runs' too
        metrics["privacy"] = federated_audit(grid, run, cfg, bundle, states, deleted=deleted, dp=metrics["dp"],
                                             strategy=strategy)
        metrics["timing"]["audit_seconds"] = metrics["privacy"]["seconds"]
    run.write_metrics(metrics)
    run.ledger.ensure()
    write_report(run.path)
    log(INFO, "fairforget: metrics and report written to %s", run.path)


def run_training_at_sites(grid: SiteGrid, cfg: RunConfig, run: RunDir) -> None:
    """Training when the data stays at the sites (the server has no ``data-root``): the task's label
    counts come from the sites' ``query.identify`` replies; evaluation and audits run at the sites, on
    their own data, and return statistics only."""
    if cfg.augment:
        raise ConfigError("augment = true needs the server's own held-out data (its fidelity classifiers); "
                          "with the data at the sites, run without augmentation")
    num_classes, num_private = grid.task()
    strategy = build_strategy(cfg, num_classes)
    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(num_classes),
                            num_rounds=strategy.num_rounds(), train_config=ConfigRecord({keys.SEED: cfg.seed}),
                            timeout=cfg.reply_timeout)
    train_wall = time.perf_counter() - t0
    states = strategy.ensemble_states(result.arrays)
    run.save_models(states)
    evaluation = evaluate_at_sites(grid, cfg, strategy, states)
    info = {"name": cfg.dataset, "num_train": sum(int(r[keys.NUM_EXAMPLES]) for r in strategy.shard_reports.values()),
            "num_heldout": None, "num_test_biased": evaluation["biased"]["n"],
            "num_test_unbiased": evaluation["unbiased"]["n"], "num_classes": num_classes, "num_private": num_private}
    metrics = training_metrics(cfg, info, strategy.shard_reports, [], evaluation, train_wall)
    metrics["federation"] = federation(strategy, grid)
    metrics["dp"] = dp_metrics(cfg, strategy, run.calibration())
    if cfg.audit:
        metrics["privacy"] = {**federated_audit(grid, run, cfg, None, states, deleted=set(), dp=metrics["dp"],
                                                strategy=strategy),
                              "note": "the data stays at the sites: each site audits on its own data"}
        metrics["timing"]["audit_seconds"] = metrics["privacy"]["seconds"]
    run.write_metrics(metrics)
    run.ledger.ensure()
    write_report(run.path)
    log(INFO, "fairforget: metrics and report written to %s", run.path)


def federation(strategy: Any, grid: Any) -> dict[str, Any]:
    """Which shard served which site, and which shards the run ended without or with a stale model."""
    report = strategy.federation_report(strategy.num_rounds()) if hasattr(strategy, "federation_report") else {}
    binding = getattr(grid, "binding", None)
    return {**report, "binding": dict(binding.as_dict()) if binding is not None else {}}


def data_summary(bundle: DataBundle) -> dict[str, Any]:
    return {"name": bundle.name, "num_train": len(bundle.train), "num_heldout": len(bundle.heldout),
            "num_test_biased": len(bundle.test_biased), "num_test_unbiased": len(bundle.test_unbiased),
            "num_classes": bundle.num_classes, "num_private": bundle.num_private}


def dp_metrics(cfg: RunConfig, strategy: Any, calibration: dict[str, Any] | None,
               previous: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``dp`` block of metrics.json: each shard's cumulative DP-SGD spend as its node last
    reported it (shards that did not reply keep their ``previous`` figures), or FedAvg's user-level
    spend, and the ensemble's; None without DP."""
    if not cfg.dp:
        return None
    summary = getattr(strategy, "privacy_summary", None)
    if summary is not None:  # FedAvg: user-level DP through Flower's wrappers
        spent = summary()
        if not spent:
            return None
        # one record's membership changes its client's data, not the client's presence: a substitution,
        # at most twice the add/remove sensitivity, so record-level attacks face 2 mu (the audit's bound)
        mu = 2.0 * spent["mu"]
        record = {**spent, "mu": mu, "tpr_bound": {f"{f:g}": tpr_bound(mu, f) for f in BOUND_FPRS},
                  "note": "record level: 2 x the user-level mu (a record's membership substitutes its client's data)"}
        return {**spent, "ensemble": record, "shards": {}, "calibration": calibration}
    shards = {int(k): v for k, v in ((previous or {}).get("shards") or {}).items()}
    shards.update({k: payloads.decode(payloads.DpSpend, r[keys.DP_JSON]).to_json()
                   for k, r in strategy.shard_reports.items() if keys.DP_JSON in r})
    return dp_block(cfg, shards, calibration)


def training_metrics(cfg: RunConfig, data: dict[str, Any], shard_reports: dict[int, dict[str, Any]],
                     history: list[dict[str, Any]], evaluation: dict[str, Any], train_wall: float) -> dict[str, Any]:
    shards = [shard_row(k, shard_reports[k], evaluation) for k in sorted(shard_reports)]
    return {
        "schema_version": METRICS_SCHEMA_VERSION,
        "run": {
            "dataset": data["name"], "strategy": cfg.strategy, "num_shards": cfg.num_shards,
            "slices": cfg.slices, "rho": cfg.rho, "class_imbalance": cfg.class_imbalance, "seed": cfg.seed,
            **{k: v for k, v in data.items() if k != "name"},
        },
        "rounds": history,
        "ensemble": evaluation_summary(evaluation),
        "shards": shards,
        "timing": {
            "train_wall_seconds": train_wall,
            "full_retrain_seconds": sum(s["train_seconds"] for s in shards),
        },
        "unlearning": [],
    }


def shard_row(shard: int, report: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    per_model = evaluation["unbiased"]["per_model_accuracy"]
    return {
        "shard": shard,
        "num_examples": int(report["num-examples"]),
        "kl_bias": float(report["kl-bias"]),
        "train_seconds": float(report["train-seconds"]),
        "model_hash": report.get("model-hash", ""),
        "accuracy_unbiased": per_model.get(shard, per_model.get(0)),
    }


def evaluation_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "accuracy": ev["accuracy"], "n": ev["n"], "worst_group": ev["worst_group"], "groups": ev["groups"],
        }
        for name, ev in evaluation.items()
    }
