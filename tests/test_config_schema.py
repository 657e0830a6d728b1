"""The run configuration is declared once (``RunConfig``'s fields, :data:`fairforget.config.KEYS`): every
key has a type, a default, a meaning and, where it is a number or an enumeration, a range or choices;
``validate`` enforces each; ``pyproject.toml``'s defaults, the JSON Schema and the reference page agree
with it. And a ``metrics.json`` of another ``schema_version`` is refused in one line, nothing written."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest

from fairforget.config import APP_DIR, KEYS, SECTIONS, ConfigError, Key, load_defaults, resolve
from fairforget.config_schema import RUN_CONFIG_SCHEMA, json_schema
from fairforget.run import RunDir, RunDirError
from fairforget.schemas import METRICS_SCHEMA_VERSION, SchemaVersionError, read_metrics
from server import cli

BY_NAME = {k.name: k for k in KEYS}


# ---------------------------------------------------------------------- the declaration
def pyproject_problems(table: dict) -> list[str]:
    """How ``table`` (``[tool.flwr.app.config]``) disagrees with the declaration: a key missing on
    either side, a default of another type (an int for a float key too) or value."""
    problems = [f"{n}: not in pyproject.toml" for n in BY_NAME if n not in table]
    problems += [f"{n}: in pyproject.toml, not declared in RunConfig" for n in table if n not in BY_NAME]
    for name, value in table.items():
        k = BY_NAME.get(name)
        if k is None:
            continue
        if type(value) is not k.type:
            problems.append(f"{name}: pyproject.toml has {value!r} ({type(value).__name__}), "
                            f"declared {k.type.__name__}")
        elif value != k.default:
            problems.append(f"{name}: pyproject.toml has {value!r}, declared {k.default!r}")
    return problems


def test_pyproject_defaults_are_the_declared_ones():
    assert pyproject_problems(load_defaults()) == []


def test_the_pyproject_check_sees_each_kind_of_drift():
    table = load_defaults()
    assert pyproject_problems({k: v for k, v in table.items() if k != "seed"}) == ["seed: not in pyproject.toml"]
    assert pyproject_problems({**table, "sede": 0}) == ["sede: in pyproject.toml, not declared in RunConfig"]
    assert pyproject_problems({**table, "model-width": 16}) == ["model-width: pyproject.toml has 16, declared 8"]
    assert pyproject_problems({**table, "rho": 1}) == ["rho: pyproject.toml has 1 (int), declared float"]
    assert pyproject_problems({**table, "dp": 0}) == ["dp: pyproject.toml has 0 (int), declared bool"]


def declaration_problems(k: Key) -> list[str]:
    problems = []
    if k.type not in (int, float, str, bool):
        problems.append(f"{k.name}: type {k.type!r}")
    if type(k.default) is not k.type:
        problems.append(f"{k.name}: default {k.default!r} is not a {k.type.__name__}")
    if not k.meaning.strip() or "\n" in k.meaning:
        problems.append(f"{k.name}: no one-line meaning")
    if k.type in (int, float) and k.minimum is None and k.maximum is None:
        problems.append(f"{k.name}: a number without a range")
    if k.type is str and not k.choices and k.form is None:
        problems.append(f"{k.name}: a string with neither choices nor a form (free-form: say which)")
    if k.choices and k.default not in k.choices:
        problems.append(f"{k.name}: default {k.default!r} is not one of its choices")
    if not k.section:
        problems.append(f"{k.name}: no section")
    return problems


def test_every_key_is_fully_declared():
    assert [p for k in KEYS for p in declaration_problems(k)] == []
    assert [first for first, _ in SECTIONS] == [k.name for i, k in enumerate(KEYS)
                                                if i == 0 or k.section != KEYS[i - 1].section]
    assert {n for n in BY_NAME if n.endswith("-options")} == {
        "strategy-options", "objective-options", "unlearner-options", "attack-options", "dataset-options"}


def test_the_declaration_check_sees_a_missing_range_or_form():
    rho, partition = BY_NAME["rho"], BY_NAME["partition"]
    assert declaration_problems(Key(0.5, "x", name="rho", type=float, section="s")) == ["rho: a number without a range"]
    assert declaration_problems(Key("x", "y", name="p", type=str, section="s")) == [
        "p: a string with neither choices nor a form (free-form: say which)"]
    assert declaration_problems(Key(1, "", minimum=0, name="n", type=float, section="")) == [
        "n: default 1 is not a float", "n: no one-line meaning", "n: no section"]
    assert declaration_problems(Key("nope", "m", choices=partition.choices, name="p", type=str, section="s")) == [
        "p: default 'nope' is not one of its choices"]
    assert not declaration_problems(rho) and not declaration_problems(partition)


def _outside(k: Key) -> list:
    """Values that break ``k``'s own rule (a bound naming another key: with that key at its default)."""
    def bound(b):
        return BY_NAME[b].default if isinstance(b, str) else b

    if k.choices:
        return ["not-a-choice"]
    if k.form is not None:
        return {"out-dir": [" "], "request": ["xyz", "0123456789ABCDEF"], "dataset": [""], "strategy": [" "],
                "objective": [""], "model": [""], "dp-plan": ["[1]"], "unlearn-method": [""], "augment-filter": [""],
                "attack-options": ['{"a": 1}']}.get(k.name, ["[1]", "{"] if k.name.endswith("-options") else [])
    out = []
    step = 1 if k.type is int else 0.5
    if k.minimum is not None:
        lo = k.type(bound(k.minimum))
        out.append(lo if k.open_min else lo - step)
    if k.maximum is not None:
        hi = k.type(bound(k.maximum))
        out.append(hi if k.open_max else hi + step)
    if k.multiple_of:
        out.append(k.type(bound(k.minimum)) + 2)
    return out


def _edges(k: Key) -> list:
    """The closed bounds: values the rule takes."""
    out = []
    for b, is_open in ((k.minimum, k.open_min), (k.maximum, k.open_max)):
        if b is not None and not is_open and k.type in (int, float):
            out.append(k.type(BY_NAME[b].default if isinstance(b, str) else b))
    return out


@pytest.mark.parametrize("k", [k for k in KEYS if k.type is not bool], ids=lambda k: k.name)
def test_validate_enforces_every_declared_rule(k):
    outside = _outside(k)
    assert outside or k.form is not None and k.form.check is None, f"{k.name}: no value breaks its rule"
    for value in outside:
        with pytest.raises(ConfigError) as err:
            resolve({k.name: value})
        assert str(err.value) == f"config key '{k.name}' = {value!r}: must be {k.rule()}"
    # the keys this one bounds, at their own far end (ddim-steps 1 when diffusion-timesteps is 10)
    bounded = {d.name: d.minimum if d.maximum == k.name else d.maximum for d in KEYS
               if k.name in (d.minimum, d.maximum)}
    for value in _edges(k):
        assert getattr(resolve({k.name: value, **bounded}), k.name.replace("-", "_")) == value


def test_a_bound_naming_a_key_is_checked_after_that_key():
    """dp-target-fpr out of range is reported as itself, not as the dp-target-tpr it bounds."""
    with pytest.raises(ConfigError, match=r"^config key 'dp-target-fpr' = 1.5: must be in \(0, 1\)$"):
        resolve({"dp-target-fpr": 1.5})
    assert resolve({"num-shards": 8, "min-shards": 8}).required_shards == 8


# ---------------------------------------------------------------------- the JSON Schema
def test_the_shipped_json_schema_is_the_declarations():
    shipped = json.loads(RUN_CONFIG_SCHEMA.read_text(encoding="utf-8"))
    assert shipped == json_schema(), "run `.venv/bin/python docs/gen_reference.py` (or make docs) to regenerate it"
    props = shipped["properties"]
    assert list(props) == [k.name for k in KEYS] and shipped["additionalProperties"] is False
    types = {int: "integer", float: "number", str: "string", bool: "boolean"}
    for k in KEYS:
        p = props[k.name]
        assert (p["type"], p["default"], p["description"]) == (types[k.type], k.default, k.meaning)
        assert p.get("enum") == (list(k.choices) if k.choices else None)
        if isinstance(k.minimum, int | float):
            assert p.get("exclusiveMinimum" if k.open_min else "minimum") == k.minimum, k.name
        if isinstance(k.maximum, int | float):
            assert p.get("exclusiveMaximum" if k.open_max else "maximum") == k.maximum, k.name
    assert props["min-shards"]["maximum"] == 1024  # num-shards' own bound: JSON Schema cannot compare two keys
    assert props["dp-target-tpr"]["exclusiveMinimum"] == 0.0


def test_the_json_schema_takes_the_defaults_and_refuses_what_validate_refuses():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    assert list(validator.iter_errors(resolve().to_mapping())) == []
    for bad in ({"num-shards": 0}, {"rho": 1.5}, {"partition": "random"}, {"diffusion-width": 6},
                {"request": "xyz"}, {"bogus": 1}, {"slices": "4"}):
        assert list(validator.iter_errors(bad)), bad


# ---------------------------------------------------------------------- the generated reference pages
def _generate(tmp_path: Path) -> tuple[str, str, Path]:
    spec = importlib.util.spec_from_file_location("gen_reference", APP_DIR / "docs" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    schema = tmp_path / "schema.json"
    assert gen.main(["--out", str(tmp_path), "--schema", str(schema)]) == 0
    return (tmp_path / "config.md").read_text(), (tmp_path / "cli.md").read_text(), schema


def test_the_generated_config_page_lists_every_key_with_type_default_and_range(tmp_path):
    config, _, schema = _generate(tmp_path)
    assert json.loads(schema.read_text()) == json_schema()
    rows = {}
    for line in config.splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \| (\w+) \| `(.*)` \| (.+) \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert list(rows) == [k.name for k in KEYS]
    for k in KEYS:
        typ, default, values, meaning = rows[k.name]
        assert typ == k.type.__name__ and values.strip() and meaning.strip()
        parsed = tomllib.loads(f"v = {default}")["v"]
        assert parsed == k.default and type(parsed) is k.type, (k.name, default)
        if k.choices:
            assert values == "one of " + ", ".join(f"`{c}`" for c in k.choices)
        elif k.type in (int, float):
            assert values.replace("\\", "") == k.rule(), k.name
        if k.name.endswith("-options"):
            assert "(#plugin-options)" in meaning
    headings = re.findall(r"^## (.+)$", config, re.M)
    assert headings == [title for _, title in SECTIONS] + ["Plugin options"]
    assert "`strategy-options`" in config.split("## Plugin options")[1]  # the text of fairforget/plugins.py


def test_the_generated_cli_page_lists_every_command_and_argument(tmp_path):
    _, page, _ = _generate(tmp_path)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert re.findall(r"^## `fairforget (\w+)`$", page, re.M) == list(sub.choices)
    for name, command in sub.choices.items():
        section = page.split(f"## `fairforget {name}`")[1].split("\n## ")[0]
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in section, (name, option)
            if action.help and action.option_strings != ["-h", "--help"]:
                assert action.help.split(",")[0].split("(")[0].strip() in section.replace("\\", ""), (name, action.dest)
    assert "`RUN_DIR`" in page  # compare's positional argument


def test_the_committed_reference_pages_are_the_generated_ones(tmp_path):
    """The pages are committed (the docs build does not run the generator): an edit by hand, or a key or
    argument changed without regenerating them, fails here."""
    config, cli_md, _ = _generate(tmp_path)
    fix = "run `.venv/bin/python docs/gen_reference.py` (or make docs) and commit the pages"
    assert (APP_DIR / "docs" / "reference" / "config.md").read_text(encoding="utf-8") == config, fix
    assert (APP_DIR / "docs" / "reference" / "cli.md").read_text(encoding="utf-8") == cli_md, fix


# ---------------------------------------------------------------------- metrics.json's schema_version
def _metrics(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_read_metrics_takes_its_own_version_only(tmp_path):
    path = tmp_path / "runs" / "x" / "metrics.json"
    assert read_metrics(_metrics(path, {"schema_version": METRICS_SCHEMA_VERSION, "run": {}})) == {
        "schema_version": METRICS_SCHEMA_VERSION, "run": {}}
    old, new = METRICS_SCHEMA_VERSION - 1, METRICS_SCHEMA_VERSION + 1
    cases = [
        ({"schema_version": old}, f"{path}: schema_version {old}, this fairforget (0.1.0) reads "
                                  f"{METRICS_SCHEMA_VERSION}: re-run `fairforget simulate --config "
                                  f"{path.parent / 'config.toml'} --out NEW_DIR`"),
        ({"schema_version": new}, f"{path}: schema_version {new}, this fairforget (0.1.0) reads "
                                  f"{METRICS_SCHEMA_VERSION}: a newer fairforget wrote it; upgrade fairforget"),
        ({"schema_version": "1"}, f"{path}: no schema_version"),
        ({"schema_version": True}, f"{path}: no schema_version"),
        ({}, f"{path}: no schema_version"),
        ([1], f"{path}: no schema_version"),
        ('{"schema_version": 1,\n', f"{path}: not valid JSON (line 2: "),
    ]
    for data, message in cases:
        with pytest.raises(SchemaVersionError) as err:
            read_metrics(_metrics(path, data))
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert read_metrics(_metrics(path, {}), unversioned_ok=True) == {}  # RunDir.require_finished's quick check
    with pytest.raises(SchemaVersionError):
        read_metrics(_metrics(path, {"schema_version": new}), unversioned_ok=True)


@pytest.fixture
def old_run(tiny_cfg):
    """A finished run's files (no training: the commands refuse before it matters), its metrics.json
    of another schema_version."""
    cfg = tiny_cfg(audit=False)
    run = RunDir(cfg.out_path)
    run.write_config(cfg)
    run.models_dir.mkdir()
    _metrics(run.metrics_path, {"schema_version": METRICS_SCHEMA_VERSION + 1, "run": {}})
    return run


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv", [["audit"], ["forget", "--ids", "1"], ["forget", "--resume"], ["verify"]],
                         ids=lambda a: " ".join(a))
def test_the_commands_refuse_another_version_in_one_line_and_write_nothing(old_run, capsys, argv):
    before = _snapshot(old_run.path)
    code = cli.main([argv[0], "--run", str(old_run.path), *argv[1:]])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE
    assert err == (f"fairforget: error: {old_run.metrics_path}: schema_version {METRICS_SCHEMA_VERSION + 1}, this "
                   f"fairforget (0.1.0) reads {METRICS_SCHEMA_VERSION}: a newer fairforget wrote it; upgrade "
                   "fairforget to read it")
    assert _snapshot(old_run.path) == before


def test_the_run_folder_and_the_report_read_through_the_check(old_run):
    from fairforget.report import write_report

    other = f"schema_version {METRICS_SCHEMA_VERSION + 1}, "
    with pytest.raises(SchemaVersionError, match=other):
        old_run.metrics()
    with pytest.raises(SchemaVersionError, match=other):
        old_run.require_finished()
    with pytest.raises(SchemaVersionError, match=other):
        write_report(old_run.path)
    assert not old_run.report_path.exists()
    old_run.metrics_path.unlink()
    with pytest.raises(RunDirError, match="missing metrics.json"):
        old_run.require_finished()
