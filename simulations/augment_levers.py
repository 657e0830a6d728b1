"""The augmentation levers of issue 12, measured one by one on Biased-Digits (rho = 0.99).

    python simulations/augment_levers.py pilot                       # every lever, shard 0, in-process
    python simulations/augment_levers.py pilot --lever baseline --lever reweight --shards 0,1
    python simulations/augment_levers.py e2e --lever reweight --set augment-steps=1   # through Flower

Levers (run-config overrides on the defaults; ``LEVERS`` below): the generator's training steps and
width, the guidance scale, upweighting the bias-conflicting originals in the generator's batches
(``diffusion-group-reweight``), rejection filtering by a site classifier trained with cross-entropy or
with EnD (``augment-filter``), a debiasing objective in the shard classifiers (``objective``), and
combinations.

``pilot`` runs the site's real generation path (:class:`clients.augment.Augmenter`: generator, plan,
filter) on the chosen shards in this process, trains each shard's SISA model on its originals and
synthetic samples, and evaluates the shards' ensemble on the unbiased test set. Generators are cached
in ``OUT/generators/`` by their settings, so levers that only change sampling reuse them (their
training seconds are the first measurement's). ``e2e`` runs ``fairforget simulate --set augment=true``
with the lever's overrides (Flower's simulation engine, 4 shards, 2 retirement steps) and reads the
run's metrics.json.

Columns: class label fidelity of the generated samples over all groups and over the bias-conflicting
ones (class != colour), judged by the server's fidelity classifier (colour-free view, trained on the
held-out split: a measurement, not part of any lever); the filter's keep rate (kept / drawn); the
ensemble's unbiased accuracy and worst (class, colour) group; seconds (generator training, sampling
with the filter, shard training). Prints a Markdown table and writes ``OUT/levers.md`` and
``OUT/levers.json`` (atomically). A run of the mode's default levers (no ``--lever``) also writes its
part of ``docs/results/augmentation-levers.md``: this run's rows, stamped (``--no-page`` does not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.augment import Augmenter, AugmentStore  # noqa: E402
from fairforget.config import RunConfig, parse_set, resolve  # noqa: E402
from fairforget.data import load_dataset, shard_of  # noqa: E402
from fairforget.data.base import SampleSet  # noqa: E402
from fairforget.diffusion.filter import FilterSettings  # noqa: E402
from fairforget.diffusion.generator import ConditionalGenerator, GeneratorSettings  # noqa: E402
from fairforget.diffusion.planner import plan_counts  # noqa: E402
from fairforget.diffusion.quality import FidelityClassifiers  # noqa: E402
from fairforget.ensemble import Ensemble  # noqa: E402
from fairforget.metrics import accuracy_report  # noqa: E402
from fairforget.sisa import SisaSettings, SisaShard  # noqa: E402
from fairforget.storage import atomic_write_json, atomic_write_text  # noqa: E402
from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402
from simulations.simulate_cli import simulate as run_simulate  # noqa: E402
from simulations.simulate_cli import toml_value  # noqa: E402

FILTER_END = {"augment-filter": "end"}
LEVERS: dict[str, dict[str, Any]] = {
    "vanilla": {"augment": False},  # no augmentation (pilot: the shard models on their originals)
    "baseline": {},  # today's defaults: width 16, 1,500 steps, guidance 1.5, no reweighting, no filter
    "steps-3000": {"diffusion-train-steps": 3000},
    "width-32": {"diffusion-width": 32},
    "guidance-3": {"guidance-scale": 3.0},
    "reweight": {"diffusion-group-reweight": 1.0},
    "filter-ce": {"augment-filter": "cross-entropy"},
    "filter-end": FILTER_END,
    "objective-end": {"objective": "end"},
    "reweight+guidance-3": {"diffusion-group-reweight": 1.0, "guidance-scale": 3.0},
    "reweight+filter-end": {"diffusion-group-reweight": 1.0, **FILTER_END},
    "reweight+filter-end+objective-end": {"diffusion-group-reweight": 1.0, **FILTER_END, "objective": "end"},
}
BASE = {"rho": 0.99, "augment": True, "augment-groups": "class-private"}
PILOT_DEFAULT = ["vanilla", "baseline", "guidance-3", "reweight", "reweight+guidance-3", "filter-ce", "filter-end",
                 "objective-end",
                 "reweight+filter-end", "reweight+filter-end+objective-end", "steps-3000", "width-32"]


# ---------------------------------------------------------------------- pilot (in-process)
def generator_key(s: GeneratorSettings, cfg: RunConfig, shard: int) -> str:
    parts = (cfg.dataset, cfg.rho, cfg.seed, cfg.num_shards, shard, s.width, s.train_steps, s.batch_size, s.lr,
             s.timesteps, s.label_dropout, s.group_reweight, s.groups)
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def site_generator(cfg: RunConfig, bundle: Any, k: int, shard: SampleSet, sisa: SisaShard, cache: Path,
                   work: Path) -> tuple[Augmenter, ConditionalGenerator, float, bool]:
    """Shard ``k``'s Augmenter and generator, trained through the site's own path or taken from
    ``cache`` (keyed by the generator's training settings); its training seconds and whether cached."""
    gs = GeneratorSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    store = AugmentStore(work / f"shard-{k}", k)
    aug = Augmenter(shard, sisa, store, gs, cfg.seed, cfg.augment_kl_threshold,
                    filter_settings=FilterSettings.from_config(cfg))
    cached = cache / generator_key(gs, cfg, k)
    if (cached / "seconds.json").exists():
        shutil.copytree(cached / "generator", store.generator_dir)
        store.state.update(generator_version=1, generator_valid=True,
                           generator_trained_on=sorted(int(i) for i in shard.ids.tolist()))
        store.save()
        seconds, was_cached = json.loads((cached / "seconds.json").read_text())["seconds"], True
    else:
        t0 = time.perf_counter()
        aug._train_generator()
        seconds, was_cached = time.perf_counter() - t0, False
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(store.generator_dir, cached / "generator")
        atomic_write_json(cached / "seconds.json", {"seconds": seconds})
    generator, _ = ConditionalGenerator.load(store.generator_dir, gs.device)
    generator.settings = gs  # sampling keys (guidance, DDIM steps) from this lever, not the cached training run
    return aug, generator, seconds, was_cached


def pilot_shard(cfg: RunConfig, bundle: Any, k: int, shard: SampleSet, fidelity: FidelityClassifiers,
                cache: Path, work: Path) -> dict[str, Any]:
    """One shard: its generator (cached), the planned samples through the Augmenter's generation path
    (filter included), its SISA model on originals + samples."""
    sisa = SisaShard(work / f"shard-{k}", k, shard, SisaSettings.from_config(cfg, bundle.num_classes,
                                                                              bundle.num_private))
    out: dict[str, Any] = {"generator_seconds": 0.0, "sampling_seconds": 0.0}
    if cfg.augment:
        aug, generator, out["generator_seconds"], out["generator_cached"] = site_generator(
            cfg, bundle, k, shard, sisa, cache, work)
        add = plan_counts(aug.counts(shard), cfg.augment_kl_threshold)
        t0 = time.perf_counter()
        new = aug._generate(generator, add, None, tag=0)
        out["sampling_seconds"] = time.perf_counter() - t0
        out["requested"], out["generated"] = int(add.sum()), len(new)
        out["filter"] = aug.last_filter
        conflicting = new.y != new.private
        out["fidelity"] = fidelity.fidelity(new.x, new.y, new.private)
        out["fidelity_conflicting"] = fidelity.fidelity(new.x[conflicting], new.y[conflicting],
                                                        new.private[conflicting])
        if len(new):
            sisa.add([int(i) for i in new.ids.tolist()], aug.pool())
    out["train_seconds"] = sisa.train_through(cfg.slices)
    out["state"] = sisa.model_state()
    return out


def pilot(name: str, overrides: dict[str, Any], shards: list[int], cache: Path,
          fidelity_cache: dict[str, FidelityClassifiers], extra: dict[str, Any]) -> dict[str, Any]:
    cfg = resolve(BASE, overrides, extra)
    torch.set_num_threads(max(cfg.num_threads, 1))
    bundle = load_dataset(cfg)
    parts = shard_of(cfg, bundle)
    if "f" not in fidelity_cache:
        fidelity_cache["f"] = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private,
                                                        seed=cfg.seed)
    fidelity = fidelity_cache["f"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        per = {k: pilot_shard(cfg, bundle, k, parts[k], fidelity, cache, Path(tmp)) for k in shards}
    ensemble = Ensemble({k: r.pop("state") for k, r in per.items()}, bundle.num_classes, cfg.model_width)
    report = accuracy_report(ensemble.predict(bundle.test_unbiased.x), bundle.test_unbiased,
                             bundle.num_classes, bundle.num_private)
    filters = [r["filter"] for r in per.values() if r.get("filter")]
    row = {
        "lever": name, "overrides": overrides, "mode": f"pilot (shards {','.join(map(str, shards))})",
        "fidelity_class": _mean(r["fidelity"]["class"] for r in per.values() if "fidelity" in r),
        "fidelity_class_conflicting": _mean(r["fidelity_conflicting"]["class"] for r in per.values()
                                            if "fidelity_conflicting" in r),
        "keep_rate": (sum(f["kept"] for f in filters) / max(sum(f["drawn"] for f in filters), 1)) if filters else None,
        "shortfall": sum(f["shortfall"] for f in filters) if filters else None,
        "accuracy_unbiased": report["accuracy"], "worst_group": report["worst_group"]["accuracy"],
        "generator_seconds": sum(r["generator_seconds"] for r in per.values()),
        "sampling_seconds": sum(r["sampling_seconds"] for r in per.values()),
        "train_seconds": sum(r["train_seconds"] for r in per.values()),
        "seconds": time.perf_counter() - t0, "shards": per,
    }
    return row


def _mean(values: Any) -> float | None:
    vals = list(values)
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------- end to end (Flower)
def e2e(name: str, overrides: dict[str, Any], out: Path, extra: list[str]) -> dict[str, Any]:
    run = out / f"e2e-{name}"
    seconds = run_simulate(run, {**{k: toml_value(v) for k, v in {**BASE, **overrides}.items()},
                                 **dict(s.split("=", 1) for s in extra)}, quiet=False)
    metrics = json.loads((run / "metrics.json").read_text())
    aug = metrics["augmentation"]
    step0 = aug["steps"][0]["shards"].values()
    quality = [s["quality"] for s in step0 if "quality" in s]
    filters = [s["filter"] for st in aug["steps"] for s in st["shards"].values() if "filter" in s]
    rows = {r["name"]: r for r in aug["rows"]}
    last = aug["rows"][-1]
    return {
        "lever": name, "overrides": overrides, "mode": "e2e (Flower, 4 shards)",
        "fidelity_class": _mean(q["label_fidelity"]["class"] for q in quality),
        "fidelity_class_conflicting": None,
        "keep_rate": (sum(f["kept"] for f in filters) / max(sum(f["drawn"] for f in filters), 1)) if filters else None,
        "shortfall": sum(f["shortfall"] for f in filters) if filters else None,
        "accuracy_unbiased": rows["augmented"]["accuracy_unbiased"],
        "worst_group": rows["augmented"]["worst_group"]["accuracy"],
        "accuracy_unbiased_after_unlearning": last["accuracy_unbiased"],
        "worst_group_after_unlearning": last["worst_group"]["accuracy"],
        "generator_seconds": sum(s.get("generator_seconds", 0.0) for s in step0),
        "sampling_seconds": sum(s.get("sampling_seconds", 0.0) for st in aug["steps"] for s in st["shards"].values()),
        "train_seconds": sum(s.get("retrain_seconds", 0.0) for st in aug["steps"] for s in st["shards"].values()),
        "seconds": seconds, "run": str(run),
    }


# ---------------------------------------------------------------------- table
def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| lever | mode | class fidelity (all / conflicting) | filter keep rate | unbiased acc. | worst group | "
             "after step-wise unlearning (acc. / worst) | generator s | sampling s | shard training s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = (f"{_f(r.get('accuracy_unbiased_after_unlearning'))} / {_f(r.get('worst_group_after_unlearning'))}"
                 if "accuracy_unbiased_after_unlearning" in r else "n/a")
        fid = f"{_f(r['fidelity_class'])} / {_f(r['fidelity_class_conflicting'])}"
        lines.append(f"| {r['lever']} | {r['mode']} | {fid} | {_f(r['keep_rate'])} | {_f(r['accuracy_unbiased'])} "
                     f"| {_f(r['worst_group'])} | {after} | "
                     f"{r['generator_seconds']:.0f} | {r['sampling_seconds']:.0f} | {r['train_seconds']:.0f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("pilot", "e2e"))
    parser.add_argument("--lever", action="append", choices=sorted(LEVERS),
                        help="measure this lever (repeatable; default: every pilot lever / reweight for e2e)")
    parser.add_argument("--shards", default="0", help="pilot: the shards to run (comma-separated)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "levers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run-config overrides for every lever")
    add_page_option(parser)
    args = parser.parse_args()
    names = args.lever or (PILOT_DEFAULT if args.mode == "pilot" else ["reweight"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"levers-{args.mode}.json"
    done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    fidelity_cache: dict[str, FidelityClassifiers] = {}
    measured = []
    for name in names:
        if args.mode == "pilot":
            shards = [int(s) for s in args.shards.split(",")]
            row = pilot(name, LEVERS[name], shards, args.out / "generators", fidelity_cache, parse_set(args.set))
        else:
            row = e2e(name, LEVERS[name], args.out, args.set)
        done[f"{name}@{row['mode']}"] = row
        measured.append(row)
        atomic_write_json(path, done)
        print(table([row]).splitlines()[-1], flush=True)
    text = table(list(done.values()))
    print(text)
    atomic_write_text(args.out / f"levers-{args.mode}.md", text + "\n")
    if page_wanted(args, "augmentation-levers", partial="--lever measures a subset" if args.lever else None):
        write_page("augmentation-levers", "Augmentation levers and composition", PAGE_INTRO[args.mode] + "\n\n"
                   + table(measured), measures=PAGE_MEASURES, command=invocation(), part=f"levers-{args.mode}",
                   part_title=f"The levers one by one ({args.mode})")
    return 0


# ---------------------------------------------------------------------- results page
PAGE_MEASURES = ["fairforget/diffusion/", "clients/augment.py", "server/augment.py", "simulations/augment_levers.py"]
PAGE_INTRO = {
    "pilot": ("Each lever is a run-config override on the colour-bias defaults (rho = 0.99; `LEVERS` in "
              "`simulations/augment_levers.py`). The pilot runs one site's real generation path "
              "(`clients.augment.Augmenter`: generator, bias plan, filter) on the chosen shards in-process, trains "
              "their SISA models on originals plus samples and evaluates their ensemble on the unbiased test set. "
              "Class fidelity: the server's colour-free fidelity classifier's agreement with the requested class "
              "(chance 0.10), over all samples and the bias-conflicting ones. Generators are cached by their "
              "settings: a lever that only changes sampling shows the first measurement's training seconds."),
    "e2e": ("Each lever is one `fairforget simulate --set augment=true` run with the lever's overrides through "
            "Flower's simulation engine (4 shards, step-wise unlearning after augmentation)."),
}


if __name__ == "__main__":
    raise SystemExit(main())
