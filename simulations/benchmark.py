"""Benchmark: what SISA unlearning saves, and what Flower's simulation engine costs.

Two measurements, taken one after the other in one run and printed as two tables:

(a) SISA unlearning cost. For S shards and R slices on the embedded Biased-Digits data (every other
    key at its ``pyproject.toml`` default), train all S shards from scratch in this process
    (:class:`fairforget.sisa.SisaShard`, in a temporary folder) and sum their training seconds: the
    cost of a full retrain. Then delete single training samples, drawn at random with a seeded
    numpy Generator, one request at a time (successively, on the same shards), with
    :func:`fairforget.unlearning.exact.unlearn`, and take the mean seconds of one deletion. Reported:
    the measured speed-up full / unlearn; SISA's expectation 2RS/(R+1) (Bourtoule et al. 2021,
    whose cost model keeps a shard's total training cost fixed as R grows); and the expectation for
    this project's schedule, in which every stage trains ``epochs-per-slice`` epochs: stage r costs
    r slice-units, a full shard R(R+1)/2, a deletion in slice k (uniform over 1..R) retrains stages
    k..R, so the expected speed-up is S * (R(R+1)/2) / mean_k(sum_{r=k..R} r).

(b) Flower engine overhead, at two workloads: the demo's (the defaults, audit off) and one about
    ten times larger (``model-width`` 16, ``epochs-per-slice`` 12). Each is one run through Flower's
    simulation engine (:func:`fairforget.runner.run_flower`), timed end to end; ``metrics.json``
    gives the wall time of the strategy loop (``timing.train_wall_seconds``) and the difference is
    the time spent outside it (engine start-up and shutdown, plus the ServerApp's own set-up and
    wrap-up), reported apart. The same SISA training is then run in a plain PyTorch loop in this
    process, shard after shard, and the strategy loop's per-round server-side evaluation is redone
    in-process and timed, so the loop can be compared with and without it.

Torch runs on ``num-threads`` threads (default 1) throughout, so runs are comparable.

Run from the repository root (about 2 minutes with ``--quick``, a few more without; on 2 cores)::

    python simulations/benchmark.py                 # S in {4, 8}, R in {1, 4}, 4 deletions each; both workloads
    python simulations/benchmark.py --quick         # S = 4 only, 2 deletions each; demo workload only
    python simulations/benchmark.py --parts b       # only the Flower overhead, at both workloads (about 8 min)
    python simulations/benchmark.py --out runs/bench.json

The figures also go to ``--out`` (default ``runs/benchmark.json``) as JSON, and a full run (not
``--quick``, not ``--no-page``) writes its results pages, stamped: part (a) ``docs/results/unlearning-speedup.md``,
part (b) ``docs/results/flower-overhead.md`` (:mod:`simulations.results_page`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairforget.config import ConfigError, RunConfig, resolve
from fairforget.data import load_dataset, shard_of
from fairforget.requests import Request
from fairforget.run import RunDir
from fairforget.runner import FlowerRunError, run_flower
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.storage import atomic_write_json
from fairforget.unlearning.exact import unlearn
from server.evaluation import RoundEvaluator, evaluate_states
from simulations.results_page import add_page_option, invocation, page_wanted, write_page
from strategies import build_strategy

DEFAULT_OUT = Path("runs/benchmark.json")


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures."""

    shard_counts: tuple[int, ...]      # S values of part (a)
    slice_counts: tuple[int, ...]      # R values of part (a)
    deletions: int                     # one-sample deletions per (S, R)
    flower: dict[str, dict[str, Any]]  # part (b): workload name -> run-config overrides


# The audit trains reference models after the strategy loop; it would count as engine overhead.
DEMO_RUN: dict[str, Any] = {"audit": False}
LARGE_RUN: dict[str, Any] = {"audit": False, "model-width": 16, "epochs-per-slice": 12}
PLANS = {
    "full": Plan(shard_counts=(4, 8), slice_counts=(1, 4), deletions=4, flower={"demo": DEMO_RUN, "10x": LARGE_RUN}),
    "quick": Plan(shard_counts=(4,), slice_counts=(1, 4), deletions=2, flower={"demo": DEMO_RUN}),
}


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Measure SISA unlearning speed-ups (in-process) and Flower simulation-engine overhead.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="S = 4 only and 2 deletions per setting (about 2 minutes on 2 cores)")
    parser.add_argument("--parts", default="a,b", help="which parts to run: a, b or a,b (default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the figures as JSON (default {DEFAULT_OUT})")
    add_page_option(parser)
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"a", "b"}:
        parser.error(f"--parts takes a, b or a,b, got {','.join(sorted(args.parts)) or 'nothing'}")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give a file name such as {args.out / 'benchmark.json'}")
    return args


# ---------------------------------------------------------------------- expectations
def sisa_expected_speedup(shards: int, slices: int) -> float:
    """Bourtoule et al.'s expected speed-up of one deletion over retraining all shards."""
    return 2.0 * slices * shards / (slices + 1)


def schedule_expected_speedup(shards: int, slices: int) -> float:
    """The same for this project's schedule (every stage trains epochs-per-slice epochs)."""
    full_units = slices * (slices + 1) / 2
    mean_retrain_units = float(np.mean([sum(range(k, slices + 1)) for k in range(1, slices + 1)]))
    return shards * full_units / mean_retrain_units


# ---------------------------------------------------------------------- (a) unlearning cost
def bench_unlearning(cfg: RunConfig, deletions: int, workdir: Path) -> dict[str, Any]:
    """Train ``cfg.num_shards`` SISA shards from scratch, then time ``deletions`` one-sample deletions."""
    S, R = cfg.num_shards, cfg.slices
    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    shards = [SisaShard(workdir / f"shard-{k}", k, data, settings) for k, data in enumerate(shard_of(cfg, bundle))]

    full_seconds = sum(shard.train_through() for shard in shards)

    owner = {i: k for k, shard in enumerate(shards) for i in shard.live_ids()}
    rng = np.random.default_rng([cfg.seed, S, R])
    victims = rng.choice(np.asarray(sorted(owner)), size=deletions, replace=False)
    requests = []
    for sample_id in (int(v) for v in victims):
        shard = shards[owner[sample_id]]
        trained = shard.trained
        result = unlearn(shard, [sample_id])
        # Training compute alone (no checkpoint I/O), comparable with how full_seconds is counted.
        compute = float(sum(shard.index["stage_seconds"][result.restart_stage:trained]))
        requests.append({
            "id": sample_id, "shard": owner[sample_id], "restart_stage": result.restart_stage,
            "retrained_stages": result.retrained_stages, "seconds": result.seconds,
            "compute_seconds": compute,
        })

    mean_unlearn = float(np.mean([r["seconds"] for r in requests]))
    mean_compute = float(np.mean([r["compute_seconds"] for r in requests]))
    sisa, ours = sisa_expected_speedup(S, R), schedule_expected_speedup(S, R)
    speedup = full_seconds / mean_unlearn
    return {
        "shards": S, "slices": R, "num_train": len(bundle.train), "deletions": deletions,
        "full_retrain_seconds": full_seconds,
        "mean_unlearn_seconds": mean_unlearn,
        "mean_unlearn_compute_seconds": mean_compute,
        "speedup": speedup,
        "speedup_compute_only": full_seconds / mean_compute,
        "expected_sisa": sisa, "measured_over_sisa": speedup / sisa,
        "expected_schedule": ours, "measured_over_schedule": speedup / ours,
        "requests": requests,
    }


# ---------------------------------------------------------------------- (b) engine overhead
def bench_flower(cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    """One Flower simulation of ``cfg``, then the same SISA training in a plain in-process loop."""
    out = workdir / "flower-run"
    out.mkdir(parents=True)
    request = Request.simulate()
    cfg = cfg.replace(out_dir=str(out.resolve()), request=request.id)
    request.save(out)
    t0 = time.perf_counter()
    run_flower(cfg, quiet=True)
    flower_total = time.perf_counter() - t0
    timing = RunDir(out).metrics()["timing"]
    flower_loop = float(timing["train_wall_seconds"])

    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    t0 = time.perf_counter()
    shards = [SisaShard(workdir / "plain" / f"shard-{k}", k, data, settings)
              for k, data in enumerate(shard_of(cfg, bundle))]
    plain_compute = sum(shard.train_through() for shard in shards)
    plain_loop = time.perf_counter() - t0

    # What the strategy loop spends on its per-round server-side evaluation, redone here, so the
    # loop's remaining time can be set against the plain loop.
    evaluator = RoundEvaluator(build_strategy(cfg, bundle.num_classes), bundle, cfg)
    t0 = time.perf_counter()
    for stage in range(1, cfg.slices + 1):
        evaluate_states({shard.shard: shard.model_state(stage) for shard in shards}, evaluator.bundle, cfg)
    evaluation = time.perf_counter() - t0

    mapping = cfg.to_mapping()
    return {
        "config": {k: mapping[k] for k in ("num-shards", "slices", "epochs-per-slice", "model-width", "client-cpus",
                                           "num-threads", "audit")},
        "cpu_cores": os.cpu_count(),
        "flower_total_seconds": flower_total,
        "flower_loop_seconds": flower_loop,
        "flower_outside_loop_seconds": flower_total - flower_loop,
        "flower_client_compute_seconds": float(timing["full_retrain_seconds"]),
        "plain_loop_seconds": plain_loop,
        "plain_compute_seconds": plain_compute,
        "evaluation_seconds_in_process": evaluation,
        "loop_ratio": flower_loop / plain_loop,
        "loop_less_evaluation_ratio": (flower_loop - evaluation) / plain_loop,
        "client_compute_ratio": float(timing["full_retrain_seconds"]) / plain_compute,
    }


# ---------------------------------------------------------------------- report
def print_unlearning(rows: list[dict[str, Any]]) -> None:
    print("(a) SISA exact unlearning of one sample vs full retrain of all shards "
          f"(in-process, {torch.get_num_threads()} torch thread(s))")
    head = (f"{'S':>3} {'R':>3} {'full s':>8} {'unlearn s':>10} {'speed-up':>9} {'SISA 2RS/(R+1)':>15} "
            f"{'meas/SISA':>10} {'ours':>7} {'meas/ours':>10} {'compute-only':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shards']:>3} {r['slices']:>3} {r['full_retrain_seconds']:>8.2f} "
              f"{r['mean_unlearn_seconds']:>10.2f} {r['speedup']:>8.2f}x {r['expected_sisa']:>14.2f}x "
              f"{r['measured_over_sisa']:>10.2f} {r['expected_schedule']:>6.2f}x "
              f"{r['measured_over_schedule']:>10.2f} {r['speedup_compute_only']:>12.2f}x")
    print("full s: training seconds of all S shards from scratch; unlearn s: mean wall seconds of one deletion\n"
          f"({rows[0]['deletions']} random samples each; index update, checkpoint I/O and retraining);\n"
          "ours: S*(R(R+1)/2)/mean_k(sum_{r=k..R} r), the expectation when every stage trains the same epochs;\n"
          "compute-only: the speed-up from retraining compute alone (no checkpoint I/O), as full s counts it.")


def print_flower(name: str, fl: dict[str, Any]) -> None:
    c = fl["config"]
    print(f"(b) {name} workload: Flower simulation engine vs a plain PyTorch loop (S={c['num-shards']}, "
          f"R={c['slices']}, {c['epochs-per-slice']} epoch(s) per slice, width {c['model-width']}, audit off)")
    rows = [
        ("Flower run_flower, end to end", fl["flower_total_seconds"]),
        ("Flower strategy loop (train_wall_seconds)", fl["flower_loop_seconds"]),
        ("Flower outside the strategy loop", fl["flower_outside_loop_seconds"]),
        ("plain loop, shards one after another", fl["plain_loop_seconds"]),
        ("  training compute, Flower clients (sum)", fl["flower_client_compute_seconds"]),
        ("  training compute, plain loop (sum)", fl["plain_compute_seconds"]),
        (f"server-side evaluation x {c['slices']} rounds, in-process", fl["evaluation_seconds_in_process"]),
    ]
    for name, seconds in rows:
        print(f"{name:<44} {seconds:>8.2f} s")
    print(f"{'strategy loop / plain loop':<44} {fl['loop_ratio']:>8.2f}x")
    print(f"{'(strategy loop - evaluation) / plain loop':<44} {fl['loop_less_evaluation_ratio']:>8.2f}x")
    print(f"{'training compute, Flower clients / plain':<44} {fl['client_compute_ratio']:>8.2f}x")
    print(f"Flower runs the {c['num-shards']} clients in parallel, client-cpus={c['client-cpus']} CPU each "
          f"(Ray; {fl['cpu_cores']} cores here);\nthe plain loop runs them one after another in this process. "
          "The strategy loop also evaluates\nthe ensemble on the server after every round (the plain loop does not; "
          "its cost, redone in-process,\nis the evaluation row), and Ray starts the client workers during round 1, "
          "so their start-up is inside\nthe loop. Outside the loop = the rest of engine start-up/shutdown "
          "(SuperLink, simulation process)\nplus the ServerApp's data load, final evaluation, model saving and report.")


# ---------------------------------------------------------------------- results pages
SPEEDUP_MEASURES = ["fairforget/sisa.py", "fairforget/training.py", "fairforget/unlearning/exact.py",
                    "simulations/benchmark.py"]
OVERHEAD_MEASURES = ["server/experiment.py", "server/evaluation.py", "clients/", "strategies/shard_ensemble.py",
                     "fairforget/training.py", "simulations/benchmark.py"]


def speedup_markdown(results: dict[str, Any]) -> str:
    """Part (a) as the page shows it."""
    rows = results["unlearning"]
    lines = [f"In-process, {results['torch_threads']} torch thread(s); one random sample deleted at a time, "
             f"mean of {rows[0]['deletions']}; full retrain: training seconds of all S shards from scratch.", "",
             "| S | R | full retrain s | one deletion s | speed-up | SISA 2RS/(R+1) | measured / SISA | ours* "
             "| measured / ours | compute-only speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shards']} | {r['slices']} | {r['full_retrain_seconds']:.2f} | {r['mean_unlearn_seconds']:.2f} "
              f"| {r['speedup']:.2f}x | {r['expected_sisa']:.2f}x | {r['measured_over_sisa']:.2f} "
              f"| {r['expected_schedule']:.2f}x | {r['measured_over_schedule']:.2f} "
              f"| {r['speedup_compute_only']:.2f}x |" for r in rows]
    lines += ["", "\\* every stage trains `epochs-per-slice` epochs, so the expected speed-up is "
              "S R(R+1)/2 / mean_k(sum_{r=k..R} r); SISA's 2RS/(R+1) keeps a shard's total cost fixed as R grows. "
              "Compute-only: retraining compute alone, without checkpoint I/O, as the full retrain counts it."]
    return "\n".join(lines)


def overhead_markdown(results: dict[str, Any]) -> str:
    """Part (b) as the page shows it."""
    lines = ["Audit off; the same SISA training then runs shard after shard in one process (the plain loop); "
             "the server's per-round evaluation is redone in-process and timed.", "",
             "| workload | `flwr run` end to end | outside the strategy loop | strategy loop | plain loop "
             "| loop / plain | loop less per-round evaluation / plain | training compute, Flower clients / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for name, fl in results["flower"].items():
        c = fl["config"]
        lines.append(f"| {name} (S {c['num-shards']}, R {c['slices']}, {c['epochs-per-slice']} epochs, width "
                     f"{c['model-width']}, {c['client-cpus']} CPU per client) | {fl['flower_total_seconds']:.1f} s "
                     f"| {fl['flower_outside_loop_seconds']:.1f} s | {fl['flower_loop_seconds']:.1f} s "
                     f"| {fl['plain_loop_seconds']:.1f} s | {fl['loop_ratio']:.2f}x "
                     f"| {fl['loop_less_evaluation_ratio']:.2f}x | {fl['client_compute_ratio']:.2f}x |")
    return "\n".join(lines)


def write_pages(args: argparse.Namespace, results: dict[str, Any], failed: bool, command: str) -> None:
    """Part (a) to docs/results/unlearning-speedup.md, part (b) to flower-overhead.md: full runs only."""
    quick = "--quick measures less than the page shows" if args.quick else None
    if "a" in args.parts and page_wanted(args, "unlearning-speedup", partial=quick):
        write_page("unlearning-speedup", "Unlearning speed-up", speedup_markdown(results),
                   measures=SPEEDUP_MEASURES, command=command)
    if "b" in args.parts and page_wanted(args, "flower-overhead",
                                         partial=quick or ("a Flower run failed" if failed else None)):
        write_page("flower-overhead", "Flower's overhead", overhead_markdown(results), measures=OVERHEAD_MEASURES,
                   command=command, script="simulations/benchmark.py --parts b")


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    try:
        base = resolve({"dataset": "biased-digits"})
        flower_cfgs = {name: resolve(over) for name, over in plan.flower.items()}
    except ConfigError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    if base.num_threads > 0:
        torch.set_num_threads(base.num_threads)
    torch.manual_seed(base.seed)

    results: dict[str, Any] = {"plan": "quick" if args.quick else "full", "seed": base.seed,
                               "torch_threads": torch.get_num_threads(), "unlearning": [], "flower": {}}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fairforget-bench-") as tmp:
        for S in plan.shard_counts if "a" in args.parts else ():
            for R in plan.slice_counts:
                cfg = base.replace(num_shards=S, slices=R)
                print(f"benchmark: (a) S={S} R={R}: training {S} shards, then {plan.deletions} deletions",
                      file=sys.stderr, flush=True)
                results["unlearning"].append(bench_unlearning(cfg, plan.deletions, Path(tmp) / f"a-s{S}-r{R}"))
        for name, cfg in flower_cfgs.items() if "b" in args.parts else ():
            print(f"benchmark: (b) {name} workload: one Flower simulation, then the same training in a plain loop",
                  file=sys.stderr, flush=True)
            try:
                results["flower"][name] = bench_flower(cfg, Path(tmp) / f"b-{name}")
            except FlowerRunError as exc:
                errors[name] = str(exc)
                results["flower"][name] = {"error": str(exc)}

    if results["unlearning"]:
        print()
        print_unlearning(results["unlearning"])
    for name, fl in results["flower"].items():
        print()
        if name in errors:
            print(f"(b) {name} workload: not measured, the Flower run failed: {errors[name]}")
        else:
            print_flower(name, fl)
    atomic_write_json(args.out, results)
    print(f"\nfigures: {args.out}")
    write_pages(args, results, bool(errors), invocation(None if argv is None else [__file__, *argv]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
