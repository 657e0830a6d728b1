"""Bias-aware diffusion augmentation: the planner, the generator, provenance, invalidation on deletion,
and the step-wise driver, with a tiny UNet (block_out_channels (8, 16)) and two DDIM steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.augment import AugmentStore
from clients.node import Node
from fairforget import keys
from fairforget.config import ConfigError
from fairforget.data import load_dataset
from fairforget.data.base import SYNTHETIC_ID_BASE, is_synthetic
from fairforget.diffusion.generator import (
    ConditionalGenerator,
    GeneratorError,
    GeneratorSettings,
    sample,
    train_generator,
)
from fairforget.diffusion.planner import PlanError, kl_to_target, plan_counts
from fairforget.diffusion.quality import FidelityClassifiers, frechet_distance
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from tests.conftest import forget_request

TINY_AUG = {
    "augment": True, "augment-kl-threshold": 0.3, "augment-steps": 1, "augment-retire-per-step": 5,
    "diffusion-width": 8, "diffusion-train-steps": 10, "ddim-steps": 2, "audit-bootstrap": 0,
}


# ---------------------------------------------------------------------- planner
@pytest.mark.parametrize("threshold", [0.5, 0.1, 0.01])
def test_plan_brings_kl_under_threshold(threshold):
    counts = np.array([[50, 1, 0], [0, 40, 2], [3, 0, 30]])
    add = plan_counts(counts, threshold)
    assert add.shape == counts.shape and (add >= 0).all()
    assert kl_to_target(counts) > threshold
    assert kl_to_target(counts + add) <= threshold
    # most under-represented first: an empty group gets at least as much as any populated one
    assert add[0, 2] >= add[0, 1] >= add[0, 0] == 0


def test_plan_is_minimal_and_respects_target():
    counts = np.array([10, 10, 10, 0])
    add = plan_counts(counts, 0.01)
    assert add[:3].sum() == 0 and add[3] > 0
    smaller = add.copy()
    smaller[3] -= 1
    assert kl_to_target(counts + smaller) > 0.01  # one sample fewer is not enough
    assert plan_counts(np.array([5, 5, 5, 5]), 0.0).sum() == 0  # already balanced: nothing to add
    target = np.array([0.5, 0.5, 0.0, 0.0])
    add = plan_counts(np.array([10, 2, 0, 0]), 0.01, target=target)
    assert add[2] == add[3] == 0 and kl_to_target(np.array([10, 2, 0, 0]) + add, target) <= 0.01


def test_plan_rejects_bad_input():
    with pytest.raises(PlanError, match=">= 0"):
        plan_counts(np.array([3, 1]), -0.1)
    with pytest.raises(PlanError, match="no real samples"):
        plan_counts(np.array([0, 0]), 0.1)


def test_kl_matches_log_k_minus_entropy():
    counts = np.array([6, 3, 1, 0])
    p = counts[counts > 0] / counts.sum()
    assert kl_to_target(counts) == pytest.approx(np.log(4) + np.sum(p * np.log(p)))


# ---------------------------------------------------------------------- generator
def _tiny_settings(**kw) -> GeneratorSettings:
    base = dict(image_size=8, num_classes=3, num_private=2, width=8, train_steps=5, batch_size=16, ddim_steps=2)
    return GeneratorSettings(**{**base, **kw})


def test_saved_generator_reloads_and_reproduces_samples(tmp_path: Path):
    x = torch.rand(24, 3, 8, 8)
    y, a = torch.arange(24) % 3, torch.arange(24) % 2
    model = train_generator(x, y, a, _tiny_settings(), seed=3)
    model.save(tmp_path / "gen", {"version": 1})
    again, meta = ConditionalGenerator.load(tmp_path / "gen")
    assert meta["version"] == 1
    first = sample(model, y[:6], a[:6], seed=11)
    second = sample(again, y[:6], a[:6], seed=11)
    assert first.shape == (6, 3, 8, 8) and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, sample(model, y[:6], a[:6], seed=12))
    # training is seeded too
    torch.testing.assert_close(sample(train_generator(x, y, a, _tiny_settings(), seed=3), y[:6], a[:6], seed=11), first)


def test_classifier_guidance_changes_samples():
    x = torch.rand(12, 3, 8, 8)
    y, a = torch.arange(12) % 3, torch.arange(12) % 2
    model = train_generator(x, y, a, _tiny_settings(), seed=0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 3))
    plain = sample(model, y[:4], a[:4], seed=1)
    guided = sample(model, y[:4], a[:4], seed=1, classifier=clf, classifier_scale=5.0)
    assert not torch.allclose(plain, guided)


def test_unloadable_generator_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "gen").mkdir()
    with pytest.raises(GeneratorError, match="cannot load the generator"):
        ConditionalGenerator.load(tmp_path / "gen")


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-3)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=0.05)


def test_fidelity_classifiers_round_trip(tiny_cfg):
    bundle = load_dataset(tiny_cfg())
    clf = FidelityClassifiers.train(bundle.heldout, bundle.num_classes, bundle.num_private, seed=0, epochs=2)
    again = FidelityClassifiers.from_state(clf.state(), bundle.num_classes, bundle.num_private)
    for p, q in zip(clf.predict(bundle.test_biased.x), again.predict(bundle.test_biased.x), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- the driver, provenance and deletion
@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    """One in-process augmented run (shared by the tests below; each test copies it)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fairforget.config import resolve
    from tests.conftest import TINY, InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    out = tmp_path_factory.mktemp("aug") / "run"
    cfg = resolve({**TINY, **TINY_AUG, "out-dir": str(out)})
    run_training(InProcessGrid(cfg), cfg)
    return cfg


def _copy(cfg, tmp_path: Path, **changes):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(cfg.out_dir, dst)
    return cfg.replace(out_dir=str(dst), **changes)


def test_augmentation_brings_every_shard_under_the_threshold(augmented_run):
    cfg = augmented_run
    metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    aug = metrics["augmentation"]
    assert [r["name"] for r in aug["rows"]] == ["vanilla", "augmented", "augmented + step-wise unlearning"]
    first = aug["steps"][0]["shards"]
    for rep in first.values():
        assert rep["kl_before"] > cfg.augment_kl_threshold >= rep["kl_after"]
        assert rep["generated"] > 0 and rep["num_synthetic"] == rep["generated"]
        assert 0.0 <= rep["quality"]["label_fidelity"]["class"] <= 1.0
        assert rep["kl_after_judged"] >= 0.0  # what the (10-step) generator drew, as judged: reported beside
    last = aug["steps"][-1]
    assert last["retired"] == cfg.augment_retire_per_step * cfg.num_shards
    for rep in last["shards"].values():
        assert rep["kl_after"] <= cfg.augment_kl_threshold  # replenished after retiring
    assert set(aug["rows"][2]["mia"]) == set(aug["rows"][0]["mia"])
    assert (Path(cfg.out_dir) / "nodes" / "shard-0" / "augment" / "grids" / "overview.png").is_file()
    assert "Augmentation" in (Path(cfg.out_dir) / "report.md").read_text()


def check_reported_bias_follows_generation(root, monkeypatch) -> None:
    """The judged KL a step reports comes from what the generator drew: real images of the requested
    groups pass the debiasing check (tests/oracles.py), noise for the very same plan fails it."""
    from tests.oracles import assert_debiased, augment_step_report, noise_sampler, real_group_sampler, tiny_fidelity

    threshold = TINY_AUG["augment-kl-threshold"]
    good = augment_step_report(root / "good", real_group_sampler(tiny_fidelity()[1]), monkeypatch)
    assert_debiased(good, threshold)
    noisy = augment_step_report(root / "noise", noise_sampler, monkeypatch)
    assert noisy["kl_after"] == good["kl_after"] <= threshold  # the same plan: the requested labels cannot tell
    try:
        assert_debiased(noisy, threshold)
    except AssertionError:
        return
    raise AssertionError(f"a generator that outputs noise passed the debiasing check: {noisy['kl_after_judged']}")


def test_reported_bias_comes_from_what_was_generated(tmp_path, monkeypatch):
    check_reported_bias_follows_generation(tmp_path, monkeypatch)


def test_provenance_and_retirement_are_recorded(augmented_run, grid_for):
    cfg = augmented_run
    grid = grid_for(cfg)
    node = grid.node(101)
    store = AugmentStore(node.state_dir, node.shard)
    synth, versions = store.synthetic((3, 8, 8))
    assert len(synth) and is_synthetic(synth.ids).all()
    assert ((synth.ids - SYNTHETIC_ID_BASE) >> 28 == node.shard).all()  # the shard that made them
    assert (versions == store.state["generator_version"]).all() and store.state["generator_version"] == 1
    live = node.sisa.live_ids()
    assert set(synth.ids.tolist()) <= live  # every synthetic sample trains the shard
    assert store.retired and not (store.retired & live)  # retired originals left the classifier
    assert set(store.state["generator_trained_on"]) >= store.retired  # ...but the site still has them
    ledger = [json.loads(line) for line in (Path(cfg.out_dir) / "ledger.jsonl").read_text().splitlines()]
    retired_rows = [r for r in ledger if r["decision"] == "retire-original"]
    assert sorted(i for r in retired_rows for i in r["ids"]) == sorted(
        i for s in range(cfg.num_shards) for i in grid.node(101 + s).augment_store.retired)


@pytest.mark.parametrize("policy", ["regenerate", "drop"])
def test_deleting_an_original_invalidates_generator_and_its_samples(augmented_run, grid_for, tmp_path, policy):
    cfg = _copy(augmented_run, tmp_path, augment_on_delete=policy)
    grid = grid_for(cfg)
    node = grid.node(101)
    store = node.augment_store
    old_synth = set(store.synthetic((3, 8, 8))[0].ids.tolist())
    victim = sorted(i for i in node.sisa.live_ids() if i < SYNTHETIC_ID_BASE)[0]
    retired_victim = sorted(store.retired)[0]  # a retired original can still be deleted (from the generator)
    run_forget(grid, cfg, forget_request(f"{victim},{retired_victim}"))

    node = grid.node(101)
    store = node.augment_store
    synth, versions = store.synthetic((3, 8, 8))
    live = node.sisa.live_ids()
    assert victim not in live and not (old_synth & live)  # gone from the index
    assert not (old_synth & set(synth.ids.tolist()))  # gone from the synthetic store
    for path in (Path(node.state_dir) / "checkpoints").glob("stage-*.pt"):
        ckpt_ids = set(torch.load(path, weights_only=True)["ids"].tolist())
        assert victim not in ckpt_ids and not (old_synth & ckpt_ids)
    if policy == "regenerate":
        assert store.state["generator_version"] == 2 and store.state["generator_valid"]
        assert victim not in store.state["generator_trained_on"]
        assert retired_victim not in store.state["generator_trained_on"]
        assert len(synth) == len(old_synth) and (versions == 2).all()
    else:
        assert not store.state["generator_valid"] and len(synth) == 0
        assert not store.generator_dir.exists()
    row = [json.loads(line) for line in (Path(cfg.out_dir) / "ledger.jsonl").read_text().splitlines()][-1]
    assert row["generator_invalidated"] is True and row["policy"] == policy
    assert row["synthetic_dropped"] == len(old_synth)
    again = run_forget(grid, cfg, forget_request(ids=str(retired_victim)))  # asked again: satisfied, not redone
    assert [(r["id"], r["request"]) for r in again["satisfied"]] == [(retired_victim, row["request"])]


def test_a_crash_inside_an_augmented_forget_is_finished_on_restart(augmented_run, grid_for, tmp_path, monkeypatch):
    """Crash after the augmentation state recorded the deletion and the invalid generator, before the
    SISA index or the generator changed: the restart removes the generator, its samples and its grids,
    regenerates without the deleted original, retrains, and records the completion."""
    from fairforget.sisa import SisaShard

    cfg = _copy(augmented_run, tmp_path)
    grid = grid_for(cfg)
    node = grid.node(101)
    old_synth = set(node.augment_store.synthetic((3, 8, 8))[0].ids.tolist())
    grids = node.augment_store.grids_dir / "overview.png"
    old_grid = grids.read_bytes()
    victim = sorted(i for i in node.sisa.live_ids() if i < SYNTHETIC_ID_BASE)[0]

    def crash(self, *a, **k):
        raise RuntimeError("injected crash")

    monkeypatch.setattr(SisaShard, "remove", crash)
    with pytest.raises(ForgetError, match="did not finish"):
        run_forget(grid, cfg, forget_request(ids=str(victim)))
    monkeypatch.undo()
    state = json.loads((node.augment_store.state_path).read_text())
    assert state["invalidated"] and not state["generator_valid"] and victim in state["deleted"]
    run_forget(grid, cfg, forget_request(ids=""))  # the restart reconciles

    node = grid.node(101)
    store = node.augment_store
    synth, versions = store.synthetic((3, 8, 8))
    assert "invalidated" not in store.state and store.state["generator_valid"]
    assert store.state["generator_version"] == 2 and victim not in store.state["generator_trained_on"]
    assert not (old_synth & node.sisa.live_ids()) and not (old_synth & set(synth.ids.tolist()))
    assert (versions == 2).all() and grids.read_bytes() != old_grid  # grids redrawn by the new generator
    for path in (Path(node.state_dir) / "checkpoints").glob("stage-*.pt"):
        ckpt_ids = set(torch.load(path, weights_only=True)["ids"].tolist())
        assert victim not in ckpt_ids and not (old_synth & ckpt_ids)
    from fairforget.ledger import Ledger

    lg = Ledger(Path(cfg.out_dir) / "ledger.jsonl")
    assert lg.pending() == {} and lg.entries()[-1]["resumed"] is True


def test_group_without_real_samples_is_a_clear_error(tiny_cfg, grid_for):
    # class 9 removed from the training data: the generator cannot learn it
    cfg = tiny_cfg()
    node = Node.from_context({**cfg.to_mapping(), **TINY_AUG}, {keys.NODE_PARTITION_ID: 0,
                                                                keys.NODE_NUM_PARTITIONS: cfg.num_shards})
    keep = np.flatnonzero(node.data.y.numpy() != 9)
    node.data = node.data.subset(keep)
    with pytest.raises(GeneratorError, match="class 9 has no real samples"):
        node.augmenter.step(0, 0, None)


def test_bad_augmentation_config_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="augment-kl-threshold"):
        tiny_cfg(**{"augment-kl-threshold": -0.5})
    with pytest.raises(ConfigError, match="guidance-scale.*expected float"):
        tiny_cfg(**{"guidance-scale": "strong"})
    from strategies import build_strategy  # the strategy class declares supports_augment

    with pytest.raises(ConfigError, match="shard-ensemble"):
        build_strategy(tiny_cfg(**{"augment": True, "strategy": "fedavg"}), 10)


def test_each_step_retires_within_the_deletion_capacity(tiny_cfg):
    """The strategy grants retirements from the same deletion budget forget requests spend."""
    from flwr.app import ArrayRecord

    from fairforget.capacity import newton_capacity
    from strategies.shard_ensemble import ShardEnsemble

    def grants(cfg, step):
        strategy = ShardEnsemble.from_config(cfg, 10)
        strategy.shard_reports = {0: {keys.NUM_EXAMPLES: 540, keys.NODE_ID: 101}}
        messages = strategy.configure_augment(step, cfg.augment_retire_per_step, ArrayRecord())
        assert [m.metadata.dst_node_id for m in messages] == [101]
        assert strategy.granted() == {0: int(messages[0].content[keys.CONFIG][keys.RETIRE])}
        return strategy.granted()[0]

    cfg = tiny_cfg(**{"augment-retire-per-step": 10_000})
    d = 8 * cfg.model_width * 10 + 10
    expected = newton_capacity(cfg.capacity_eps, cfg.capacity_delta, 540, d, cfg.capacity_c)
    assert 0 < grants(cfg, 1) == expected < 540  # the capacity binds
    assert grants(tiny_cfg(**{"augment-retire-per-step": 3}), 1) == 3  # the per-step budget binds
    assert grants(cfg, 0) == 0  # step 0 only augments


@pytest.mark.slow
def test_trained_generator_makes_the_requested_class(tiny_cfg):
    """A small generator trained long enough on real digits (rho = 0.1: colour carries no class)
    produces the class it is asked for far above chance, as judged by a classifier trained on other
    real data (the held-out split)."""
    cfg = tiny_cfg(rho=0.1)
    bundle = load_dataset(cfg)
    settings = GeneratorSettings(image_size=8, num_classes=10, num_private=10, width=16, train_steps=1200,
                                 batch_size=64, ddim_steps=20)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # pytest-xdist runs another worker beside this one: two threads would fight it
    try:
        model = train_generator(bundle.train.x, bundle.train.y, bundle.train.private, settings, seed=0)
    finally:
        torch.set_num_threads(before)
    fidelity = FidelityClassifiers.train(bundle.heldout, 10, 10, seed=0)
    assert fidelity.accuracy(bundle.test_unbiased)["class"] > 0.8
    y = torch.arange(10).repeat_interleave(20)
    a = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(0))
    fid = fidelity.fidelity(sample(model, y, a, seed=1), y, a)
    # the class AND the colour asked for, far above chance (0.1 each): what augmentation is for
    from tests.oracles import assert_generated_match_requested

    assert_generated_match_requested(fid, min_class=0.5, min_private=0.5)


def test_class_mode_regeneration_keeps_the_replaced_samples_labels(tiny_cfg, grid_for):
    cfg = tiny_cfg(**{**TINY_AUG, "augment-groups": "class", "augment-steps": 0, "class-imbalance": 4.0,
                      "augment-kl-threshold": 0.01})
    grid = grid_for(cfg)
    run_training(grid, cfg)
    node = grid.node(101)
    before, _ = node.augment_store.synthetic((3, 8, 8))
    assert len(before) and node.augment_store.state["generator_version"] == 1
    victim = sorted(i for i in node.sisa.live_ids() if i < SYNTHETIC_ID_BASE)[0]
    run_forget(grid, cfg, forget_request(ids=str(victim)))
    after, versions = grid.node(101).augment_store.synthetic((3, 8, 8))
    assert (versions == 2).all() and not set(before.ids.tolist()) & set(after.ids.tolist())
    order = torch.argsort(before.y, stable=True)
    assert torch.equal(after.y, before.y[order]) and torch.equal(after.private, before.private[order])


def test_verify_proves_an_augmented_shard_and_sees_a_synthetic_sample_moved(augmented_run, tmp_path):
    """`fairforget verify` on an augmented run: every shard (originals and live synthetic samples) is
    replayed from scratch and matches; a synthetic sample moved to another slice in the node's index
    (the replay would follow the index) is caught by the slice check, not trusted."""
    from fairforget.data.base import SYNTHETIC_ID_BASE
    from fairforget.verify import MATCH, MISMATCH, verify_run

    cfg = _copy(augmented_run, tmp_path)
    verdicts = verify_run(Path(cfg.out_dir), cfg, [0, 1])
    assert [v.status for v in verdicts] == [MATCH, MATCH], [(v.status, v.problems) for v in verdicts]
    assert all(v.replay_hash == v.served_hash for v in verdicts)
    path = Path(cfg.out_dir) / "nodes" / "shard-0" / "index.json"
    index = json.loads(path.read_text())
    s, synth = next((s, i) for s, sl in enumerate(index["slices"]) for i in sl if i >= SYNTHETIC_ID_BASE)
    index["slices"][s].remove(synth)
    index["slices"][(s + 1) % len(index["slices"])].append(synth)
    path.write_text(json.dumps(index))
    (v,) = verify_run(Path(cfg.out_dir), cfg, [0])
    assert v.status == MISMATCH and any("synthetic id(s) in slice" in p for p in v.problems), v.problems
