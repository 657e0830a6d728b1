"""REM (fairforget/unlearning/rem.py): its added neurons are gone from every saved model, it is an
approximate unlearner as far as the ledger, the deletion budget and the tombstones go, it is refused
under DP-SGD, and bad input is one line."""

import pytest
import torch

from fairforget.config import ConfigError
from fairforget.data import load_dataset, shard_of
from fairforget.model import build_model
from fairforget.run import RunDir
from fairforget.sisa import SisaError, SisaSettings, SisaShard
from fairforget.storage import read_json, state_hash, torch_load
from fairforget.tombstones import Tombstones
from fairforget.unlearning import is_exact, rem, unlearn_params
from fairforget.unlearning.approximate import UnlearnParams, approx_path, current_state, model_from
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from tests.conftest import forget_request


def _layout(state) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((k, tuple(v.shape)) for k, v in state.items())


def test_the_expanded_network_starts_as_the_model_and_its_neurons_are_not_saved(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"epochs-per-slice": 2, "unlearn-epochs": 1})
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    shard = SisaShard(tmp_path / "s", 0, data, settings)
    shard.train_through()
    original = _layout(build_model(bundle.num_classes, cfg.model_width, seed=0).state_dict())
    before = shard.model_state()
    assert _layout(before) == original

    # every new channel masked off, the expanded network is the model; on, it is not (random new weights)
    model = model_from(before, shard)
    net = rem.Redirected(model, 0.5, seed=1).eval()
    with torch.no_grad():
        assert torch.allclose(net(data.x, [torch.zeros(len(data), e) for e in net.extra]), model(data.x), atol=1e-5)
        assert not torch.allclose(net(data.x, [torch.ones(len(data), e) for e in net.extra]), model(data.x), atol=1e-3)
    assert net.added_parameters() > 0

    ids = sorted(data.ids[:3].tolist())
    result = rem.unlearn(shard, ids, UnlearnParams.from_config(cfg))
    assert result.method == "rem" and result.figures["added_parameters"] == net.added_parameters()
    saved = torch_load(approx_path(shard))["model"]  # the file the node serves from
    assert _layout(saved) == original  # no added neuron left: the original architecture's keys and shapes
    assert state_hash(current_state(shard)) == result.hash_after != state_hash(before)
    assert set(ids) <= shard.deleted


def test_rem_options_come_from_unlearner_options_and_bad_ones_are_one_line(tiny_cfg):
    params = unlearn_params(tiny_cfg(**{"unlearn-method": "rem", "unlearner-options": '{"extra": 0.25}'}))
    assert params.options["extra"] == 0.25 and params.options["gamma"] == rem.options["gamma"]
    with pytest.raises(ConfigError) as err:
        unlearn_params(tiny_cfg(**{"unlearn-method": "rem", "unlearner-options": '{"width": 2}'}))
    assert "has no option 'width'" in str(err.value) and "\n" not in str(err.value)


def test_rem_is_refused_under_dp_sgd_before_anything_is_written(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"dp": True, "dp-accountant": "rdp"})
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    shard = SisaShard(tmp_path / "s", 0, data, SisaSettings.from_config(cfg, bundle.num_classes))
    files = sorted(p for p in (tmp_path / "s").rglob("*") if p.is_file())
    with pytest.raises(SisaError, match="'rem' cannot run under DP-SGD"):
        rem.check(shard, [int(data.ids[0])])
    assert sorted(p for p in (tmp_path / "s").rglob("*") if p.is_file()) == files


def test_rem_deletion_is_approximate_in_the_ledger_charged_to_the_budget_and_tombstoned(tiny_cfg, grid_for):
    # tiny shards of 540 and 539 samples, capacity-c = 0.05: a capacity of 3 each (tests/test_capacity.py)
    cfg = tiny_cfg(**{"audit": False, "capacity-c": 0.05, "unlearn-method": "rem", "unlearn-epochs": 1})
    run_training(grid_for(cfg), cfg)
    run = RunDir(cfg.out_path)
    before = run.load_models()[1]
    ids = shard_of(cfg, load_dataset(cfg))[1].ids[:2].tolist()
    assert not is_exact("rem")

    run_forget(grid_for(cfg), cfg, forget_request(",".join(map(str, ids))))
    row = run.ledger.entries()[-1]
    assert (row["decision"], row["method"], row["shard"], row["capacity_before"], row["capacity_after"]) == \
        ("approximate", "rem", 1, 3, 1)
    assert read_json(run.budget_path)["shards"]["1"]["used"] == 2
    assert set(ids) <= Tombstones.of_run(cfg.out_path).ids()
    after = run.load_models()[1]  # the model the server keeps for shard 1
    assert _layout(after) == _layout(before) and state_hash(after) != state_hash(before)

    # unknown ids: one line, nothing changed
    entries = len(run.ledger.entries())
    with pytest.raises(ForgetError) as err:
        run_forget(grid_for(cfg), cfg, forget_request("999999"))
    assert "unknown sample id(s)" in str(err.value) and "\n" not in str(err.value)
    assert len(run.ledger.entries()) == entries
