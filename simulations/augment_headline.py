"""Headline experiment of the augmentation issue: vanilla vs augmented vs augmented + step-wise
unlearning on the embedded Biased-Digits, in two variants, through Flower's simulation engine.

    python simulations/augment_headline.py                 # both variants (about 20 minutes on 2 CPU cores)
    python simulations/augment_headline.py --variant colour-bias --set diffusion-train-steps=3000

Variants:
  colour-bias  rho = 0.99, groups = (class, colour): 100 groups, almost all empty in every shard
  class-skew   class-imbalance = 10 at rho = 0.1 (no colour shortcut), groups = class

Each variant is one ``fairforget simulate --set augment=true`` run; the table is read from its
metrics.json. Prints a markdown table and writes ``runs/headline/headline.md`` and ``headline.json``;
a run of both variants also writes ``docs/results/augmentation.md`` (the tables, stamped; ``--no-page``
does not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402

VARIANTS = {
    "colour-bias": {"rho": 0.99, "class-imbalance": 1.0, "augment-groups": '"class-private"'},
    "class-skew": {"rho": 0.1, "class-imbalance": 10.0, "augment-groups": '"class"'},
}
ATTACKS = ("loss", "rmia")


def run_variant(name: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    sets = [f"{k}={v}" for k, v in VARIANTS[name].items()] + ["augment=true", *extra]
    cmd = [str(Path(sys.executable).parent / "fairforget"), "simulate", "--out", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - t0


def table(name: str, metrics: dict, seconds: float) -> list[str]:
    aug = metrics["augmentation"]
    lines = [f"### {name} ({seconds / 60:.1f} min, `{metrics['run']['num_train']}` members)", "",
             "| model | max KL over shards | unbiased acc. | worst-group acc. | "
             + " | ".join(f"MIA {a} AUC / TPR@1%FPR" for a in ATTACKS) + " |",
             "|---|---|---|---|" + "---|" * len(ATTACKS)]
    for row in aug["rows"]:
        kl = max(row["kl_per_shard"].values())
        mia = row.get("mia") or {}
        cells = [f"{mia[a]['auc']:.3f} / {mia[a]['tpr_at_0.01_fpr']:.3f}" if a in mia else "n/a" for a in ATTACKS]
        lines.append(f"| {row['name']} | {kl:.4f} | {row['accuracy_unbiased']:.3f} | "
                     f"{row['worst_group']['accuracy']:.3f} | " + " | ".join(cells) + " |")
    q = [rep["quality"] for rep in aug["steps"][0]["shards"].values() if "quality" in rep]
    if q:
        fid = sum(x["label_fidelity"]["class"] for x in q) / len(q)
        fd = sum(x["frechet_distance"] for x in q) / len(q)
        fd0 = sum(x["frechet_distance_real_vs_real"] for x in q) / len(q)
        ceiling = aug["fidelity_classifiers_accuracy_unbiased"]["class"]
        lines += ["", f"Synthetic samples (step 0, mean over shards): class label fidelity {fid:.3f} (fidelity "
                  f"classifier on real unbiased test: {ceiling:.3f}; chance 0.100); Frechet distance {fd:.2f} "
                  f"(real vs real {fd0:.2f}). Last row's MIA: the retired (unlearned) originals vs non-members."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append",
                        help="run only this variant (repeatable; default: both)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "headline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run-config overrides for every variant")
    add_page_option(parser)
    args = parser.parse_args()
    results, lines = {}, []
    for name in args.variant or list(VARIANTS):
        metrics, seconds = run_variant(name, args.out / name, args.set)
        results[name] = {"seconds": seconds, "rows": metrics["augmentation"]["rows"]}
        lines += table(name, metrics, seconds) + [""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headline.md").write_text(text + "\n")
    (args.out / "headline.json").write_text(json.dumps(results, indent=2) + "\n")
    partial = "--variant runs a subset of the variants" if set(results) != set(VARIANTS) else None
    if page_wanted(args, "augmentation", partial=partial):
        write_page("augmentation", "Augmentation (make headline)", PAGE_INTRO + "\n\n" + text,
                   measures=PAGE_MEASURES, command=invocation())
    return 0


# ---------------------------------------------------------------------- results page
PAGE_MEASURES = ["fairforget/diffusion/", "clients/augment.py", "server/augment.py", "simulations/augment_headline.py"]
PAGE_INTRO = ("Each variant is one `fairforget simulate --set augment=true` run through Flower's simulation engine "
              "(colour-bias: rho = 0.99, groups (class, colour); class-skew: class-imbalance 10 at rho = 0.1, "
              "groups = classes). MIA against the ensemble: the vanilla and augmented rows attack all original "
              "members, the last row the retired (unlearned) originals, all against the held-out non-members.")


if __name__ == "__main__":
    raise SystemExit(main())
