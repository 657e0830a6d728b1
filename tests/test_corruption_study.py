"""simulations/corruption_study.py: the corruption it plants, and one cell of its grid on a tiny config
(the full grid is the script's)."""

import math

import numpy as np
import torch

from fairforget.config import resolve
from fairforget.data import load_dataset, shard_of
from simulations import corruption_study as cs

TINY_STUDY = {"num-shards": 4, "slices": 2, "epochs-per-slice": 2, "model-width": 4, "image-size": 8, "rho": 0.1,
              "batch-size": 32, "device": "cpu", "unlearn-epochs": 1}


def test_the_planted_corruption(tmp_path):
    cfg = resolve({**TINY_STUDY, "out-dir": str(tmp_path / "run")})
    clean = shard_of(cfg, load_dataset(cfg))[0]
    n = round(cs.FRACTION * len(clean))
    flipped, order = cs.corrupt(clean, "flips", 10, 0, seed=3)
    changed = np.flatnonzero((flipped.y != clean.y).numpy())
    assert len(order) == len(changed) == n  # 5% of the shard, every one a different label
    assert sorted(order) == sorted(clean.ids[changed].tolist()) and torch.equal(flipped.x, clean.x)
    poisoned, order = cs.corrupt(clean, "trigger", 10, 2, seed=3)
    pos = np.flatnonzero(np.isin(clean.ids.numpy(), order))
    assert len(pos) == n and (clean.y[pos] != 2).all() and (poisoned.y[pos] == 2).all()
    assert torch.equal(poisoned.x[pos], cs.stamp(clean.x[pos])) and not torch.equal(poisoned.x[pos], clean.x[pos])
    rest = np.setdiff1d(np.arange(len(clean)), pos)
    assert torch.equal(poisoned.x[rest], clean.x[rest]) and torch.equal(poisoned.y[rest], clean.y[rest])


def test_one_cell_of_the_grid_runs(tmp_path):
    cfg = resolve({**TINY_STUDY, "out-dir": str(tmp_path / "run")})
    run = cs.run_kind(cfg, "trigger", [0.5], list(cs.METHODS), tmp_path / "work")
    assert run["corrupted"] == round(cs.FRACTION * run["shard_size"])
    assert [r["method"] for r in run["rows"]] == list(cs.METHODS)
    for row in run["rows"]:
        assert row["discovered"] == round(0.5 * run["corrupted"])
        assert 0 <= row["effect"] <= 1 and 0 < row["clean_acc"] <= 1 and row["seconds"] > 0
    summary = cs.mean_rows([run])
    assert "| rem |" in cs.tables(summary, ["trigger"], [0.5], list(cs.METHODS))
    assert cs.aim(summary, ["trigger"], 0.5)[0].startswith("- trigger at rate 0.5: REM effect")
    assert not math.isnan(summary[("trigger", "before", 0.0)]["effect"])


def test_bad_input_is_one_line(capsys):
    assert cs.main(["--rates", "0", "--no-page"]) == 2
    assert capsys.readouterr().err.strip() == "corruption_study: error: --rates [0.0]: each must be in (0, 1]"
    assert cs.main(["--methods", "nope", "--no-page"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("corruption_study: error: ") and "nope" in err and "\n" not in err
