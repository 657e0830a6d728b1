import tomllib

import pytest

from fairforget.config import PYPROJECT, ConfigError, RunConfig, load_defaults, parse_ids, parse_set, read_toml, resolve


def test_dataclass_has_exactly_the_pyproject_keys():
    defaults = load_defaults()
    cfg = resolve()
    assert set(cfg.to_mapping()) == set(defaults)
    assert cfg.to_mapping() == {k: (float(v) if isinstance(getattr(cfg, k.replace("-", "_")), float) else v)
                                for k, v in defaults.items()}


def test_flower_reads_the_same_table():
    with PYPROJECT.open("rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    assert app["config"] == load_defaults()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"bogus": 1}, "unknown config key(s): bogus"),
    ({"num-shards": 0}, "'num-shards' = 0: must be in [1, 1024]"),
    ({"rho": 1.5}, "'rho' = 1.5: must be in [0, 1]"),
    ({"rho": "high"}, "'rho' = 'high': expected float, got str"),
    ({"slices": 2.5}, "'slices' = 2.5: expected int, got float"),
    ({"num-shards": True}, "expected int, got bool"),
    ({"heldout-fraction": 0.45, "test-fraction": 0.45}, "at least 20% for training"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_int_given_for_float_is_accepted():
    assert resolve({"rho": 1}).rho == 1.0


def test_parse_set_types():
    assert parse_set(["num-shards=8", "rho=0.5", "dataset=celeba", 'out-dir="a b"', "x=true"]) == {
        "num-shards": 8, "rho": 0.5, "dataset": "celeba", "out-dir": "a b", "x": True}
    with pytest.raises(ConfigError):
        parse_set(["novalue"])


def test_parse_ids():
    assert parse_ids("3, 17,42\n5") == [3, 17, 42, 5]
    assert parse_ids("") == []
    for bad in ("3,-1", "a", "3,3"):
        with pytest.raises(ConfigError):
            parse_ids(bad)


def test_read_toml_variants(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('num-shards = 3\nrho = 0.9\n')
    assert read_toml(flat) == {"num-shards": 3, "rho": 0.9}
    nested = tmp_path / "nested.toml"
    nested.write_text('[tool.flwr.app.config]\nslices = 2\n')
    assert read_toml(nested) == {"slices": 2}
    broken = tmp_path / "broken.toml"
    broken.write_text("num-shards = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(broken)
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "missing.toml")


def test_from_mapping_requires_every_key():
    mapping = resolve().to_mapping()
    del mapping["seed"]
    with pytest.raises(ConfigError, match="missing config key"):
        RunConfig.from_mapping(mapping)


def test_registered_names_are_checked_by_their_registries():
    """config.py imports no registry; each registry gives the same one-line error where it is used."""
    from fairforget.data import load_dataset
    from fairforget.objectives import ObjectiveContext, build_objective
    from fairforget.unlearning import get_unlearner
    from strategies import build_strategy

    cases = [
        (lambda: build_strategy(resolve({"strategy": "fedsgd"}), 10), "'strategy' = 'fedsgd': must be one of fedavg"),
        (lambda: build_objective("focal", ObjectiveContext(10)), "'objective' = 'focal': must be one of cross-entropy"),
        (lambda: get_unlearner("forgetful"), "'unlearn-method' = 'forgetful': must be one of del, exact-sisa"),
        (lambda: load_dataset(resolve({"dataset": "mnist-9"})), "'dataset' = 'mnist-9': must be one of biased-digits"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)
