"""Bad simulation input (issue 27): more shards than training samples, more CPUs or GPUs per client
than the machine has, zero or negative resources: one line, exit 2, before Flower starts, nothing written."""

import pytest

from fairforget.config import ConfigError, resolve
from server import cli


@pytest.fixture
def no_flower(monkeypatch):
    """Fail the test if a command gets as far as starting Flower."""
    def refuse(*args, **kwargs):
        raise AssertionError("Flower was started")

    monkeypatch.setattr(cli, "run_flower", refuse)


def _one_line(capsys, code, expected):
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE, err
    assert err.startswith("fairforget: error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err, err


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "client-cpus=0"], "'client-cpus' = 0"),
    (["--set", "client-cpus=-1"], "'client-cpus' = -1"),
    (["--set", "client-gpus=-0.5"], "'client-gpus' = -0.5"),
    (["--set", "client-cpus=4096"], "this machine has"),
    (["--set", "num-shards=2000"], "'num-shards' = 2000"),
    # 0.4 + 0.39 of the embedded data held out leaves fewer training samples than 500 shards
    (["--set", "num-shards=500", "--set", "heldout-fraction=0.4", "--set", "test-fraction=0.39"],
     "training samples cannot fill 500 shards"),
])
def test_simulate_refuses_bad_resources_before_flower(tmp_path, capsys, no_flower, args, expected):
    out = tmp_path / "run"
    code = cli.main(["simulate", *args, "--out", str(out)])
    _one_line(capsys, code, expected)
    assert not out.exists()  # nothing written


def test_resources_against_the_machine():
    cfg = resolve({})
    cfg.replace(client_cpus=2).check_simulation_resources(cores=2, gpus=0)  # fits
    cfg.replace(client_gpus=0.25).check_simulation_resources(cores=2, gpus=1)  # 4 clients share one GPU
    with pytest.raises(ConfigError, match="'client-cpus' = 3: this machine has 2 CPU core"):
        cfg.replace(client_cpus=3).check_simulation_resources(cores=2, gpus=0)
    with pytest.raises(ConfigError, match=r"'client-gpus' = 0.5: this machine has 0 GPU\(s\).*use 0"):
        cfg.replace(client_gpus=0.5).check_simulation_resources(cores=2, gpus=0)
    with pytest.raises(ConfigError, match="'client-gpus' = 2: this machine has 1 GPU"):
        cfg.replace(client_gpus=2.0).check_simulation_resources(cores=2, gpus=1)
