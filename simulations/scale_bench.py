"""Scaling benchmark: how the simulation's wall time grows with the number of clients S at a fixed
total workload (issue 27).

For each S it runs ``fairforget simulate --set num-shards=S --set audit=false`` (default data and
schedule, so the shards together always train the same ~1,079 images for the same epochs) in a
subprocess and reads the run's ``metrics.json``:

* **command wall**: the ``fairforget simulate`` process, end to end (imports, Flower and Ray start-up,
  strategy loop, final evaluation, report);
* **train wall**: Flower's strategy loop (``timing.train_wall_seconds``);
* **serial compute**: the sum of the shards' SISA training seconds (``timing.full_retrain_seconds``),
  what one core would spend on the training alone;
* **2-core ideal**: serial compute / min(S, cores): the training perfectly spread over the cores.

``train wall / ideal`` is the figure of merit: 1.0 means no per-client overhead at all. At S = 16
the benchmark also runs four times the epochs (``epochs-per-slice`` x4), where the fixed per-message
work weighs less.

Run from the repository root (about 10-20 minutes on 2 cores, more on a loaded machine)::

    nice -n 10 python simulations/scale_bench.py                  # S = 2..64 and S = 16 at 4x epochs
    python simulations/scale_bench.py --shards 16,64 --no-epochs  # a subset, first 16 then 64
    python simulations/scale_bench.py --note "machine loaded by 6 other jobs"

Writes ``--out`` (default ``runs/scale-bench.json``, after every run), a plot ``runs/scale-bench.png`` and (not with
``--no-page``) the results page ``docs/results/scaling.md`` with the S measured (:mod:`simulations.results_page`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from simulations.results_page import add_page_option, invocation, page_wanted, write_page  # noqa: E402

DEFAULT_SHARDS = (2, 4, 8, 16, 32, 64)
EPOCHS_S = 16          # the S also run at EPOCHS_FACTOR x the default epochs
EPOCHS_FACTOR = 4
DEFAULT_EPOCHS = 3     # pyproject's epochs-per-slice
DEFAULT_OUT = ROOT / "runs" / "scale-bench.json"
MEASURES = ["clients/", "server/experiment.py", "server/evaluation.py", "strategies/shard_ensemble.py",
            "fairforget/sisa.py", "fairforget/training.py", "simulations/scale_bench.py"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scale_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=",".join(map(str, DEFAULT_SHARDS)),
                   help="comma-separated S values (default 2,4,8,16,32,64)")
    p.add_argument("--no-epochs", action="store_true", help=f"skip the S={EPOCHS_S} run at {EPOCHS_FACTOR}x epochs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="figures as JSON (default runs/scale-bench.json)")
    p.add_argument("--client-cpus", default="1", help="comma-separated client-cpus values for the extra S=8 "
                   "runs that show how many clients run at once (default 1: none extra)")
    p.add_argument("--note", default="", help="a line for the page about the machine (e.g. its load)")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="measure nothing: print, plot and publish the rows an earlier (e.g. interrupted) run saved "
                        "in FILE, stamped with --command, the command that measured them")
    p.add_argument("--baseline", type=Path, metavar="FILE",
                   help="rows (this script's JSON) measured on the code before a change, shown as a second table")
    p.add_argument("--baseline-note", default="", help="a line saying what --baseline measured")
    p.add_argument("--command", default="", help="with --from-json: the command that measured the rows")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take (default 1800)")
    add_page_option(p)
    args = p.parse_args(argv)
    try:
        args.shards = [int(s) for s in args.shards.split(",") if s.strip()]
    except ValueError:
        p.error(f"--shards takes integers such as 2,4,8, got {args.shards!r}")
    if not args.shards or any(not 1 <= s <= 64 for s in args.shards):
        p.error("--shards: each S must be in 1..64")
    return args


def _client_workers(out: Path) -> int | None:
    """How many Ray client workers (Flower's ``ClientAppActor`` processes) of *this* run are alive now:
    the descendants of the simulation process that holds the run folder's lock (Linux only; other
    simulations on the machine are not counted). None where /proc is not there."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    lock = str((out / ".lock").resolve())
    children: dict[int, list[int]] = {}
    names: dict[int, bytes] = {}
    sim = None
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            names[int(d.name)] = (d / "cmdline").read_bytes()
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            if sim is None and b"flwr-simulation" in names[int(d.name)]:
                if any(os.readlink(f) == lock for f in (d / "fd").iterdir()):
                    sim = int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    if sim is None:
        return 0
    count, todo = 0, [sim]
    while todo:
        pid = todo.pop()
        count += b"ClientAppA" in names.get(pid, b"")
        todo += children.get(pid, [])
    return count


def run_one(shards: int, epochs: int, workdir: Path, timeout: float, client_cpus: int = 1) -> dict[str, Any]:
    """One ``fairforget simulate`` of S shards; its walls, the run's training seconds and the most
    client workers seen alive at once (sampled every 0.5 s)."""
    out = workdir / f"s{shards}-e{epochs}-c{client_cpus}"
    cmd = [str(Path(sys.executable).parent / "fairforget"), "simulate", "--quiet", "--out", str(out),
           "--set", f"num-shards={shards}", "--set", "audit=false", "--set", f"epochs-per-slice={epochs}",
           "--set", f"client-cpus={client_cpus}"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"S={shards}: fairforget simulate ran past {timeout:.0f} s")
        peak = max(peak, _client_workers(out) or 0)
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"S={shards}: fairforget simulate exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    timing = metrics["timing"]
    cores = os.cpu_count() or 1
    serial = float(timing["full_retrain_seconds"])
    ideal = serial / min(shards, cores)
    train = float(timing["train_wall_seconds"])
    return {"shards": shards, "epochs_per_slice": epochs, "client_cpus": client_cpus, "peak_client_workers": peak,
            "command_wall_seconds": wall,
            "train_wall_seconds": train, "serial_compute_seconds": serial, "ideal_seconds": ideal,
            "train_over_ideal": train / ideal, "train_over_serial": train / serial,
            "outside_train_seconds": wall - train, "cores": cores,
            "load_before": load0, "load_after": os.getloadavg()[0],
            "model_hashes": [s["model_hash"] for s in metrics["shards"]]}


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| S | epochs/slice | client-cpus | clients at once | command wall s | train wall s | serial compute s "
             "| 2-core ideal s | train / serial | train / ideal | outside the loop s | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def f(value: Any, spec: str = ".1f", unit: str = "") -> str:  # a baseline row may hold a note instead
        return f"{value:{spec}}{unit}" if isinstance(value, int | float) else str(value)

    lines += [f"| {r['shards']} | {r['epochs_per_slice']} | {r['client_cpus']} | {r['peak_client_workers']} | "
              f"{f(r['command_wall_seconds'])} | {f(r['train_wall_seconds'])} | {f(r['serial_compute_seconds'])} | "
              f"{f(r['ideal_seconds'])} | {f(r['train_over_serial'], '.2f', 'x')} | "
              f"{f(r['train_over_ideal'], '.2f', 'x')} | {f(r['outside_train_seconds'])} | "
              f"{f(r['load_before'])} -> {f(r['load_after'])} |" for r in rows]
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    base = [r for r in rows if r["epochs_per_slice"] == DEFAULT_EPOCHS and r["client_cpus"] == 1]
    if not base:
        return None
    s = [r["shards"] for r in base]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("command_wall_seconds", "command wall"), ("train_wall_seconds", "train wall"),
                       ("serial_compute_seconds", "serial compute"), ("ideal_seconds", "2-core ideal")):
        ax.plot(s, [r[key] for r in base], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(s, [str(v) for v in s])
    ax.set_xlabel("clients S (fixed total workload)")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = [(s, DEFAULT_EPOCHS) for s in args.shards]
    plan = [(s, e, 1) for s, e in plan]
    if not args.no_epochs:
        plan.append((EPOCHS_S, DEFAULT_EPOCHS * EPOCHS_FACTOR, 1))
    plan += [(8, DEFAULT_EPOCHS, int(c)) for c in args.client_cpus.split(",") if c.strip() and int(c) != 1]
    rows: list[dict[str, Any]] = []
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, args.note, plan = saved["rows"], args.note or saved.get("note", ""), []
    with tempfile.TemporaryDirectory(prefix="fairforget-scale-") as tmp:
        for shards, epochs, cpus in plan:
            print(f"scale_bench: S={shards}, epochs-per-slice={epochs}, client-cpus={cpus} ...", file=sys.stderr,
                  flush=True)
            try:
                rows.append(run_one(shards, epochs, Path(tmp), args.timeout, cpus))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"scale_bench: error: {exc}", file=sys.stderr)
                return 1
            print("\n".join(table(rows[-1:])[2:]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rows": rows, "note": args.note}, indent=2))  # after every run
    rows.sort(key=lambda r: (r["client_cpus"], r["epochs_per_slice"], r["shards"]))
    print("\n".join(table(rows)))
    figure = plot(rows, args.out.with_suffix(".png"))
    print(f"figures: {args.out}" + (f", {figure}" if figure else ""))
    command = invocation(None if argv is None else [__file__, *argv])
    if args.from_json and args.command:
        command = f"{args.command} (published by: {command})"
    if page_wanted(args, "scaling"):  # the page shows the S measured, whichever they are
        body = [f"`fairforget simulate --set num-shards=S --set audit=false`, default data and schedule: the "
                f"total training work is the same for every S. 2-core ideal = serial compute / min(S, "
                f"{rows[0]['cores']} cores)." + (f" S = {EPOCHS_S} also runs at {EPOCHS_FACTOR}x the epochs." if any(
                    r["epochs_per_slice"] != DEFAULT_EPOCHS for r in rows) else "") + " Rows with client-cpus above 1 "
                "show how many clients run at once. Clients at once: the most Ray client workers of the run alive at "
                "one time (sampled every 0.5 s).", ""]
        if args.note:
            body += [f"!!! warning \"Machine load\"\n    {args.note}", ""]
        body += table(rows)
        if args.baseline:
            body += ["", "### Before", "", args.baseline_note, "",
                     *table(json.loads(args.baseline.read_text())["rows"])]
        write_page("scaling", "Scaling with the number of clients", "\n".join(body), measures=MEASURES,
                   command=command, script="simulations/scale_bench.py",
                   figures=[figure] if figure else ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
