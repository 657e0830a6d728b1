"""The augmentation driver (``augment = true``): bias-aware diffusion augmentation on every shard, then
step-wise unlearning of the originals (Pan et al. 2024, as this project reads it).

Reads top to bottom: train the fidelity classifiers on the held-out split; step 0 asks every node to
train its generator and augment its shard until its bias is below the threshold (``train.augment``);
each later step asks every node to retire ``augment-retire-per-step`` originals (exact SISA
unlearning from its classifier) and to replenish the groups they leave short; after every step the
ensemble is evaluated and audited. The result is the three-row comparison the report shows: vanilla,
augmented, augmented + step-wise unlearning, with bias, accuracy, worst group and membership
inference on the original members.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fairforget import ledger
from fairforget.audit.suite import membership
from fairforget.config import RunConfig
from fairforget.data import DataBundle
from fairforget.diffusion.quality import FidelityClassifiers
from fairforget.run import RunDir
from fairforget.unlearning import EXACT
from server.evaluation import evaluate_states

MIA_KEYS = ("auc", "tpr_at_0.01_fpr")


def run_augmentation(grid: Grid, cfg: RunConfig, strategy: Any, bundle: DataBundle, run: RunDir,
                     states: dict[int, dict[str, torch.Tensor]], vanilla_eval: dict[str, Any],
                     ) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Returns the ``augmentation`` block of metrics.json, the final shard models (also saved) and
    their evaluation."""
    t_start = time.perf_counter()
    originals = [int(i) for i in bundle.train.ids.tolist()]
    fidelity = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=cfg.seed)
    fidelity_arrays = ArrayRecord(fidelity.state())
    rows = [_row("vanilla", vanilla_eval, None, _mia(cfg, bundle, states, originals, run, strategy.predictor()), [])]

    steps: list[dict[str, Any]] = []
    retired: list[int] = []
    for step in range(cfg.augment_steps + 1):
        # the strategy grants each shard's retirements from its deletion budget
        messages = strategy.configure_augment(step, cfg.augment_retire_per_step, fidelity_arrays)
        grants = strategy.granted()
        log(INFO, "fairforget: augmentation step %d (originals to retire per shard: %s)", step, grants)
        t0 = time.perf_counter()
        shard_steps = dict(sorted(strategy.aggregate_augment(grid.send_and_receive(messages)).items()))
        wall = time.perf_counter() - t0
        states = {k: strategy.shard_arrays[k].to_torch_state_dict() for k in sorted(strategy.shard_arrays)}
        run.save_models(states)
        step_retired = sorted(i for rep in shard_steps.values() for i in rep["retired_ids"])
        retired += step_retired
        if step_retired:
            run.ledger.append(_ledger_rows(run.ledger.next_request(), step, shard_steps))
        evaluation = evaluate_states(states, bundle, cfg, strategy.predictor())
        live = sorted(set(originals) - set(retired))
        record = {
            "step": step, "retired": len(step_retired), "granted": {str(k): g for k, g in grants.items()},
            "wall_seconds": wall,
            "accuracy_unbiased": evaluation["unbiased"]["accuracy"],
            "worst_group_accuracy": evaluation["unbiased"]["worst_group"]["accuracy"],
            "shards": {str(k): _shard_summary(rep) for k, rep in shard_steps.items()},
            "missing_shards": sorted(set(grants) - set(shard_steps)),  # no reply in time (min-shards allowed it)
            "mia_live_originals": _mia(cfg, bundle, states, live, run, strategy.predictor()),
        }
        if retired:
            record["mia_retired_originals"] = _mia(cfg, bundle, states, retired, run, strategy.predictor())
        steps.append(record)
        if step == 0:
            rows[0]["kl_per_shard"] = {str(k): rep["kl_before"] for k, rep in shard_steps.items()}
            rows.append(_row("augmented", evaluation, shard_steps, record["mia_live_originals"], []))
    if cfg.augment_steps > 0:
        rows.append(_row("augmented + step-wise unlearning", evaluation, shard_steps,
                         steps[-1].get("mia_retired_originals"), retired, steps[-1]["mia_live_originals"]))
    return {
        "groups": cfg.augment_groups,
        "kl_threshold": cfg.augment_kl_threshold,
        "fidelity_classifiers_accuracy_unbiased": fidelity.accuracy(bundle.test_unbiased),
        "rows": rows,
        "steps": steps,
        "retired_ids": retired,
        "seconds": time.perf_counter() - t_start,
    }, states, evaluation


# ---------------------------------------------------------------------- helpers
def _mia(cfg: RunConfig, bundle: DataBundle, states: dict[int, dict[str, torch.Tensor]], ids: list[int],
         run: RunDir, predictor: Any = None) -> dict[str, dict[str, float]]:
    if not ids:
        return {}
    full = membership(cfg, bundle, states, ids, run, bootstrap=0, predictor=predictor)
    return {attack: {k: float(r[k]) for k in MIA_KEYS} for attack, r in full.items()}


def _row(name: str, evaluation: dict[str, Any], shard_steps: dict[int, Any] | None,
         mia: dict[str, Any] | None, retired: list[int], mia_live: dict[str, Any] | None = None) -> dict[str, Any]:
    kl = {str(k): rep["kl_after"] for k, rep in shard_steps.items()} if shard_steps else None
    row = {
        "name": name,
        "accuracy_biased": evaluation["biased"]["accuracy"],
        "accuracy_unbiased": evaluation["unbiased"]["accuracy"],
        "worst_group": evaluation["unbiased"]["worst_group"],
        "kl_per_shard": kl,
        "mia": mia,  # vanilla, augmented: all originals (members); last row: the retired (unlearned) originals
        "num_retired": len(retired),
    }
    if mia_live is not None:
        row["mia_remaining_originals"] = mia_live
    return row


def _shard_summary(rep: dict[str, Any]) -> dict[str, Any]:
    keep = ("kl_before", "kl_after", "kl_after_judged", "generated", "num_originals", "num_synthetic",
            "generator_version", "generator_trained", "generator_seconds", "sampling_seconds", "retrain_seconds",
            "restart_stage", "seconds", "quality", "filter", "retire_order")
    return {k: rep[k] for k in keep if k in rep}


def _ledger_rows(request_no: int, step: int, shard_steps: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "request": request_no,
            "shard": shard,
            "ids": rep["retired_ids"],
            "method": EXACT,
            "decision": ledger.RETIRE_ORIGINAL,
            "augment_step": step,
            "replenished": rep["generated"],
            "generator_version": rep["generator_version"],
            "restart_stage": rep["restart_stage"],
            "seconds": rep["retrain_seconds"],
            "hash_before": rep["hash_before"],
            "hash_after": rep["hash_after"],
        }
        for shard, rep in sorted(shard_steps.items()) if rep["retired_ids"]
    ]
