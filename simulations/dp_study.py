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
import tempfile
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


# ---------------------------------------------------------------------- the privacy-utility curve (issue 24)
CURVE_MEASURES = ["fairforget/models/", "fairforget/privacy/planner.py", "fairforget/privacy/dp_sgd.py",
                  "fairforget/sisa.py", "simulations/dp_study.py"]


def curve_point(sets: dict[str, object], model: str, eps: float | None, out: Path) -> dict:
    """One point of the curve: every shard trained in-process by the sites' own code (SisaShard, the
    training engine, DP-SGD with the planner's schedule for ``eps``; None: no DP, the run's schedule),
    then each shard's and the softmax ensemble's unbiased test accuracy."""
    import torch

    from fairforget.data import load_dataset, shard_of
    from fairforget.model import load_model
    from fairforget.privacy.reporting import calibrate
    from fairforget.sisa import SisaSettings, SisaShard

    extra = {"model": model} if eps is None else {"model": model, "dp": True, "dp-calibrate": "plan",
                                                  "dp-target-epsilon": eps}
    cfg = resolve({**sets, **extra, "out-dir": str(out)})
    bundle = load_dataset(cfg)
    shards = shard_of(cfg, bundle)
    plan = None
    t0 = time.perf_counter()
    if eps is not None:
        calibration = calibrate(cfg, [len(s) for s in shards], compare=False)
        plan = calibration["plan"]
        cfg = cfg.replace(dp_noise_multiplier=plan["noise_multiplier"], dp_plan=plan["dp_plan"], dp_calibrate="none")
    plan_seconds = time.perf_counter() - t0
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    test = bundle.test_unbiased
    probs, per_shard, spent, train_seconds = [], [], [], 0.0
    for k, data in enumerate(shards):
        shard = SisaShard(out / f"shard-{k}", k, data, settings)
        train_seconds += shard.train_through()
        net = load_model(shard.model_state(), bundle.num_classes, cfg.model_width)
        with torch.no_grad():
            p = torch.cat([net(test.x[i:i + 512]).softmax(-1) for i in range(0, len(test), 512)])
        probs.append(p)
        per_shard.append(float((p.argmax(-1) == test.y).float().mean()))
        if shard.accountant is not None:
            spent.append(shard.accountant.epsilon())
    ensemble = float((torch.stack(probs).mean(0).argmax(-1) == test.y).float().mean())
    return {"model": model, "target_epsilon": eps, "epsilon": max(spent) if spent else None,
            "ensemble_unbiased": ensemble, "mean_shard_unbiased": sum(per_shard) / len(per_shard),
            "shards_unbiased": per_shard, "train_seconds": train_seconds, "plan_seconds": plan_seconds,
            "plan": None if plan is None else {k: plan[k] for k in ("noise_multiplier", "steps", "stages")}}


def curve_markdown(points: list[dict]) -> str:
    lines = ["| model | target epsilon | epsilon spent (worst shard) | ensemble unbiased | mean shard unbiased | "
             "sigma | steps (stages) | expected batch (stages) | lr / clip | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        plan = p["plan"]
        sched = ("-", "-", "-", "-") if plan is None else (
            f"{plan['noise_multiplier']:g}", "/".join(str(s["steps"]) for s in plan["stages"]),
            "/".join(str(s["batch_size"]) for s in plan["stages"]),
            f"{plan['stages'][0]['lr']:g} / {plan['stages'][0]['max_grad_norm']:g}")
        eps = "no DP" if p["target_epsilon"] is None else f"{p['target_epsilon']:g}"
        spent = "-" if p["epsilon"] is None else f"{p['epsilon']:.3f}"
        lines.append(f"| {p['model']} | {eps} | {spent} | {p['ensemble_unbiased']:.3f} | "
                     f"{p['mean_shard_unbiased']:.3f} | {' | '.join(sched)} | {p['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def curve_plot(points: list[dict], path: Path) -> Path:
    """Unbiased accuracy (ensemble: solid, mean shard: dashed) against epsilon, one colour per model, its
    no-DP figures as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    models = list(dict.fromkeys(p["model"] for p in points))
    for i, model in enumerate(models):
        colour = f"C{i}"
        dp = sorted((p for p in points if p["model"] == model and p["epsilon"] is not None),
                    key=lambda p: p["epsilon"])
        if dp:
            ax.plot([p["epsilon"] for p in dp], [p["ensemble_unbiased"] for p in dp], "o-", color=colour,
                    label=f"{model}: ensemble")
            ax.plot([p["epsilon"] for p in dp], [p["mean_shard_unbiased"] for p in dp], "s--", color=colour,
                    alpha=0.7, label=f"{model}: mean shard")
        for p in points:
            if p["model"] == model and p["epsilon"] is None:
                ax.axhline(p["ensemble_unbiased"], color=colour, lw=1, ls=":", label=f"{model}: ensemble, no DP")
    ax.axhline(0.1, color="grey", lw=0.8, ls="-.", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (worst shard, delta 1e-5)")
    ax.set_ylabel("unbiased test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Biased-Digits: privacy-utility curve (DP-SGD, planned schedule)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CURVE_INTRO = ("Every shard trained in-process by the sites' own code (`SisaShard`, the training engine, "
               "Opacus DP-SGD with Poisson sampling) at `rho` 0.1 on the embedded Biased-Digits data, the DP rows "
               "with the DP planner's schedule (`dp-calibrate = \"plan\"`, fairforget/privacy/planner.py: the noise "
               "and each stage's steps, expected batch, lr and clipping norm for the target epsilon, with room for "
               "`dp-plan-retrains` full retrains within `dp-max-epsilon`); the no-DP rows with the run's ordinary "
               "schedule. Accuracy on the unbiased test set (no colour shortcut); the ensemble is the softmax vote. "
               "No membership audit here: the attacks' TPR beside the bound is the Flower rows' table "
               "(`python simulations/dp_study.py`). Aims of issue 24 (ensemble): >= 0.93 without DP, 0.80 at "
               "epsilon 8, 0.65 at 4, 0.35 at 1.")


def run_curve(args: argparse.Namespace, sets: dict[str, object]) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    eps = [float(e) for e in args.eps.split(",") if e.strip()]
    out = args.out / "curve"
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for model in models:
        for e in ([] if args.skip_plain else [None]) + eps:
            with tempfile.TemporaryDirectory(prefix="dp-curve-") as tmp:
                point = curve_point(sets, model, e, Path(tmp))
            points.append(point)
            print(f"{model} eps {e}: ensemble {point['ensemble_unbiased']:.3f}, mean shard "
                  f"{point['mean_shard_unbiased']:.3f}, epsilon {point['epsilon']}, {point['train_seconds']:.0f} s",
                  flush=True)
            atomic_write_json(out / "curve.json", {"points": points, "sets": sets})
    for earlier in args.merge:
        points += json.loads(earlier.read_text())["points"]
    eps = sorted({*eps, *(p["target_epsilon"] for p in points if p["target_epsilon"] is not None)})
    text = curve_markdown(points)
    print(text)
    figure = curve_plot(points, out / "curve.png")
    atomic_write_text(out / "curve.md", text)
    partial = None if {1.0, 4.0, 8.0} <= set(eps) else "--eps leaves out epsilon 1, 4 or 8"
    if args.merge:
        text += "\nPoints measured by separate `--curve` runs (in parallel, each its own process), read from: " + \
            "; ".join(f"`{m}` (config keys {json.loads(m.read_text())['sets']})" for m in args.merge) + \
            ". The no-DP rows use the run's ordinary schedule with those keys; the DP rows the planner's.\n"
    if page_wanted(args, "dp-curve", partial=partial):
        write_page("dp-curve", "Differential privacy: the privacy-utility curve with feature models",
                   CURVE_INTRO + "\n\n" + text, measures=CURVE_MEASURES, figures=[figure],
                   command=invocation(None if args.argv is None else [__file__, *args.argv]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dp_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", default="1,4,8", help="target epsilons, comma-separated (default 1,4,8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config keys")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "dp_study")
    parser.add_argument("--skip-generator", action="store_true", help="skip the DP generator's fidelity")
    parser.add_argument("--generator-steps", type=int, default=600)
    parser.add_argument("--curve", action="store_true",
                        help="the privacy-utility curve of the shard models (in-process, planned DP schedule; "
                             "writes docs/results/dp-curve.md with its plot) instead of the Flower rows")
    parser.add_argument("--models", default="scatter-linear,scatter-cnn,simple-conv",
                        help="--curve: the models, comma-separated")
    parser.add_argument("--skip-plain", action="store_true", help="--curve: leave out the no-DP points")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="--curve: add the points of earlier --curve runs (their curve.json) to this one's "
                             "table, plot and page (points measured in parallel processes)")
    add_page_option(parser)
    args = parser.parse_args(argv)
    args.argv = argv
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
    if args.curve:
        return run_curve(args, parse_set([f"{k}={v}" for k, v in sets.items() if not k.startswith("audit")]))
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
