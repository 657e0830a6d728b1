"""Deletion capacity (Sekhari et al. 2021) and the per-shard budget the strategy owns and enforces."""

import math

import pytest

from fairforget.capacity import (
    BudgetExceeded,
    DeletionBudget,
    dp_capacity,
    head_parameters,
    newton_capacity,
)
from fairforget.data import load_dataset, shard_of
from fairforget.run import RunDir, RunDirError
from fairforget.sisa import SisaSettings, SisaShard, assign_slices
from fairforget.storage import read_json, state_hash
from server.experiment import run_training
from server.forget import ForgetError, run_forget
from tests.conftest import forget_request


# ---------------------------------------------------------------------- the bounds, by hand
def test_newton_capacity_matches_the_notes_worked_examples():
    # 5000 / (5130 ln 1e5)^(1/4) = 5000 / 15.590 = 320.7 (NOTES: ~321)
    assert newton_capacity(1.0, 1e-5, 5000, 5130) == 320
    # 5000 / (11.2e6 ln 1e5)^(1/4) = 5000 / 106.56 = 46.9 (NOTES: ~47)
    assert newton_capacity(1.0, 1e-5, 5000, 11_200_000) == 46
    # c and eps scale it: c sqrt(eps) = 0.5 * 2 = 1
    assert newton_capacity(4.0, 1e-5, 5000, 5130, c=0.5) == 320


def test_dp_capacity_by_hand():
    # 5000 * 1 / sqrt(5130 * (1 + ln 1e5)) = 5000 / sqrt(5130 * 12.513) = 5000 / 253.36 = 19.7
    assert dp_capacity(1.0, 1e-5, 5000, 5130) == 19
    assert dp_capacity(1.0, 1e-5, 5000, 5130) < newton_capacity(1.0, 1e-5, 5000, 5130)


def test_capacity_is_capped_at_c_n_and_checks_its_arguments():
    # 10 * 10 / (1 * ln 2)^(1/4) = 109.6 > c n = 10
    assert newton_capacity(100.0, 0.5, 10, 1) == 10
    assert dp_capacity(100.0, 0.5, 10, 1, c=0.5) == 5
    for bad in [dict(eps=0.0), dict(delta=1.0), dict(d=0), dict(c=0.0)]:
        args = {"eps": 1.0, "delta": 1e-5, "n": 100, "d": 10, "c": 1.0, **bad}
        with pytest.raises(ValueError):
            newton_capacity(**args)


def test_head_parameters():
    assert head_parameters(512, 10) == 5130  # NOTES' ResNet-18 head
    assert head_parameters(64, 10) == 650  # SimpleConvNet, width 8


# ---------------------------------------------------------------------- the accountant
def test_budget_accounting_by_hand():
    budget = DeletionBudget("newton", 1.0, 1e-5, d=5130)
    budget.track(0, 5000)
    assert budget.shards[0].capacity == 320 and budget.remaining(0) == 320
    assert not budget.would_exceed(0, 320) and budget.would_exceed(0, 321)
    budget.consume(0, 300)
    assert budget.remaining(0) == 20 and budget.would_exceed(0, 21)
    with pytest.raises(BudgetExceeded, match="shard 0: deletion capacity exhausted: 20 of 320 left, request needs 21"):
        budget.consume(0, 21)
    assert budget.remaining(0) == 20  # a refused consume changes nothing
    budget.track(0, 1)  # an open budget is not reopened
    assert budget.remaining(0) == 20
    budget.reset(0, 4700)  # after an exact retrain on the 4700 that are left: 4700 / 15.590 = 301.5
    assert (budget.shards[0].capacity, budget.shards[0].used) == (301, 0)


def test_budget_state_round_trips_through_a_run_folder(tmp_path):
    budget = DeletionBudget("dp", 1.0, 1e-5, d=5130, c=2.0)
    budget.track(0, 5000)
    budget.track(3, 1000)
    budget.consume(3, 2)
    run = RunDir(tmp_path)
    run.save_budget(budget)  # saving is the caller's job; the budget is pure accounting
    assert read_json(run.budget_path) == budget.state_dict()
    again = run.load_budget(DeletionBudget("dp", 1.0, 1e-5, 5130, 2.0))
    assert again == budget
    # the capacity parameters are fixed when the run is created: other ones are refused, never recomputed
    with pytest.raises(RunDirError, match=r"parameters differ from the run's: bound 'dp' \(run: 'newton'\)"):
        run.load_budget(DeletionBudget("newton", 1.0, 1e-5, 5130, 2.0))
    assert RunDir(tmp_path / "none").load_budget(DeletionBudget("dp", 1.0, 1e-5, 5130)).shards == {}


# ---------------------------------------------------------------------- owned by the strategy
def _reply(to, shard, n, method, hash_after="h1"):
    from flwr.app import ArrayRecord, Message, RecordDict

    from fairforget import keys
    from fairforget.unlearning import UnlearnResult

    result = UnlearnResult(shard=shard, method=method, restart_stage=0, retrained_stages=0, seconds=0.1,
                           wall_seconds=0.2, hash_before="h0", hash_after=hash_after, num_examples=n,
                           full_train_seconds=1.0)
    metrics, config = result.to_records()
    return Message(RecordDict({keys.ARRAYS: ArrayRecord(), keys.METRICS: metrics, keys.CONFIG: config}), reply_to=to)


def test_strategy_checks_before_sending_and_settles_when_aggregating():
    from fairforget import ledger
    from strategies.shard_ensemble import ShardEnsemble

    budget = DeletionBudget("newton", 1.0, 1e-5, d=330, c=0.05)
    strategy = ShardEnsemble(2, 2, budget=budget, policy="refuse")
    shard_of, sizes = {101: 0, 102: 1}, {0: 540, 1: 539}  # capacity 3 each
    # over budget under "refuse": a typed error, and no message exists
    with pytest.raises(BudgetExceeded) as err:
        strategy.configure_unlearn({101: [1, 2], 102: [5, 6, 7, 8]}, shard_of, sizes, "finetune")
    assert (err.value.shard, err.value.remaining, err.value.needed) == (1, 3, 4)
    assert budget.shards[0].used == 0 and budget.shards[1].used == 0  # nothing spent
    # within budget: one message per owner, spent only when the replies are aggregated
    messages = strategy.configure_unlearn({101: [2, 1]}, shard_of, sizes, "finetune")
    assert [(m.metadata.dst_node_id, list(m.content["config"]["forget-ids"])) for m in messages] == [(101, [1, 2])]
    assert budget.shards[0].used == 0
    outcome = strategy.aggregate_unlearn([_reply(messages[0], 0, 538, "finetune")])[0]
    assert (outcome.decision, outcome.capacity_before, outcome.capacity_after) == (ledger.APPROXIMATE, 3, 1)
    assert budget.shards[0].used == 2 and outcome.result.hash_after == "h1"
    # "retrain" past the budget: an exact retrain is sent instead, and it resets the budget
    strategy.policy = "retrain"
    messages = strategy.configure_unlearn({101: [3, 4]}, shard_of, sizes, "finetune")
    assert messages[0].content["config"]["method"] == "exact-sisa"
    outcome = strategy.aggregate_unlearn([_reply(messages[0], 0, 536, "exact-sisa")])[0]
    assert outcome.decision == ledger.EXACT_FALLBACK and budget.shards[0].used == 0
    assert budget.shards[0].n == 536


def test_unlearn_result_round_trips_through_flower_records():
    from fairforget.unlearning import UnlearnResult

    result = UnlearnResult(shard=3, method="newton", restart_stage=1, retrained_stages=0, seconds=0.5,
                           wall_seconds=0.7, hash_before="a", hash_after="b", num_examples=99,
                           full_train_seconds=4.0, approx_deletions=2, figures={"noise_sigma": 0.25},
                           augment={"generator_invalidated": True, "policy": "drop"})
    metrics, config = result.to_records()
    from flwr.app import RecordDict

    from fairforget import keys

    assert UnlearnResult.from_records(RecordDict({keys.METRICS: metrics, keys.CONFIG: config})) == result


# ---------------------------------------------------------------------- enforced by the forget driver
# tiny runs: width 4 -> d = 32 * 10 + 10 = 330, (330 ln 1e5)^(1/4) = 7.851; shards of 540 and 539 samples
# have capacities 68.8 c and 68.7 c; capacity-c = 0.05 gives each a capacity of 3.
BUDGET = {"audit": False, "capacity-c": 0.05, "unlearn-method": "finetune", "unlearn-epochs": 1}


@pytest.fixture
def small_budget_run(tiny_cfg, grid_for):
    cfg = tiny_cfg(**BUDGET)
    run_training(grid_for(cfg), cfg)
    return cfg


def _forget(cfg, grid_for, ids, **changes):
    grid = grid_for(cfg.replace(**changes))
    run_forget(grid, grid.cfg, forget_request(",".join(map(str, ids))))
    return grid


def _state_files(cfg) -> dict[str, bytes]:
    out = cfg.out_path
    paths = [out / "metrics.json", out / "ledger.jsonl", out / "report.md", *sorted((out / "models").glob("*.pt")),
             *sorted((out / "nodes").rglob("*.json")), *sorted((out / "nodes").rglob("*.pt"))]
    return {str(p.relative_to(out)): p.read_bytes() for p in paths}


def test_capacity_of_the_tiny_shards(small_budget_run):
    cfg = small_budget_run
    sizes = [len(s) for s in shard_of(cfg, load_dataset(cfg))]
    assert sizes == [540, 539]
    d = head_parameters(8 * cfg.model_width, 10)
    assert d == 330
    for n in sizes:
        assert newton_capacity(1.0, 1e-5, n, d, 0.05) == math.floor(0.05 * n / (330 * math.log(1e5)) ** 0.25) == 3


def test_approximate_deletions_consume_the_budget_across_restarts(small_budget_run, grid_for):
    cfg = small_budget_run
    run = RunDir(cfg.out_path)
    ids = shard_of(cfg, load_dataset(cfg))[1].ids[:3].tolist()
    grid = _forget(cfg, grid_for, ids[:2])
    assert not [m for m in grid.sent if m.metadata.message_type == "train.unlearn"
                and grid.nodes[m.metadata.dst_node_id] == 0]
    row = run.ledger.entries()[-1]
    assert (row["decision"], row["method"], row["capacity_before"], row["capacity_after"], row["capacity"]) == \
        ("approximate", "finetune", 3, 1, 3)
    saved = read_json(run.budget_path)
    assert saved["shards"]["1"] == {"n": 539, "capacity": 3, "used": 2} and "0" not in saved["shards"]
    assert run.metrics()["unlearning"][-1]["budget"]["1"]["capacity_after"] == 1
    # a new ServerApp (a restart) reads the budget back from budget.json and goes on from there
    _forget(cfg, grid_for, ids[2:])
    row = run.ledger.entries()[-1]
    assert (row["decision"], row["capacity_before"], row["capacity_after"]) == ("approximate", 1, 0)
    assert read_json(run.budget_path)["shards"]["1"]["used"] == 3


def test_refuse_changes_nothing(small_budget_run, grid_for):
    cfg = small_budget_run
    run = RunDir(cfg.out_path)
    ids = shard_of(cfg, load_dataset(cfg))[0].ids[:4].tolist()
    before = _state_files(cfg)
    with pytest.raises(ForgetError, match=r"shard 0: deletion capacity exhausted: 3 of 3 left, request needs 4"):
        _forget(cfg, grid_for, ids, capacity_policy="refuse")
    ledger_before = before.pop("ledger.jsonl")
    after = _state_files(cfg)
    assert after.pop("ledger.jsonl").startswith(ledger_before)  # only the decision is added...
    assert after == before  # ...nothing else changed
    refused = run.ledger.entries()[-1]
    assert (refused["decision"], refused["shard"], refused["ids"]) == ("refused", 0, sorted(ids))
    assert "capacity exhausted" in refused["reason"] and not set(ids) & run.ledger.deleted_ids()
    assert not run.budget_path.exists()
    # and after some of the budget is spent
    _forget(cfg, grid_for, ids[:2], capacity_policy="refuse")
    before = _state_files(cfg)
    budget = run.budget_path.read_bytes()
    with pytest.raises(ForgetError, match=r"shard 0: deletion capacity exhausted: 1 of 3 left, request needs 2"):
        _forget(cfg, grid_for, ids[2:], capacity_policy="refuse")
    before.pop("ledger.jsonl")
    after = _state_files(cfg)
    assert run.ledger.entries()[-1]["decision"] == "refused"
    after.pop("ledger.jsonl")
    assert after == before and run.budget_path.read_bytes() == budget


def test_retrain_policy_falls_back_to_exact_and_resets_the_budget(small_budget_run, grid_for):
    cfg = small_budget_run
    run = RunDir(cfg.out_path)
    bundle = load_dataset(cfg)
    data = shard_of(cfg, bundle)[0]
    ids = data.ids[:4].tolist()
    _forget(cfg, grid_for, ids[:2])  # approximate, 1 of 3 left
    assert (cfg.out_path / "nodes" / "shard-0" / "approx.pt").exists()
    grid = _forget(cfg, grid_for, ids[2:])  # needs 2: over budget -> exact SISA retrain
    sent = [m for m in grid.sent if m.metadata.message_type == "train.unlearn"]
    assert [m.content["config"]["method"] for m in sent] == ["exact-sisa"]
    row = run.ledger.entries()[-1]
    assert (row["decision"], row["method"], row["capacity_before"]) == ("exact-fallback", "exact-sisa", 1)
    # reset: a fresh capacity for the 536 samples left (536 * 0.05 / 7.851 = 3.41), nothing used
    assert read_json(run.budget_path)["shards"]["0"] == {"n": 536, "capacity": 3, "used": 0}
    assert row["capacity_after"] == 3
    # the approximate model is gone, and the shard is exactly the model trained without all four ids
    node = cfg.out_path / "nodes" / "shard-0"
    assert not (node / "approx.pt").exists()
    index = read_json(node / "index.json")
    assert index["trained"] == cfg.slices and sorted(index["deleted"]) == sorted(ids)
    settings = SisaSettings.from_config(cfg, bundle.num_classes)
    # the from-scratch replay's slices come from the shard's own assignment less the four ids, never
    # from the node's index (an index that lost or kept the wrong ids would replay to itself)
    gone = set(ids)
    slices = [[i for i in sl if i not in gone] for sl in assign_slices(data.ids.tolist(), cfg.slices, cfg.seed, 0)]
    assert index["slices"] == slices
    scratch = SisaShard(cfg.out_path.parent / "scratch", 0, data, settings, slices=slices)
    scratch.train_through()
    assert state_hash(run.load_models()[0]) == scratch.model_hash()
    # an exact request resets too
    _forget(cfg, grid_for, data.ids[4:5].tolist(), unlearn_method="exact-sisa")
    assert run.ledger.entries()[-1]["decision"] == "exact-retrain"
