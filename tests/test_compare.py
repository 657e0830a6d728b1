"""``fairforget compare``: one table and one plot across finished runs (fairforget/compare.py)."""

from __future__ import annotations

import pytest

from fairforget.compare import CompareError, collect
from server import cli
from server.experiment import run_training


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny real runs through the in-process grid: vanilla and EnD."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as conftest's autouse fixture
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, objective in (("vanilla", "cross-entropy"), ("end", "end")):
        cfg = resolve({**TINY, "out-dir": str(root / name), "objective": objective,
                       "audit-attacks": "loss,confidence", "audit-references": 0, "end-alpha": 50.0})
        run_training(InProcessGrid(cfg), cfg)
        runs.append(root / name)
    return runs


def test_compare_renders_a_table_and_a_plot_from_two_runs(two_runs, tmp_path, capsys):
    code = cli.main(["compare", *map(str, two_runs), "--out", str(tmp_path / "cmp.md")])
    assert code == 0, capsys.readouterr().err
    table = (tmp_path / "cmp.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| vanilla") or line.startswith("| end")]
    assert len(rows) == 2 and "| cross-entropy | 0.99 | shard-ensemble | no |" in rows[0] and "| end |" in rows[1]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    vanilla, end = collect(two_runs)
    assert 0.0 <= vanilla.probe <= 1.0 and vanilla.probe_chance == pytest.approx(0.1)
    assert vanilla.mia_attack in ("loss", "confidence") and 0.0 <= vanilla.mia_auc <= 1.0
    low, high = vanilla.probe_shards
    assert 0.0 <= low <= high <= 1.0 and f"{low:.3f}-{high:.3f}" in rows[0]
    assert f"{vanilla.accuracy_unbiased:.3f}" in rows[0] and f"{end.probe:.3f}" in rows[1]


def test_compare_refuses_a_folder_that_is_not_a_finished_run(two_runs, tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.toml").write_text('objective = "end"\n')
    for bad, expected in [(tmp_path / "nope", "is not a folder"),
                          (tmp_path / "half", "is not a finished fairforget run (missing metrics.json)")]:
        code = cli.main(["compare", str(two_runs[0]), str(bad), "--out", str(tmp_path / "cmp")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and expected in err, err
    (tmp_path / "half" / "metrics.json").write_text('{"ensemble": {}}')
    with pytest.raises(CompareError, match=r"half/metrics.json: no schema_version \(this fairforget"):
        collect([tmp_path / "half"])
    (tmp_path / "half" / "metrics.json").write_text('{"schema_version": 1, "ensemble": {}}')
    with pytest.raises(CompareError, match="unreadable KeyError"):
        collect([tmp_path / "half"])
    assert not (tmp_path / "cmp.md").exists() and not (tmp_path / "cmp.png").exists()


def test_the_study_runs_a_training_set_once_and_shows_it_at_each_rho_it_equals(two_runs, tmp_path, capsys):
    """At 1,079 training digits rho 0.99 and 0.995 leave the same bias-conflicting images: the study
    shows the 0.99 run at 0.995 (named for it) instead of training it again; 0.90 is other data."""
    import json
    import shutil

    from simulations import debias_study

    fp = debias_study.data_fingerprint
    assert fp({"rho": 0.99}) == fp({"rho": 0.995}) != fp({"rho": 0.9})
    shutil.copytree(two_runs[0], tmp_path / "vanilla-rho0.99")
    (tmp_path / "vanilla-rho0.99" / "status.json").write_text('{"mode": "simulate", "ok": true}')  # as the CLI writes
    code = debias_study.main(["--report-only", "--methods", "vanilla", "--rhos", "0.995,0.99,0.9",
                              "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["same_training_set"] == {"vanilla-rho0.995": "vanilla-rho0.99"}
    assert study["not_run"] == ["vanilla-rho0.9"]
    rows = {r["name"]: r for r in study["rows"]}
    copy = rows["vanilla-rho0.995 (= vanilla-rho0.99)"]
    assert copy["rho"] == 0.995 and copy["accuracy_unbiased"] == rows["vanilla-rho0.99"]["accuracy_unbiased"]
    assert "| vanilla-rho0.995 (= vanilla-rho0.99) | cross-entropy | 0.995 |" in (tmp_path / "table.md").read_text()


def test_a_failed_study_row_is_named_in_one_line_and_the_others_are_still_tabulated(two_runs, tmp_path, capsys,
                                                                                    monkeypatch):
    import json
    import shutil
    import subprocess

    from simulations import debias_study

    shutil.copytree(two_runs[0], tmp_path / "vanilla-rho0.99")
    (tmp_path / "vanilla-rho0.99" / "status.json").write_text('{"mode": "simulate", "ok": true}')

    def simulate(out, sets, rerun):  # the vanilla row is reused, the EnD run fails
        if out.name.startswith("end"):
            raise subprocess.CalledProcessError(1, ["fairforget", "simulate"])
        return 0.0

    monkeypatch.setattr(debias_study, "simulate", simulate)
    code = debias_study.main(["--methods", "vanilla,end", "--rhos", "0.99", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "debias_study: error: 1 row(s) failed (see each run's status.json): end-rho0.99", err
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["failed"] == ["end-rho0.99"] and [r["name"] for r in study["rows"]] == ["vanilla-rho0.99"]
    assert "| vanilla-rho0.99 |" in (tmp_path / "table.md").read_text()
