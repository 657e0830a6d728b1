"""End to end through Flower's simulation engine (`flwr run`, Ray backend): the workflow of
docs/tutorials/first-simulation.md on tiny data, 2 SuperNodes. Slow (Flower start-up dominates), so there is
just this one."""

import subprocess
import sys

import pytest
import torch

from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir
from fairforget.sisa import SisaSettings, SisaShard, assign_slices
from fairforget.storage import read_json, read_jsonl, torch_load

pytestmark = pytest.mark.e2e

SETTINGS = ["num-shards=2", "slices=2", "epochs-per-slice=1", "model-width=4", "image-size=8", "device=\"cpu\"",
            "audit-bootstrap=50"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_simulate_then_forget_through_flower(tmp_path):
    out = tmp_path / "run"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    sim = _cli("simulate", *sets, "--out", str(out), "--quiet")
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert f"report:  {out / 'report.md'}" in sim.stdout
    for name in ("metrics.json", "ledger.jsonl", "report.md", "config.toml", "group_accuracy.png"):
        assert (out / name).is_file(), name
    run = RunDir(out)
    cfg = run.config()
    metrics = run.metrics()
    assert len(metrics["shards"]) == 2 and len(metrics["rounds"]) == 2

    shards = shard_of(cfg, load_dataset(cfg))
    victims = shards[1].ids[:3].tolist()
    model0 = (out / "models" / "shard-0.pt").read_bytes()
    fg = _cli("forget", "--run", str(out), "--ids", ",".join(map(str, victims)), "--quiet")
    assert fg.returncode == 0, fg.stdout + fg.stderr
    assert "untouched shards: 0" in fg.stdout
    assert (out / "models" / "shard-0.pt").read_bytes() == model0

    ledger = read_jsonl(out / "ledger.jsonl")
    assert [(e["phase"], e.get("shard"), e["ids"]) for e in ledger] == [("intent", None, sorted(victims)),
                                                                         ("done", 1, sorted(victims))]
    assert run.metrics()["unlearning"][0]["ids"] == sorted(victims)

    # exactness through the Flower path: the unlearned constituent equals a from-scratch SISA model
    index = read_json(out / "nodes" / "shard-1" / "index.json")
    assert not set(victims) & {i for s in index["slices"] for i in s}
    gone = set(victims)  # the replay's slices: the shard's own assignment less the victims, not the node's index
    slices = [[i for i in sl if i not in gone] for sl in assign_slices(shards[1].ids.tolist(), cfg.slices, cfg.seed, 1)]
    assert index["slices"] == slices
    scratch = SisaShard(tmp_path / "scratch", 1, shards[1], SisaSettings.from_config(cfg, 10), slices=slices)
    scratch.train_through()
    served = torch_load(out / "models" / "shard-1.pt")
    ref = scratch.model_state()
    assert max((served[k].float() - ref[k].float()).abs().max().item() for k in ref) < 1e-5

    again = _cli("forget", "--run", str(out), "--ids", str(victims[0]), "--quiet")
    # asked again (erasure requests get repeated): satisfied by the first request, named; nothing redone
    assert again.returncode == 0 and "was already deleted by request 1" in again.stdout, again.stdout + again.stderr
    assert read_jsonl(out / "ledger.jsonl") == ledger
    assert torch.equal(torch_load(out / "models" / "shard-1.pt")["fc.weight"], served["fc.weight"])


def test_augmented_simulate_then_forget_through_flower(tmp_path):
    """train.augment through the simulation engine: every shard is augmented under the KL threshold,
    originals are retired step-wise, and a deletion invalidates the generator trained on it."""
    out = tmp_path / "aug"
    aug = ["augment=true", "augment-kl-threshold=0.3", "augment-steps=1", "augment-retire-per-step=4",
           "diffusion-width=8", "diffusion-train-steps=10", "ddim-steps=2", "audit=false"]
    sets = [a for s in SETTINGS + aug for a in ("--set", s)]
    sim = _cli("simulate", *sets, "--out", str(out), "--quiet")
    assert sim.returncode == 0, sim.stdout + sim.stderr
    metrics = RunDir(out).metrics()
    steps = metrics["augmentation"]["steps"]
    assert [s["retired"] for s in steps] == [0, 8]
    assert all(rep["kl_after"] <= 0.3 < rep["kl_before"] for rep in steps[0]["shards"].values())
    assert "Augmentation and step-wise unlearning" in (out / "report.md").read_text()

    cfg = RunDir(out).config()
    retired = [e for e in read_jsonl(out / "ledger.jsonl") if e["decision"] == "retire-original" and e["shard"] == 0]
    retired_victim = retired[0]["ids"][0]  # out of the classifier, still in the generator: deletable
    victim = next(i for i in shard_of(cfg, load_dataset(cfg))[0].ids.tolist() if i not in retired[0]["ids"])
    fg = _cli("forget", "--run", str(out), "--ids", f"{victim},{retired_victim}", "--quiet")
    assert fg.returncode == 0, fg.stdout + fg.stderr
    row = read_jsonl(out / "ledger.jsonl")[-1]
    assert row["ids"] == sorted([victim, retired_victim]) and row["generator_invalidated"] is True
    assert row["synthetic_regenerated"] == row["synthetic_dropped"] > 0
    assert read_json(out / "nodes" / "shard-0" / "augment" / "state.json")["generator_version"] == 2
