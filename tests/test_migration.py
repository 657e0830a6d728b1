"""Deletion ledgers and tombstones written by older versions are migrated on read, never refused; a
line that matches no version is one line naming the file, the line and the field."""

from __future__ import annotations

import json

import pytest

from fairforget.ledger import Ledger, LedgerError
from fairforget.schemas.ledger import LEDGER_SCHEMA_VERSION, LedgerLine
from fairforget.schemas.tombstones import TombstoneLine
from fairforget.tombstones import TombstoneError, Tombstones, legacy_sample_id

# What the first releases wrote (server/forget.py at e110751 and 18fa840: one line per decision, no
# phase, no schema_version), then the two-phase ledger before schema_version (56160c9 .. now).
V1_SINGLE_PHASE = [
    {"request": 1, "shard": 0, "ids": [4, 2], "method": "exact-sisa", "decision": "exact-retrain", "restart_stage": 1,
     "retrained_stages": 2, "seconds": 0.5, "hash_before": "aa", "hash_after": "bb",
     "time": "2026-11-24T10:00:00+00:00"},
    {"request": 2, "shard": 1, "ids": [9], "method": "finetune", "decision": "refused", "reason": "capacity exhausted",
     "time": "2026-11-25T10:00:00+00:00"},
    {"request": 3, "shard": 1, "ids": [11], "method": "exact-sisa", "decision": "retire-original", "augment_step": 0,
     "replenished": 3, "generator_version": 1, "restart_stage": 0, "seconds": 1.0, "hash_before": "cc",
     "hash_after": "dd", "time": "2026-11-25T11:00:00+00:00"},
]
V1_TWO_PHASE = [
    {"phase": "intent", "request": 4, "method": "exact-sisa", "ids": [5, 7],
     "shards": {"0": {"ids": [5], "method": "exact-sisa", "decision": "exact-retrain"},
                "1": {"ids": [7], "method": "exact-sisa", "decision": "exact-retrain"}},
     "time": "2026-11-26T10:00:00+00:00"},
    {"phase": "done", "request": 4, "shard": 0, "ids": [5], "method": "exact-sisa", "decision": "exact-retrain",
     "capacity_before": 3, "capacity_after": 3, "capacity": 3, "num_examples": 40, "restart_stage": 1,
     "seconds": 0.2, "hash_before": "bb", "hash_after": "ee", "time": "2026-11-26T10:00:01+00:00"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def test_a_version_1_ledger_reads_as_the_current_one_and_is_not_rewritten(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _write(path, V1_SINGLE_PHASE + V1_TWO_PHASE)
    before = path.read_bytes()
    lg = Ledger(path)
    records = lg.records()
    assert all(isinstance(r, LedgerLine) for r in records)
    assert [(r.version, r.phase, r.request, r.shard) for r in records] == [
        (1, "done", 1, 0), (1, "done", 2, 1), (1, "done", 3, 1), (1, "intent", 4, None), (1, "done", 4, 0)]
    first = records[0]
    assert (first.ids, first.method, first.decision, first.restart_stage, first.seconds, first.hash_after) == (
        [4, 2], "exact-sisa", "exact-retrain", 1, 0.5, "bb")
    assert records[1].reason == "capacity exhausted" and records[2].augment_step == 0
    assert records[3].plans[1].ids == [7] and records[3].plans[0].decision == "exact-retrain"
    # the deletion list the site must keep honouring
    assert lg.deleted_ids() == {2, 4, 5}
    assert lg.unlearned_ids() == {2, 4, 5, 11}
    assert lg.pending() == {4: {1: {"ids": [7], "method": "exact-sisa", "decision": "exact-retrain"}}}
    assert [r["hash_after"] for r in lg.receipts([4, 5])] == ["bb", "ee"]
    assert lg.next_request() == 5
    assert lg.lines() == V1_SINGLE_PHASE + V1_TWO_PHASE  # the lines as written, nothing added on read
    assert path.read_bytes() == before
    # a new line is the current version; the old ones stay as they were
    lg.complete([{"request": 4, "shard": 1, "ids": [7], "method": "exact-sisa", "decision": "exact-retrain"}])
    assert path.read_bytes().startswith(before)
    assert [r.version for r in lg.records()] == [1, 1, 1, 1, 1, LEDGER_SCHEMA_VERSION]
    assert json.loads(path.read_text().splitlines()[-1])["schema_version"] == LEDGER_SCHEMA_VERSION
    assert lg.pending() == {} and lg.deleted_ids() == {2, 4, 5, 7}


def test_a_newer_ledger_line_is_read_for_what_this_version_knows(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _write(path, [{"schema_version": LEDGER_SCHEMA_VERSION + 1, "phase": "done", "request": 1, "shard": 2, "ids": [3],
                   "decision": "exact-retrain", "hash_after": "ff", "proof": {"kind": "zk"}}])
    (line,) = Ledger(path).records()
    assert (line.version, line.shard, line.ids) == (LEDGER_SCHEMA_VERSION + 1, 2, [3])
    assert line.extra == {"proof": {"kind": "zk"}}
    assert Ledger(path).deleted_ids() == {3}


@pytest.mark.parametrize(("row", "says"), [
    ({"request": 1, "shard": "zero", "ids": [1]}, "line 2: field 'shard' = \"zero\": expected int or null"),
    ({"request": 1, "shard": 0, "ids": [1, "x"]}, "line 2: field 'ids[1]' = \"x\": expected int"),
    ({"request": True, "ids": []}, "line 2: field 'request' = true: expected int"),
    ({"request": 1, "phase": "maybe", "ids": []}, "line 2: field 'phase' = 'maybe': expected 'intent' or 'done'"),
    ({"request": 1, "phase": "intent", "ids": [1]}, "line 2: an intent line with no field 'shards'"),
    ({"request": 1, "phase": "intent", "ids": [1], "shards": {"0": {"ids": "1"}}},
     "line 2: field 'shards.0.ids' = \"1\": expected list[int]"),
])
def test_a_ledger_line_that_matches_no_version_is_one_line_naming_file_line_and_field(tmp_path, row, says):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(V1_SINGLE_PHASE[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LedgerError) as err:
        Ledger(path).entries()
    assert str(err.value) == f"{path} {says}" and "\n" not in str(err.value)


def test_a_writer_mistake_is_refused_before_anything_is_appended(tmp_path):
    lg = Ledger(tmp_path / "ledger.jsonl")
    lg.complete([{"request": 1, "shard": 0, "ids": [1], "decision": "exact-retrain"}])
    before = lg.path.read_bytes()
    with pytest.raises(LedgerError, match="field 'seconds' = \"fast\": expected float or null"):
        lg.complete([{"request": 2, "shard": 0, "ids": [2], "decision": "exact-retrain"},
                     {"request": 2, "shard": 1, "ids": [3], "seconds": "fast"}])
    with pytest.raises(LedgerError, match="field 'shards.0.method' = 5: expected str"):
        lg.intend(3, {0: {"ids": [4], "method": 5, "decision": "d"}}, "m")
    assert lg.path.read_bytes() == before


def test_version_1_tombstones_are_migrated_and_honoured(tmp_path):
    # what 56160c9 wrote ({"id", "request", "time"}: for an image folder, the unkeyed hash of the record id)
    site = tmp_path / "site.jsonl"
    old = legacy_sample_id("img/3.png")
    site.write_text(json.dumps({"id": old, "request": 1, "time": "2026-11-25T10:00:00+00:00"}) + "\n"
                    + json.dumps({"id": 8, "request": 2, "time": "2026-11-25T10:00:01+00:00"}) + "\n")
    before = site.read_bytes()
    t = Tombstones(site, {100: "img/3.png", 101: "img/4.png"})
    lines = t.lines()
    assert all(isinstance(x, TombstoneLine) for x in lines)
    assert [(x.version, x.id, x.record, x.request, x.legacy) for x in lines] == [
        (1, old, None, 1, True), (1, 8, None, 2, True)]
    assert t.ids() == {old, 8, 100}  # the record under its current, keyed sample id too
    assert t.add([101], request=3) == [101]
    assert site.read_bytes().startswith(before)
    new = t.lines()[-1]
    assert (new.version, new.id, new.record, new.request, new.legacy) == (2, 101, "img/4.png", 3, False)
    # a line of a newer version is read for what this one knows
    site.open("a").write(json.dumps({"schema_version": 3, "record": "img/9.png", "salt": "x"}) + "\n")
    assert Tombstones(site, {555: "img/9.png"}).ids() == {old, 8, 101, 555}


@pytest.mark.parametrize(("row", "says"), [
    ({"id": "12"}, "line 2: field 'id' = \"12\": expected int or null"),
    ({"request": 3}, "line 2: a tombstone naming no 'id' and no 'record'"),
    ({"record": 5}, "line 2: field 'record' = 5: expected str or null"),
])
def test_a_tombstone_line_of_no_known_shape_is_one_line(tmp_path, row, says):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TombstoneError) as err:
        Tombstones(path).ids()
    assert str(err.value) == f"{path} {says}"
    path.write_text(json.dumps({"id": 1}) + "\nnot json\n" + json.dumps({"id": 2}) + "\n")
    with pytest.raises(TombstoneError, match="line 2 is not a JSON object"):
        Tombstones(path).ids()


def test_the_forget_command_names_a_bad_ledger_line_in_one_line_and_changes_nothing(tiny_cfg, capsys):
    from fairforget.run import RunDir
    from fairforget.schemas import METRICS_SCHEMA_VERSION
    from server import cli

    cfg = tiny_cfg(audit=False)
    run = RunDir(cfg.out_path)
    run.write_config(cfg)
    run.models_dir.mkdir()
    run.metrics_path.write_text(json.dumps({"schema_version": METRICS_SCHEMA_VERSION, "run": {}}))
    ledger = run.path / "ledger.jsonl"
    _write(ledger, [V1_SINGLE_PHASE[0], {"request": 2, "shard": 0, "ids": [3], "seconds": "slow"}])
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert cli.main(["forget", "--run", str(run.path), "--ids", "3"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == f"fairforget: error: {ledger} line 2: field 'seconds' = \"slow\": expected float or null"
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before
