"""Mutation kill rate on a uniform random sample of each file's mutants (``make mutation MUTATION_SAMPLE=N``).

Running every mutant of ``fairforget/sisa.py`` or ``verify.py`` takes hours (a surviving mutant runs every
selected test that reaches its function); a uniform sample of N mutants per file, drawn with a fixed seed,
estimates the kill rate with an exact (Clopper-Pearson) 95% interval in minutes to an hour
(``simulations/mutation_report.py --sampled`` prints it).

Steps: (1) generate the mutants (mutmut's own generation; only files changed since the last run are
mutated again), (2) read each file's mutant names from ``mutants/<file>.meta`` and draw
``random.Random(f"{seed}/{file}").sample(sorted(names), N)`` (the same sample for the same seed and the
same mutants), (3) record the samples in ``mutants/mutation-sample.json``, (4) run them with
``mutmut run NAME ...`` (all files' samples in one run: one clean-test run, one forced-fail check).
The tests of a mutant run fastest first (by the durations mutmut recorded), so a killed mutant costs its
first failing test rather than the slow ones before it; the verdicts are mutmut's.

    python simulations/mutation_sample.py --sample 60 --seed 28 fairforget/privacy/dp_sgd.py [FILE ...]
        [--max-children 1] [--dry-run] [--skip-killed] [--max-minutes M]

FILE defaults to every file the ``[tool.mutmut] only_mutate`` patterns select; ``FILE:N`` draws N of that
file's mutants instead of ``--sample``. ``--dry-run`` generates,
draws and records the sample without running it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import signal
import sys
from pathlib import Path

SAMPLES = Path("mutants/mutation-sample.json")


def meta_names(path: str) -> list[str]:
    meta = Path("mutants") / (path + ".meta")
    if not meta.exists():
        return []
    return sorted(json.loads(meta.read_text())["exit_code_by_key"])


KILLED = {1, 3, 24, -24, 36, 152, 255, 37}  # mutmut's exit codes of a killed, timed-out or type-rejected mutant


def verdict(path: str, name: str) -> int | None:
    meta = Path("mutants") / (path + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"].get(name)


def draw(names: list[str], n: int, seed: int, path: str) -> list[str]:
    """A uniform sample without replacement of ``n`` of ``names`` (all of them when n >= len)."""
    names = sorted(names)
    return sorted(random.Random(f"{seed}/{path}").sample(names, min(n, len(names))))


def _generate(max_children: int) -> None:
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants

    Path("mutants").mkdir(exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # mutmut prints every file it walks
        copy_src_dir()
        copy_also_copy_files()
        create_mutants(max_children)


def _fastest_tests_first() -> None:
    """Order each mutant's tests by the duration mutmut recorded for them (unknown last)."""
    from mutmut.runners.harness import PytestRunner
    from mutmut.state import state

    regular = PytestRunner._pytest_args_regular_run

    def ordered(self, tests):  # noqa: ANN001, ANN202 (mutmut's signature)
        durations = state().duration_by_test
        return regular(self, sorted(tests, key=lambda t: (durations.get(t, math.inf), t)))

    PytestRunner._pytest_args_regular_run = ordered


def _interrupt(signum, frame):  # noqa: ANN001, ANN202, ARG001 (a signal handler's signature)
    print(f"mutation_sample: --max-minutes reached, stopping (signal {signum})", file=sys.stderr)
    raise KeyboardInterrupt


def mutable_files() -> list[str]:
    from mutmut.configuration import config
    from mutmut.utils.file_utils import walk_mutatable_files

    config()
    return sorted(str(p) for p in walk_mutatable_files())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="source files, FILE:N to draw N of that one (default: every file "
                                                 "mutmut mutates)")
    parser.add_argument("--sample", type=int, required=True, help="mutants drawn per file")
    parser.add_argument("--seed", type=int, default=28, help="seed of the draw")
    parser.add_argument("--max-children", type=int, default=1, help="mutants run at once")
    parser.add_argument("--dry-run", action="store_true", help="draw and record the sample, run nothing")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop the run after this long (0: no limit); mutants not finished stay unrun, and the "
                             "report counts them apart (a bound that takes them as surviving)")
    parser.add_argument("--skip-killed", action="store_true",
                        help="run only the sampled mutants without a killed verdict (after adding tests: a kill "
                             "stands, mutmut resets the verdicts of a function whose source changed)")
    args = parser.parse_args(argv)
    if args.sample < 1:
        print(f"mutation_sample: error: --sample must be at least 1, got {args.sample}", file=sys.stderr)
        return 2
    _generate(args.max_children)
    files = args.files or mutable_files()
    samples = json.loads(SAMPLES.read_text()) if SAMPLES.exists() else {}
    chosen: list[str] = []
    for spec in files:
        path, _, size = spec.partition(":")  # FILE:N draws N of that file's mutants
        names = meta_names(path)
        if not names:
            print(f"mutation_sample: error: no mutants for {path} (not a file mutmut mutates?)", file=sys.stderr)
            return 2
        picked = draw(names, int(size) if size else args.sample, args.seed, path)
        samples[path] = {"seed": args.seed, "sample": len(picked), "mutants": len(names), "names": picked}
        run = [name for name in picked if not (args.skip_killed and verdict(path, name) in KILLED)]
        chosen += run
        print(f"{path}: {len(picked)} of {len(names)} mutants (seed {args.seed}), {len(run)} to run")
    tmp = SAMPLES.with_suffix(".tmp")
    tmp.write_text(json.dumps(samples, indent=1))
    tmp.replace(SAMPLES)
    if args.dry_run or not chosen:
        return 0
    _fastest_tests_first()
    from mutmut.__main__ import cli

    if args.max_minutes > 0:  # mutmut stops its workers on KeyboardInterrupt and keeps the verdicts it has
        signal.signal(signal.SIGALRM, _interrupt)
        signal.alarm(max(1, int(args.max_minutes * 60)))

    try:
        cli.main(args=["run", "--max-children", str(args.max_children), *chosen], standalone_mode=False)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
