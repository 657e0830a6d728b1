"""Focused, fast tests that kill the mutants ``make mutation`` found surviving in the modules the
privacy and unlearning guarantees rest on (fairforget/ledger.py, tombstones.py, privacy/, audit/):
each pins a figure or a branch by hand, so that the wrong implementation a mutant is fails here.
Every test runs in well under a second."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from fairforget.audit import ATTACKS, TargetOutputs, build_attack
from fairforget.audit.references import ReferenceOutputs
from fairforget.capacity import DeletionBudget, ShardBudget
from fairforget.config import ConfigError
from fairforget.ledger import Ledger, LedgerError
from tests.oracles import probs_from_phi


def _k2(phi):
    """Two-class softmax outputs whose LiRA statistic is ``phi`` (label 0)."""
    phi = np.asarray(phi, dtype=np.float64)
    return probs_from_phi(phi, np.zeros(phi.shape[-1], dtype=int), 2)


# ---------------------------------------------------------------------- fairforget/ledger.py
def _ledger(tmp_path):
    """Request 1: intent for shards 0 (ids 5, 3) and 1 (id 7), only shard 0 completed; 2 refused at
    shard 1 (id 9); 3 retired original 11 at shard 1; 4 a line of an older version (no ``phase``)
    deleting 13 at shard 0 with its capacity; 5 refused at shard 0; 6 refused with no shard, and a
    completion at shard 5 with no id list; 7 an intent (shard 2, id 21) never completed; 8 a retired
    original with no shard."""
    lg = Ledger(tmp_path / "ledger.jsonl")
    lg.ensure()
    assert lg.path.read_bytes() == b""
    lg.intend(1, {1: {"ids": [7], "method": "finetune", "decision": "approximate"},
                  0: {"ids": [5, 3], "method": "exact-sisa", "decision": "exact-retrain"}}, "mixed")
    lg.complete([{"request": 1, "shard": 0, "ids": [3, 5], "decision": "exact-retrain", "hash_after": "h0",
                  "records": ["P-3", "P-5"]}])
    lg.complete([{"request": 2, "shard": 1, "ids": [9], "decision": "refused"}])
    lg.complete([{"request": 3, "shard": 1, "ids": [11], "decision": "retire-original", "capacity": 4,
                  "capacity_after": 4, "num_examples": 50}])
    lg.append([{"request": 4, "shard": 0, "ids": [13], "decision": "exact-retrain", "capacity": 10,
                "capacity_after": 7, "num_examples": 100, "loss": float("nan")}])
    lg.complete([{"request": 5, "shard": 0, "ids": [14], "decision": "refused"}])
    lg.complete([{"request": 6, "ids": [20], "decision": "refused"},
                 {"request": 6, "shard": 5, "decision": "exact-retrain"}])
    lg.intend(7, {2: {"ids": [21], "method": "exact-sisa", "decision": "exact-retrain"}}, "exact-sisa")
    lg.complete([{"request": 8, "ids": [30], "decision": "retire-original"}])
    return lg


def test_ledger_reads_back_every_decision_by_hand(tmp_path):
    lg = _ledger(tmp_path)
    lines = lg.lines()
    assert [(e.get("phase"), e["request"]) for e in lines] == [
        ("intent", 1), ("done", 1), ("done", 2), ("done", 3), (None, 4), ("done", 5), ("done", 6), ("done", 6),
        ("intent", 7), ("done", 8)]
    intent = lines[0]
    assert intent["method"] == "mixed" and intent["ids"] == [3, 5, 7]
    assert intent["shards"] == {"0": {"ids": [3, 5], "method": "exact-sisa", "decision": "exact-retrain"},
                                "1": {"ids": [7], "method": "finetune", "decision": "approximate"}}
    assert list(intent["shards"]) == ["0", "1"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", e["time"]) for e in lines)
    raw = lg.path.read_text().splitlines()
    assert len(raw) == 10 and json.loads(raw[4])["loss"] is None  # strict JSON: NaN written as null
    assert all(list(json.loads(r)) == sorted(json.loads(r)) for r in raw)  # sorted keys
    assert [e["request"] for e in lg.entries()] == [1, 2, 3, 4, 5, 6, 6, 8]
    assert [e["request"] for e in lg.intents()] == [1, 7]
    assert lg.pending() == {1: {1: {"ids": [7], "method": "finetune", "decision": "approximate"}},
                            7: {2: {"ids": [21], "method": "exact-sisa", "decision": "exact-retrain"}}}
    assert lg.pending_ids() == {7, 21}
    assert {i: e["request"] for i, e in lg.deletions().items()} == {3: 1, 5: 1, 13: 4}
    assert lg.deleted_ids() == {3, 5, 13}
    assert lg.unlearned_ids() == {3, 5, 11, 13, 30}
    assert lg.next_request() == 9
    receipts = lg.receipts([13, 9, 5, 11, 99])
    assert [{k: v for k, v in r.items() if k != "time"} for r in receipts] == [
        {"id": 5, "request": 1, "shard": 0, "hash_after": "h0", "record": ["P-3", "P-5"]},
        {"id": 13, "request": 4, "shard": 0, "hash_after": ""}]
    assert receipts[0]["time"] == lines[1]["time"]
    assert [(lg.last_done(k) or {}).get("request") for k in (0, 1, 2, 5)] == [4, 3, None, 6]
    lg.ensure()  # an existing ledger is kept
    assert len(lg.path.read_text().splitlines()) == 10
    with lg.path.open("a") as fh:  # a hand-written line, no time: its receipt says none
        fh.write(json.dumps({"request": 9, "shard": 3, "ids": [40], "decision": "exact-retrain"}) + "\n")
    assert lg.receipts([40]) == [{"id": 40, "request": 9, "shard": 3, "hash_after": "", "time": ""}]


def test_ledger_settles_a_budget_from_the_last_lines_that_record_capacity(tmp_path):
    lg = _ledger(tmp_path)
    budget = DeletionBudget("newton", 1.0, 1e-5, d=10, shards={0: ShardBudget(100, 10, 0), 2: ShardBudget(5, 1, 1)})
    settled = lg.settle(budget)
    assert settled is budget
    assert budget.shards == {0: ShardBudget(n=100, capacity=10, used=3), 1: ShardBudget(n=50, capacity=4, used=0),
                             2: ShardBudget(5, 1, 1)}
    # a last line without capacity figures leaves the saved state of its shard as it is, not the others'
    lg.complete([{"request": 9, "shard": 0, "ids": [15], "decision": "exact-retrain"}])
    budget = DeletionBudget("newton", 1.0, 1e-5, d=10, shards={0: ShardBudget(100, 10, 6)})
    assert lg.settle(budget).shards == {0: ShardBudget(100, 10, 6), 1: ShardBudget(50, 4, 0)}


def test_ledger_lines_without_a_request_or_an_id_list_are_errors(tmp_path):
    lg = _ledger(tmp_path)
    lg.append([{"shard": 0, "ids": [1], "note": "x" * 100}])
    with pytest.raises(LedgerError) as err:
        lg.lines()
    assert str(err.value) == (f"{lg.path}: entry 11 has no request number or no id list: "
                              + ('{"ids": [1], "note": "' + "x" * 100)[:80])
    lg = Ledger(tmp_path / "other.jsonl")
    lg.append([{"request": 1}])  # no ids at all: allowed (a refusal of nothing)
    assert lg.lines()[0]["request"] == 1 and lg.torn == ""
    lg.append([{"request": 2, "ids": 3}])
    with pytest.raises(LedgerError, match="entry 2 has no request number or no id list"):
        lg.entries()
    assert Ledger(tmp_path / "none.jsonl").next_request() == 1


# ---------------------------------------------------------------------- fairforget/audit/lira.py
def test_lira_per_candidate_variance_by_hand():
    """``attack-options`` ``fixed-variance: false``: each candidate's own sample std. Offline:
    references' phi (0, 2) for candidate 0 and (1, 1) for candidate 1: mu_out (1, 1), s_out (sqrt 2,
    0 -> the floor 1e-3). Online (test_audit.py's data): candidate 0 IN (3, 5), OUT (0, 2); candidate
    1 IN (2, 4), OUT (0, 1): s_in (sqrt 2, sqrt 2), s_out (sqrt 2, sqrt 0.5)."""
    from scipy.stats import norm

    y = np.zeros(2, dtype=int)
    refs = ReferenceOutputs(_k2([[0.0, 1.0], [2.0, 1.0]]), _k2([[0.0], [0.0]]), np.zeros((2, 2), bool), 0.0)
    target = TargetOutputs(_k2([2.0, 0.0]), y, _k2([0.0]), np.zeros(1, int))
    per = build_attack("lira-offline", '{"lira-offline": {"fixed-variance": false}}')
    assert per.options == {"fixed-variance": False} and build_attack("lira-offline").options == {"fixed-variance": True}
    np.testing.assert_allclose(per.scores(target, refs), [norm.logcdf(1 / np.sqrt(2)), norm.logcdf(-1000.0)],
                               rtol=1e-6)
    np.testing.assert_allclose(build_attack("lira-offline").scores(target, refs),
                               [norm.logcdf(1.0), norm.logcdf(-1.0)], atol=1e-6)  # pooled: s = 1
    phi = np.array([[3.0, 2.0], [5.0, 0.0], [0.0, 4.0], [2.0, 1.0]])
    in_mask = np.array([[True, True], [True, False], [False, True], [False, False]])
    refs = ReferenceOutputs(_k2(phi), _k2(np.zeros((4, 1))), in_mask, 0.0)
    target = TargetOutputs(_k2([4.0, 0.5]), y, _k2([0.0]), np.zeros(1, int))
    online = build_attack("lira-online", '{"lira-online": {"fixed-variance": false}}', ["lira-online", "loss"])
    r2, rh = np.sqrt(2.0), np.sqrt(0.5)
    expected = [norm.logpdf(4.0, 4.0, r2) - norm.logpdf(4.0, 1.0, r2),
                norm.logpdf(0.5, 3.0, r2) - norm.logpdf(0.5, 0.5, rh)]
    np.testing.assert_allclose(online.scores(target, refs), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="option 'fixed-variance' of attack 'lira-online' = 1: expected bool"):
        build_attack("lira-online", '{"lira-online": {"fixed-variance": 1}}')
    assert ATTACKS["lira-online"]().options["fixed-variance"] is True  # the default, as every run so far had


# ---------------------------------------------------------------------- fairforget/tombstones.py
def test_tombstone_files_are_where_the_data_lives(tmp_path):
    from types import SimpleNamespace

    from fairforget.tombstones import RUN_FILE, SITE_FILE, Tombstones

    site = SimpleNamespace(dataset="image-folder", data_root=str(tmp_path / "images"), out_dir=str(tmp_path / "out"))
    t = Tombstones.for_data(site, {1: "a"}, run_dir=tmp_path / "run")
    assert (t.path, t.also, t.records) == (tmp_path / "images" / SITE_FILE, [tmp_path / "run" / RUN_FILE], {1: "a"})
    assert Tombstones.for_data(site).also == []
    given = Tombstones.for_data(site, {2: "b"}, path=tmp_path / "x.jsonl")
    assert (given.path, given.records, given.also) == (tmp_path / "x.jsonl", {2: "b"}, [])
    bench = SimpleNamespace(dataset="biased-digits", data_root=str(tmp_path / "images"), out_dir=str(tmp_path / "out"))
    assert Tombstones.for_data(bench).path == tmp_path / "out" / RUN_FILE
    assert Tombstones.for_data(bench, run_dir=tmp_path / "run").path == tmp_path / "run" / RUN_FILE
    no_root = SimpleNamespace(dataset="image-folder", data_root="", out_dir=str(tmp_path / "out"))
    assert Tombstones.for_data(no_root).path == tmp_path / "out" / RUN_FILE
    assert Tombstones.of_site(tmp_path).path == tmp_path / SITE_FILE
    assert Tombstones.of_run(tmp_path).path == tmp_path / RUN_FILE
    assert Tombstones(tmp_path / "a", also=[tmp_path / "a", tmp_path / "b"]).also == [tmp_path / "b"]


def test_tombstones_name_records_by_id_record_and_legacy_hash(tmp_path):
    import hashlib

    from fairforget.tombstones import Tombstones, legacy_sample_id

    legacy = int.from_bytes(hashlib.sha256(b"record:img/3.png").digest()[:8], "big") >> 3  # 61 bits
    assert legacy_sample_id("img/3.png") == legacy < 2**61
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"id": legacy}) + "\n" + json.dumps({"id": 77, "record": None}) + "\n{\"id\": 5")
    records = {10: "img/1.png", 11: "img/2.png", 12: "img/3.png", 13: "img/4.png"}
    t = Tombstones(tmp_path / "site.jsonl", {str(k): v for k, v in records.items()}, also=[old])
    assert t.records == records
    assert t.ids() == {legacy, 77, 12}  # the torn tail of the old file names nothing
    assert t.add([11, 12, 11, 99], request=4) == [11, 99]  # 12 is tombstoned already (by its legacy id)
    rows = [json.loads(x) for x in t.path.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == [
        {"schema_version": 2, "id": 11, "record": "img/2.png", "request": 4},
        {"schema_version": 2, "id": 99, "request": 4}]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["time"]) for r in rows)
    assert t.ids() == {legacy, 77, 12, 11, 99}
    # a record id tombstoned under an old sample id: its new sample id (a new site key) is deleted too
    moved = Tombstones(tmp_path / "site.jsonl", {500: "img/2.png", 501: "img/4.png"}, also=[old])
    assert moved.ids() == {legacy, 77, 11, 99, 500}
    assert Tombstones(tmp_path / "none.jsonl", records).ids() == set()
    assert Tombstones(tmp_path / "site.jsonl").add([]) == []


def test_tombstone_appends_wait_for_the_folders_lock(tmp_path):
    """Concurrent nodes of one simulation: an append waits (as long as it takes) for the lock on the
    file's folder (``.tombstones.lock.d``), whoever holds it, then appends; the lock names its holder."""
    import threading

    from fairforget.locks import LOCK_FILE, locked
    from fairforget.tombstones import Tombstones

    t = Tombstones(tmp_path / "site.jsonl")
    done: list = []
    worker = threading.Thread(target=lambda: done.append(t.add([4], request=1)))
    with locked(tmp_path / ".tombstones.lock.d", "forget"):
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not t.path.exists()  # waiting for the holder
    worker.join(10)
    assert done == [[4]] and [json.loads(x)["id"] for x in t.path.read_text().splitlines()] == [4]
    assert (tmp_path / ".tombstones.lock.d" / LOCK_FILE).read_text().startswith("fairforget tombstones (pid ")


# ---------------------------------------------------------------------- fairforget/privacy/
def test_gdp_edges_and_plans_by_hand(monkeypatch):
    from scipy.stats import norm

    from fairforget.privacy.gdp import (
        _bisect,
        dp_sgd_entry,
        epsilon_for_tpr,
        epsilon_of_mu,
        mu_of,
        noise_for_epsilon,
        noise_for_tpr,
        planned_sisa,
        tpr_bound,
    )

    for fpr in (-0.01, 1.01):
        with pytest.raises(ValueError, match=f"fpr must be in \\[0, 1\\], got {fpr}"):
            tpr_bound(1.0, fpr)
    assert (tpr_bound(2.0, 0.0), tpr_bound(2.0, 1.0), tpr_bound(math.inf, 0.0), tpr_bound(math.inf, 0.3)) == (
        0.0, 1.0, 1.0, 1.0)
    assert tpr_bound(0.5, 0.2) == pytest.approx(norm.cdf(norm.ppf(0.2) + 0.5), rel=1e-12)
    # mu: entries without steps add nothing; no noise, or e^(1/sigma^2) past e^700, is no privacy
    assert mu_of([(1.0, 0.1, 100), (0.0, 0.5, 0), (2.0, 0.3, -1)]) == pytest.approx(0.1 * math.sqrt(100 * (math.e - 1)))
    assert mu_of([]) == 0.0 and mu_of([(1.0, 0.1, 10), (0.0, 0.1, 1)]) == math.inf
    assert mu_of([(0.0377, 0.1, 1)]) == math.inf and mu_of([(0.0378, 0.1, 1)]) < math.inf  # 1/sigma^2: 703.6, 699.9
    assert mu_of([(0.03779, 0.1, 1)]) == math.inf  # 700.2
    assert mu_of([(1.0, 0.1, 1)]) == pytest.approx(0.1 * math.sqrt(math.e - 1))  # one step counts
    assert mu_of([(0.0, 0.5, 0), (1.0, 0.1, 100)]) == mu_of([(1.0, 0.1, 100)]) > 0  # later entries count too
    # epsilon of mu-GDP: Dong et al.'s delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    assert epsilon_of_mu(0.0, 1e-5) == 0.0 and epsilon_of_mu(math.inf, 1e-5) == math.inf
    eps = epsilon_of_mu(1.0, 1e-5)
    assert norm.cdf(-eps + 0.5) - math.exp(eps) * norm.cdf(-eps - 0.5) == pytest.approx(1e-5, rel=1e-3)
    # one epoch of n samples at batch b: Poisson rate b / n, int(n / b) steps an epoch
    assert dp_sgd_entry(100, 32, 2, 1.5) == [(1.5, 0.32, 6)]
    assert dp_sgd_entry(10, 32, 3, 1.0) == [(1.0, 1.0, 3)]
    assert dp_sgd_entry(0, 32, 3, 1.0) == [] and dp_sgd_entry(100, 32, 0, 1.0) == []
    assert dp_sgd_entry(1, 32, 1, 1.0) == [(1.0, 1.0, 1)]
    assert planned_sisa([100, 0, 200], 50, 1, 2.0) == [(2.0, 0.5, 2), (2.0, 0.25, 4)]
    # bisection: the smallest sigma that is ok, to within its tolerance
    assert 3.0 <= _bisect(lambda s: s >= 3.0) <= 3.0 * 1.001
    assert 0.3 <= _bisect(lambda s: s >= 0.3) <= 0.3 + 1e-3  # below 1: an absolute tolerance of 1e-3
    assert _bisect(lambda s: s >= 0.01) == 0.05
    with pytest.raises(ValueError, match="no noise multiplier up to 64.0 meets the target"):
        _bisect(lambda s: s >= 100)
    for tpr, fpr in ((0.05, 0.0), (0.01, 0.01), (1.5, 0.01)):
        with pytest.raises(ValueError, match=f"need 0 < fpr < target TPR <= 1, got fpr {fpr}, TPR {tpr}"):
            noise_for_tpr(tpr, fpr, [100], 10, 1)
    assert noise_for_tpr(1.0, 0.01, [100], 10, 1) == 0.05  # any noise meets TPR <= 1
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0.0"):
        noise_for_epsilon(0.0, 1e-5, [100], 10, 1)
    asked = []

    def fake_epsilon(accountant, plan, delta):  # epsilon = steps / sigma, to see what is asked
        asked.append((accountant, delta))
        return sum(t for _, _, t in plan) / plan[0][0]

    monkeypatch.setattr("fairforget.privacy.accountant.epsilon_of", fake_epsilon)
    sigma = noise_for_epsilon(2.0, 1e-5, [100, 200], 20, 1, accountant="gdp")  # 5 + 10 steps: sigma 7.5
    assert 7.5 <= sigma <= 7.5 * 1.001 and set(asked) == {("gdp", 1e-5)}
    assert 15.0 <= noise_for_epsilon(1.0, 1e-5, [100, 200], 20, 1) <= 15.0 * 1.001  # (an epsilon of 1 is allowed)
    assert epsilon_for_tpr(0.05, 0.01, 0.01) == pytest.approx(math.log(4))
    assert epsilon_for_tpr(0.01, 0.01, 0.02) == pytest.approx(math.log(1e-300 / 0.01))


def test_accountant_figures_by_hand(tmp_path):
    from opacus.accountants import RDPAccountant

    from fairforget.privacy.accountant import (
        BOUND_FPRS,
        PRV_LIMIT,
        PrivacyBudgetExceeded,
        ShardAccountant,
        epsilon_of,
        summarize,
    )
    from fairforget.privacy.gdp import epsilon_of_mu, mu_of, tpr_bound

    history = [(1.0, 0.1, 50), (1.2, 0.05, 80)]
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon_of("rdp", history, 1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert epsilon_of("rdp", [*history, (0.5, 0.5, 0)], 1e-5) == epsilon_of("rdp", history, 1e-5)
    assert epsilon_of("gdp", history, 1e-5) == pytest.approx(epsilon_of_mu(mu_of(history), 1e-5))
    assert 0 < epsilon_of("prv", history, 1e-5) <= epsilon_of("rdp", history, 1e-5)
    assert epsilon_of("prv", [], 1e-5) == 0.0 and epsilon_of("rdp", [(0.0, 0.1, 3)], 1e-5) == math.inf
    assert epsilon_of("rdp", [(0.0, 0.5, 0)], 1e-5) == 0.0 and epsilon_of("rdp", [(1.0, 0.5, 1)], 1e-5) > 0
    huge = [(0.3, 0.5, 1000)]  # RDP epsilon past PRV_LIMIT: the RDP figure is returned
    assert epsilon_of("prv", huge, 1e-5) == epsilon_of("rdp", huge, 1e-5) > PRV_LIMIT
    with pytest.raises(ValueError, match="accountant must be one of prv, rdp, gdp, got 'moments'"):
        epsilon_of("moments", history, 1e-5)
    s = summarize(history, "gdp", 1e-4)
    mu = mu_of(history)
    assert s == {"accountant": "gdp", "epsilon": epsilon_of("gdp", history, 1e-4), "delta": 1e-4, "mu": mu,
                 "tpr_bound": {f"{f:g}": tpr_bound(mu, f) for f in BOUND_FPRS}, "steps": 130, "trainings": 2}
    assert list(s["tpr_bound"]) == ["0.001", "0.01"]

    acc = ShardAccountant(3, "gdp", 1e-4)
    acc.record([(1, 0.1, 50), (2.0, 0.5, 0)])  # a training without steps is not recorded
    assert acc.history == [(1.0, 0.1, 50)] and isinstance(acc.history[0][0], float)
    one = ShardAccountant(3, "gdp", 1e-4)
    one.record([(2.0, 0.5, 1)])
    assert one.history == [(2.0, 0.5, 1)]
    with pytest.raises(PrivacyBudgetExceeded, match=r"; this training \(1 DP-SGD steps\) would take it to"):
        one.check([(2.0, 0.5, 1)], cap=one.epsilon() / 2)
    assert acc.mu() == mu_of([(1.0, 0.1, 50)]) and acc.mu([(1.2, 0.05, 80)]) == mu
    assert acc.epsilon([(1.2, 0.05, 80)]) == epsilon_of("gdp", history, 1e-4)
    assert acc.summary() == {"shard": 3, **summarize(acc.history, "gdp", 1e-4)}
    acc.check([], cap=0.0)  # nothing planned: never stopped
    after = acc.epsilon([(1.2, 0.05, 80)])
    acc.check([(1.2, 0.05, 80)], cap=after)  # exactly at the cap is allowed
    with pytest.raises(PrivacyBudgetExceeded) as err:
        acc.check([(1.2, 0.05, 80)], cap=1.5, what="stage 2")
    assert str(err.value) == (f"shard 3: DP budget exhausted: epsilon spent {acc.epsilon():.3f} of dp-max-epsilon 1.5; "
                              f"stage 2 (80 DP-SGD steps) would take it to {after:.3f} (delta 0.0001); nothing was "
                              "trained or changed")
    acc.save(tmp_path)
    assert json.loads((tmp_path / "privacy.json").read_text()) == {
        "mechanism": "gdp", "history": [[1.0, 0.1, 50]], "shard": 3, "delta": 1e-4}
    back = ShardAccountant.load(tmp_path, 3, "gdp", 1e-4)
    assert back.history == acc.history and back.delta == 1e-4
    assert ShardAccountant.load(tmp_path / "none", 3, "gdp", 1e-4).history == []
    with pytest.raises(ValueError, match="privacy state of shard 3 loaded into shard 4"):
        ShardAccountant.load(tmp_path, 4, "gdp", 1e-4)
    with pytest.raises(ValueError, match="shard 3: privacy spent so far was accounted with 'gdp'; dp-accountant "
                                         "cannot change to 'rdp' in the middle of a run"):
        ShardAccountant.load(tmp_path, 3, "rdp", 1e-4)


def test_reporting_by_hand(monkeypatch):
    from types import SimpleNamespace

    from fairforget.privacy.gdp import mu_of, noise_for_tpr, planned_sisa, tpr_bound
    from fairforget.privacy.reporting import calibrate, dp_block, stage_sizes

    assert stage_sizes(10, 3) == [4, 7, 10] and stage_sizes(9, 1) == [9]
    # the epsilon-first routes through a stand-in accountant (epsilon = 10 / sigma), to keep this fast
    accounted = set()  # (accountant, delta) each plan's epsilon was computed with

    def epsilon_of(acc, plan, delta):
        accounted.add((acc, delta))
        return 10.0 / plan[0][0]

    monkeypatch.setattr("fairforget.privacy.reporting.epsilon_of", epsilon_of)
    routes = set()  # (delta, accountant) each epsilon-first bisection was given

    def noise_for_epsilon(eps, delta, sizes, bs, epochs, accountant):
        routes.add((delta, accountant))
        return 10.0 / eps

    monkeypatch.setattr("fairforget.privacy.reporting.noise_for_epsilon", noise_for_epsilon)
    cfg = SimpleNamespace(slices=2, batch_size=20, epochs_per_slice=1, dp_target_tpr=0.1, dp_target_fpr=0.01,
                          dp_target_epsilon=3.0, dp_delta=1e-5, dp_accountant="rdp", dp_noise_multiplier=0.7,
                          dp_calibrate="none")
    out = calibrate(cfg, [300, 200, 250], compare=False)
    direct = noise_for_tpr(0.1, 0.01, [100, 200], 20, 1)
    assert (out["mode"], out["smallest_shard"], out["stage_sizes"]) == ("none", 200, [100, 200])
    assert out["target"] == {"tpr": 0.1, "fpr": 0.01, "epsilon": 3.0, "delta": 1e-5}
    mu = mu_of(planned_sisa([100, 200], 20, 1, 0.7))
    assert out["chosen"]["noise_multiplier"] == 0.7 and out["chosen"]["mu"] == mu
    assert out["chosen"]["tpr_bound_at_0.01_fpr"] == tpr_bound(mu, 0.01)
    assert out["attack_risk"]["noise_multiplier"] == direct and "epsilon_first" not in out
    assert calibrate(SimpleNamespace(**{**vars(cfg), "dp_calibrate": "attack-risk"}), [200],
                     compare=False)["chosen"]["noise_multiplier"] == direct
    by_eps = calibrate(SimpleNamespace(**{**vars(cfg), "dp_calibrate": "epsilon"}), [200], compare=True)
    assert by_eps["chosen"]["noise_multiplier"] == pytest.approx(10 / 3) and by_eps["chosen"]["epsilon"] == 3.0
    assert by_eps["attack_risk"]["epsilon"] == 10.0 / direct
    assert {k: v["noise_multiplier"] for k, v in by_eps["epsilon_first"].items()} == {"1": 10.0, "4": 2.5, "8": 1.25}
    # its "epsilon" is the plan's, as in every entry; the route's target, ln((TPR - delta) / FPR), is kept beside it
    via = by_eps["attack_risk_via_epsilon"]
    assert via["noise_multiplier"] == pytest.approx(10 / math.log((0.1 - 1e-5) / 0.01))
    assert via["target_epsilon"] == pytest.approx(math.log((0.1 - 1e-5) / 0.01)) and via["epsilon"] == pytest.approx(
        via["target_epsilon"])
    assert routes == {(1e-5, "rdp")} and accounted == {("rdp", 1e-5)}  # the run's delta and accountant, always
    assert "epsilon_first" in calibrate(cfg, [200])  # the alternatives are compared unless told not to

    shards = {1: {"epsilon": 2.0, "mu": 0.5, "tpr_bound": {"0.01": 0.05}},
              0: {"epsilon": 2.0, "mu": 0.9, "tpr_bound": {"0.01": 0.08}}}
    cfg = SimpleNamespace(dp_noise_multiplier=1.1, dp_max_grad_norm=1.0, dp_accountant="rdp", dp_delta=1e-5,
                          dp_max_epsilon=8.0, dp_secure_mode=False)
    block = dp_block(cfg, shards, None)
    assert list(block["shards"]) == ["0", "1"] and block["calibration"] is None
    assert block["ensemble"]["mu"] == 0.9 and "worst shard" in block["ensemble"]["note"]  # ties broken by mu
    assert (block["noise_multiplier"], block["max_grad_norm"], block["accountant"], block["delta"],
            block["max_epsilon"], block["secure_mode"]) == (1.1, 1.0, "rdp", 1e-5, 8.0, False)
    assert dp_block(cfg, {}, {"a": 1})["ensemble"] == {"note": block["ensemble"]["note"]}
    # the record names the mechanism it describes (a reader of metrics.json has nothing else)
    assert (block["mechanism"], block["model"], block["sampling"]) == (
        "DP-SGD (Opacus), per shard", "SimpleConvNet with GroupNorm (BatchNorm has no per-sample gradients)",
        "Poisson, rate batch-size / stage size")
    assert "STATE/dp-seeds.json, mode 0600" in block["randomness"]



# ---------------------------------------------------------------------- fairforget/audit/probe.py, suite.py
def test_probe_by_hand():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a torch thread pool in a forked child, as mutmut runs tests, can hang)
    try:
        _probe_by_hand(torch)
    finally:
        torch.set_num_threads(threads)


def _probe_by_hand(torch):
    from fairforget.audit.probe import attribute_inference, bottleneck, linear_probe
    from fairforget.data.base import make_sampleset

    class Features(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def features(self, x):
            return x.flatten(1) * self.scale

    models = [Features(1.0), Features(-2.0)]
    x = torch.arange(10.0).reshape(5, 1, 2, 1)
    feats = bottleneck(models, x, batch=2)
    assert torch.equal(feats, torch.cat([x.flatten(1), -2 * x.flatten(1)], 1))
    assert not models[0].training and not models[1].training
    # the attribute is feature 0's sign (feature 1 is noise); test samples flip it: accuracy 1 and 0
    gen = torch.Generator().manual_seed(0)
    a = torch.arange(40) % 2
    tr = torch.stack([(2 * a - 1).float() * (1 + torch.rand(40, generator=gen)), torch.randn(40, generator=gen)], 1)
    r = linear_probe(tr + 5.0, a, tr + 5.0, 1 - a, 2)  # (an offset the standardisation removes)
    assert r == {"train_accuracy": 1.0, "unbiased_test_accuracy": 0.0, "chance": 0.5}
    assert linear_probe(tr, a, tr, a, 4, epochs=1, lr=0.0)["chance"] == 0.25
    biased = make_sampleset(torch.zeros(40, 1, 1, 1), np.zeros(40, int), a.numpy(), np.arange(40))
    unbiased = make_sampleset(torch.zeros(40, 1, 1, 1), np.zeros(40, int), a.numpy(), np.arange(40))
    assert attribute_inference(tr, biased, tr, unbiased, 2) == linear_probe(tr, a, tr, a, 2)
    skipped = attribute_inference(tr, biased, tr, unbiased, 1)
    assert skipped["skipped"] == "the dataset has no private attribute" and skipped["chance"] == 1.0
    assert math.isnan(skipped["train_accuracy"]) and math.isnan(skipped["unbiased_test_accuracy"])


def test_suite_helpers_by_hand():
    import torch

    from fairforget.audit.suite import MIN_GROUP, _group_aucs, _probe_test, _shard_key, headline, with_sites
    from fairforget.data.base import make_sampleset

    assert (_shard_key("shard-12"), _shard_key("ensemble")) == (12, -1)
    # groups (class, private): (0, 0) and (1, 1) have MIN_GROUP members and non-members; (0, 1) too few
    # (1, 0): MIN_GROUP members but one non-member, too few; (0, 0) has two more non-members than members
    y = np.r_[[0] * (2 * MIN_GROUP), [1] * (2 * MIN_GROUP), [0] * 4, [1] * (MIN_GROUP + 1), [0, 0]]
    a = np.r_[[0] * (2 * MIN_GROUP), [1] * (2 * MIN_GROUP), [1] * 4, [0] * (MIN_GROUP + 1), [0, 0]]
    member = np.r_[[True, False] * MIN_GROUP, [True, False] * MIN_GROUP, [True, False] * 2, [True] * MIN_GROUP,
                   [False, False, False]]
    scores = np.where(member, 1.0, 0.0)
    scores[2 * MIN_GROUP:4 * MIN_GROUP] = 0.5  # class 1: the attack cannot tell
    cand = make_sampleset(torch.zeros(len(y), 1, 1, 1), y, a, np.arange(len(y)))
    assert _group_aucs(scores, member, cand, 2) == [
        {"class": 0, "private": 0, "n_members": MIN_GROUP, "n_nonmembers": MIN_GROUP + 2, "auc": 1.0},
        {"class": 1, "private": 1, "n_members": MIN_GROUP, "n_nonmembers": MIN_GROUP, "auc": 0.5}]
    # the probes' test set: at most 10 a group, every group kept, in order
    y = np.r_[[0] * 15, [1] * 3]
    a = np.r_[[0] * 12, [1] * 3, [0] * 3]
    unbiased = make_sampleset(torch.zeros(18, 1, 1, 1), y, a, np.arange(18))
    kept = _probe_test(unbiased, 2, seed=1).ids.tolist()
    assert kept == sorted(kept) and len(kept) == 10 + 3 + 3 and set(range(12, 18)) <= set(kept)
    assert _probe_test(unbiased, 2, seed=1).ids.tolist() == kept
    assert headline(None) is None
    fig = {"auc": 0.6, "tpr_at_0.01_fpr": 0.02, "advantage": 0.1}
    assert headline({"targets": {"shard-0": {"loss": fig}}}) == {"shard-0": {"loss": {"auc": 0.6,
                                                                                       "tpr_at_0.01_fpr": 0.02}}}
    # the sites' own shard audits become the targets; what else they sent is kept per site
    server = {"attacks": ["loss"], "targets": {"ensemble": {"loss": fig}, "shard-3": {"loss": {"auc": 0.9}}},
              "dp_bound_violations": ["old"]}
    sites = {"site-b": {"shard": 1, "targets": {"shard-1": {"loss": {"auc": 0.7}}, "ensemble": {"loss": fig}},
                        "members": 9},
             "site-a": {"shard": 0, "targets": {"shard-0": {"loss": {"auc": 0.8}}}},
             "site-c": {"error": "lost"}}
    from types import SimpleNamespace

    out = with_sites(server, sites, SimpleNamespace(audit_attacks="loss", audit_references=2))
    assert list(out["targets"]) == ["ensemble", "shard-0", "shard-1", "shard-3"]
    assert out["targets"]["shard-1"] == {"loss": {"auc": 0.7}} and out["targets"]["shard-3"] == {"loss": {"auc": 0.9}}
    assert out["audited_at"] == {"ensemble": "server", "shard-0": "site-a", "shard-1": "site-b", "shard-3": "server"}
    assert out["sites"]["site-b"] == {"shard": 1, "targets": {"ensemble": {"loss": fig}}, "members": 9}
    assert out["sites"]["site-c"] == {"error": "lost"} and "dp_bound_violations" not in out
    assert server["dp_bound_violations"] == ["old"] and "sites" not in server  # the server's block is not changed
    bare = with_sites(None, {}, SimpleNamespace(audit_attacks="loss, rmia", audit_references=3))
    assert bare == {"attacks": ["loss", "rmia"], "population": "each site's held-out half",
                    "references": {"count": 3, "train_seconds": 0.0}, "attribute_inference": {}, "seconds": 0.0,
                    "targets": {}, "audited_at": {}, "sites": {}}


def test_audit_config_checks_at_their_edges(tiny_cfg):
    from fairforget.audit import AuditError
    from fairforget.audit.suite import check_audit_config
    from fairforget.data import load_dataset

    cfg = tiny_cfg()
    bundle = load_dataset(cfg)
    two = type(bundle)(bundle.name, bundle.train, bundle.heldout.subset([0, 1]), bundle.test_biased,
                       bundle.test_unbiased, bundle.num_classes, bundle.num_private)
    online = cfg.replace(audit_attacks="loss,lira-online", audit_references=4)
    assert check_audit_config(online, two) == ["loss", "lira-online"]  # 2 held-out samples, 4 references: enough
    with pytest.raises(AuditError, match="the run has no held-out"):
        check_audit_config(cfg, type(bundle)(bundle.name, bundle.train, bundle.heldout.subset([0]), bundle.test_biased,
                                             bundle.test_unbiased, bundle.num_classes, bundle.num_private))
    with pytest.raises(ConfigError, match="attack 'loss' has no option 'k'"):
        check_audit_config(cfg.replace(audit_attacks="loss", attack_options='{"loss": {"k": 1}}'), bundle)


# ---------------------------------------------------------------------- fairforget/privacy/auditing.py
def test_audit_reads_each_claim_and_says_what_it_proves():
    from fairforget.privacy.auditing import Check, audit, clopper_pearson_upper

    assert clopper_pearson_upper(0, 1, 0.05) == pytest.approx(0.95)  # one trial is a valid count
    fig = {"n_nonmembers": 100, "n_members": 100, "tpr_at_0.01_fpr": 1.0}  # 1 of 100 allowed: k = 1
    dp = {"delta": 1e-3, "shards": {"0": {"mu": 0.5, "epsilon": float("inf")}, "1": {"epsilon": None, "mu": None},
                                    "2": {"epsilon": 0.1, "mu": 0.1, "delta": 0.0}}}
    out = audit({"targets": {"shard-0": {"lira": fig}, "shard-1": {"lira": fig}, "shard-2": {"lira": fig}}}, dp,
                levels=(0.01,))
    # shard 1 claims nothing finite: not checked, not counted in the Bonferroni correction
    assert [(c.target, c.claimed_epsilon, c.claimed_mu) for c in out.checks] == [("shard-0", None, 0.5),
                                                                                 ("shard-2", 0.1, 0.1)]
    assert out.tests == 2 and all(c.resolvable and c.false_positives_allowed == 1 for c in out.checks)
    # a claim without its own delta takes the run's; one with it keeps its own
    assert [c.delta for c in out.checks] == [1e-3, 0.0]
    assert [c.exceeds for c in out.checks] == [("mu",), ("epsilon", "mu")]

    check = Check(target="shard-2", attack="lira", fpr=0.01, nonmembers=100, members=100, false_positives_allowed=0,
                  true_positives=90, resolvable=False, tested=True, fpr_upper=0.1, fnr_upper=0.2,
                  epsilon_lower_bound=1.5, mu_lower_bound=0.25, max_provable_epsilon=3.0, claimed_epsilon=0.1,
                  claimed_mu=0.2, delta=0.0, exceeds=("epsilon", "mu"))
    assert check.message(0.05, 1) == (
        "shard-2 lira: 90 of 100 members vs none of 100 non-members above its 1.0% FPR threshold prove "
        "epsilon >= 1.500 and mu >= 0.250 at 95% confidence (Bonferroni over 1 test): exceeds the claimed "
        "epsilon 0.100 and the mu-GDP bound (mu = 0.200)")
    two = Check(**{**vars(check), "false_positives_allowed": 3, "exceeds": ("mu",)}).message(0.05, 2)
    assert "vs at most 3 of 100 non-members" in two and two.endswith("(Bonferroni over 2 tests): exceeds the mu-GDP "
                                                                       "bound (mu = 0.200)")


# ---------------------------------------------------------------------- fairforget/privacy/dp_sgd.py
def _dp_setup(n=32, batch=8, classes=3):
    import torch
    from torch import nn

    from fairforget.data.base import make_sampleset

    rng = np.random.default_rng(0)
    data = make_sampleset(torch.as_tensor(rng.random((n, 3, 2, 2)), dtype=torch.float32),
                          rng.integers(0, classes, n), np.zeros(n, dtype=np.int64), np.arange(n))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, classes))
    return data, model, torch.optim.SGD(model.parameters(), lr=0.5)


class _CE:
    def loss(self, model, batch):
        import torch.nn.functional as F

        return F.cross_entropy(model(batch.x), batch.y) if len(batch) else model(batch.x).sum()


def _dp_trained(sample_seed, noise_seed, global_seed, poisson=True):
    """An epoch of DP-SGD on 32 samples (q = 1/4) from a fixed start; the torch global generator is
    reseeded first, so a draw that used it instead of the hook's own generators would differ."""
    import torch

    from fairforget.privacy.dp_sgd import DPSGD
    from fairforget.training import train

    torch.manual_seed(0)
    data, model, opt = _dp_setup()
    torch.manual_seed(global_seed)
    hook = DPSGD(1.0, 1.0, sample_seed, noise_seed, poisson=poisson)
    train(model, data, seeds=[0], batch_size=8, objective=_CE(), optimizer=opt, privacy=hook)
    hook.close()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), hook.spent()


def test_dp_sgd_noise_and_masks_come_from_their_seeds_alone():
    import torch

    a, spent_a = _dp_trained(1, 2, global_seed=0)
    b, spent_b = _dp_trained(1, 2, global_seed=99)
    assert torch.equal(a, b) and spent_a == spent_b  # replayable from the two recorded seeds
    assert spent_a["sample_rate"] == 0.25 and spent_a["steps"] == 4.0  # int(1 / q) Poisson batches an epoch
    other_noise, spent_n = _dp_trained(1, 3, global_seed=0)
    assert not torch.equal(a, other_noise) and spent_n == spent_a
    assert not torch.equal(a, _dp_trained(5, 2, global_seed=0)[0])


def test_dp_sgd_attaches_poisson_sampling_at_the_planned_rate():
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fairforget.privacy.dp_sgd import DPSGD, DPSettings

    settings = DPSettings(2.0, 0.5, 1e-5, "rdp", 8.0)
    assert settings.fixed(16.0) == {"dp": True, "dp-noise-multiplier": 2.0, "dp-max-grad-norm": 0.5,
                                    "dp-delta": 1e-5, "dp-accountant": "rdp", "dp-max-epsilon": 8.0,
                                    "dp-secure-mode": False, "batch-size": 16}
    hook = settings.hook(3, 4)
    assert hook.spent() == {"noise_multiplier": 2.0, "sample_rate": 0.0, "steps": 0.0}  # nothing attached yet
    dataset = TensorDataset(torch.zeros(32, 12), torch.zeros(32, dtype=torch.long))
    _, model, opt = _dp_setup()
    _, dp_opt, loader = hook.attach(model, opt, DataLoader(dataset, batch_size=8))
    sampler = loader.loader.batch_sampler
    assert isinstance(sampler, UniformWithReplacementSampler)
    assert (sampler.num_samples, sampler.sample_rate) == (32, 0.25)
    assert (dp_opt.expected_batch_size, dp_opt.noise_multiplier, dp_opt.max_grad_norm) == (8, 2.0, 0.5)
    hook.close()
    plain = DataLoader(dataset, batch_size=8)  # poisson=False: the engine's own batches, expected size the batch's
    hook = settings.hook(3, 4, poisson=False)
    _, dp_opt, loader = hook.attach(model, opt, plain)
    assert loader.loader is plain and dp_opt.expected_batch_size == 8
    hook.close()
    for unbatched in (DataLoader(dataset, batch_size=64), DataLoader(dataset, batch_size=None)):
        hook = DPSGD(1.0, 1.0, 0, 0)  # a batch larger than the data, or none: every sample, every step
        _, dp_opt, _ = hook.attach(model, opt, unbatched)
        assert hook.spent()["sample_rate"] == 1.0 and dp_opt.expected_batch_size == 32
        hook.close()
    with pytest.raises(ValueError, match="max_grad_norm > 0"):
        DPSGD(1.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match="the model cannot be trained with DP-SGD: .*BatchNorm"):
        DPSGD(1.0, 1.0, 0, 0).attach(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), opt,
                                     DataLoader(dataset, batch_size=8))


# ---------------------------------------------------------------------- fairforget/verify.py
def _verify_node(slices, deleted=(), trained=2, target=None, approx=None, extra_pool=(), dp_seeds=None, shard=1):
    import torch

    from fairforget.data.base import make_sampleset
    from fairforget.verify import NodeState

    ids = np.r_[np.arange(10), np.asarray(extra_pool, dtype=np.int64)]
    pool = make_sampleset(torch.zeros(len(ids), 3, 2, 2), np.zeros(len(ids)), np.zeros(len(ids)), ids)
    index = {"slices": [list(s) for s in slices], "deleted": list(deleted), "trained": trained, "version": 3}
    if target is not None:
        index["target"] = target
    return NodeState(shard, index, pool, "served", approx, dp_seeds)


def _verify_settings(dp=None):
    from fairforget.sisa import SisaSettings

    return SisaSettings(slices=2, epochs_per_slice=1, batch_size=4, lr=0.1, weight_decay=0.0, width=4,
                        num_classes=2, seed=7, dp=dp)


def test_verify_index_problems_by_hand():
    from fairforget.data.base import SYNTHETIC_ID_BASE
    from fairforget.sisa import assign_slices, derived_seed
    from fairforget.verify import _fmt, index_problems

    settings = _verify_settings()
    a, b = assign_slices(list(range(10)), 2, 7, 1)
    x = a[0]  # deleted from slice 1
    good = [[i for i in a if i != x], b]
    assert index_problems(_verify_node(good, deleted=[x]), settings, {x}, set()) == []
    assert index_problems(_verify_node(good, deleted=[x]), None, set(), set()) == []
    # a synthetic id is in the slice its id draws, and only there
    sid = SYNTHETIC_ID_BASE + 5
    home = derived_seed(7, 1, 91, sid) % 2
    with_synth = [s + [sid] if k == home else s for k, s in enumerate(good)]
    assert index_problems(_verify_node(with_synth, [x], extra_pool=[sid]), settings, set(), set()) == []
    away = [s + [sid] if k != home else s for k, s in enumerate(good)]
    assert index_problems(_verify_node(away, [x], extra_pool=[sid]), settings, set(), set()) == [
        f"synthetic id(s) in slice {2 - home} belong to another slice: {sid}"]
    # a deleted id brought back, one the ledger deleted but the index did not, a tombstoned one live
    y, z = b[0], b[1]
    back = [a, b]
    assert index_problems(_verify_node(back, deleted=[x]), settings, {y}, {z}) == [
        f"deleted id(s) still live: {', '.join(map(str, sorted({x, y, z})))}",
        f"id(s) the ledger deleted are not deleted in the index: {y}",
        f"slice 1 is not the from-scratch assignment (extra: {x}; missing: none)"]
    twice = [a, b + [a[1]]]
    assert index_problems(_verify_node(twice), settings, set(), set())[:1] == ["an id is live in two slices"]
    swapped = [[i for i in a if i != x] + [b[0]], [x] + b[1:]]
    assert index_problems(_verify_node(swapped), settings, set(), set())[0] == (
        f"slice 1 is not the from-scratch assignment (extra: {b[0]}; missing: {x})")
    # an id tombstoned before the index was made never entered it: the assignment is of the others
    c, d = assign_slices(list(range(9)), 2, 7, 1)
    assert index_problems(_verify_node([c, d]), settings, set(), {9}) == []
    assert index_problems(_verify_node([c, d + [42]]), settings, set(), {9})[-1] == (
        "live id(s) with no sample in the node's data: 42")
    # a pending retrain, unless an approximate model serves the shard
    assert index_problems(_verify_node(good, [x], trained=1, target=2), settings, {x}, set()) == [
        "a retrain is pending (stage 1 of target 2): the node finishes it before its next message"]
    assert index_problems(_verify_node(good, [x], trained=1, target=2, approx={"model_hash": "served"}), settings,
                          {x}, set()) == []
    assert _fmt([]) == "none" and _fmt(list(range(12))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (+2 more)"
    assert _fmt([5, 6], limit=2) == "5, 6"


def test_verify_seed_problems_by_hand():
    from fairforget.verify import seed_problems

    node = _verify_node([[0, 1, 2, 3, 4], [5, 6, 7, 8]], dp_seeds={1: {"samples": 5}})
    assert seed_problems(node) == ["no recorded DP seeds for stage(s) 2 (STATE/dp-seeds.json): the shard's "
                                   "training cannot be replayed"]
    node.dp_seeds = {1: {"samples": 5}, 2: {"samples": 8}, 3: {"samples": 1}}
    assert seed_problems(node) == ["stage 2's DP seeds were drawn for 8 samples, its slices hold 9"]
    node.dp_seeds = {1: {}, 2: {"samples": "9"}}
    assert seed_problems(node) == []


def test_verify_shard_verdicts_without_a_replay():
    from fairforget.privacy.dp_sgd import DPSettings
    from fairforget.sisa import assign_slices
    from fairforget.verify import APPROXIMATE, MISMATCH, NOT_REPLAYABLE, SITE_ONLY, SITE_ONLY_NOTE, verify_shard

    a, b = assign_slices(list(range(10)), 2, 7, 1)
    good = [[i for i in a if i != a[0]], b]
    ledger = [{"shard": 1, "request": 2, "ids": [a[0]], "decision": "exact-retrain", "hash_after": "old"},
              {"shard": 1, "request": 4, "decision": "approximate", "hash_after": "served", "seed": 7,
               "code_version": "1.0"},  # a line with no id list (an older version's) deletes none
              {"shard": 1, "request": 5, "ids": [b[0]], "decision": "refused", "hash_after": "x"},
              {"shard": 0, "request": 6, "ids": [b[1]], "decision": "exact-retrain", "hash_after": "y"},
              {"shard": 1, "request": 7, "ids": [b[2]], "decision": "exact-retrain"}]  # an intent: no hash yet
    approx = {"model_hash": "served", "method": "finetune", "index_version": 3}
    v = verify_shard(_verify_node(good, [a[0]], approx=approx), _verify_settings(), ledger)
    assert (v.status, v.ok, v.ledger_hash, v.ledger_request, v.index_version, v.trained_stages, v.live, v.deleted) == (
        APPROXIMATE, True, "served", 4, 3, 2, 9, 1)
    assert v.ledger_fields == {"seed": 7, "code_version": "1.0"} and v.problems == []
    assert v.note == ("no exactness receipt (served by finetune; an exact retrain, forget --method exact-sisa, "
                      "makes it verifiable)")
    assert v.to_dict()["status"] == APPROXIMATE and v.to_dict()["problems"] == []
    v = verify_shard(_verify_node(good, [a[0]], approx={**approx, "model_hash": "other"}), _verify_settings(),
                     ledger[:1])
    assert (v.status, v.ok) == (MISMATCH, False) and v.problems == [
        "the served model served is not the node's approximate model other",
        "the served model served is not the ledger's receipt old (request 2)"]
    v = verify_shard(_verify_node(good, [a[0]]), None, ledger)
    assert (v.status, v.note) == (NOT_REPLAYABLE, "DP-SGD with dp-secure-mode: cryptographic noise cannot be replayed")
    dp = _verify_settings(DPSettings(1.0, 1.0, 1e-5, "rdp", 10.0))
    v = verify_shard(_verify_node(good, [a[0]]), dp, ledger, {a[0]})
    assert (v.status, v.note, v.problems) == (SITE_ONLY, SITE_ONLY_NOTE, [])
    v = verify_shard(_verify_node(good, [a[0]]), dp, [{**ledger[0], "seed": 8}])
    assert v.status == MISMATCH and v.problems == ["the ledger's seed 8 is not the run's 7",
                                                   "the served model served is not the ledger's receipt old "
                                                   "(request 2)"]
    # a live id with no sample: nothing to replay, a mismatch
    v = verify_shard(_verify_node([good[0], good[1] + [42]], [a[0]]), _verify_settings(), [])
    assert v.status == MISMATCH and v.replay_hash is None and v.problems[-1].startswith("live id(s) with no sample")


def test_verify_run_names_a_shard_it_does_not_have(tiny_cfg, tmp_path):
    from fairforget.verify import VerifyError, verify_run

    with pytest.raises(VerifyError, match=r"^no shard 7: the run has shards 0-1$"):
        verify_run(tmp_path, tiny_cfg(**{"num-shards": 2}), [0, 7])


def test_verify_json_merges_by_shard(tmp_path):
    from fairforget.verify import MATCH, MISMATCH, ShardVerdict, read_verification, write_verification

    assert read_verification(tmp_path) is None
    write_verification(tmp_path, [ShardVerdict(10, MATCH, "h")])
    record = write_verification(tmp_path, [ShardVerdict(2, MISMATCH, "g", problems=["p"])])
    assert list(record["shards"]) == ["2", "10"] and record["last"]["shards"] == [2] and record["last"]["ok"] is False
    assert read_verification(tmp_path) == record and record["shards"]["10"]["status"] == MATCH
    assert write_verification(tmp_path, [ShardVerdict(2, MATCH, "g")])["last"]["ok"] is True
    (tmp_path / "verify.json").write_text("[1]")
    assert read_verification(tmp_path) is None
    (tmp_path / "verify.json").write_text('{"shards": [')
    assert read_verification(tmp_path) is None
    (tmp_path / "verify.json").write_text('{"shards": []}')
    assert read_verification(tmp_path) is None


def test_dp_settings_come_from_the_run_config(tiny_cfg):
    from fairforget.privacy.dp_sgd import DPSettings

    assert DPSettings.from_config(tiny_cfg()) is None
    cfg = tiny_cfg(**{"dp": True, "dp-noise-multiplier": 1.5, "dp-max-grad-norm": 0.7, "dp-delta": 1e-4,
                      "dp-accountant": "rdp", "dp-max-epsilon": 6.0})
    assert DPSettings.from_config(cfg) == DPSettings(1.5, 0.7, 1e-4, "rdp", 6.0, False)


def test_verify_reads_a_sites_state_folder(tmp_path):
    from types import SimpleNamespace

    import torch

    from fairforget.data.base import SYNTHETIC_ID_BASE, make_sampleset
    from fairforget.storage import atomic_torch_save, atomic_write_json, state_hash
    from fairforget.verify import VerifyError, read_node, read_site, verify_site

    cfg = SimpleNamespace(slices=2, dp=False)
    originals = make_sampleset(torch.zeros(4, 3, 2, 2), np.zeros(4), np.zeros(4), np.arange(4))
    state = tmp_path / "site"
    with pytest.raises(VerifyError, match=r"index.json is missing: .*site is not a shard's state folder"):
        read_site(state, cfg, originals)
    state.mkdir()
    atomic_write_json(state / "index.json", {"slices": [[0, 1], [2]], "deleted": [3], "trained": 0, "version": 3})
    with pytest.raises(VerifyError, match="index.json is not a valid shard index: KeyError"):
        read_site(state, cfg, originals)
    index = {"shard": 2, "slices": [["0", 1], [2]], "deleted": ["3"], "trained": "0", "version": "3"}
    atomic_write_json(state / "index.json", index)
    with pytest.raises(VerifyError, match="shard 2 in .* has no trained stage: it serves no model yet"):
        read_site(state, cfg, originals)
    atomic_write_json(state / "index.json", {**index, "trained": 2})
    with pytest.raises(VerifyError, match=r"stage-2.pt is missing: shard 2 has no model for its trained stage 2"):
        read_site(state, cfg, originals)
    (state / "checkpoints").mkdir()
    (state / "checkpoints" / "stage-2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(VerifyError, match="stage-2.pt is not a readable checkpoint"):
        read_site(state, cfg, originals)
    model = {"w": torch.arange(3.0)}
    atomic_torch_save(state / "checkpoints" / "stage-2.pt", {"model": model})
    node = read_site(state, cfg, originals)
    assert (node.shard, node.served_hash, node.approx_meta, node.dp_seeds) == (2, state_hash(model), None, None)
    assert node.index["slices"] == [[0, 1], [2]] and node.index["deleted"] == [3] and node.index["trained"] == 2
    assert node.pool is originals
    # a valid approximate model serves the shard; one made for another index version does not
    other = {"w": torch.ones(2)}
    atomic_torch_save(state / "approx.pt", {"meta": {"index_version": 3, "method": "finetune"}, "model": other})
    node = read_site(state, cfg, originals)
    assert node.served_hash == state_hash(other) and node.approx_meta == {"index_version": 3, "method": "finetune",
                                                                          "model_hash": state_hash(other)}
    atomic_torch_save(state / "approx.pt", {"meta": {"index_version": 2}, "model": other})
    assert read_site(state, cfg, originals).served_hash == state_hash(model)
    (state / "approx.pt").write_bytes(b"junk")
    with pytest.raises(VerifyError, match="approx.pt is not a readable approximate model"):
        read_site(state, cfg, originals)
    (state / "approx.pt").unlink()
    # the node's synthetic samples join its pool
    sid = [SYNTHETIC_ID_BASE + 1]
    atomic_torch_save(state / "augment" / "synthetic.pt", {"x": torch.ones(1, 3, 2, 2), "y": torch.tensor([1]),
                                                           "private": torch.tensor([0]), "ids": torch.tensor(sid)})
    pool = read_site(state, cfg, originals).pool
    assert pool.ids.tolist() == [0, 1, 2, 3] + sid and pool.y.tolist() == [0, 0, 0, 0, 1]
    atomic_torch_save(state / "augment" / "synthetic.pt", {"x": torch.ones(0, 3, 2, 2), "y": torch.zeros(0),
                                                           "private": torch.zeros(0), "ids": torch.zeros(0)})
    assert read_site(state, cfg, originals).pool is originals
    (state / "augment" / "synthetic.pt").write_bytes(b"junk")
    with pytest.raises(VerifyError, match="synthetic.pt is not a readable synthetic-sample file"):
        read_site(state, cfg, originals)
    (state / "augment" / "synthetic.pt").unlink()
    # under DP the site reads its recorded seeds
    dp = SimpleNamespace(slices=2, dp=True)
    assert read_site(state, dp, originals).dp_seeds == {}
    atomic_write_json(state / "dp-seeds.json", {"stages": {"1": {"sample_seed": "5", "noise_seed": 6, "samples": 2}}})
    assert read_site(state, dp, originals).dp_seeds == {1: {"sample_seed": 5, "noise_seed": 6, "samples": 2}}
    atomic_write_json(state / "dp-seeds.json", {"stages": {"1": {"noise_seed": 6}}})
    with pytest.raises(VerifyError, match="dp-seeds.json is not a DP seed record: KeyError"):
        read_site(state, dp, originals)
    # the server's copy of a run: the same index under OUT/nodes/shard-K, its served model in OUT/models
    run = tmp_path / "run"
    with pytest.raises(VerifyError, match=r"shard-2.pt is missing: the run serves no model for shard 2"):
        read_node(run, cfg, originals, 2)
    (run / "models").mkdir(parents=True)
    (run / "models" / "shard-2.pt").write_bytes(b"junk")
    (run / "nodes").mkdir()
    with pytest.raises(VerifyError, match="shard 2's node state is not in this run folder"):
        read_node(run, cfg, originals, 2)
    state.rename(run / "nodes" / "shard-2")
    with pytest.raises(VerifyError, match="shard-2.pt is not a readable model"):
        read_node(run, cfg, originals, 2)
    atomic_torch_save(run / "models" / "shard-2.pt", model)
    assert read_node(run, cfg, originals, 2).served_hash == state_hash(model)
    assert read_node(run, dp, originals, 2).dp_seeds is None  # the server never reads a site's seeds
    with pytest.raises(VerifyError, match="dp-seeds.json is not a DP seed record"):
        read_node(run, dp, originals, 2, site_local=True)
    with pytest.raises(VerifyError, match="belongs to shard 2 with 2 slices and 2 trained, not to shard 2 of a run "
                                          "with 3 slices"):
        read_node(run, SimpleNamespace(slices=3, dp=False), originals, 2)
    with pytest.raises(VerifyError, match="a site's verification needs its data: --data-root"):
        verify_site(run / "nodes" / "shard-2", SimpleNamespace(data_root=" "))


def test_a_site_replays_its_own_shard_bit_for_bit(tmp_path):
    from fairforget.config import resolve
    from fairforget.data import load_dataset
    from fairforget.sisa import SisaSettings, SisaShard
    from fairforget.storage import atomic_torch_save, state_hash, torch_load
    from fairforget.verify import MATCH, MISMATCH, verify_site
    from tests.conftest import TINY
    from tests.test_sites import write_site

    cfg = resolve({**TINY, "dataset": "image-folder", "data-root": str(write_site(tmp_path / "data", n=16)),
                   "out-dir": str(tmp_path / "out")})
    bundle = load_dataset(cfg)
    shard = SisaShard(tmp_path / "state", 0, bundle.train,
                      SisaSettings.from_config(cfg, bundle.num_classes, bundle.num_private))
    shard.train_through(cfg.slices)
    v = verify_site(tmp_path / "state", cfg)
    assert (v.status, v.problems, v.replay_hash) == (MATCH, [], v.served_hash)
    ckpt = tmp_path / "state" / "checkpoints" / f"stage-{cfg.slices}.pt"
    saved = torch_load(ckpt)
    saved["model"] = {k: t + 1 if t.is_floating_point() else t for k, t in saved["model"].items()}
    atomic_torch_save(ckpt, saved)
    v = verify_site(tmp_path / "state", cfg)
    assert v.status == MISMATCH and v.served_hash == state_hash(saved["model"]) and v.problems == [
        f"the served model {v.served_hash} is not the replay {v.replay_hash}"]


# ---------------------------------------------------------------------- fairforget/sisa.py
def test_sisa_public_seeds_and_seed_records(tmp_path):
    from fairforget.privacy.dp_sgd import DPSettings
    from fairforget.sisa import read_dp_seeds
    from fairforget.storage import atomic_write_json
    from fairforget.training import NO_PRIVACY

    hook = _verify_settings(DPSettings(1.0, 1.0, 1e-5, "rdp", 10.0)).privacy_hook(5)
    assert (hook.sample_gen.initial_seed(), hook.noise_gen.initial_seed()) == (5, 6)  # masks seed, noise seed + 1
    assert _verify_settings().privacy_hook(5) is NO_PRIVACY
    assert read_dp_seeds(tmp_path) == {"stages": {}, "approximate": []}
    atomic_write_json(tmp_path / "dp-seeds.json", {"approximate": [2]})  # no training recorded yet
    assert read_dp_seeds(tmp_path) == {"stages": {}, "approximate": [2]}


def test_sisa_add_puts_each_new_id_in_its_drawn_slice(tmp_path):
    import torch

    from fairforget.data.base import SYNTHETIC_ID_BASE, make_sampleset
    from fairforget.sisa import SisaShard, derived_seed

    settings = _verify_settings()
    data = make_sampleset(torch.zeros(10, 3, 2, 2), np.zeros(10), np.zeros(10), np.arange(10))
    shard = SisaShard(tmp_path, 1, data, settings)
    version, slices = shard.index["version"], [list(s) for s in shard.index["slices"]]
    sid = SYNTHETIC_ID_BASE + 3
    pool = make_sampleset(torch.zeros(11, 3, 2, 2), np.zeros(11), np.zeros(11), np.r_[np.arange(10), sid])
    assert shard.add([sid], pool) == 0 and shard.index["version"] == version + 1
    home = derived_seed(7, 1, 91, sid) % 2
    assert shard.index["slices"] == [sorted(s + [sid]) if k == home else s for k, s in enumerate(slices)]


def test_sisa_planned_removal_charges_only_the_stages_a_deletion_retrains(tmp_path):
    """A deletion from slice s retrains stages s+1..target (stage s trained on the slices before s): the
    hard stop is checked against exactly those stages' DP-SGD entries, on the slices without the ids."""
    import torch

    from fairforget.data.base import make_sampleset
    from fairforget.privacy.dp_sgd import DPSettings
    from fairforget.sisa import SisaShard

    settings = _verify_settings(DPSettings(1.0, 1.0, 1e-5, "rdp", 10.0))
    shard = SisaShard(tmp_path, 0, make_sampleset(torch.zeros(10, 3, 2, 2), np.zeros(10), np.zeros(10),
                                                  np.arange(10)), settings)
    shard.index["trained"] = 2  # as if trained through both stages (nothing is trained here)
    slices = [list(s) for s in shard.index["slices"]]
    dp = settings.dp
    in_second, in_first = slices[1][0], slices[0][0]
    assert shard.planned_removal([in_second], 2) == dp.planned(len(slices[0]) + len(slices[1]) - 1, 4, 1, stage=2)
    assert shard.planned_removal([in_first], 2) == [*dp.planned(len(slices[0]) - 1, 4, 1, stage=1),
                                                    *dp.planned(len(slices[0]) + len(slices[1]) - 1, 4, 1, stage=2)]
    shard.index["trained"] = 0  # nothing trained yet: training through stage 2 is stages 1 and 2, without the id
    assert shard.planned_removal([in_second], 2) == [*dp.planned(len(slices[0]), 4, 1, stage=1),
                                                     *dp.planned(len(slices[0]) + len(slices[1]) - 1, 4, 1, stage=2)]
    assert shard.planned_removal([], 2) == [] and SisaShard(tmp_path / "plain", 0, shard.data,
                                                            _verify_settings()).planned_removal([1], 2) == []


def test_sisa_each_shard_starts_from_its_own_seeded_weights(tmp_path):
    """A shard's first model is seeded by (seed, shard): shards start apart, and a replay elsewhere starts
    where the shard did (exactness needs the second; an ensemble of one init repeated, the first)."""
    import torch

    from fairforget.data.base import make_sampleset
    from fairforget.model import build_model
    from fairforget.sisa import SisaShard, derived_seed

    settings = _verify_settings()
    data = make_sampleset(torch.zeros(10, 3, 8, 8), np.zeros(10), np.zeros(10), np.arange(10))
    first = {k: SisaShard(tmp_path / str(k), k, data, settings)._fresh()[0].state_dict() for k in (0, 1)}
    assert any(not torch.equal(first[0][n], first[1][n]) for n in first[0])
    for k in (0, 1):
        want = build_model(2, 4, seed=derived_seed(7, k, 0), model=settings.model).state_dict()
        assert all(torch.equal(first[k][n], want[n]) for n in want)


def test_sisa_a_shard_trained_without_dp_refuses_a_dp_run(tmp_path):
    """A state folder whose index has trained (version 1) without DP cannot be continued with dp = true
    (its epsilon would be a claim about models it does not describe); an untrained one can."""
    import torch

    from fairforget.data.base import make_sampleset
    from fairforget.privacy.dp_sgd import DPSettings
    from fairforget.sisa import SisaError, SisaShard

    dp = _verify_settings(DPSettings(1.0, 1.0, 1e-5, "rdp", 10.0))
    data = make_sampleset(torch.rand(10, 3, 8, 8), np.arange(10) % 2, np.zeros(10), np.arange(10))
    plain = SisaShard(tmp_path / "plain", 0, data, _verify_settings())
    SisaShard(tmp_path / "plain", 0, data, dp)  # index written, nothing trained: DP may still start
    plain.train_through(1)
    assert plain.index["version"] == 1
    with pytest.raises(SisaError, match="holds a shard trained without DP"):
        SisaShard(tmp_path / "plain", 0, data, dp)
