"""Compare finished runs: one table and one plot (``fairforget compare RUN_DIR ... --out PREFIX``).

Any finished runs (objectives, rho values, strategies, augmentation, DP), read from their
``config.toml`` and ``metrics.json`` alone: the ensemble's accuracy on the biased and the unbiased
test set and its worst (class, private) group, the private-attribute probe on the ensemble's
bottleneck (Barbano et al.'s attack; chance ``1 / n_private``), the strongest membership-inference
attack's AUC on the ensemble, and the seconds spent (training, augmentation, audit). Writes
``PREFIX.md`` (the table) and ``PREFIX.png`` (probe accuracy against unbiased accuracy, one point
per run, and the figures per run), each atomically. :func:`plot_by` draws one figure against a
config key (the debias study's probe accuracy per rho).
"""

from __future__ import annotations

import io
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fairforget.schemas import SchemaVersionError, read_metrics  # noqa: E402
from fairforget.storage import atomic_write_bytes, atomic_write_text  # noqa: E402


class CompareError(ValueError):
    """A folder that cannot be compared; the message is one line for the user."""


@dataclass(frozen=True)
class RunRow:
    """One finished run's figures (``None``: the run did not measure it, e.g. audit off)."""

    name: str
    path: str
    objective: str
    rho: float
    strategy: str
    augment: bool
    dp: bool
    accuracy_biased: float
    accuracy_unbiased: float
    worst_group: float
    worst_group_label: str
    probe: float | None  # the strongest attribute probe's accuracy on the ensemble (named in probe_name)
    probe_chance: float | None
    probe_shards: tuple[float, float] | None  # (lowest, highest) strongest probe over the shard models
    mia_auc: float | None
    mia_attack: str
    train_seconds: float
    audit_seconds: float | None
    probe_name: str = ""  # which probe was the strongest (fairforget.audit.probe.PROBES)
    probe_seed: float | None = None  # the seed's probe (linear, trained on the biased data) on the ensemble


def read_run(path: Path, name: str | None = None) -> RunRow:
    """The figures of the finished run in ``path``; :class:`CompareError` for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path} is not a folder")
    missing = [f for f in ("config.toml", "metrics.json") if not (path / f).is_file()]
    if missing:
        raise CompareError(f"{path} is not a finished fairforget run (missing {', '.join(missing)})")
    try:
        m = read_metrics(path / "metrics.json")  # another schema_version: one line
    except SchemaVersionError as exc:
        raise CompareError(str(exc)) from None
    try:
        with (path / "config.toml").open("rb") as fh:
            cfg = tomllib.load(fh)
        ens = m["ensemble"]
        worst = ens["unbiased"]["worst_group"]
        privacy = m.get("privacy") or {}
        probes = privacy.get("attribute_inference") or {}
        probe = probes.get("ensemble") or {}
        shard_probes = [s for k, v in probes.items() if k.startswith("shard-")
                        and (s := _strongest(v)[0]) is not None and s == s]
        strong, strong_name = _strongest(probe) if probe or not privacy else (None, "not measured")
        attacks = (privacy.get("targets") or {}).get("ensemble") or {}
        best = max(attacks, key=lambda a: attacks[a]["auc"], default=None)
        timing = m["timing"]
        return RunRow(
            name=name or path.name, path=str(path), objective=str(cfg.get("objective", "cross-entropy")),
            rho=float(m["run"]["rho"]), strategy=str(m["run"]["strategy"]), augment=bool(cfg.get("augment", False)),
            dp=bool(cfg.get("dp", False)),
            accuracy_biased=float(ens["biased"]["accuracy"]), accuracy_unbiased=float(ens["unbiased"]["accuracy"]),
            worst_group=float(worst["accuracy"]),
            worst_group_label=f"({worst['class']}, {worst['private']}), n = {worst['n']}",
            probe=strong, probe_chance=_num(probe.get("chance")), probe_name=strong_name,
            probe_seed=_num(probe.get("unbiased_test_accuracy")),
            probe_shards=(min(shard_probes), max(shard_probes)) if shard_probes else None,
            mia_auc=None if best is None else float(attacks[best]["auc"]), mia_attack=best or "",
            train_seconds=float(timing["train_wall_seconds"]) + float(timing.get("augmentation_seconds", 0.0)),
            audit_seconds=_num(timing.get("audit_seconds")),
        )
    except (tomllib.TOMLDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CompareError(f"{path} is not a finished fairforget run (unreadable {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _strongest(probe: dict[str, Any]) -> tuple[float | None, str]:
    """The strongest probe's accuracy and name (a run before the strong probes: the seed's probe)."""
    if "probes" in probe:
        best = probe.get("strongest")
        return (float(best["accuracy"]), str(best["probe"])) if best else (None, "not measured")
    return _num(probe.get("unbiased_test_accuracy")), "biased-linear" if probe else ""


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent's name prefixed where two runs share one."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def collect(paths: Sequence[Path]) -> list[RunRow]:
    if not paths:
        raise CompareError("no run folders given")
    return [read_run(Path(p), n) for p, n in zip(paths, _names(paths), strict=True)]


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: Sequence[RunRow]) -> str:
    lines = ["| run | objective | rho | strategy | augment | biased acc. | unbiased acc. | worst group "
             "(class, private) | strongest probe (which; chance) | seed probe | strongest probe, shard models | "
             "MIA AUC (strongest attack) | train s | audit s |", "|---" * 14 + "|"]
    for r in rows:
        probe = (f"{_f(r.probe)} ({r.probe_name}; {_f(r.probe_chance, '.2f')})" if r.probe is not None
                 else "not measured" if r.probe_name == "not measured" else "-")
        mia = f"{_f(r.mia_auc)} ({r.mia_attack})" if r.mia_auc is not None else "-"
        shards = f"{r.probe_shards[0]:.3f}-{r.probe_shards[1]:.3f}" if r.probe_shards else "-"
        lines.append(f"| {r.name} | {r.objective}{' + DP' if r.dp else ''} | {r.rho:g} | {r.strategy} | "
                     f"{'yes' if r.augment else 'no'} | {r.accuracy_biased:.3f} | {r.accuracy_unbiased:.3f} | "
                     f"{r.worst_group:.3f} {r.worst_group_label} | {probe} | {_f(r.probe_seed)} | {shards} | {mia} | "
                     f"{r.train_seconds:.1f} | {_f(r.audit_seconds, '.1f')} |")
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot(rows: Sequence[RunRow]) -> bytes:
    """Left: probe accuracy against unbiased accuracy, one point per run. Right: unbiased accuracy,
    worst group and probe accuracy per run."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        if r.probe is not None:
            ax1.scatter(r.accuracy_unbiased, r.probe)
            ax1.annotate(r.name, (r.accuracy_unbiased, r.probe), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chance = next((r.probe_chance for r in rows if r.probe_chance), None)
    if chance:
        ax1.axhline(chance, color="grey", ls=":", label="probe chance")
        ax1.legend(fontsize=8)
    ax1.set(xlabel="unbiased test accuracy", ylabel="strongest private-attribute probe", xlim=(0, 1.02),
            ylim=(0, 1.02), title="leakage vs utility")
    x = range(len(rows))
    width = 0.27
    series = [("unbiased acc.", [r.accuracy_unbiased for r in rows]), ("worst group", [r.worst_group for r in rows]),
              ("probe acc.", [r.probe if r.probe is not None else 0.0 for r in rows])]
    for k, (label, values) in enumerate(series):
        ax2.bar([i + (k - 1) * width for i in x], values, width, label=label)
    ax2.set_xticks(list(x), [r.name for r in rows], rotation=45, ha="right", fontsize=7)
    ax2.set(ylim=(0, 1.02), title="per run")
    ax2.legend(fontsize=8)
    return _png(fig)


def plot_by(rows: Sequence[RunRow], x: str, y: str, label: Callable[[RunRow], str], title: str = "") -> bytes:
    """``y`` against ``x`` (RunRow fields), one line per ``label(row)``; x on a categorical axis."""
    xs = sorted({getattr(r, x) for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in sorted({label(r) for r in rows}):
        pts = sorted((getattr(r, x), getattr(r, y)) for r in rows if label(r) == g and getattr(r, y) is not None)
        if pts:
            ax.plot([xs.index(p[0]) for p in pts], [p[1] for p in pts], marker="o", label=g)
    ax.set_xticks(range(len(xs)), [f"{v:g}" if isinstance(v, float) else str(v) for v in xs])
    ax.set(xlabel=x, ylabel=y, ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_tradeoff(rows: Sequence[RunRow], label: Callable[[RunRow], str], title: str = "") -> bytes:
    """Probe accuracy against unbiased accuracy, one colour per ``label(row)``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for g in sorted({label(r) for r in rows}):
        pts = [(r.accuracy_unbiased, r.probe) for r in rows if label(r) == g and r.probe is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=g)
    chance = next((r.probe_chance for r in rows if r.probe_chance), None)
    if chance:
        ax.axhline(chance, color="grey", ls=":", label="probe chance")
    ax.set(xlabel="unbiased test accuracy", ylabel="strongest private-attribute probe", xlim=(0, 1.02),
           ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    return _png(fig)


def write(paths: Sequence[Path], out: Path) -> tuple[Path, Path, list[RunRow]]:
    """Table ``out.md`` and plot ``out.png`` for the runs in ``paths`` (every run is read first, so
    a bad folder writes nothing)."""
    rows = collect(paths)
    md, png = write_rows(rows, out)
    return md, png, rows


def write_rows(rows: Sequence[RunRow], out: Path) -> tuple[Path, Path]:
    """Table ``out.md`` and plot ``out.png`` of rows already read (a study may relabel some)."""
    out = Path(out)
    md, png = out.with_name(out.name + ".md"), out.with_name(out.name + ".png")
    text = "# fairforget compare\n\n" + markdown(rows) + f"\n![leakage vs utility]({png.name})\n"
    atomic_write_bytes(png, plot(rows))
    atomic_write_text(md, text)
    return md, png


def rows_as_dicts(rows: Sequence[RunRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
