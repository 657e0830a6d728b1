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
    with pytest.raises(CompareError, match="unreadable KeyError"):
        collect([tmp_path / "half"])
    assert not (tmp_path / "cmp.md").exists() and not (tmp_path / "cmp.png").exists()
