"""Differential privacy study (issue: DP-SGD with Opacus): utility, fairness and measured membership
leakage at epsilon about 1, 4 and 8 and without DP, next to the mu-GDP bound; the noise an
attack-risk calibration chooses against the epsilon-first one; DP-SGD's cost; and a DP generator's
label fidelity against a non-private one.

    python simulations/dp_study.py                       # about 20-30 minutes on 2 CPU cores
    python simulations/dp_study.py --eps 4 --skip-generator --set epochs-per-slice=2

Each row is one ``fairforget simulate`` run through Flower's simulation engine (``dp-calibrate =
"epsilon"``: the noise is solved for the target epsilon over the smallest shard's planned SISA
training, with the run's accountant), audited with LiRA (offline) and RMIA on the ensemble. The
study runs at ``rho = 0.1`` by default (no colour shortcut, so accuracy measures learning the digits,
and members can be told from non-members only through memorisation); ``--set rho=0.99`` gives the
shortcut-dominated setting of the demo. Prints markdown tables and writes ``OUT/dp_study.md`` and
``OUT/dp_study.json``; a run of at least epsilon 1, 4 and 8 with the generator also writes
``docs/results/dp.md`` (the tables, stamped; ``--no-page`` does not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairforget.config import ConfigError, parse_set, resolve  # noqa: E402
from fairforget.storage import atomic_write_json, atomic_write_text  # noqa: E402
from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402
from simulations.simulate_cli import simulate as run_simulate  # noqa: E402
from simulations.simulate_cli import toml_value  # noqa: E402

BASE = {"rho": 0.1, "audit-attacks": '"loss,lira-offline,rmia"', "audit-references": 2}
ATTACKS = ("lira-offline", "rmia")


def simulate(out: Path, sets: dict[str, object]) -> tuple[dict, float]:
    seconds = run_simulate(out, sets)
    return json.loads((out / "metrics.json").read_text()), seconds


def row(name: str, m: dict, seconds: float) -> dict:
    ens = m["ensemble"]["unbiased"]
    dp = m.get("dp") or {}
    targets = m["privacy"]["targets"]["ensemble"]
    return {
        "name": name,
        "seconds": seconds,
        "train_seconds": m["timing"]["full_retrain_seconds"],
        "noise_multiplier": dp.get("noise_multiplier"),
        "epsilon": (dp.get("ensemble") or {}).get("epsilon"),
        "mu": (dp.get("ensemble") or {}).get("mu"),
        "bound": (dp.get("ensemble") or {}).get("tpr_bound"),
        "accuracy_unbiased": ens["accuracy"],
        "worst_group": ens["worst_group"]["accuracy"],
        "mia": {a: {k: targets[a][k] for k in ("auc", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr")} for a in ATTACKS},
        "violations": m["privacy"].get("dp_bound_violations", []),
        "calibration": dp.get("calibration"),
    }


def generator_fidelity(cfg_sets: dict[str, object], steps: int) -> dict:
    """Label fidelity of a DP generator vs a non-private one on shard 0 (same settings and seed)."""
    import torch

    from fairforget.data import load_dataset, shard_of
    from fairforget.diffusion.generator import GeneratorSettings, sample, train_generator
    from fairforget.diffusion.quality import FidelityClassifiers
    from fairforget.privacy import DPSettings

    cfg = resolve({k: v for k, v in parse_set([f"{k}={v}" for k, v in cfg_sets.items()]).items()},
                  {"dp": True, "augment-groups": "class", "diffusion-train-steps": steps})
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = GeneratorSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    fidelity = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=cfg.seed)
    y = torch.arange(bundle.num_classes).repeat_interleave(20)
    out = {"steps": steps, "classifier_ceiling": fidelity.accuracy(bundle.test_unbiased)["class"]}
    for name, dp in (("non-private", None), ("dp", DPSettings.from_config(cfg))):
        t0 = time.perf_counter()
        model = train_generator(data.x, data.y, data.private, settings, seed=cfg.seed, dp=dp)
        seconds = time.perf_counter() - t0
        x = sample(model, y, torch.zeros_like(y), seed=cfg.seed)
        out[name] = {"class_fidelity": fidelity.fidelity(x, y, None)["class"], "train_seconds": seconds}
    out["dp"]["noise_multiplier"] = cfg.dp_noise_multiplier
    return out


def markdown(rows: list[dict], gen: dict | None) -> str:
    lines = ["| run | sigma | epsilon (ensemble) | mu | unbiased acc. | worst group | "
             + " | ".join(f"{a} AUC / TPR@1% / TPR@0.1%" for a in ATTACKS)
             + " | bound TPR@1% / @0.1% | train s | x plain |",
             "|---|---|---|---|---|---|" + "---|" * len(ATTACKS) + "---|---|---|"]
    plain = next((r["train_seconds"] for r in rows if r["epsilon"] is None), None)
    for r in rows:
        mia = " | ".join(f"{r['mia'][a]['auc']:.3f} / {r['mia'][a]['tpr_at_0.01_fpr']:.3f} / "
                         f"{r['mia'][a]['tpr_at_0.001_fpr']:.3f}" for a in ATTACKS)
        bound = f"{r['bound']['0.01']:.3f} / {r['bound']['0.001']:.4f}" if r["bound"] else "1 / 1"
        ratio = f"{r['train_seconds'] / plain:.2f}x" if plain else ""
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "inf (no DP)"
        sigma = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] is not None else "-"
        mu = f"{r['mu']:.3f}" if r["mu"] is not None else "-"
        lines.append(f"| {r['name']} | {sigma} | {eps} | {mu} | {r['accuracy_unbiased']:.3f} | "
                     f"{r['worst_group']:.3f} | {mia} | {bound} | {r['train_seconds']:.1f} | {ratio} |")
    cal = next((r["calibration"] for r in rows if r["calibration"] and "epsilon_first" in r["calibration"]), None)
    if cal:
        fpr = cal["target"]["fpr"]
        key = f"tpr_bound_at_{fpr:g}_fpr"
        lines += ["", f"Noise for the attack-risk target TPR <= {cal['target']['tpr']:g} at FPR {fpr:g} (smallest "
                      f"shard, {cal['smallest_shard']} samples):", "",
                  "| calibration | sigma | epsilon | mu | TPR bound |", "|---|---|---|---|---|"]
        target = cal["attack_risk_via_epsilon"]["target_epsilon"]
        for name, f in [("attack risk (mu-GDP)", cal["attack_risk"]),
                        (f"epsilon-first for the same risk (epsilon {target:.2f})",
                         cal["attack_risk_via_epsilon"]),
                        *[(f"epsilon-first, epsilon = {e}", f) for e, f in cal["epsilon_first"].items()]]:
            lines.append(f"| {name} | {f['noise_multiplier']:.3f} | {f['epsilon']:.3f} | {f['mu']:.3f} | "
                         f"{f[key]:.4f} |")
    if gen:
        plain, dp = gen["non-private"], gen["dp"]
        lines += ["", f"Generator label fidelity (shard 0, {gen['steps']} steps, class mode; fidelity classifier "
                      f"ceiling {gen['classifier_ceiling']:.3f}): non-private {plain['class_fidelity']:.3f} "
                      f"({plain['train_seconds']:.1f} s), DP-SGD sigma {dp['noise_multiplier']:.2f} "
                      f"{dp['class_fidelity']:.3f} ({dp['train_seconds']:.1f} s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dp_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", default="1,4,8", help="target epsilons, comma-separated (default 1,4,8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config keys")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_study")
    parser.add_argument("--skip-generator", action="store_true", help="skip the DP generator's fidelity")
    parser.add_argument("--generator-steps", type=int, default=600)
    add_page_option(parser)
    args = parser.parse_args(argv)
    try:
        extra = {k: toml_value(v) for k, v in parse_set(args.set).items()}
        sets = {**BASE, **extra}
        eps = [float(e) for e in args.eps.split(",") if e.strip()]
        if any(e <= 0 for e in eps):
            raise ConfigError(f"--eps: every epsilon must be > 0, got {args.eps}")
        resolve(parse_set([f"{k}={v}" for k, v in sets.items()]))
    except (ConfigError, ValueError) as exc:
        print(f"dp_study: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row("no DP", *simulate(args.out / "no-dp", sets))]
    for e in eps:
        dp_sets = {**sets, "dp": "true", "dp-calibrate": '"epsilon"', "dp-target-epsilon": e}
        rows.append(row(f"DP, epsilon {e:g}", *simulate(args.out / f"eps-{e:g}", dp_sets)))
    gen = None if args.skip_generator else generator_fidelity(sets, args.generator_steps)
    text = markdown(rows, gen)
    print(text)
    atomic_write_text(args.out / "dp_study.md", text)
    atomic_write_json(args.out / "dp_study.json", {"rows": rows, "generator": gen, "sets": sets})
    print(f"tables: {args.out / 'dp_study.md'}")
    partial = ("--skip-generator" if args.skip_generator
               else "--eps leaves out epsilon 1, 4 or 8" if not {1.0, 4.0, 8.0} <= set(eps) else None)
    if page_wanted(args, "dp", partial=partial):
        write_page("dp", "Differential privacy: utility, attacks and the bound", PAGE_INTRO + "\n\n" + text,
                   measures=["fairforget/privacy/", "fairforget/training.py", "simulations/dp_study.py"],
                   command=invocation(None if argv is None else [__file__, *argv]))
    return 0


PAGE_INTRO = ("Each row is one `fairforget simulate` run through Flower's simulation engine (`dp-calibrate = "
              "\"epsilon\"`: the noise solved for the target epsilon over the smallest shard's SISA schedule), "
              "audited with LiRA (offline) and RMIA on the ensemble, next to the mu-GDP bound on any attack's TPR.")


if __name__ == "__main__":
    sys.exit(main())
