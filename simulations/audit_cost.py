"""Benchmark: what the privacy audit costs, next to what training costs.

``--mode both`` (default) trains the demo configuration once through Flower's simulation engine
(``fairforget simulate``, one Ray worker per client CPU) and prints, side by side for that one run:

* ``sites``: the audit as ``simulate`` runs it now. Every site audits its own shard model with every
  configured attack and trains its reference models itself, on its own held-out data, on the Ray
  workers in parallel, while the ServerApp audits the ensemble (``server/audit.py``). The figure is the
  run's own ``timing.audit_seconds``.
* ``server``: the audit as ``simulate`` ran it before, every target (ensemble and each shard model)
  with its reference models trained one after another in the server's process
  (:func:`fairforget.audit.suite.run_audit` with the shard targets, a fresh reference cache), on the
  same run's models; the Ray workers idle meanwhile. The reference-free site audits of that design
  (a few seconds) are not counted, so this figure is a lower bound of the old cost.

Both are set against the run's training wall time (``timing.train_wall_seconds``: Flower's strategy
loop, Ray start-up and per-round evaluation included). ``--mode sites`` or ``--mode server`` prints one
row (``server`` on an existing ``--run``). ``--mode attacks`` prints what one attack costs on a finished
run: RMIA with 2 references vs LiRA offline with 2 and LiRA online with 8 or 16 shadows.

    python simulations/audit_cost.py [--mode both|sites|server|attacks] [--out runs/audit-cost]
                                     [--run DIR] [--set key=value ...] [--no-page]

``--mode both`` and ``--mode attacks`` also write their part of ``docs/results/audit-cost.md`` (the
table they print, stamped; :mod:`simulations.results_page`); ``sites`` or ``server`` alone do not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fairforget.audit import TargetOutputs, build_attack
from fairforget.audit.references import predict_probs, train_references
from fairforget.audit.roc import summarize
from fairforget.audit.suite import run_audit
from fairforget.data import SampleSet, load_dataset, shard_of
from fairforget.model import load_model
from fairforget.run import RunDir, RunDirError
from fairforget.sisa import SisaSettings
from fairforget.tombstones import Tombstones
from simulations.results_page import add_page_option, invocation, page_wanted, record_stdout, write_page

FAIRFORGET = Path(sys.executable).parent / "fairforget"


def simulate(out: Path, sets: list[str]) -> None:
    cmd = [str(FAIRFORGET), "simulate", "--out", str(out), "--force", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def server_side_seconds(run: RunDir) -> tuple[float, dict]:
    """Every target audited in this process, references trained one after another, none cached."""
    cfg = run.config()
    torch.set_num_threads(max(cfg.num_threads, 1))
    bundle = load_dataset(cfg)
    deleted = run.ledger.unlearned_ids() | Tombstones.for_data(cfg, bundle.records, run_dir=run.path).ids()
    with tempfile.TemporaryDirectory(prefix="audit-cost-") as tmp:
        t0 = time.perf_counter()
        privacy = run_audit(RunDir(Path(tmp)), cfg, bundle, run.load_models(), deleted=deleted, shards=True)
        return time.perf_counter() - t0, privacy


def compare(args: argparse.Namespace) -> int:
    out = Path(args.run or args.out).resolve()
    if args.run is None:
        simulate(out, args.set)
    run = RunDir(out)
    try:
        run.require_finished()
    except RunDirError as exc:
        print(f"audit_cost: error: {exc}", file=sys.stderr)
        return 2
    m = run.metrics()
    cfg = run.config()
    train = m["timing"]["train_wall_seconds"]
    print(f"\naudit cost vs training on {out} ({cfg.num_shards} shards x {cfg.slices} slices, "
          f"{cfg.epochs_per_slice} epochs, width {cfg.model_width}; attacks {cfg.audit_attacks}; "
          f"{cfg.audit_references} references; {cfg.client_cpus} CPU per Ray client)")
    print(f"{'mode':8} {'training wall s':>16} {'audit wall s':>13} {'audit / training':>17}  where the audit ran")
    if args.mode in ("both", "sites"):
        p = m.get("privacy") or {}
        if "sites_seconds" not in p:
            print("sites    (this run has no site audit: audit = false, or a run made before site audits)")
        else:
            audit = m["timing"]["audit_seconds"]
            print(f"{'sites':8} {train:>16.1f} {audit:>13.1f} {audit / train:>16.2f}x  ensemble on the server "
                  f"({p['server_seconds']:.1f} s) while the sites audit their shard models "
                  f"({p['sites_seconds']:.1f} s)")
            per_site = ", ".join(f"{s} {r['seconds']:.1f} s (references {r['reference_seconds']:.1f} s)"
                                 for s, r in p["sites"].items() if "seconds" in r)
            print(f"{'':8} {'':>16} {'':>13} {'':>17}  per site, on the Ray workers: {per_site}")
    if args.mode in ("both", "server"):
        seconds, privacy = server_side_seconds(run)
        print(f"{'server':8} {train:>16.1f} {seconds:>13.1f} {seconds / train:>16.2f}x  every target on the "
              f"server, one after another (references {privacy['references']['train_seconds']:.1f} s)", flush=True)
    return 0


def attacks(args: argparse.Namespace) -> int:
    """RMIA with few references vs LiRA with many, on the ensemble and shard 0 of a finished run."""
    run = RunDir(Path(args.run or "runs/demo"))
    try:
        run.require_finished()
        cfg = run.config()
    except RunDirError as exc:
        print(f"audit_cost: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(cfg.num_threads, 1))
    bundle = load_dataset(cfg)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    deleted = run.ledger.unlearned_ids()
    models = {k: load_model(s, bundle.num_classes, cfg.model_width) for k, s in run.load_models().items()}
    shards = [s.subset([i for i, sid in enumerate(s.ids.tolist()) if sid not in deleted])
              for s in shard_of(cfg, bundle)]
    live = SampleSet.concat(shards)
    rng = np.random.default_rng(cfg.seed + 4242)
    ensemble_members = live.subset(np.sort(rng.permutation(len(live))[: len(bundle.heldout)]))
    targets = {"ensemble": (list(models.values()), ensemble_members, len(live)),
               "shard-0": ([models[0]], shards[0], len(shards[0]))}
    pop = bundle.test_biased
    print(f"attack cost on {run.path} ({len(pop)} population samples, {len(bundle.heldout)} non-members)")
    print(f"{'target':10} {'attack':14} {'refs':>4} {'AUC':>6} {'TPR@1%':>7} {'seconds':>8} {'x RMIA':>7}")
    for tname, (tmodels, members, train_size) in targets.items():
        cand = SampleSet.concat([members, bundle.heldout])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(bundle.heldout), bool)]
        target = TargetOutputs(predict_probs(tmodels, cand.x), cand.y.numpy(), predict_probs(tmodels, pop.x),
                               pop.y.numpy())
        runs = [("rmia", 2, False), ("lira-offline", 2, False)] + [("lira-online", n, True) for n in args.shadows]
        base = None
        for name, count, online in runs:
            t0 = time.perf_counter()
            refs = train_references(pop, cand, count=count, members_per_model=min(train_size, len(pop)),
                                    models_per_reference=len(tmodels), settings=settings, seed=cfg.seed + 99,
                                    online=online)
            r = summarize(build_attack(name).scores(target, refs), is_member, bootstrap=0)
            seconds = time.perf_counter() - t0
            base = base or seconds
            print(f"{tname:10} {name:14} {count:>4} {r['auc']:>6.3f} {r['tpr_at_0.01_fpr']:>7.3f} "
                  f"{seconds:>8.1f} {seconds / base:>6.1f}x", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("both", "sites", "server", "attacks"), default="both")
    parser.add_argument("--out", default="runs/audit-cost", help="where the benchmark's own run goes (replaced)")
    parser.add_argument("--run", help="a finished run to measure instead of training one (server, attacks)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for the benchmark's run (default: the demo's configuration)")
    parser.add_argument("--shadows", type=int, nargs="+", default=[8, 16], help="LiRA-online shadow counts (attacks)")
    add_page_option(parser)
    args = parser.parse_args()
    if args.mode == "sites" and args.run:
        parser.error("--mode sites measures a run it trains itself: leave out --run")
    with record_stdout() as printed:
        code = attacks(args) if args.mode == "attacks" else compare(args)
    if code == 0:
        write_part(args, printed.getvalue())
    return code


# ---------------------------------------------------------------------- results page
PAGE_MEASURES = ["fairforget/audit/", "server/audit.py", "clients/handlers.py", "simulations/audit_cost.py"]
PARTS = {"both": ("sites-vs-server", "Audit at the sites vs on the server", "audit cost vs training on"),
         "attacks": ("attacks", "What one attack costs", "attack cost on")}


def write_part(args: argparse.Namespace, printed: str) -> None:
    """The table this mode printed, as its part of docs/results/audit-cost.md (``both`` and ``attacks`` only)."""
    part, title, header = PARTS.get(args.mode, ("", "", ""))
    start = printed.find(header) if header else -1
    partial = (f"--mode {args.mode} prints one row of the page's table" if not part
               else "the run has no site audit (audit = false?)" if "this run has no site audit" in printed
               else "its table was not printed" if start < 0 else None)
    if page_wanted(args, "audit-cost", partial=partial):
        table = printed[start:].strip()
        write_page("audit-cost", "Audit cost", f"```text\n{table}\n```", measures=PAGE_MEASURES,
                   command=invocation(), part=part, part_title=title)


if __name__ == "__main__":
    sys.exit(main())
