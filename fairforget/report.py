"""``OUT/report.md`` and its plots, rendered from ``metrics.json``, ``ledger.jsonl`` and (after a
``fairforget verify``) ``verify.json`` alone, so that every command that changes the figures
(simulate, forget, audit, verify) can render it again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fairforget.ledger import Ledger  # noqa: E402
from fairforget.privacy.auditing import AUDIT_FPRS, audit, resolvable  # noqa: E402
from fairforget.privacy.gdp import tpr_bound  # noqa: E402
from fairforget.schemas import read_metrics  # noqa: E402
from fairforget.storage import atomic_write_bytes, atomic_write_text  # noqa: E402
from fairforget.verify import read_verification  # noqa: E402


def _save(fig: Any, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


def plot_rounds(metrics: dict[str, Any], path: Path) -> str | None:
    rows = metrics["rounds"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    r = [row["round"] for row in rows]
    ax.plot(r, [row["accuracy_biased"] for row in rows], "o-", label="biased test")
    ax.plot(r, [row["accuracy_unbiased"] for row in rows], "s-", label="unbiased test")
    ax.plot(r, [row["worst_group_accuracy"] for row in rows], "^--", label="worst group (unbiased)")
    ax.set(xlabel="round (SISA slice)", ylabel="accuracy", ylim=(0, 1.02), title="Ensemble accuracy by round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_groups(metrics: dict[str, Any], path: Path) -> str:
    run = metrics["run"]
    grid = np.full((run["num_classes"], run["num_private"]), np.nan)
    for g in metrics["ensemble"]["unbiased"]["groups"]:
        grid[g["class"], g["private"]] = g["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * run["num_private"], 1.2 + 0.35 * run["num_classes"]))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(xlabel="private attribute", ylabel="class", title="Accuracy per group (unbiased test)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def plot_shards(metrics: dict[str, Any], path: Path) -> str:
    shards = metrics["shards"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([str(s["shard"]) for s in shards], [s["kl_bias"] for s in shards], color="tab:orange")
    ax.set(xlabel="shard", ylabel="KL(p_group || uniform)", title="Bias of each shard")
    return _save(fig, path)


def plot_unlearning(metrics: dict[str, Any], path: Path) -> str | None:
    rows = metrics["unlearning"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"#{u['request']}" for u in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [u["seconds"] for u in rows], 0.4, label="unlearning (retrain affected shards)")
    ax.bar(x + 0.2, [u["full_retrain_seconds"] for u in rows], 0.4, label="full retrain (all shards)")
    ax.set_xticks(x, labels)
    ax.set(xlabel="deletion request", ylabel="seconds of training", title="Cost of forgetting")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _dp_summary(metrics: dict[str, Any], target: str) -> dict[str, Any] | None:
    dp = metrics.get("dp")
    if not dp:
        return None
    return dp.get("ensemble") if target == "ensemble" else (dp.get("shards") or {}).get(target.removeprefix("shard-"))


def plot_roc(metrics: dict[str, Any], path: Path) -> str | None:
    """Log-log ROC of every attack; under DP also the mu-GDP bound Phi(Phi^-1(FPR) + mu) no attack may
    cross (theory against practice)."""
    privacy = metrics.get("privacy")
    if not privacy:
        return None
    shown = [t for t in ("ensemble", "shard-0") if t in privacy["targets"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
    for ax, target in zip(axes[0], shown, strict=True):
        for name, res in privacy["targets"][target].items():
            fpr, tpr = np.array(res["roc"]["fpr"]), np.array(res["roc"]["tpr"])
            keep = (fpr > 0) & (tpr > 0)
            ax.loglog(fpr[keep], tpr[keep], label=f"{name} (AUC {res['auc']:.2f})")
        ax.loglog([1e-3, 1], [1e-3, 1], "k--", lw=0.8)
        summary = _dp_summary(metrics, target)
        if summary and summary.get("mu") is not None:
            grid = np.logspace(-3, 0, 200)
            ax.loglog(grid, [tpr_bound(summary["mu"], f) for f in grid], "r-", lw=2,
                      label=f"mu-GDP bound (mu {summary['mu']:.2f})")
        ax.set(xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate", ylabel="true positive rate",
               title=f"Membership inference: {target}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _dp_lines(metrics: dict[str, Any]) -> list[str]:
    """The guarantee, per shard and for the ensemble, and how the noise was chosen."""
    dp = metrics["dp"]
    clip = dp.get("max_grad_norm", dp.get("clipping_norm"))
    lines = [f"{dp['mechanism']}: noise multiplier {dp['noise_multiplier']:.3f}, clipping norm {clip}, "
             f"accountant {dp['accountant']}, delta {dp['delta']:g}."]
    if dp.get("model"):
        lines[0] += (f" Model: {dp['model']}; sampling: {dp['sampling']}; "
                     + (f"randomness: {dp['randomness']}." if dp.get("randomness") else
                        f"Opacus secure mode {'on' if dp.get('secure_mode') else 'off (seeded noise, replayable)'}."))
    lines += ["", "| model | epsilon | mu (GDP) | TPR bound at 0.1% FPR | TPR bound at 1% FPR | DP-SGD steps |",
              "|---|---|---|---|---|---|"]
    rows = [(f"shard {k}", v) for k, v in (dp.get("shards") or {}).items()] + [("ensemble", dp["ensemble"])]
    for name, v in rows:
        lines.append(f"| {name} | {v['epsilon']:.3f} | {v['mu']:.3f} | {v['tpr_bound']['0.001']:.4f} | "
                     f"{v['tpr_bound']['0.01']:.4f} | {v.get('steps', '')} |")
    if dp["ensemble"].get("note"):
        lines += ["", f"The ensemble: {dp['ensemble']['note']}."]
    c = dp.get("calibration")
    if c:
        fpr = c["target"]["fpr"]
        key = f"tpr_bound_at_{fpr:g}_fpr"
        lines += ["", f"Noise calibration (`dp-calibrate = {c['mode']}`; smallest shard, {c['smallest_shard']} "
                      f"samples, stages {c['stage_sizes']}):", "",
                  f"| calibration | noise multiplier | epsilon | mu | TPR bound at {fpr:g} FPR |",
                  "|---|---|---|---|---|"]
        named = [("used by this run", c["chosen"]),
                 (f"attack risk: TPR <= {c['target']['tpr']:g} at FPR {fpr:g}", c["attack_risk"])]
        if "epsilon_first" in c:
            named += [(f"same risk via epsilon = {c['attack_risk_via_epsilon']['target_epsilon']:.2f}",
                       c["attack_risk_via_epsilon"]),
                      *[(f"epsilon-first, epsilon = {e}", f) for e, f in c["epsilon_first"].items()]]
        lines += [f"| {n} | {f['noise_multiplier']:.3f} | {f['epsilon']:.3f} | {f['mu']:.3f} | {f[key]:.4f} |"
                  for n, f in named]
        if c.get("plan"):
            lines += _plan_lines(c["plan"])
        if c.get("candidates"):
            lines += _candidate_lines(c["candidates"])
    if metrics.get("privacy"):
        lines += ["", *_audit_lines(metrics["privacy"], dp)]
    return lines


def _plan_lines(p: dict[str, Any]) -> list[str]:
    """The DP planner's per-stage schedule (fairforget/privacy/planner.py)."""
    lines = ["", f"DP-aware schedule (`{p['model']}`; target epsilon {p['target_epsilon']:g}, one training "
                 f"{p['epsilon']:.3f}; room for {p['retrains']} full retrains within dp-max-epsilon "
                 f"{p['max_epsilon']:g}: "
                 f"{p['epsilon_with_retrains']:.3f} with them; {p['basis']}):", "",
             "| stage | samples | expected batch | sampling rate | steps | lr | clipping norm |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {st['samples']} | {st['batch_size']} | {st['sample_rate']:.3f} | {st['steps']} | "
              f"{st['lr']:g} | {st['max_grad_norm']:g} |" for i, st in enumerate(p["stages"], 1)]
    return lines


def _candidate_lines(k: dict[str, Any]) -> list[str]:
    """Settings meeting the run's target, with their Delta-divergence over the least vulnerable one."""
    if k.get("error"):
        return ["", f"Settings that meet the same target: no Delta-divergence ({k['error']})."]
    lines = ["", f"Settings that meet the same target ({k['target']}); Delta is each one's worst-case excess "
                 f"vulnerability over the least vulnerable one ({k['method']}; whenever that one is (eps, delta)-DP, "
                 "a setting is (eps, delta + (1 + e^eps) Delta)-DP). This run's Delta: "
                 f"{k['chosen_delta_excess']:.4f}.", "",
             "| setting | noise multiplier | steps | epsilon | mu | Delta |", "|---|---|---|---|---|---|"]
    for name, r in k["settings"].items():
        tag = " (this run's)" if r["chosen"] else ""
        tag += " (least vulnerable)" if name == k["least_vulnerable"] else ""
        lines.append(f"| {name}{tag} | {r['noise_multiplier']:.3f} | {r['steps']} | {r['epsilon']:.3f} | "
                     f"{r['mu']:.3f} | {r['delta_excess']:.4f} |")
    return lines


def _audit_lines(privacy: dict[str, Any], dp: dict[str, Any]) -> list[str]:
    """The audit against the claims (:mod:`fairforget.privacy.auditing`): per target what the attacks
    prove beside what is claimed and the most its counts could ever prove; the alarms metrics.json holds."""
    result = audit(privacy, dp)
    levels = ", ".join(f"{f:.1%}" for f in AUDIT_FPRS)
    lines = [f"The audit against these claims (Jagielski et al. 2020, Nasr et al. 2021): at each attack's threshold "
             f"for {levels} FPR, Clopper-Pearson upper bounds on both error rates give a lower bound on epsilon "
             f"and on mu at {1 - result.alpha:.0%} confidence, Bonferroni-corrected over {result.tests} tests; a "
             f"violation is a lower bound above the claimed epsilon or above the mu of the mu-GDP bound (the ROC "
             f"plot's red curve).", "",
             "| target | claimed epsilon | claimed mu | non-members | members | most epsilon any attack could prove "
             "| proven epsilon (attack, FPR) | proven mu |", "|---|---|---|---|---|---|---|---|"]
    beyond = []
    for target in dict.fromkeys(c.target for c in result.checks):
        checks = [c for c in result.checks if c.target == target and c.tested]
        best = max(checks, key=lambda c: c.epsilon_lower_bound)
        most = max(c.max_provable_epsilon for c in checks)
        claim = "" if best.claimed_epsilon is None else f"{best.claimed_epsilon:.3f}"
        mu = "" if best.claimed_mu is None else f"{best.claimed_mu:.3f}"
        lines.append(f"| {target} | {claim} | {mu} | {best.nonmembers} | {best.members} | {most:.2f} | "
                     f"{best.epsilon_lower_bound:.2f} ({best.attack}, {best.fpr:.1%}) | "
                     f"{max(c.mu_lower_bound for c in checks):.2f} |")
        if best.claimed_epsilon is not None and best.claimed_epsilon >= most:
            beyond.append(f"{target} (epsilon {best.claimed_epsilon:.2f}; with {best.nonmembers} non-members and "
                          f"{best.members} members no attack can prove epsilon above {most:.2f})")
    if beyond:
        lines += ["", "Claims no audit of this size can refute, whatever the model leaks: " + "; ".join(beyond) + "."]
    if result.unchecked:
        lines += ["", "Not judged (figures without member and non-member counts): " + ", ".join(result.unchecked) + "."]
    violations = privacy.get("dp_bound_violations") or []
    if violations:
        lines += ["", "**Empirical TPR above the DP bound (a bug in training, accounting or the attack):**", ""]
        lines += [f"- **{v}**" for v in violations]
    else:
        lines += ["", "No attack proves more than its target claims (epsilon, or the mu-GDP bound)."]
    return lines


def tpr_cell(r: dict[str, Any], fpr: float, ci: bool = True) -> str:
    """An attack's TPR at ``fpr`` with its bootstrap interval, or "not resolvable with N non-members"
    when fewer than 1/fpr non-members put the threshold above all of them (its true FPR unknown)."""
    n = r.get("n_nonmembers")
    if n and not resolvable(n, fpr):
        return f"not resolvable with {n} non-members"
    lo, hi = r.get(f"tpr_at_{fpr:g}_fpr_ci95") or (None, None)
    shown = ci and lo is not None and hi is not None and lo == lo and hi == hi  # null / NaN: no bootstrap
    interval = f" [{lo:.3f}, {hi:.3f}]" if shown else ""
    return f"{r[f'tpr_at_{fpr:g}_fpr']:.3f}{interval}"


def _privacy_lines(metrics: dict[str, Any]) -> list[str]:
    privacy = metrics.get("privacy")
    if not privacy:
        return ["Not audited (`audit = false`); run `fairforget audit --run DIR`."]
    at = privacy.get("audited_at") or {}
    where = ("the ensemble on the server, with reference models trained on the population split "
             f"({privacy['population']}); each shard model at its own site, on the site's live members vs half "
             "its held-out data, with reference models the site trains on the other half"
             if any(w != "server" for w in at.values()) else
             f"every target on the server, with reference models trained on the population split "
             f"({privacy['population']})")
    lines = [f"{len(privacy['attacks'])} attacks, {privacy['references']['count']} offline reference model(s) per "
             f"target; candidates: members vs held-out non-members. Audited: {where}. The audit took "
             f"{privacy['seconds']:.1f} s.", "",
             "| target | audited at | attack | AUC | balanced acc. | advantage | TPR @ 1% FPR [95% CI] "
             "| TPR @ 0.1% FPR |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(t, at.get(t, "server"), a) for t, a in privacy["targets"].items()]
    rows += [(f"{t} (at {site})", site, a) for site, r in privacy.get("sites", {}).items()
             for t, a in (r.get("targets") or {}).items()]  # site-audit-scope = "ensemble"
    for target, place, attacks in rows:
        for name, r in attacks.items():
            lines.append(f"| {target} | {place} | {name} | {r['auc']:.3f} | {r['balanced_accuracy']:.3f} | "
                         f"{r['advantage']:.3f} | {tpr_cell(r, 0.01)} | {tpr_cell(r, 0.001, ci=False)} |")
    sites = {s: r for s, r in privacy.get("sites", {}).items() if not r.get("error") and not r.get("skipped")}
    if sites:
        lines += ["", "The sites' audits (ROC statistics only came back; scope: what a site audited):", "",
                  "| site | scope | members | non-members | population (reference training) | reference models | "
                  "seconds |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {site} | {r['scope']} | {r['members']} | {r['nonmembers']} | {r['population']} | "
                  f"{r['references']} | {r['seconds']:.1f} |" for site, r in sites.items()]
        by_decile = [(site, t, a, v) for site, r in sites.items() for t, v in (r.get("lsi_deciles") or {}).items()
                     for a in next(iter(v.values())) if a != "members"]
        if by_decile:
            lines += ["", "Membership attacks per LSI decile, at the sites (AUC of the decile's members against the "
                      "non-members; decile 0 the least informative records, from `fairforget inspect`):", "",
                      "| site | target | attack | " + " | ".join(f"d{d}" for d in range(10)) + " |",
                      "|---|---|---|" + "---|" * 10]
            lines += [f"| {site} | {t} | {a} | " + " | ".join(
                f"{v[f'decile-{d}'][a]:.2f}" if f"decile-{d}" in v else "" for d in range(10)) + " |"
                for site, t, a, v in by_decile]
    failed = {s: r for s, r in privacy.get("sites", {}).items() if r.get("error") or r.get("skipped")}
    lines += [f"- {site}: {r.get('error') or r.get('skipped')}" for site, r in failed.items()]
    lines += probe_lines(privacy.get("attribute_inference") or {})
    audited = [u for u in metrics["unlearning"] if "audit" in u]
    if audited:
        lines += ["", "Deleted samples vs non-members (AUC; about 0.5 means the deleted samples look like "
                  "non-members):", "", "| request | attack | before forget | after forget |", "|---|---|---|---|"]
        for u in audited:
            before = u["audit"]["deleted_vs_nonmembers_auc_before"]
            after = u["audit"]["deleted_vs_nonmembers_auc_after"]
            lines += [f"| {u['request']} | {name} | {before[name]:.3f} | {after[name]:.3f} |" for name in before]
    return lines


def probe_lines(probes: dict[str, Any]) -> list[str]:
    """The attribute-inference table: every probe per target (accuracy, 95% bootstrap interval), the
    strongest named; a probe not measured says so, with why, below the table."""
    if not probes:
        return ["", "Attribute inference: not measured (no probe ran: the server holds no unbiased or "
                "audit split)"]
    names = list(next((p["probes"] for p in probes.values() if "probes" in p), {}))
    if not names:  # a run written before the strong probes: the seed's probe only
        lines = ["", "Attribute inference (linear probe on the bottleneck, trained on biased data):", "",
                 "| target | probe accuracy on unbiased test | chance |", "|---|---|---|"]
        return lines + [f"| {t} | {p['unbiased_test_accuracy']:.3f} | {p['chance']:.3f} |" for t, p in probes.items()]
    lines = ["", "Attribute inference: probes for the private attribute on the features each head sees "
             "(accuracy on data the probe did not train on, 95% bootstrap interval; the strongest named):", "",
             "| target | features | " + " | ".join(names) + " | strongest | chance |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    missing = []
    for target, p in probes.items():
        cells = []
        for name in names:
            r = p["probes"].get(name, {})
            if "accuracy" in r:
                ci = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else ""
                cells.append(f"{r['accuracy']:.3f}{ci}")
            else:
                cells.append("not measured")
                missing.append(f"- {target}, {name}: not measured: {r.get('not_measured', 'no figure')}")
        best = p.get("strongest")
        strong = f"**{best['accuracy']:.3f}** ({best['probe']})" if best else "not measured"
        lines.append(f"| {target} | {p.get('features', 'bottleneck')} | " + " | ".join(cells)
                     + f" | {strong} | {p['chance']:.3f} |")
    return lines + ([""] + sorted(set(missing)) if missing else [])


def unlearning_methods_table(result: dict[str, Any]) -> list[str]:
    """The table of ``simulations/unlearning_compare.py`` (``metrics["unlearning_methods"]``)."""
    lines = ["| method | forget acc | retain acc | test acc (unbiased) | forget-set MIA AUC (LOSS) | seconds "
             "| vs exact |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
        ratio = "" if r["seconds"] is None else f"{r['ratio_to_exact']:.3f}x"
        lines.append(f"| {r['method']} | {r['forget_accuracy']:.3f} | {r['retain_accuracy']:.3f} | "
                     f"{r['test_accuracy']:.3f} | {r['forget_mia_auc']:.3f} | {secs} | {ratio} |")
    return lines


def _unlearning_methods_lines(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    labels = ("with their true labels" if result["forget_labels"] == "true" else
              "relabelled (y + 1 mod K) before training, so the model can fit them only by memorising")
    gone = result.get("excluded_deleted_ids", 0)
    return [f"One deletion request served by every method on its own copy of shard 0 ({result['shard_size']} "
            f"samples{f', the {gone} ids deleted in this run left out' if gone else ''}), retrained from scratch "
            f"in a scratch folder with the run's config and the command's `--set` keys (rho = {c['rho']}, "
            f"{c['image-size']} px, width {c['model-width']}, {c['slices']} slices x {c['epochs-per-slice']} "
            "epochs); the forget set is "
            f"k = {result['k']} of its samples, {labels}; exact retraining restarts at stage "
            f"{result['restart_stage']}. Made by `{result.get('command', 'simulations/unlearning_compare.py')}`; "
            "the run's models and ledger are unchanged.", "", *unlearning_methods_table(result)]


def _fmt3(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.3f}"


def _augmentation_lines(metrics: dict[str, Any], run_dir: Path) -> list[str]:
    aug = metrics["augmentation"]
    names = list((aug["rows"][0].get("mia") or {}).keys())
    lines = [f"Groups: {aug['groups']}; KL threshold {aug['kl_threshold']}; {len(aug['steps']) - 1} step(s) of "
             f"step-wise unlearning; {len(aug['retired_ids'])} originals retired; {aug['seconds']:.1f} s. MIA: "
             "vanilla and augmented rows attack all original members, the last row the retired (unlearned) "
             "originals; all against held-out non-members.", "",
             "| model | KL per shard | unbiased acc. | worst group acc. | " +
             " | ".join(f"{n} AUC / TPR@1%" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for r in aug["rows"]:
        kl = ", ".join(f"{v:.3f}" for v in (r["kl_per_shard"] or {}).values())
        mia = r.get("mia") or {}
        cells = [f"{mia[n]['auc']:.3f} / {mia[n]['tpr_at_0.01_fpr']:.3f}" if n in mia else "" for n in names]
        lines.append(f"| {r['name']} | {kl} | {r['accuracy_unbiased']:.3f} | {r['worst_group']['accuracy']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Per shard and step (KL after: of the groups requested of the generator; in brackets, of the "
              "groups the fidelity classifiers see in the samples it generated; "
              "quality: label fidelity of the new samples by the fidelity classifiers; "
              "Frechet distance on their features, matched labels, next to real vs real):", "",
              "| step | shard | KL before | KL after (as judged) | generated | originals / synthetic | "
              "class fidelity | private fidelity | FD (real vs real) | generator s | sampling s | retrain s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in aug["steps"]:
        for k, rep in st["shards"].items():
            q = rep.get("quality", {})
            fid = q.get("label_fidelity", {})
            fd = (f"{_fmt3(q['frechet_distance'])} ({_fmt3(q['frechet_distance_real_vs_real'])})"
                  if "frechet_distance" in q else "")
            judged = f" ({rep['kl_after_judged']:.3f})" if "kl_after_judged" in rep else ""
            lines.append(f"| {st['step']} | {k} | {rep['kl_before']:.3f} | {rep['kl_after']:.4f}{judged} | "
                         f"{rep['generated']} | "
                         f"{rep['num_originals']} / {rep['num_synthetic']} | {_fmt3(fid.get('class'))} | "
                         f"{_fmt3(fid.get('private'))} | {fd} | {rep['generator_seconds']:.1f} | "
                         f"{rep['sampling_seconds']:.1f} | {rep['retrain_seconds']:.1f} |")
    ceiling = aug["fidelity_classifiers_accuracy_unbiased"]
    lines += ["", f"Fidelity classifiers on the real unbiased test set (the ceiling of label fidelity): class "
              f"{_fmt3(ceiling['class'])}, private {_fmt3(ceiling.get('private'))}."]
    overview = Path("nodes") / "shard-0" / "augment" / "grids" / "overview.png"
    if (run_dir / overview).is_file():
        lines += ["", "Shard 0's generator, one sample per group (rows: class; columns: private attribute); "
                  "8 samples per group in `nodes/shard-K/augment/grids/`:", "", f"![samples]({overview.as_posix()})"]
    return lines


def _verification_lines(record: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """The last ``fairforget verify`` of each shard (``verify.json``)."""
    current = {str(s["shard"]): s.get("model_hash") for s in metrics["shards"]}
    lines = ["The last from-scratch replay of each shard (`fairforget verify`; a match proves the served model "
             "is exactly the one trained without the deleted samples):", "",
             "| shard | verified (UTC) | result | replay hash | served hash | ledger hash_after | seconds | "
             "still served |", "|---|---|---|---|---|---|---|---|"]
    for k, v in record["shards"].items():
        served = v.get("served_hash")
        still = "" if current.get(k) is None else ("yes" if current[k] == served else "no (the model changed since)")
        result = v.get("status", "") + (f": {v['note']}" if v.get("note") else "")
        if v.get("problems"):
            result += "; " + "; ".join(v["problems"][:3])
        code = [f"`{h}`" if h else "" for h in (v.get("replay_hash"), served, v.get("ledger_hash"))]
        lines.append(f"| {k} | {v.get('time', '')} | {result} | {' | '.join(code)} | {v.get('seconds', 0.0):.2f} | "
                     f"{still} |")
    return lines


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.json")  # another schema_version: one line, nothing written
    run_ledger = Ledger(run_dir / "ledger.jsonl")
    ledger = run_ledger.entries()  # the decisions (a forget's intent lines left out)
    plots = [
        ("Accuracy by round", plot_rounds(metrics, run_dir / "accuracy_rounds.png")),
        ("Accuracy per (class, private attribute) group", plot_groups(metrics, run_dir / "group_accuracy.png")),
        ("Bias per shard", plot_shards(metrics, run_dir / "shard_bias.png")),
        ("Unlearning cost", plot_unlearning(metrics, run_dir / "unlearning.png")),
        ("Membership inference ROC (log-log)", plot_roc(metrics, run_dir / "mia_roc.png")),
    ]
    run, ens = metrics["run"], metrics["ensemble"]
    lines = [
        f"# fairforget report: {run['dataset']}, {run['strategy']}",
        "",
        f"{run['num_shards']} shards x {run['slices']} slices; rho = {run['rho']}, class imbalance = "
        f"{run['class_imbalance']}, seed = {run['seed']}; {run['num_train']} members, "
        f"{run['num_heldout']} held-out non-members, {run['num_test_biased']} biased and "
        f"{run['num_test_unbiased']} unbiased test samples.",
        "",
        "## Utility and fairness (ensemble)",
        "",
        "| test set | accuracy | worst group (class, private) | worst-group accuracy | groups |",
        "|---|---|---|---|---|",
    ]
    for name in ("biased", "unbiased"):
        w = ens[name]["worst_group"]
        n = f", n = {w['n']}" if "n" in w else ""  # sites report no counts per group
        lines.append(f"| {name} | {ens[name]['accuracy']:.3f} | ({w.get('class', '-')}, {w.get('private', '-')}){n} | "
                     f"{w['accuracy']:.3f} | {len(ens[name]['groups'])} |")
    if ens["unbiased"].get("scope"):
        lines += ["", f"Evaluated at the sites ({ens['unbiased']['scope']}): the server holds no patient data; each "
                  "group's accuracy is the mean over the sites that have the group."]
    fed = metrics.get("federation") or {}
    if fed.get("missing") or fed.get("stale"):
        lines += ["", f"**Lost sites**: the run ended without shard(s) {fed.get('missing') or 'none'}; stale models "
                  f"(last round they replied to): {fed.get('stale') or 'none'} (min-shards = {fed.get('min_shards')})."]
    lines += ["", "## Shards", "", "| shard | samples | KL bias | train seconds | unbiased accuracy | model hash |",
              "|---|---|---|---|---|---|"]
    for s in metrics["shards"]:
        acc = s.get("accuracy_unbiased")
        lines.append(f"| {s['shard']} | {s['num_examples']} | {s['kl_bias']:.3f} | {s['train_seconds']:.2f} | "
                     f"{'' if acc is None else f'{acc:.3f}'} | `{s['model_hash']}` |")
    lines += ["", "## Unlearning", ""]
    if metrics["unlearning"]:
        lines += ["| request | ids | shards | seconds | full retrain seconds | speed-up | unbiased acc. after |",
                  "|---|---|---|---|---|---|---|"]
        for u in metrics["unlearning"]:
            ids = ", ".join(map(str, u["ids"][:8])) + (" ..." if len(u["ids"]) > 8 else "")
            sp = u["speedup_vs_full_retrain"]
            lines.append(f"| {u['request']} | {ids} | {', '.join(map(str, u['shards']))} | {u['seconds']:.2f} | "
                         f"{u['full_retrain_seconds']:.2f} | {'' if sp is None else f'{sp:.1f}x'} | "
                         f"{u['accuracy_unbiased']:.3f} |")
    else:
        lines.append("No deletion requests yet (`fairforget forget --run DIR --ids ...`).")
    if ledger:
        lines += ["", "Ledger (`ledger.jsonl`; capacity: remaining before -> after, of the shard's capacity):", "",
                  "| request | shard | ids | method | decision | capacity | restart stage | seconds | hash before | "
                  "hash after |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in ledger:
            cap = f"{e['capacity_before']} -> {e['capacity_after']} of {e['capacity']}" if "capacity" in e else ""
            secs = f"{e['seconds']:.2f}" if "seconds" in e else ""
            lines.append(f"| {e['request']} | {e['shard']} | {len(e.get('ids', []))} | {e.get('method', '')} | "
                         f"{e.get('decision', '')} | {cap} | {e.get('restart_stage', '')} | {secs} | "
                         f"`{e.get('hash_before', '')}` | `{e.get('hash_after', '')}` |")
    pending = run_ledger.pending()
    if pending:
        unfinished = "; ".join(f"request {r} at shard(s) {', '.join(map(str, sorted(sh)))}"
                               for r, sh in sorted(pending.items()))
        lines += ["", "**Unfinished deletions** (an intent without a completion line: a crash or a failed node; "
                  f"`fairforget forget --run DIR --resume` finishes them): {unfinished}"]
    verification = read_verification(run_dir)
    if verification:
        lines += ["", "## Verification (deletion receipts)", "", *_verification_lines(verification, metrics)]
    if metrics.get("unlearning_methods"):
        lines += ["", "## Unlearning methods vs exact retraining", "",
                  *_unlearning_methods_lines(metrics["unlearning_methods"])]
    if metrics.get("augmentation"):
        lines += ["", "## Augmentation and step-wise unlearning", "", *_augmentation_lines(metrics, run_dir)]
    if metrics.get("dp"):
        lines += ["", "## Differential privacy", "", *_dp_lines(metrics)]
    lines += ["", "## Privacy audit", "", *_privacy_lines(metrics)]
    lines += ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in plots if name]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
