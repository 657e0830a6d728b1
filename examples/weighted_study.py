"""The accuracy-weighted shard ensemble against the plain (even) one, under the real Flower simulation.

Workload: ``fairforget_examples.validation_data:load_sites``: Biased-Digits held by 4 sites
(``partition = "site"``), three of which recorded their digits with the colour shortcut (rho = 0.99),
the fourth without it (colour independent of the label). The shard models are the same in every run
(same data, seed and SISA training: the script checks their hashes); only how they combine differs:
``shard-ensemble`` averages them evenly, ``weighted-ensemble`` weights each by its accuracy on the
validation split (``accuracy``, or ``softmax-accuracy`` at temperature 0.05). Each run is one
``fairforget simulate`` (``flwr run``, Ray backend) writing OUT/metrics.json; this script reads the
figures back, recomputes each run's weights from its stored models through the strategy's own
predictor (and checks that they give the accuracy the run reported), and writes
``examples/results/weighted.md``.

    .venv/bin/python examples/weighted_study.py            # 3 runs, one at a time
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "weighted.md"
FAIRFORGET = ROOT / ".venv" / "bin" / "fairforget"
DATASET = "fairforget_examples.validation_data:load_sites"
COMMON = {"dataset": DATASET, "partition": "site", "num-shards": 4, "audit": "false", "device": "cpu"}
RUNS = [  # (label, strategy, strategy-options)
    ("even (shard-ensemble)", "shard-ensemble", ""),
    ("weighted, accuracy", "weighted-ensemble", '{"weighting": "accuracy"}'),
    ("weighted, softmax-accuracy T=0.05", "weighted-ensemble",
     '{"weighting": "softmax-accuracy", "temperature": 0.05}'),
]


def overrides(strategy: str, options: str) -> dict[str, Any]:
    out: dict[str, Any] = {**COMMON, "strategy": strategy}
    if options:
        out["strategy-options"] = options
    return out


def command(out: Path, sets: dict[str, Any]) -> list[str]:
    cmd = [str(FAIRFORGET), "simulate", "--out", str(out), "--force", "--quiet"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def figures(out: Path, strategy: str) -> dict[str, Any]:
    """The run's reported figures, and its weights recomputed from its stored models by the strategy's
    predictor (checked against the reported accuracy)."""
    import strategies
    from fairforget.data import load_dataset
    from fairforget.run import RunDir
    from fairforget.storage import state_hash

    run = RunDir(out)
    m, cfg, states = run.metrics(), run.config(), run.load_models()
    bundle = load_dataset(cfg)
    ensemble = strategies.build_strategy(cfg, bundle.num_classes).predictor()(states, bundle.num_classes,
                                                                               cfg.model_width)
    test = bundle.test_unbiased
    recomputed = float((ensemble.predict(test.x) == test.y).float().mean())
    reported = m["ensemble"]["unbiased"]["accuracy"]
    if abs(recomputed - reported) > 1e-9:
        raise SystemExit(f"{strategy}: the run reported {reported}, its predictor gives {recomputed}")
    return {"unbiased": reported, "biased": m["ensemble"]["biased"]["accuracy"],
            "worst": m["ensemble"]["unbiased"]["worst_group"]["accuracy"],
            "per_model": {int(s["shard"]): s["accuracy_unbiased"] for s in m["shards"]},
            "weights": ensemble.weights, "hashes": [state_hash(states[k])[:12] for k in sorted(states)]}


def stamp() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " (working tree with uncommitted changes)" if git("status", "--porcelain") else ""
    return (f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{platform.node() or 'host'}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    rows, commands = [], []
    for i, (label, strategy, options) in enumerate(RUNS, 1):
        out = Path(f"/tmp/weighted-study/w{i}")
        cmd = command(out, overrides(strategy, options))
        commands.append(shlex.join([".venv/bin/fairforget", *cmd[1:]]))
        print(f"[{i}/{len(RUNS)}] {label}: {commands[-1]}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        rows.append((label, figures(out, strategy), time.perf_counter() - t0))
    hashes = {tuple(r[1]["hashes"]) for r in rows}
    if len(hashes) != 1:
        raise SystemExit(f"the runs trained different shard models: {hashes}")
    write(rows, commands)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def write(rows: list[tuple[str, dict[str, Any], float]], commands: list[str]) -> None:
    def weights(w: dict[int, float] | None) -> str:
        if w is None:
            return "even"
        total = sum(w.values())
        return " / ".join(f"{w[k] / total:.2f}" for k in sorted(w))

    lines = [
        "# Accuracy-weighted shard ensemble vs the even one",
        "",
        "Written by `examples/weighted_study.py`; " + stamp() + ".",
        "",
        "Workload: Biased-Digits held by 4 sites (`partition = \"site\"`, "
        "`dataset = \"fairforget_examples.validation_data:load_sites\"`): sites 0-2 recorded their digits with "
        "the colour shortcut (rho = 0.99), site 3 without it (colour independent of the label). The validation "
        "split the weights come from is 30% of the test digits (by record id) in every colour, taken out of both "
        "test sets; the accuracies below are on the rest of the test set. Every run trains the same 4 shard "
        "models (hashes " + ", ".join(rows[0][1]["hashes"]) + "), one Flower simulation each, audit off.",
        "",
        "| ensemble | unbiased accuracy | biased accuracy | worst group (unbiased) | weights (shards 0/1/2/3) |",
        "|---|---|---|---|---|",
    ]
    for label, f, _ in rows:
        lines.append(f"| {label} | {f['unbiased']:.4f} | {f['biased']:.4f} | {f['worst']:.4f} "
                     f"| {weights(f['weights'])} |")
    per = rows[0][1]["per_model"]
    lines += [
        "",
        "Each shard model's own unbiased test accuracy: " + ", ".join(f"shard {k}: {per[k]:.4f}" for k in sorted(per))
        + ". Weights are normalised to sum to 1 and recomputed from the stored models by the strategy's predictor "
        "(the script checks they give the reported accuracy).",
        "",
        "Commands (run one at a time; wall seconds: " + ", ".join(f"{r[2]:.0f}" for r in rows) + "):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
