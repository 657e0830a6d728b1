"""SISA training and exact unlearning on one shard (no Flower)."""

import pytest
import torch

from fairforget.data import load_dataset, shard_of
from fairforget.objectives import OBJECTIVES
from fairforget.sisa import SisaError, SisaSettings, SisaShard, assign_slices
from fairforget.unlearning.exact import unlearn


@pytest.fixture
def shard_setup(tiny_cfg, tmp_path):
    cfg = tiny_cfg(slices=3, **{"epochs-per-slice": 2})
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    return cfg, data, settings, tmp_path


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_slices_partition_the_shard():
    ids = list(range(100, 150))
    slices = assign_slices(ids, 4, seed=0, shard=1)
    assert sorted(i for s in slices for i in s) == ids
    assert [len(s) for s in slices] == [13, 13, 12, 12]
    assert assign_slices(ids, 4, seed=0, shard=1) == slices
    assert assign_slices(ids, 4, seed=1, shard=1) != slices


def test_training_is_deterministic(shard_setup):
    _, data, settings, tmp = shard_setup
    a = SisaShard(tmp / "a", 0, data, settings)
    b = SisaShard(tmp / "b", 0, data, settings)
    a.train_through()
    b.train_through()
    assert a.model_hash() == b.model_hash()
    assert a.trained == settings.slices
    assert all((tmp / "a" / "checkpoints" / f"stage-{r}.pt").exists() for r in (1, 2, 3))


@pytest.mark.parametrize("slice_no", [0, 1, 2])
def test_unlearning_equals_training_from_scratch_without_the_ids(shard_setup, slice_no):
    _, data, settings, tmp = shard_setup
    shard = SisaShard(tmp / "shard", 0, data, settings)
    shard.train_through()
    original_slices = [list(s) for s in shard.index["slices"]]
    forget = original_slices[slice_no][:2] + (original_slices[2][:1] if slice_no < 2 else [])
    before = shard.model_state()

    result = unlearn(shard, forget)

    assert result.restart_stage == slice_no
    assert result.retrained_stages == settings.slices - slice_no
    assert result.hash_before != result.hash_after
    scratch = SisaShard(tmp / "scratch", 0, data, settings,
                        slices=[[i for i in s if i not in forget] for s in original_slices])
    scratch.train_through()
    assert _max_diff(shard.model_state(), scratch.model_state()) < 1e-6
    assert _max_diff(shard.model_state(), before) > 1e-4


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_unlearning_is_exact_with_every_objective(tiny_cfg, tmp_path, objective):
    """Model and the objective's own parts (bias branches, bias networks) after unlearning equal a
    training from scratch without the ids, bit for bit."""
    cfg = tiny_cfg(objective=objective)
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private)
    shard = SisaShard(tmp_path / "shard", 0, data, settings)
    shard.train_through()
    original = [list(s) for s in shard.index["slices"]]
    forget = original[1][:2]
    before = shard.model_hash()
    unlearn(shard, forget)
    scratch = SisaShard(tmp_path / "scratch", 0, data, settings, slices=[[i for i in s if i not in forget]
                                                                         for s in original])
    scratch.train_through()
    assert shard.model_hash() == scratch.model_hash() != before
    a, b = (torch.load(s.checkpoint_path(settings.slices), weights_only=True)["objective"] for s in (shard, scratch))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (len(a) > 0) == (objective != "cross-entropy")  # EnD keeps its joint head aside (head refit)


def test_deleted_ids_are_gone_from_index_and_checkpoints(shard_setup):
    _, data, settings, tmp = shard_setup
    shard = SisaShard(tmp / "s", 0, data, settings)
    shard.train_through()
    victim = shard.index["slices"][1][0]
    stage1 = shard.checkpoint_path(1).read_bytes()
    later = {st: shard.checkpoint_path(st).read_bytes() for st in (2, 3)}
    unlearn(shard, [victim])
    assert victim not in shard.live_ids()
    assert victim in shard.deleted
    for stage in range(1, settings.slices + 1):
        trained_on = torch.load(shard.checkpoint_path(stage), weights_only=True)["ids"].tolist()
        assert victim not in trained_on
    # stage 1 never saw the victim (slice 2): it was kept, byte for byte; stages 2 and 3 were retrained
    assert shard.checkpoint_path(1).read_bytes() == stage1
    assert all(shard.checkpoint_path(st).read_bytes() != later[st] for st in (2, 3))
    reopened = SisaShard(tmp / "s", 0, data, settings)
    assert victim not in reopened.live_ids() and reopened.trained == settings.slices


def test_bad_ids_change_nothing(shard_setup):
    _, data, settings, tmp = shard_setup
    shard = SisaShard(tmp / "s", 0, data, settings)
    shard.train_through()
    victim = shard.index["slices"][0][0]
    unlearn(shard, [victim])
    index_before = (tmp / "s" / "index.json").read_bytes()
    hash_before = shard.model_hash()
    with pytest.raises(SisaError, match="already deleted"):
        unlearn(shard, [victim])
    with pytest.raises(SisaError, match="not in shard 0"):
        unlearn(shard, [999_999])
    assert (tmp / "s" / "index.json").read_bytes() == index_before
    assert shard.model_hash() == hash_before


def test_crash_after_commit_leaves_no_stale_checkpoint(shard_setup):
    """A crash between committing the deletion and retraining: on reload the dirty checkpoints go."""
    _, data, settings, tmp = shard_setup
    shard = SisaShard(tmp / "s", 0, data, settings)
    shard.train_through()
    stale = torch.load(shard.checkpoint_path(3), weights_only=True)
    victim = shard.index["slices"][1][0]
    clean = shard.remove([victim])  # committed, not retrained: "crash" here
    assert clean == 1
    # simulate a checkpoint that survived the crash
    torch.save(stale, shard.checkpoint_path(3))
    reopened = SisaShard(tmp / "s", 0, data, settings)
    assert reopened.trained == 1
    assert not reopened.checkpoint_path(3).exists()
    reopened.train_through()
    assert victim not in torch.load(reopened.checkpoint_path(3), weights_only=True)["ids"].tolist()


def test_state_folder_of_another_shard_is_refused(shard_setup):
    _, data, settings, tmp = shard_setup
    SisaShard(tmp / "s", 0, data, settings)
    with pytest.raises(SisaError, match="belongs to shard 0"):
        SisaShard(tmp / "s", 1, data, settings)
