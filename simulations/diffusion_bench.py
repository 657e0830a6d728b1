"""Diffusion cost and quality on this machine, so a user can choose steps (a benchmark, not a test).

    python simulations/diffusion_bench.py                        # shard 0 of the default demo, 1 thread
    python simulations/diffusion_bench.py --steps 10,25,50 --train-steps 3000 --threads 2

Prints, measured in one run: the generator's training seconds on one shard, then for each DDIM step
count the sampling rate (images per second, guided) and the label fidelity of the samples (class and
private attribute, judged by classifiers trained on the real held-out split, whose own accuracy on
the real unbiased test set is printed as the ceiling), over every (class, private) group equally.
What it prints also goes to ``docs/results/diffusion-cost.md``, stamped (``--no-page``: not).
"""

from __future__ import annotations

import argparse
import time

import torch

from fairforget.config import parse_set, resolve
from fairforget.data import load_dataset, shard_of
from fairforget.diffusion.generator import GeneratorSettings, sample, train_generator
from fairforget.diffusion.quality import FidelityClassifiers
from simulations.results_page import add_page_option, invocation, page_wanted, record_stdout, write_page

PAGE_MEASURES = ["fairforget/diffusion/", "simulations/diffusion_bench.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,25,50", help="DDIM step counts to compare")
    parser.add_argument("--train-steps", type=int, default=None, help="generator training steps (default: config)")
    parser.add_argument("--per-group", type=int, default=4, help="samples per (class, private) group")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_page_option(parser)
    args = parser.parse_args()
    with record_stdout() as printed:
        measure(args)
    if page_wanted(args, "diffusion-cost"):
        head, table = printed.getvalue().split("| DDIM steps", 1)
        body = "\n\n".join(line.strip() for line in head.splitlines() if line.strip()) + "\n\n| DDIM steps" + table
        write_page("diffusion-cost", "Diffusion cost and DDIM steps",
                   body, measures=PAGE_MEASURES, command=invocation())
    return 0


def measure(args: argparse.Namespace) -> None:
    """Train shard 0's generator, then sample at each DDIM step count; prints the figures."""
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    if args.train_steps:
        overrides["diffusion-train-steps"] = args.train_steps
    cfg = resolve(overrides)
    bundle = load_dataset(cfg)
    shard = shard_of(cfg, bundle)[0]
    settings = GeneratorSettings.from_config(cfg, bundle.num_classes, bundle.num_private)

    t0 = time.perf_counter()
    model = train_generator(shard.x, shard.y, shard.private, settings, seed=cfg.seed)
    train_s = time.perf_counter() - t0
    fidelity = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=cfg.seed)
    ceiling = fidelity.accuracy(bundle.test_unbiased)

    groups = torch.arange(bundle.num_classes * bundle.num_private).repeat_interleave(args.per_group)
    y, a = groups // bundle.num_private, groups % bundle.num_private
    print(f"shard 0: {len(shard)} samples, {settings.image_size} px, UNet width {settings.width} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters), {settings.train_steps} training steps "
          f"of batch {settings.batch_size}: {train_s:.1f} s ({1000 * train_s / settings.train_steps:.0f} ms/step), "
          f"{args.threads} thread(s)")
    print(f"fidelity classifiers on the real unbiased test set: class {ceiling['class']:.3f}, "
          f"private {ceiling['private']:.3f} (chance {1 / bundle.num_classes:.3f} / {1 / bundle.num_private:.3f})")
    print(f"guidance scale {settings.guidance_scale}, {len(y)} samples over {bundle.num_classes * bundle.num_private} "
          "groups", "\n")
    print("| DDIM steps | images/s | class fidelity | private fidelity |")
    print("|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        t0 = time.perf_counter()
        images = sample(model, y, a, seed=1, ddim_steps=steps)
        rate = len(y) / (time.perf_counter() - t0)
        fid = fidelity.fidelity(images, y, a)
        print(f"| {steps} | {rate:.1f} | {fid['class']:.3f} | {fid['private']:.3f} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
