"""The ``fairforget`` command: ``simulate`` a federated run, ``forget`` samples from a finished one,
``audit`` it again. It launches the Flower App (``flwr run``) and checks every name the run config
selects (dataset, strategy, objective, unlearning method, attacks) with the registry that owns it,
before anything is written.

User mistakes (bad config, missing data, unknown ids, a folder that is no run, bad argument syntax)
end with one line ``fairforget: error: ...`` and exit status 2, before anything is written.

Start-up is light: this module imports only what the parser needs (no torch, Opacus, Flower or the
audit package), and each command imports what it uses, so ``--help`` and an argument error answer at
once (``tests/test_cli_startup.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fairforget.config import ConfigError, RunConfig, parse_ids, parse_set, read_toml, resolve
from fairforget.locks import LockBusy, check_free, locked
from fairforget.runner import FlowerRunError, run_flower

if TYPE_CHECKING:
    from fairforget.run import RunDir

STARTED = time.time()  # when this module was loaded: the start of a console command's wait (see main)

EXIT_USAGE = 2
EXIT_RUN = 1

# The errors a user can fix, printed as one line, by the module that defines each. They are looked up
# in sys.modules when a command fails: an exception whose module was never imported cannot have been
# raised, so recognising them imports nothing.
USER_ERRORS = {
    "fairforget.config": "ConfigError", "fairforget.data": "DatasetError", "fairforget.run": "RunDirError",
    "fairforget.audit": "AuditError", "fairforget.ledger": "LedgerError", "fairforget.locks": "LockBusy",
    "fairforget.requests": "RequestError", "fairforget.schemas": "SchemaVersionError",
    "fairforget.privacy.divergence": "DivergenceError", "fairforget.lsi": "LsiError",
    "fairforget.tombstones": "TombstoneError",
}


class UserError(Exception):
    """Anything the user can fix; printed as one line."""


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    return any(module in sys.modules and isinstance(exc, getattr(sys.modules[module], name, ()))
               for module, name in USER_ERRORS.items())


def run_audit(*args: Any, **kwargs: Any) -> dict:
    """:func:`fairforget.audit.suite.run_audit`, imported when an audit runs (not at start-up)."""
    from fairforget.audit.suite import run_audit as audit

    return audit(*args, **kwargs)


# ---------------------------------------------------------------------- simulate
def _config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then ``--config FILE.toml``, then every ``--set key=value``."""
    return resolve(read_toml(Path(args.config)) if args.config else {}, parse_set(args.set or []))


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml",
                        help="a TOML file of run-config keys overriding the defaults (flat keys, or a "
                             "[tool.flwr.app.config] table)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append",
                        help="override one run-config key, e.g. --set num-shards=8 "
                             "(repeatable; applied after --config)")


def cmd_simulate(args: argparse.Namespace) -> int:
    from fairforget.data import shard_of
    from fairforget.privacy.reporting import calibrate
    from fairforget.requests import Request
    from fairforget.run import RunDir
    from strategies import strategy_class

    cfg = _config(args)
    out = Path(args.out if args.out else cfg.out_dir).expanduser().resolve()
    request = Request.simulate()
    cfg = cfg.replace(out_dir=str(out), request=request.id)
    replace = _replaceable(out, args.force)  # before anything else: only a run is ever replaced
    bundle = preflight(cfg)
    calibration = None
    if cfg.dp and strategy_class(cfg.strategy).dp_mechanism == "dp-sgd":  # the sites' noise, chosen before the run
        calibration = calibrate(cfg, [len(s) for s in shard_of(cfg, bundle)], compare=cfg.dp_calibrate != "none",
                                candidates=cfg.dp_calibrate != "none")
        _print_calibration(calibration)
        cfg = cfg.replace(dp_noise_multiplier=calibration["chosen"]["noise_multiplier"], dp_calibrate="none",
                          dp_plan=calibration["plan"]["dp_plan"] if "plan" in calibration else cfg.dp_plan)
    if replace:
        _replace_run(out)
    out.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        RunDir(out).write_calibration(calibration)
    request.save(out)
    print(f"fairforget: training {cfg.num_shards} shards x {cfg.slices} slices of {bundle.name} "
          f"({len(bundle.train)} members) with {cfg.strategy} via Flower; output in {out}", flush=True)
    run_flower(cfg, quiet=args.quiet)
    _print_summary(out)
    return 0


def _replaceable(out: Path, force: bool) -> bool:
    """Whether ``out`` holds a run that ``--force`` replaces; a folder with other files (or a run
    without ``--force``) is a :class:`UserError`, and nothing is deleted."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not force:
        raise UserError(f"{out} already holds files; choose another --out or pass --force to replace it")
    if out == Path(out.anchor) or out == Path.home().resolve() or Path.cwd().resolve().is_relative_to(out):
        raise UserError(f"--force will not replace {out}: it is the root, the home folder or holds the current folder")
    if not _holds_run(out):
        raise UserError(f"--force replaces only a fairforget run, and {out} holds none (no valid config.toml); "
                        "nothing was deleted")
    return True


def _holds_run(out: Path) -> bool:
    """``out/config.toml`` is a run config a fairforget run wrote (a valid config naming its own
    out-dir, mode and shards: an empty or foreign TOML file is not)."""
    from fairforget.run import RunDir, RunDirError

    run = RunDir(out)
    if not run.config_path.is_file():
        return False
    try:
        run.config()
        return {"out-dir", "num-shards", "strategy"} <= set(read_toml(run.config_path))
    except (RunDirError, ConfigError):
        return False


def _replace_run(out: Path) -> None:
    """Replace the run in ``out`` by an empty folder, keeping its tombstones (the deletions its data
    owner recorded: no later run may train on those records). The new folder is made beside it and
    swapped in (:func:`fairforget.storage.replace_dir`), so a crash never leaves the tombstones lost."""
    from fairforget.run import RunDir
    from fairforget.storage import atomic_write_bytes, replace_dir
    from fairforget.tombstones import Tombstones

    try:
        check_free(out, "simulate --force")  # a command still writing the old run
    except LockBusy as exc:
        raise UserError(str(exc)) from None
    fresh = out.with_name(f".{out.name}.new-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    old = Tombstones.of_run(out).path
    if old.is_file():
        atomic_write_bytes(Tombstones.of_run(fresh).path, old.read_bytes())
    unfinished = RunDir(out).ledger.pending_ids()  # deletions decided but not finished: deleted all the same
    if unfinished:
        Tombstones.of_run(fresh).add(unfinished)
    replace_dir(fresh, out)


def _print_calibration(c: dict) -> None:
    t, fpr = c["target"], c["target"]["fpr"]
    key = f"tpr_bound_at_{fpr:g}_fpr"

    def line(name: str, f: dict) -> str:
        return (f"  {name:<44} sigma {f['noise_multiplier']:6.3f}  epsilon {f['epsilon']:7.3f}  mu {f['mu']:6.3f}  "
                f"TPR bound at {fpr:.1%} FPR {f[key]:.3f}")

    print(f"fairforget: DP-SGD noise for the smallest shard ({c['smallest_shard']} samples, stages "
          f"{c['stage_sizes']}), delta {t['delta']:g}; dp-calibrate = {c['mode']}:")
    print(line("used by this run", c["chosen"]))
    if "plan" in c:  # the DP-aware schedule (fairforget/privacy/planner.py)
        p = c["plan"]
        print(f"  planned schedule ({p['model']}; room for {p['retrains']} full retrains within dp-max-epsilon "
              f"{p['max_epsilon']:g}: epsilon {p['epsilon_with_retrains']:.3f} with them): " + "; ".join(
                  f"stage {i} ({st['samples']} samples): {st['steps']} steps, batch {st['batch_size']} (q "
                  f"{st['sample_rate']:.2f}), lr {st['lr']:g}, clip {st['max_grad_norm']:g}"
                  for i, st in enumerate(p["stages"], 1)))
    print(line(f"attack risk: TPR <= {t['tpr']:g} at {fpr:g} FPR (mu-GDP)", c["attack_risk"]))
    if "epsilon_first" in c:
        via = c["attack_risk_via_epsilon"]
        print(line(f"same risk, epsilon-first (epsilon = {via['target_epsilon']:.2f})", via))
        for eps, f in c["epsilon_first"].items():
            print(line(f"epsilon-first, epsilon = {eps}", f))
    if "candidates" in c:
        _print_candidates(c["candidates"])


def _print_candidates(k: dict) -> None:
    """The settings that meet the same target, with their Delta-divergence to the least vulnerable one."""
    if k.get("error"):
        print(f"settings meeting the same target: no Delta-divergence ({k['error']})")
        return
    print(f"settings meeting the same target ({k['target']}), by the worst-case excess vulnerability Delta over "
          f"the least vulnerable one ({k['method']}):")
    for name, r in k["settings"].items():
        tag = " (this run's)" if r["chosen"] else ""
        tag += " least vulnerable" if name == k["least_vulnerable"] else ""
        print(f"  {name + tag:<58} sigma {r['noise_multiplier']:6.3f}  epsilon {r['epsilon']:7.3f}  "
              f"mu {r['mu']:6.3f}  steps {r['steps']:5d}  Delta {r['delta_excess']:.4f}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fairforget.data import load_dataset, shard_of
    from fairforget.privacy.reporting import calibrate

    cfg = _config(args)
    if args.shard_size:
        sizes = [args.shard_size]
    else:
        sizes = [len(s) for s in shard_of(cfg, load_dataset(cfg))]
    c = calibrate(cfg, sizes, candidates=True)
    _print_calibration(c)
    print(f"dp-noise-multiplier = {c['chosen']['noise_multiplier']:.4f}")
    if "plan" in c:  # what a ServerApp run (not `fairforget simulate`, which plans itself) is given
        print(f"dp-plan = '{c['plan']['dp_plan']}'")
    return 0


def preflight(cfg: RunConfig):
    """Every check that needs no Flower: the data root, the partition, and each registered name."""
    from fairforget.audit.suite import check_audit_config
    from fairforget.data import load_dataset, shard_of
    from fairforget.sisa import SisaSettings
    from fairforget.unlearning import get_unlearner
    from strategies import build_strategy, strategy_class

    cfg.check_simulation_resources()  # client-cpus / client-gpus this machine can give (else Ray waits forever)
    bundle = load_dataset(cfg)  # fail on a bad data root before starting Flower
    shard_of(cfg, bundle)
    build_strategy(cfg, bundle.num_classes)
    # the objective's name (DP with a batch-coupled objective is refused by build_strategy above, which
    # every ServerApp route runs too, and at the site by its DP-SGD training)
    SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private).build_objective()
    get_unlearner(cfg.unlearn_method)
    if cfg.model != "simple-conv" and not strategy_class(cfg.strategy).keeps_shard_models:
        raise UserError(f"config key 'model' = {cfg.model!r}: only a strategy that trains shard models (SISA) "
                        f"builds the model by name; strategy {cfg.strategy!r} averages SimpleConvNet")
    if cfg.audit:
        check_audit_config(cfg, bundle)
    if cfg.dp and cfg.dp_calibrate != "none" and strategy_class(cfg.strategy).dp_mechanism != "dp-sgd":
        raise UserError(f"dp-calibrate = {cfg.dp_calibrate!r} calibrates the shards' DP-SGD; strategy "
                        f"{cfg.strategy!r} takes dp-noise-multiplier as it is (dp-calibrate = \"none\")")
    return bundle


def _print_summary(out: Path) -> None:
    from fairforget.run import RunDir

    m = RunDir(out).metrics()
    ens = m["ensemble"]
    print(f"accuracy: biased test {ens['biased']['accuracy']:.3f}, unbiased test {ens['unbiased']['accuracy']:.3f}, "
          f"worst group {ens['unbiased']['worst_group']['accuracy']:.3f}")
    print("shard KL bias: " + ", ".join(f"{s['shard']}: {s['kl_bias']:.3f}" for s in m["shards"]))
    for row in (m.get("augmentation") or {}).get("rows", []):
        mia = row.get("mia") or {}
        auc = ", ".join(f"{a} {r['auc']:.3f}" for a, r in mia.items())
        print(f"{row['name']}: unbiased {row['accuracy_unbiased']:.3f}, worst group "
              f"{row['worst_group']['accuracy']:.3f}; MIA AUC {auc}")
    dp = m.get("dp")
    if dp:
        ens = dp["ensemble"]
        print(f"DP: ensemble (worst shard) epsilon {ens['epsilon']:.3f} at delta {ens['delta']:g}, mu {ens['mu']:.3f}; "
              f"any membership attack: TPR <= {ens['tpr_bound']['0.001']:.3f} at 0.1% FPR, "
              f"<= {ens['tpr_bound']['0.01']:.3f} at 1% FPR")
        for k, v in (dp.get("shards") or {}).items():
            print(f"  shard {k}: epsilon {v['epsilon']:.3f}, mu {v['mu']:.3f}, {v['steps']} DP-SGD steps")
    _print_violations(m.get("privacy") or {})
    print(f"metrics: {out / 'metrics.json'}")
    print(f"report:  {out / 'report.md'}")


def _print_violations(privacy: dict) -> bool:
    found = privacy.get("dp_bound_violations") or []
    for v in found:
        print(f"WARNING: the audit refutes the DP claim: {v}", file=sys.stderr)
    return bool(found)


# ---------------------------------------------------------------------- forget
def cmd_forget(args: argparse.Namespace) -> int:
    from fairforget.data import load_dataset
    from fairforget.requests import Request
    from fairforget.run import RunDir
    from fairforget.tombstones import Tombstones
    from fairforget.unlearning import get_unlearner
    from strategies import build_strategy, refusal, strategy_class

    run = RunDir(Path(args.run).expanduser().resolve())
    run.require_finished()
    check_free(run.path, "forget")  # another command writing the run: one line now, not after Flower starts
    pending = run.ledger.pending()  # validates the ledger (a torn last line is an unfinished intent)
    sets = _request_options(args)
    cfg = resolve(run.config().to_mapping(), sets).replace(out_dir=str(run.path))
    cfg.check_simulation_resources()  # a run moved to a machine with fewer cores or no GPU
    get_unlearner(cfg.unlearn_method)
    if not strategy_class(cfg.strategy).exact_unlearning:
        raise UserError(f"run {run.path}: {refusal(strategy_class(cfg.strategy), cfg.strategy)}")
    if args.ids_file:
        try:
            text = Path(args.ids_file).read_text()
        except OSError as exc:
            raise UserError(f"cannot read --ids-file {args.ids_file}: {exc.strerror}") from None
        ids = parse_ids(text)
    else:
        ids = args.ids or []  # parsed by the parser (_id_list)
    if not ids and not args.resume:
        raise UserError("no sample ids given (--ids 3,17,42 or --ids-file FILE)")
    if not ids and not pending:
        print(f"fairforget: {run.path} has no unfinished deletion; nothing to resume")
        return 0
    waiting = sorted(set(ids) & run.ledger.pending_ids())
    if waiting:
        raise UserError(f"sample id(s) {', '.join(map(str, waiting))} belong to an unfinished deletion; run "
                        f"`fairforget forget --run {run.path} --resume` to finish it")
    for request_no, shards in sorted(pending.items()):
        print(f"fairforget: request {request_no} is unfinished at shard(s) {', '.join(map(str, sorted(shards)))} "
              "(a crash or a failed node); finishing it first", flush=True)
    run.load_budget(build_strategy(cfg, load_dataset(cfg).num_classes).budget)  # a broken budget.json: one line
    owner = _owners(cfg)
    unknown = sorted(i for i in ids if i not in owner)
    if unknown:
        shown = ", ".join(map(str, unknown[:20]))
        raise UserError(f"unknown sample id(s) (not a training member of this run): {shown}")
    # an erasure request repeated is satisfied, not an error: name the request that deleted it
    already = _print_satisfied(run.ledger.receipts(ids))
    tombstoned = Tombstones.for_data(cfg, load_dataset(cfg).records, run_dir=run.path).ids()  # an earlier run's
    already |= _print_satisfied([{"id": i, "tombstoned": True} for i in sorted(set(ids) & tombstoned - already)])
    ids = [i for i in ids if i not in already]
    if not ids and not pending:
        print("fairforget: nothing left to delete: every id was deleted by an earlier request")
        return 0
    before = {s["shard"]: s for s in run.metrics()["shards"]}
    shards = sorted({owner[i] for i in ids})
    if ids:
        print(f"fairforget: forgetting {len(ids)} sample(s) owned by shard(s) {', '.join(map(str, shards))}",
              flush=True)
    request = Request.forget(ids, options=sets)
    request.save(run.path)
    launched = time.time()
    status = run_flower(run.config().replace(out_dir=str(run.path), request=request.id), quiet=args.quiet)
    returned = time.time()
    _print_satisfied(status.get("satisfied") or [])
    mine = {int(r) for r in status.get("deleted", {})}  # the ledger requests *this* run completed
    for entry in [e for e in run.ledger.entries() if e["request"] in mine]:
        how = (f"approximately ({entry['method']})" if entry.get("decision") == "approximate" else
               f"retrained from stage {entry['restart_stage']}"
               + (" (budget spent: exact fallback)" if entry.get("decision") == "exact-fallback" else ""))
        if entry.get("resumed"):
            how = "finished after a crash (the node had committed it)"
        print(f"request {entry['request']}, shard {entry['shard']}: {len(entry['ids'])} id(s), {how} in "
              f"{entry['seconds']:.2f}s; model {entry['hash_before'] or '?'} -> {entry['hash_after']}")
        if "capacity_before" in entry:
            print(f"shard {entry['shard']}: deletion capacity {entry['capacity_before']} -> {entry['capacity_after']} "
                  f"of {entry['capacity']} left")
    if not mine:
        print("fairforget: nothing was deleted by this request")
        return 0
    untouched = [k for k in before if k not in shards]
    print(f"untouched shards: {', '.join(map(str, untouched)) or 'none'}")
    last = next((u for u in reversed(run.metrics()["unlearning"]) if u["request"] in mine), None)
    waited = _record_wait(run.path, request.id, status, args.started, launched, returned)
    if last is not None:
        sp = last["speedup_vs_full_retrain"]
        print(f"unlearning {last['seconds']:.2f}s vs full retrain {last['full_retrain_seconds']:.2f}s"
              + (f" ({sp:.1f}x faster)" if sp else "") + f"; {waited}")
        print(f"accuracy after: biased {last['accuracy_biased']:.3f}, unbiased {last['accuracy_unbiased']:.3f}")
    else:
        print(waited)
    print(f"ledger:  {run.path / 'ledger.jsonl'}")
    print(f"report:  {run.path / 'report.md'}")
    return 0


def wait_phases(timing: dict, started: float, launched: float, returned: float, now: float) -> dict:
    """The command's wall (``started`` to ``now``, epoch seconds) in consecutive phases: ``startup``,
    this command's until Flower is launched (imports, the run folder's checks, the partition);
    ``flower_startup``, Flower's until the driver starts (SuperLink, Ray, the ServerApp's imports); the
    driver's own phases (:class:`server.forget.Phases`, from ``timing``, the request status's block);
    ``flower_shutdown`` after the driver; ``other``: the rest (the driver's work between its phases,
    this summary). They add up to ``wall_seconds``."""
    driver = timing.get("driver_started_at")
    if driver is None:  # a run that reported no timing: Flower's part is one block
        parts = {"startup": launched - started, "flower": returned - launched}
    else:
        parts = {"startup": launched - started, "flower_startup": driver - launched, **timing.get("phases", {}),
                 "flower_shutdown": returned - driver - timing.get("driver_seconds", 0.0)}
    return {"wall_seconds": now - started, "phases": {**parts, "other": now - started - sum(parts.values())}}


def _record_wait(run_path: Path, request_id: str, status: dict, started: float, launched: float,
                 returned: float) -> str:
    """The user's wait, added to the request's status file (``timing.command``, beside the driver's
    phases) and said in one clause: "you waited 78.8 s: start-up 5.1 s, Flower start-up 30.2 s, ..."."""
    from fairforget.requests import status_path
    from fairforget.site_secret import write_private_json

    timing = status.get("timing") or {}
    wait = wait_phases(timing, started, launched, returned, time.time())
    write_private_json(status_path(run_path, request_id), {**status, "timing": {**timing, "command": wait}})
    said = {"startup": "start-up", "flower_startup": "Flower start-up", "flower_shutdown": "Flower shutdown"}
    return f"you waited {wait['wall_seconds']:.1f} s: " + ", ".join(
        f"{said.get(k, k)} {v:.1f} s" for k, v in wait["phases"].items())


def _request_options(args: argparse.Namespace) -> dict:
    """``--set`` / ``--method`` of a deletion request: its own options, checked."""
    from fairforget.requests import FIXED_KEYS, OPTION_PREFIXES

    sets = parse_set(args.set or [])
    fixed = sorted(k for k in sets if k in FIXED_KEYS)
    if fixed:
        raise UserError(f"forget --set {', '.join(fixed)}: the capacity parameters are fixed when the run is "
                        "created (only capacity-policy may change per request)")
    other = sorted(k for k in sets if not k.startswith(OPTION_PREFIXES))
    if other:
        raise UserError(f"forget --set takes only the unlearn-*, unlearner-options, newton-*, capacity-policy and "
                        f"augment-on-delete keys, got {', '.join(other)}")
    if getattr(args, "method", None):
        sets["unlearn-method"] = args.method
    return sets


def _print_satisfied(rows: list[dict]) -> set[int]:
    """Print each already-deleted id with the request that deleted it and its receipt; returns the ids."""
    for r in rows:
        if "request" in r:
            print(f"fairforget: {'record ' + ', '.join(r['record']) if r.get('record') else 'sample ' + str(r['id'])} "
                  f"was already deleted by request {r['request']} (shard {r['shard']}, model {r['hash_after']}, "
                  f"{r.get('time', '')}): satisfied")
        else:
            print(f"fairforget: sample {r['id']} was already deleted at its data's owner (tombstone of an earlier "
                  "run): satisfied")
    return {int(r["id"]) for r in rows}


# ---------------------------------------------------------------------- request (deployment)
def cmd_request(args: argparse.Namespace) -> int:
    """Write a deletion request into a deployment's run folder (on the machine where the ServerApp
    runs) and print the ``flwr run`` key that starts it; the run config then names only the request's
    random id, so no site learns whose record is deleted."""
    from fairforget.requests import Request, parse_records, status_path
    from fairforget.run import RunDir

    run = RunDir(Path(args.run).expanduser().resolve())
    run.require_finished()
    records = parse_records(args.records or "")
    if not records and not args.resume:
        raise UserError("no record ids given (--site SITE --records P-0003,P-0004, or --resume)")
    if records and not (args.site or "").strip():
        raise UserError("--records needs --site (the site whose record ids they are)")
    request = Request.forget(site=args.site or "", records=records, options=_request_options(args))
    path = request.save(run.path)
    print(f"fairforget: request {request.id} written to {path}")
    print(f'start it with: flwr run . <federation> --stream --run-config \'... out-dir="{run.path}" '
          f'request="{request.id}"\'')
    print(f"its outcome: {status_path(run.path, request.id)}")
    return 0




# ---------------------------------------------------------------------- audit
AUDIT_KEYS = ("audit-attacks", "attack-options", "audit-references", "audit-bootstrap")


def cmd_audit(args: argparse.Namespace) -> int:
    from fairforget.requests import Request
    from fairforget.run import RunDir

    run = RunDir(Path(args.run).expanduser().resolve())
    run.require_finished()
    sets = parse_set(args.set or [])
    other = sorted(k for k in sets if k not in AUDIT_KEYS)
    if other:
        raise UserError(f"audit --set takes only {', '.join(AUDIT_KEYS)}, got {', '.join(other)}")
    cfg = resolve(run.config().to_mapping(), sets).replace(out_dir=str(run.path), audit=True)
    if run.ledger.pending():  # models of an unfinished deletion may still hold its ids: finish it first
        check_free(run.path, "audit")
        print("fairforget: the run has an unfinished deletion; finishing it first", flush=True)
        request = Request.forget()
        request.save(run.path)
        run_flower(cfg.replace(request=request.id), quiet=True)
    with locked(run.path, "audit"):
        return _audit(run, cfg)


def _audit(run: RunDir, cfg: RunConfig) -> int:
    from fairforget.data import load_dataset
    from fairforget.report import write_report
    from fairforget.tombstones import Tombstones
    from strategies import build_strategy

    bundle = load_dataset(cfg)
    states = run.load_models()
    print(f"fairforget: auditing {len(states)} model(s) of {run.path}", flush=True)
    metrics = run.metrics()
    deleted = run.ledger.unlearned_ids() | Tombstones.for_data(cfg, bundle.records, run_dir=run.path).ids()
    privacy = run_audit(run, cfg, bundle, states, deleted=deleted, dp=metrics.get("dp"),
                        predictor=build_strategy(cfg, bundle.num_classes).predictor())
    if "sites" in metrics.get("privacy", {}):  # site audits need the federation: keep the last ones
        privacy["sites"] = metrics["privacy"]["sites"]
    metrics["privacy"] = privacy
    run.write_metrics(metrics)
    write_report(run.path)
    for target, attacks in privacy["targets"].items():
        print(f"{target}: " + ", ".join(f"{n} AUC {r['auc']:.3f} TPR@1%FPR {r['tpr_at_0.01_fpr']:.3f}"
                                         for n, r in attacks.items()))
    from fairforget.audit.probe import describe
    for target, p in privacy["attribute_inference"].items():
        print(f"{target}: {describe(p)}")
    print(f"audit took {privacy['seconds']:.1f}s; report: {run.path / 'report.md'}")
    if _print_violations(privacy):
        print("fairforget: error: an attack proves more than the differential-privacy claim allows (Clopper-Pearson "
              "bounds on both error rates, corrected for the tests made): a bug in training, accounting or the attack "
              "(see the report)", file=sys.stderr)
        return EXIT_RUN
    return 0


# ---------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from fairforget.report import write_report
    from fairforget.run import RunDir
    from fairforget.verify import SITE_ONLY, VerifyError, verify_run, write_verification
    from strategies import strategy_class

    if args.state_dir:
        return _verify_site(args)
    if not args.run:
        raise UserError("verify needs --run DIR (a run folder) or --state-dir STATE (a site's own shard)")
    if args.data_root or args.tombstones or args.config or args.set:
        raise UserError("--data-root, --tombstones, --config and --set go with --state-dir (a site's verification)")
    run = RunDir(Path(args.run).expanduser().resolve())
    run.require_finished()
    cfg = run.config()
    if not strategy_class(cfg.strategy).keeps_shard_models:
        raise UserError(f"run {run.path} used strategy '{cfg.strategy}', which keeps no shard models to verify")
    if args.shard is not None and not 0 <= args.shard < cfg.num_shards:
        raise UserError(f"no shard {args.shard}: the run has shards 0-{cfg.num_shards - 1}")
    shards = list(range(cfg.num_shards)) if args.shard is None else [args.shard]
    print(f"fairforget: replaying the SISA training of shard(s) {', '.join(map(str, shards))} of {run.path}"
          + (" as each site would, from its state folder (OUT/nodes/shard-K) and its recorded DP seeds"
             if args.site_local else ""), flush=True)
    try:
        with locked(run.path, "verify"):  # no forget may change the models while they are replayed
            verdicts = verify_run(run.path, cfg, shards, site_local=args.site_local)
            write_verification(run.path, verdicts)
            write_report(run.path)
    except (VerifyError, LockBusy) as exc:
        raise UserError(str(exc)) from None
    code = _print_verdicts(verdicts)
    if args.site_local and cfg.dp:
        print("note: in simulation every site's state folder (its secret DP seeds included) sits beside the server's "
              "run folder on this machine, so the DP guarantee does not hold against the server here; in a "
              "deployment each site keeps its own and runs `fairforget verify --state-dir STATE --data-root ROOT`")
    elif any(v.status == SITE_ONLY for v in verdicts):
        print(f"site-only: the DP randomness is each site's secret; a site replays its shard with `fairforget verify "
              f"--state-dir STATE --data-root ROOT` (in this simulation: `fairforget verify --run {run.path} "
              "--site-local`)")
    print(f"receipt: {run.path / 'verify.json'}")
    return code


def _site_state(args: argparse.Namespace, command: str) -> tuple[Path, Any]:
    """A site's ``--state-dir STATE --data-root ROOT`` (with ``--run DIR`` or ``--config`` / ``--set``):
    its shard's state folder and the run config reading its own data; one line for what is missing."""
    from fairforget.run import RunDir

    if args.shard is not None:
        raise UserError("--shard goes with --run; with --state-dir the shard is the state folder's")
    if not args.data_root:
        raise UserError(f"{command} --state-dir needs --data-root ROOT: the site's own data (its image folder)")
    if args.run and (args.config or args.set):
        raise UserError("give the run config once: --run DIR (its config.toml) or --config / --set")
    cfg = RunDir(Path(args.run).expanduser().resolve()).config() if args.run else _config(args)
    state = Path(args.state_dir).expanduser().resolve()
    if not state.is_dir():
        raise UserError(f"--state-dir {state} is not a folder")
    return state, cfg.replace(data_root=str(Path(args.data_root).expanduser().resolve()))


def _verify_site(args: argparse.Namespace) -> int:
    """``verify --state-dir STATE --data-root ROOT``: a site replays its own shard with its own DP seeds."""
    from fairforget.verify import VerifyError, verify_site

    if args.site_local or args.shard is not None:
        raise UserError("--site-local and --shard go with --run; with --state-dir the shard is the state folder's")
    state, cfg = _site_state(args, "verify")
    print(f"fairforget: replaying the SISA training of the shard in {state} on {cfg.data_root}"
          + (" with this site's recorded DP seeds" if cfg.dp else ""), flush=True)
    try:
        with locked(state, "verify"):  # the node may not change the shard while it is replayed
            verdict = verify_site(state, cfg, tombstones=args.tombstones)
    except (VerifyError, LockBusy) as exc:
        raise UserError(str(exc)) from None
    code = _print_verdicts([verdict], what="the model this site serves")
    if cfg.dp:
        print("the DP seeds never left this site (STATE/dp-seeds.json, mode 0600): nobody else can replay this "
              "shard; nothing was written")
    return code


def _print_verdicts(verdicts: list, what: str = "") -> int:
    from fairforget.verify import MATCH, MISMATCH

    for v in verdicts:
        head = f"shard {v.shard}: {v.status}"
        if v.replay_hash is not None:
            head += f" (replay {v.replay_hash}, served {v.served_hash}"
            head += f", ledger {v.ledger_hash} of request {v.ledger_request})" if v.ledger_hash else ", no ledger line)"
            head += f" in {v.seconds:.2f}s; {v.live} live, {v.deleted} deleted"
        print(head + (f": {v.note}" if v.note else ""))
        for p in v.problems:
            print(f"  {p}")
    mismatched = [v.shard for v in verdicts if v.status == MISMATCH]
    proven = [v.shard for v in verdicts if v.status == MATCH]
    print(f"verified: {len(proven)} of {len(verdicts)} shard(s) match their from-scratch replay"
          + (f" ({what})" if what else "")
          + (f"; MISMATCH: shard(s) {', '.join(map(str, mismatched))}" if mismatched else ""))
    return EXIT_RUN if mismatched else 0


def _owners(cfg) -> dict[int, int]:
    """sample id -> shard, from the run's deterministic partition."""
    from fairforget.data import load_dataset, shard_of

    bundle = load_dataset(cfg)
    return {int(i): k for k, shard in enumerate(shard_of(cfg, bundle)) for i in shard.ids.tolist()}


# ---------------------------------------------------------------------- compare
def cmd_compare(args: argparse.Namespace) -> int:
    from fairforget.compare import CompareError, write

    out = Path(args.out)
    if out.suffix in (".md", ".png"):
        out = out.with_suffix("")
    try:
        md, png, rows = write([Path(r) for r in args.runs], out)
    except CompareError as exc:
        raise UserError(str(exc)) from None
    print(f"compared {len(rows)} runs: {md} and {png}")
    return 0


# ---------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """Laplace Sample Information of a shard's records, at its site (:mod:`fairforget.lsi`)."""
    from fairforget.run import RunDir

    if args.state_dir:
        state, cfg = _site_state(args, "inspect")
        from fairforget.lsi import inspect_site

        with locked(state, "inspect"):
            summaries = [inspect_site(state, cfg, args.prior_precision)]
    else:
        if not args.run:
            raise UserError("inspect needs --run DIR (a simulation's run folder) or --state-dir STATE (a site's shard)")
        if args.data_root or args.config or args.set:
            raise UserError("--data-root, --config and --set go with --state-dir (a site's inspection)")
        run = RunDir(Path(args.run).expanduser().resolve())
        run.require_finished()
        cfg = run.config()
        if args.shard is not None and not 0 <= args.shard < cfg.num_shards:
            raise UserError(f"no shard {args.shard}: the run has shards 0-{cfg.num_shards - 1}")
        shards = list(range(cfg.num_shards)) if args.shard is None else [args.shard]
        from fairforget.lsi import inspect_run

        with locked(run.path, "inspect"):
            summaries = inspect_run(run.path, cfg, shards, args.prior_precision)
    for s in summaries:
        folder = Path(s["folder"]) / "lsi"
        classes = ", ".join(f"{c}: {v['mean']:.3g}" for c, v in s["classes"].items())
        print(f"shard {s['shard']}: {s['records']} records, LSI median {s['median']:.3g} nats, mean {s['mean']:.3g}, "
              f"top decile from {s['deciles'][-1]:.3g}; class means {classes}")
        print(f"  per record (stays at the site): {folder / 'records.csv'}; summary (shareable, no ids): "
              f"{folder / 'summary.json'}")
    return 0


# ---------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """argparse whose syntax errors are the command's one-line :class:`UserError` (not a usage block
    and an exit inside the parser); the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _id_list(text: str) -> list[int]:
    """``--ids`` as argparse parses it: a syntax error is an argument error, before any run is read."""
    try:
        return parse_ids(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fairforget",
        description="Federated privacy-preserving debiasing on Flower: SISA shard ensembles, exact "
                    "unlearning and reports.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate", help="train a federated run through Flower's simulation engine",
        description="Train one SISA shard model per Flower client through `flwr run` (Ray backend) and "
                    "write OUT/metrics.json, OUT/ledger.jsonl, OUT/report.md (with PNG plots) and "
                    "OUT/config.toml. Defaults: pyproject.toml [tool.flwr.app.config].",
    )
    _add_config_args(sim)
    sim.add_argument("--out", metavar="DIR", help="output folder (default: the out-dir key, runs/demo)")
    sim.add_argument("--force", action="store_true", help="replace an output folder that already holds files")
    sim.add_argument("--quiet", action="store_true", help="hide Flower's streamed logs")
    sim.set_defaults(func=cmd_simulate)

    fg = sub.add_parser(
        "forget", help="delete samples from a finished run (exact SISA unlearning)",
        description="Route deletion requests to the shards that own the samples, retrain only those "
                    "shards from their last clean checkpoint, and update the run's models, metrics, "
                    "ledger and report.",
    )
    fg.add_argument("--run", metavar="DIR", required=True, help="the folder of a finished `simulate` run")
    ids = fg.add_mutually_exclusive_group(required=True)
    ids.add_argument("--resume", action="store_true",
                     help="finish the deletions a crash or a failed node left unfinished (the ledger's intents "
                          "without a completion line), and nothing else; `forget --ids` does this first too")
    ids.add_argument("--ids", metavar="ID,ID,...", type=_id_list, help="comma-separated sample ids, e.g. 3,17,42")
    ids.add_argument("--ids-file", metavar="FILE", help="a file of sample ids, separated by commas or newlines")
    fg.add_argument("--method", metavar="NAME",
                    help="unlearning method (the unlearn-method key): exact-sisa (default), finetune, neggrad, "
                         "scrub, newton, del or rem (corrupted data), or an unlearner plugin (its name or "
                         "package.module:Attr); the approximate ones spend the shard's deletion budget")
    fg.add_argument("--set", metavar="KEY=VALUE", action="append",
                    help="override an unlearn-*, unlearner-options, newton-*, capacity-policy or augment-on-delete key "
                         "for this request, "
                         "e.g. --set capacity-policy=refuse (repeatable; the capacity-bound, -eps, -delta and -c "
                         "parameters are fixed when the run is created)")
    fg.add_argument("--quiet", action="store_true", help="hide Flower's streamed logs")
    fg.set_defaults(func=cmd_forget)

    rq = sub.add_parser(
        "request", help="deployment: write a deletion request for the ServerApp (run on the coordinator)",
        description="Write a deletion request into a deployment's run folder, where only the ServerApp reads it, "
                    "and print the request id to start it with `flwr run ... --run-config 'request=\"ID\"'`. The "
                    "request goes to the named site alone; no run config (which every site receives) names it. "
                    "Its outcome is written to DIR/requests/ID.status.json.",
    )
    rq.add_argument("--run", metavar="DIR", required=True, help="the deployment's out-dir on this machine")
    rq.add_argument("--site", metavar="SITE", help="the site whose record ids --records names")
    what = rq.add_mutually_exclusive_group(required=True)
    what.add_argument("--records", metavar="ID,ID,...", help="the site's own record ids (its labels.csv id column)")
    what.add_argument("--resume", action="store_true", help="finish the unfinished deletions only")
    rq.add_argument("--method", metavar="NAME", help="unlearning method (default exact-sisa)")
    rq.add_argument("--set", metavar="KEY=VALUE", action="append",
                    help="an unlearn-*, newton-*, capacity-policy or augment-on-delete key for this request")
    rq.set_defaults(func=cmd_request)

    ca = sub.add_parser(
        "calibrate", help="choose the DP-SGD noise for a run config (and print the alternatives)",
        description="For the planned SISA training of the smallest shard, the noise multiplier that keeps any "
                    "membership attack at or below dp-target-tpr at dp-target-fpr (mu-GDP bound), next to the "
                    "noise an epsilon-first calibration chooses (epsilon = 1, 4, 8, and the epsilon that implies "
                    "the same risk). `simulate` does this itself; a deployment passes the printed "
                    "dp-noise-multiplier in its run config.",
    )
    _add_config_args(ca)
    ca.add_argument("--shard-size", type=int, metavar="N",
                    help="calibrate for a shard of N samples (a site's size) instead of the run's own partition")
    ca.set_defaults(func=cmd_calibrate)

    au = sub.add_parser(
        "audit", help="run the privacy audit on a finished run",
        description="Membership inference (LOSS, confidence, entropy, LiRA, RMIA) against the ensemble "
                    "and every shard model, and the attribute-inference probes (the strongest named); updates "
                    "metrics.json and report.md. Offline reference models are cached in DIR/audit/.",
    )
    au.add_argument("--run", metavar="DIR", required=True, help="the folder of a finished `simulate` run")
    au.add_argument("--set", metavar="KEY=VALUE", action="append",
                    help="override audit-attacks, audit-references or audit-bootstrap for this audit, "
                         'e.g. --set audit-attacks="loss,rmia" (repeatable)')
    au.set_defaults(func=cmd_audit)

    ve = sub.add_parser(
        "verify", help="check that each shard model is exactly its from-scratch training without the deleted ids",
        description="Replay each shard's SISA training from scratch in a temporary folder on its live samples "
                    "(the deleted ids left out) and compare the model hash with the served model "
                    "(DIR/models/shard-K.pt) and the ledger's last hash_after: a match proves the model holds no "
                    "trace of the deleted records. Writes DIR/verify.json and the report's verification section. "
                    "Exit 0: every replayed shard matches (an approximate or a DP site-only shard is reported, "
                    "not proven); 1: a mismatch; 2: bad input. Under DP the noise is each site's secret: the "
                    "server reports a DP shard as site-only (its index and receipt checked, no replay), and the "
                    "site replays it with its recorded seeds: `verify --state-dir STATE --data-root ROOT "
                    "--config RUN.toml` at the site, or `verify --run DIR --site-local` in a simulation.",
    )
    ve.add_argument("--run", metavar="DIR",
                    help="the folder of a finished `simulate` run (with --state-dir: only its config.toml is read)")
    ve.add_argument("--shard", type=int, metavar="K", help="verify only shard K (default: every shard)")
    ve.add_argument("--site-local", action="store_true",
                    help="simulation: replay each shard as its site would, from OUT/nodes/shard-K and its recorded DP "
                         "seeds (the guarantee against the server holds only in a deployment)")
    ve.add_argument("--state-dir", metavar="STATE",
                    help="at a site: verify the shard in this state folder (the node-config key state-dir) against "
                         "the model it serves, replaying it with the site's recorded DP seeds; writes nothing")
    ve.add_argument("--data-root", metavar="ROOT", help="with --state-dir: the site's data (node-config key data-root)")
    ve.add_argument("--tombstones", metavar="FILE",
                    help="with --state-dir: the site's tombstones file, if the node config names one")
    _add_config_args(ve)
    ve.set_defaults(func=cmd_verify)

    ins = sub.add_parser(
        "inspect", help="at a site: how informative each record is to its shard model (Laplace Sample Information)",
        description="Score every live record of a shard by Laplace Sample Information: the KL divergence between "
                    "the Laplace posterior of the shard model's last layer with and without the record (large: "
                    "mislabeled or atypical; small: redundant). Writes, in the shard's own folder, lsi/records.csv "
                    "(the site's record ids: it stays at the site) and lsi/summary.json (histogram, deciles, "
                    "class-wise figures: no ids, shareable). At a site: `inspect --state-dir STATE --data-root "
                    "ROOT --config RUN.toml`; in a simulation: `inspect --run DIR` (each OUT/nodes/shard-K).",
    )
    ins.add_argument("--run", metavar="DIR",
                     help="a finished simulation (with --state-dir: only its config.toml is read)")
    ins.add_argument("--shard", type=int, metavar="K", help="with --run: only shard K (default: every shard)")
    ins.add_argument("--state-dir", metavar="STATE", help="at a site: the shard's state folder (node-config state-dir)")
    ins.add_argument("--data-root", metavar="ROOT", help="with --state-dir: the site's data (node-config data-root)")
    ins.add_argument("--prior-precision", type=float, metavar="LAMBDA",
                     help="the last-layer prior precision (default: chosen by the marginal likelihood)")
    _add_config_args(ins)
    ins.set_defaults(func=cmd_inspect)

    co = sub.add_parser(
        "compare", help="one table and one plot across finished runs",
        description="Read each run folder's config.toml and metrics.json and write OUT.md (a table: objective, "
                    "rho, strategy, augmentation, biased and unbiased accuracy, worst (class, private) group, the "
                    "strongest private-attribute probe's accuracy, named, and the seed's probe, the strongest "
                    "membership attack's AUC, seconds) and OUT.png (strongest probe against unbiased accuracy, "
                    "and the figures per run).",
    )
    co.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders of finished runs")
    co.add_argument("--out", metavar="OUT", default="runs/compare",
                    help="output prefix: writes OUT.md and OUT.png (default runs/compare)")
    co.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    # No argv: this process is the command (the console script, python -m): its wait began when this
    # module loaded. Called with a list (tests, scripts), it begins now.
    started = STARTED if argv is None else time.time()
    try:
        args = build_parser().parse_args(argv)  # --help exits 0 here; bad syntax is a UserError
        args.started = started
        return int(args.func(args))
    except FlowerRunError as exc:
        print(f"fairforget: error: {exc}", file=sys.stderr)
        return EXIT_RUN
    except KeyboardInterrupt:
        print("fairforget: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"fairforget: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
