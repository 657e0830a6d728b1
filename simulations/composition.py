"""Does a site's generator compose a digit with a colour it (almost) never saw it with? (issue 12)

    python simulations/composition.py                                    # shard 0, four guidance pairs
    python simulations/composition.py --guidance 1.5,1.5 --guidance 1.5,5 --set diffusion-group-reweight=1.0

For one shard at rho = 0.99 (defaults of ``simulations/augment_levers.py``: its generator cache is
shared, so a generator the levers trained is reused), draws the samples the bias plan asks for (every
one in a bias-conflicting group, class != colour) at each (class guidance, private guidance) pair and
judges them with the server's fidelity classifiers (colour-free view for the class; a measurement, not
part of the method): class fidelity, private (colour) fidelity and *both* (the requested digit on the
requested colour, the sample the shard model needs). Prints a Markdown table and writes
``OUT/composition.json``; at the default guidance pairs also its part of
``docs/results/augmentation-levers.md`` (the table, stamped; ``--no-page`` does not).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairforget.config import ConfigError, parse_set, resolve  # noqa: E402
from fairforget.data import load_dataset, shard_of  # noqa: E402
from fairforget.diffusion.generator import sample  # noqa: E402
from fairforget.diffusion.planner import plan_counts  # noqa: E402
from fairforget.diffusion.quality import FidelityClassifiers  # noqa: E402
from fairforget.sisa import SisaSettings, SisaShard  # noqa: E402
from fairforget.storage import atomic_write_json  # noqa: E402
from simulations.augment_levers import BASE, site_generator  # noqa: E402
from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402

GUIDANCE = ("1.5,1.5", "1.5,3", "1.5,5", "3,3")


def guidance_pair(text: str) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise ConfigError(f"--guidance: give two scales >= 0 as CLASS,PRIVATE, got {text!r}")
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="composition.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidance", action="append", metavar="CLASS,PRIVATE",
                        help=f"guidance scale of the class factor and of the private factor (default {GUIDANCE})")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "levers")
    add_page_option(parser)
    args = parser.parse_args(argv)
    try:
        pairs = [guidance_pair(g) for g in (args.guidance or GUIDANCE)]
        cfg = resolve(BASE, {"ddim-steps": 10}, parse_set(args.set))
        if not 0 <= args.shard < cfg.num_shards:
            raise ConfigError(f"--shard: must be in [0, {cfg.num_shards - 1}], got {args.shard}")
    except (ConfigError, ValueError) as exc:
        print(f"composition: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(cfg.num_threads, 1))
    bundle = load_dataset(cfg)
    k, shard = args.shard, shard_of(cfg, bundle)[args.shard]
    fidelity = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=cfg.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="composition-") as tmp:
        sisa = SisaShard(Path(tmp) / f"shard-{k}", k, shard, SisaSettings.from_config(cfg, bundle.num_classes,
                                                                                     bundle.num_private))
        aug, generator, gen_seconds, cached = site_generator(cfg, bundle, k, shard, sisa, args.out / "generators",
                                                             Path(tmp))
        flat = plan_counts(aug.counts(shard), cfg.augment_kl_threshold).ravel()
        groups = torch.repeat_interleave(torch.arange(flat.size), torch.as_tensor(flat))
        y, a = groups // bundle.num_private, groups % bundle.num_private
        print(f"shard {k}: generator {'cached' if cached else 'trained'} ({gen_seconds:.0f} s), "
              f"{len(y)} samples asked for, {int((y != a).sum())} of them bias-conflicting", flush=True)
        print("| class guidance | private guidance | class fidelity | private fidelity | both | sampling s |\n"
              "|---|---|---|---|---|---|", flush=True)
        for w_y, w_a in pairs:
            t0 = time.perf_counter()
            x = sample(generator, y, a, cfg.seed + 1000, guidance_scale=w_y, private_scale=w_a)
            fid = fidelity.fidelity(x, y, a)
            rows.append({"class_guidance": w_y, "private_guidance": w_a, **fid,
                         "seconds": time.perf_counter() - t0})
            print(f"| {w_y:g} | {w_a:g} | {fid['class']:.3f} | {fid['private']:.3f} | {fid['both']:.3f} | "
                  f"{rows[-1]['seconds']:.0f} |", flush=True)
    atomic_write_json(args.out / "composition.json", {"shard": k, "overrides": parse_set(args.set),
                                                      "samples": len(y), "rows": rows})
    if page_wanted(args, "augmentation-levers", partial="--guidance measures other pairs" if args.guidance else None):
        intro = (f"Shard {k} at rho = {cfg.rho:g}, generator {'from the levers cache' if cached else 'trained'} "
                 f"({gen_seconds:.0f} s); {len(y)} samples the bias plan asks for, {int((y != a).sum())} of them "
                 "bias-conflicting (class != colour), judged by the server's fidelity classifiers (chance 0.10 each); "
                 "*both*: the requested digit on the requested colour.")
        write_page("augmentation-levers", "Augmentation levers and composition", intro + "\n\n" + page_table(rows),
                   measures=PAGE_MEASURES, command=invocation(None if argv is None else [__file__, *argv]),
                   part="composition", part_title="Does the generator compose a digit with an unseen colour?")
    return 0


# ---------------------------------------------------------------------- results page
PAGE_MEASURES = ["fairforget/diffusion/", "clients/augment.py", "simulations/composition.py",
                 "simulations/augment_levers.py"]


def page_table(rows: list[dict]) -> str:
    """The printed table."""
    lines = ["| class guidance | private guidance | class fidelity | private fidelity | both | sampling s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['class_guidance']:g} | {r['private_guidance']:g} | {r['class']:.3f} | {r['private']:.3f} "
              f"| {r['both']:.3f} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
