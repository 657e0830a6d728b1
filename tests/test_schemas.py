"""The typed records of the output files and message payloads (fairforget/schemas/): metrics.json
read through its record (a field of another type is one line naming file, line and field), payloads
written and read through theirs, and the committed JSON Schemas and reference page are the generated
ones."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fairforget import keys
from fairforget.schemas import METRICS_SCHEMA_VERSION, SchemaVersionError, load_metrics, metrics_to_write, read_metrics
from fairforget.schemas.base import SCHEMA_DIR, SchemaError
from fairforget.schemas.metrics import Evaluation, Metrics
from fairforget.schemas.payloads import BY_KEY, PAYLOADS, DpSpend, EnsembleRule, SiteEvaluation, decode, encode

APP_DIR = Path(__file__).resolve().parents[1]

METRICS = {
    "schema_version": METRICS_SCHEMA_VERSION,
    "run": {"dataset": "biased-digits", "strategy": "shard-ensemble", "num_shards": 2, "slices": 2, "rho": 0.99,
            "seed": 0, "num_train": 40, "num_classes": 10, "num_private": 10},
    "rounds": [{"round": 1, "accuracy_biased": 0.5, "accuracy_unbiased": None, "worst_group_accuracy": 0.0}],
    "ensemble": {"unbiased": {"accuracy": 0.25, "n": 8, "worst_group": {"class": 3, "private": 1, "n": 2,
                                                                         "accuracy": 0.0},
                              "groups": [{"class": 3, "private": 1, "n": 2, "accuracy": 0.0}]}},
    "shards": [{"shard": 0, "num_examples": 20, "kl_bias": 2.1, "train_seconds": 1.5, "model_hash": "ab",
                "accuracy_unbiased": 0.2},
               {"shard": 1, "num_examples": 20, "kl_bias": 2.0, "train_seconds": 1, "model_hash": "cd",
                "accuracy_unbiased": 0.3}],
    "timing": {"train_wall_seconds": 3.0, "full_retrain_seconds": 2.5},
    "unlearning": [{"request": 1, "ids": [3], "shards": [0], "restart_stages": {"0": 1}, "seconds": 0.4}],
    "probes": {"leace": {"accuracy": 0.1}},  # a key another part adds: kept
}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def test_metrics_are_read_through_their_record(tmp_path):
    path = _write(tmp_path / "metrics.json", METRICS)
    assert read_metrics(path) == METRICS
    m = load_metrics(path)
    assert isinstance(m, Metrics) and isinstance(m.ensemble["unbiased"], Evaluation)
    assert (m.run.dataset, m.rounds[0].accuracy_unbiased, m.shards[1].num_examples, m.timing.audit_seconds) == (
        "biased-digits", None, 20, None)
    assert m.ensemble["unbiased"].worst_group.class_ == 3 and m.unlearning[0].restart_stages == {"0": 1}
    assert m.extra == {"probes": {"leace": {"accuracy": 0.1}}} and m.to_json() == METRICS


@pytest.mark.parametrize(("where", "value", "says"), [
    (("shards", 1, "num_examples"), "20", "field 'shards[1].num_examples' = \"20\": expected int or null"),
    (("ensemble", "unbiased", "worst_group", "class"), 3.5,
     "field 'ensemble.unbiased.worst_group.class' = 3.5: expected int or null"),
    (("run", "dataset"), 7, "field 'run.dataset' = 7: expected str or null"),
    (("rounds",), {"round": 1}, "field 'rounds' = {\"round\": 1}: expected list[RoundRow]"),
    (("unlearning", 0, "ids", 0), True, "field 'unlearning[0].ids[0]' = true: expected int"),
])
def test_a_metrics_field_of_another_type_is_one_line_naming_file_line_and_field(tmp_path, where, value, says):
    data = json.loads(json.dumps(METRICS))
    obj = data
    for part in where[:-1]:
        obj = obj[part]
    obj[where[-1]] = value
    path = _write(tmp_path / "metrics.json", data)
    with pytest.raises(SchemaVersionError) as err:
        read_metrics(path)
    message = str(err.value)
    assert "\n" not in message and message.endswith(says), message
    line = int(message[len(f"{path} line "):].split(":")[0])
    text = path.read_text().splitlines()[line - 1]
    assert f'"{where[-1]}": ' in text if isinstance(where[-1], str) else json.dumps(value) in text.strip(), (line, text)
    # a file not laid out as fairforget writes it: the field still named, no line
    path.write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match=f"^{path}: {says.replace('[', '.').replace('{', '.')}"):
        read_metrics(path)


def test_a_writer_mistake_in_metrics_is_refused_before_the_file_changes(tmp_path):
    from fairforget.run import RunDir

    run = RunDir(tmp_path)
    run.write_metrics(METRICS)
    before = run.metrics_path.read_bytes()
    with pytest.raises(SchemaVersionError, match=r"\(to write\): field 'timing.audit_seconds' = \"1s\""):
        run.write_metrics({**METRICS, "timing": {"audit_seconds": "1s"}})
    assert run.metrics_path.read_bytes() == before
    assert metrics_to_write({"rounds": []}, tmp_path) == {"rounds": []}  # a partial file (tests, tools) is typed too


def test_payloads_are_written_and_read_through_their_records():
    assert {cls.KEY for cls in PAYLOADS} == {keys.DP_JSON, keys.EVAL_JSON, keys.ENSEMBLE_RULE, keys.AUGMENT_JSON,
                                             keys.AUDIT_JSON} == set(BY_KEY)
    spend = {"shard": 1, "accountant": "prv", "epsilon": 2.5, "delta": 1e-5, "mu": 0.4, "tpr_bound": {"0.01": 0.1},
             "steps": 30, "trainings": 2}
    text = encode(DpSpend, spend)
    assert json.loads(text) == spend and decode(DpSpend, text).epsilon == 2.5
    rule = decode(EnsembleRule, encode(EnsembleRule, {"vote": "softmax", "weights": {"0": 0.5, "1": 1}}))
    assert (rule.vote, rule.weights) == ("softmax", {"0": 0.5, "1": 1})
    assert decode(EnsembleRule, "{}").to_json() == {}
    ev = decode(SiteEvaluation, json.dumps({"biased": {"accuracy": 0.5, "n": 4, "groups": []}}))
    assert ev.biased.n == 4 and ev.unbiased is None
    with pytest.raises(SchemaError, match="^message payload 'dp-json': field 'epsilon' = \"lots\": expected float"):
        encode(DpSpend, {**spend, "epsilon": "lots"})
    with pytest.raises(SchemaError, match="^message payload 'ensemble-rule': field 'weights.0' = \"x\""):
        decode(EnsembleRule, '{"weights": {"0": "x"}}')
    with pytest.raises(SchemaError, match="^message payload 'eval-json': not JSON"):
        decode(SiteEvaluation, "{")


def _generate(tmp_path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("gen_reference", APP_DIR / "docs" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--out", str(tmp_path), "--schema", str(tmp_path / "run-config.schema.json")]) == 0
    return tmp_path


def test_the_committed_schemas_and_output_page_are_the_generated_ones(tmp_path):
    out = _generate(tmp_path)
    fix = "run `.venv/bin/python docs/gen_reference.py` (or make docs) and commit the files"
    names = sorted(p.name for p in out.glob("*.schema.json"))
    assert names == sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")), fix
    for name in names:
        assert (SCHEMA_DIR / name).read_text() == (out / name).read_text(), f"{name}: {fix}"
    page = (out / "output-files.md").read_text()
    assert (APP_DIR / "docs" / "reference" / "output-files.md").read_text() == page, fix
    ledger = json.loads((out / "ledger-line.schema.json").read_text())
    assert ledger["required"] == ["request"] and ledger["properties"]["ids"] == {
        "type": "array", "items": {"type": "integer"},
        "description": "the sample ids (an intent: every id of the request)"}
    assert json.loads((out / "metrics.schema.json").read_text())["$defs"]["GroupAccuracy"]["properties"]["class"]
    for field in ("hash_after", "restart_stage", "capacity_after", "reason"):  # every declared field is documented
        assert f"| `{field}` |" in page.split("## `ledger.jsonl`")[1].split("## Tombstones")[0]


def test_the_exported_schemas_accept_what_fairforget_writes(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMA_DIR / "metrics.schema.json").read_text())
    jsonschema.validate(METRICS, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**METRICS, "shards": [{"num_examples": "20"}]}, schema)
    line = json.loads((SCHEMA_DIR / "ledger-line.schema.json").read_text())
    jsonschema.validate({"schema_version": 2, "phase": "intent", "request": 1, "ids": [1],
                         "shards": {"0": {"ids": [1], "method": "exact-sisa", "decision": "exact-retrain"}}}, line)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ids": [1]}, line)
