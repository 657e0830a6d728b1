"""The command line: help, and bad input as one line with exit status 2 and nothing changed."""

import pytest

from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir
from server import cli
from server.experiment import run_training


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code, expected):
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE
    assert err.startswith("fairforget: error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err


@pytest.mark.parametrize("command", ["simulate", "forget"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in {"simulate": ["--config", "--set", "--out", "--force", "--quiet"],
                   "forget": ["--run", "--ids", "--ids-file", "--quiet"]}[command]:
        assert option in text


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "bogus=1"], "unknown config key(s): bogus"),
    (["--set", "num-shards=0"], "'num-shards' = 0"),
    (["--set", "rho=1.2"], "'rho' = 1.2"),
    (["--set", "lr=fast"], "expected float"),
    (["--config", "/nonexistent/cfg.toml"], "config file not found"),
])
def test_simulate_bad_config(tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    code = cli.main(["simulate", *args, "--out", str(out)])
    _one_line_error(capsys, code, expected)
    assert not out.exists()


def test_simulate_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code = cli.main(["simulate", "--out", str(out), "--set", "num-shards=2"])
    _one_line_error(capsys, code, "already holds files")
    assert (out / "metrics.json").read_text() == "{}"


@pytest.fixture
def finished_run(tiny_cfg, grid_for):
    cfg = tiny_cfg()
    run_training(grid_for(cfg), cfg)
    return cfg


def test_forget_bad_input_changes_nothing(finished_run, capsys, tmp_path, grid_for):
    cfg = finished_run
    run = RunDir(cfg.out_path)
    owned = shard_of(cfg, load_dataset(cfg))[0].ids[0].item()
    heldout = load_dataset(cfg).heldout.ids[0].item()
    run.ledger.append([{"request": 1, "shard": 0, "ids": [owned], "method": "exact-sisa"}])  # as if deleted
    before = _snapshot(cfg.out_path)
    # an erasure request repeated: satisfied by the earlier request (named), exit 0, no Flower run
    assert cli.main(["forget", "--run", str(cfg.out_path), "--ids", f"{owned}"]) == 0
    out = capsys.readouterr().out
    assert f"sample {owned} was already deleted by request 1 (shard 0" in out and "satisfied" in out
    assert "nothing left to delete" in out
    assert _snapshot(cfg.out_path) == before
    cases = [
        (["--ids", "999999"], "unknown sample id(s) (not a training member of this run): 999999"),
        (["--ids", f"{heldout}"], "not a training member"),
        (["--ids", "1,x"], "non-negative integers"),
        (["--ids", "1,\u00b2"], "non-negative integers"),  # a unicode digit
        (["--ids", "5,5"], "listed twice"),
        (["--ids", ""], "no sample ids"),
        (["--ids-file", str(tmp_path / "missing.txt")], "cannot read --ids-file"),
    ]
    for args, expected in cases:
        code = cli.main(["forget", "--run", str(cfg.out_path), *args])
        _one_line_error(capsys, code, expected)
    assert _snapshot(cfg.out_path) == before


def test_forget_needs_a_run_folder(tmp_path, capsys):
    code = cli.main(["forget", "--run", str(tmp_path), "--ids", "1"])
    _one_line_error(capsys, code, "is not a finished fairforget run")
    code = cli.main(["forget", "--run", str(tmp_path / "nope"), "--ids", "1"])
    _one_line_error(capsys, code, "is not a folder")


def test_forget_refuses_fedavg_runs(tiny_cfg, grid_for, capsys):
    cfg = tiny_cfg(strategy="fedavg")
    run_training(grid_for(cfg), cfg)
    before = _snapshot(cfg.out_path)
    code = cli.main(["forget", "--run", str(cfg.out_path), "--ids", "1"])
    _one_line_error(capsys, code, "exact unlearning needs shard-ensemble")
    assert _snapshot(cfg.out_path) == before


def test_forget_says_what_the_user_waited_for(tiny_cfg, grid_for, capsys, monkeypatch):
    """The driver writes its seconds per phase (request status, and the request's metrics.json entry up to
    the report); the command adds its own start-up, Flower's and the rest, which add up to its wall; the
    summary line says that wall next to the compute speed-up. Flower's transport is the in-process grid."""
    import re

    from fairforget import runner
    from fairforget.requests import Request, read_status
    from server.app import run_driver

    def in_process_flower(cfg, quiet=False):
        run_driver(grid_for(cfg), cfg, Request.load(cfg.out_path, cfg.request))
        return runner.outcome(cfg, 0, quiet)

    monkeypatch.setattr(cli, "run_flower", in_process_flower)
    cfg = tiny_cfg(**{"audit-attacks": "loss"})
    run_training(grid_for(cfg), cfg)
    victim = shard_of(cfg, load_dataset(cfg))[1].ids[0].item()
    capsys.readouterr()
    assert cli.main(["forget", "--run", str(cfg.out_path), "--ids", str(victim)]) == 0
    out = capsys.readouterr().out
    (request_id,) = [p.name.removesuffix(".status.json") for p in (cfg.out_path / "requests").glob("*.status.json")
                     if read_status(cfg.out_path, p.name.removesuffix(".status.json"))["mode"] == "forget"]
    timing = read_status(cfg.out_path, request_id)["timing"]

    driver = timing["phases"]
    assert list(driver) == ["restore", "describe", "unlearning", "evaluation", "audit", "report"]
    assert all(v > 0 for v in driver.values()), driver
    assert sum(driver.values()) <= timing["driver_seconds"]
    entry = RunDir(cfg.out_path).metrics()["unlearning"][-1]
    assert entry["wall_seconds"] <= driver["unlearning"]  # the nodes' exchange is part of the unlearning phase
    assert set(entry["timing"]["phases"]) == set(driver) - {"report"}  # written before the report
    assert sum(entry["timing"]["phases"].values()) <= entry["timing"]["driver_seconds"] <= timing["driver_seconds"]

    command = timing["command"]
    wall, phases = command["wall_seconds"], command["phases"]
    assert list(phases) == ["startup", "flower_startup", *driver, "flower_shutdown", "other"]
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(wall) and wall >= timing["driver_seconds"]

    line = next(s for s in out.splitlines() if s.startswith("unlearning "))
    said = re.search(r"vs full retrain [\d.]+s \([\d.]+x faster\); you waited ([\d.]+) s: (.*)$", line)
    assert said, line
    assert float(said[1]) == pytest.approx(wall, abs=0.051)
    parts = dict(re.fullmatch(r"(.+) ([\d.]+) s", p).groups() for p in said[2].split(", "))
    assert list(parts) == ["start-up", "Flower start-up", *driver, "Flower shutdown", "other"]
    assert sum(float(v) for v in parts.values()) == pytest.approx(wall, abs=0.051 * len(parts))
