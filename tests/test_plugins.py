"""Plugins from anywhere, one mechanism (:mod:`fairforget.plugins`): an objective, an unlearner, an
attack and a dataset, each found by module path and by entry point (``importlib.metadata.entry_points``
replaced, as a package's ``[project.entry-points."fairforget.<kind>s"]`` would add them), used end to
end through the in-process grid where that is cheap, their options read from the one run-config key
of their kind, and every bad input one line naming the key and the plugin.

This module is itself an unlearner plugin (``NAME``, ``EXACT``, ``check``, ``unlearn`` below): a plugin
may be a module."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import pytest
import torch.nn.functional as F

import strategies
from clients.testing import set_task_identity
from fairforget import ledger
from fairforget.audit import AuditError, attack_class, build_attack, parse_attacks
from fairforget.audit.base import Attack
from fairforget.capacity import BudgetExceeded
from fairforget.config import ConfigError, resolve
from fairforget.data import DATASETS, DataBundle, load_dataset, shard_of
from fairforget.objectives import Objective, ObjectiveContext, build_objective, objective_class
from fairforget.plugins import Registry, parse_plugin_options
from fairforget.run import RunDir
from fairforget.unlearning import approximate, get_unlearner, is_exact, unlearn_params, unlearner
from strategies.shard_ensemble import ShardEnsemble
from tests.conftest import TINY, InProcessGrid, forget_request

HERE = __name__  # "tests.test_plugins"


# ---------------------------------------------------------------------- the plugins
class ScaledCrossEntropy(Objective):
    """Cross-entropy times ``scale``: records the options it was built and trained with."""

    name = "scaled-ce"
    options: ClassVar[dict[str, Any]] = {"scale": 1.0, "note": ""}
    used: ClassVar[list[float]] = []

    def loss(self, model, batch):
        ScaledCrossEntropy.used.append(self.ctx.options["scale"])
        return self.ctx.options["scale"] * F.cross_entropy(model(batch.x), batch.y)


class Forgetful:
    """An unlearner as an object: no change to the model beyond the SISA bookkeeping of the built-in
    approximate methods (:func:`approximate.approximate`); records the options it ran with."""

    options: ClassVar[dict[str, Any]] = {"passes": 1}

    def __init__(self, name: str, exact: bool) -> None:
        self.NAME, self.EXACT, self.seen = name, exact, []

    def check(self, shard, ids, params=None):
        approximate.check(self.NAME, shard, ids, params, dp_epochs=0)

    def unlearn(self, shard, ids, params=None):
        self.seen.append(dict(params.options) if params is not None else None)
        return approximate.approximate(self.NAME, lambda *_: {}, shard, ids, params, dp_epochs=0)


FORGETFUL = Forgetful("forgetful-test", exact=False)
RETRAINS = Forgetful("retrains-test", exact=True)  # declares itself exact (never run here)

# this module as an unlearner plugin
NAME = "module-test"
EXACT = False
options = {"passes": 1}  # noqa: N816 - the module's declared options


def check(shard, ids, params=None):
    FORGETFUL.check(shard, ids, params)


def unlearn(shard, ids, params=None):
    return FORGETFUL.unlearn(shard, ids, params)


class ScaledLoss(Attack):
    """The LOSS attack's score times ``temperature`` (> 0: the same ROC)."""

    name = "scaled-loss"
    options: ClassVar[dict[str, Any]] = {"temperature": 1.0}
    seen: ClassVar[list[float]] = []

    def scores(self, target, refs=None):
        ScaledLoss.seen.append(self.options["temperature"])
        p = target.cand_probs[np.arange(len(target.y)), target.y]
        return self.options["temperature"] * np.log(np.clip(p, 1e-12, None))


def small_digits(data_cfg) -> DataBundle:
    """The embedded digits, the training set cut to a ``keep`` fraction."""
    small_digits.seen.append(dict(data_cfg.dataset_options))
    bundle = DATASETS["biased-digits"](data_cfg)
    keep = int(len(bundle.train) * data_cfg.dataset_options["keep"])
    return dataclasses.replace(bundle, train=bundle.train.subset(np.arange(keep)))


small_digits.options = {"keep": 1.0}
small_digits.seen = []


def not_a_bundle(data_cfg):
    return {"train": []}


NOT_CALLABLE = 3
NO_EXACT = type("NoExact", (), {"NAME": "x", "check": staticmethod(check), "unlearn": staticmethod(unlearn)})


class AbstractObjective(Objective):  # no loss: not a plugin
    name = "abstract"


GROUPS = {"objective": "fairforget.objectives", "unlearner": "fairforget.unlearners",
          "attack": "fairforget.attacks", "dataset": "fairforget.datasets"}
PLUGINS = [("objective", "scaled-ce", f"{HERE}:ScaledCrossEntropy"),
           ("unlearner", "forgetful", f"{HERE}:FORGETFUL"),
           ("attack", "scaled-loss", f"{HERE}:ScaledLoss"),
           ("dataset", "small-digits", f"{HERE}:small_digits")]


def _entry_points(mp, *triples):
    """Installed plugins: (kind, name, value) each, as entry points of the kind's group."""
    import importlib.metadata as md

    eps = [md.EntryPoint(name=n, value=v, group=GROUPS[k]) for k, n, v in triples]
    real = md.entry_points  # other groups (torch's own plugins, loaded mid-training) as installed

    def entry_points(**params):
        if params.get("group") in GROUPS.values():
            return md.EntryPoints(e for e in eps if e.group == params["group"])
        return real(**params)

    mp.setattr(md, "entry_points", entry_points)


def _one_line(call, expected, error=ConfigError):
    with pytest.raises(error) as err:
        call()
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


# ---------------------------------------------------------------------- a run trained with a plugin objective
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run whose shards train with the objective an entry point names, with its options."""
    cfg = resolve({**TINY, "out-dir": str(tmp_path_factory.mktemp("plugins") / "run"), "audit": False, "slices": 1,
                   "objective": "scaled-ce", "objective-options": '{"scale": 2}'})
    from server.experiment import run_training

    set_task_identity()  # the autouse fixture is per test
    with pytest.MonkeyPatch.context() as mp:
        _entry_points(mp, *PLUGINS)
        ScaledCrossEntropy.used.clear()
        run_training(InProcessGrid(cfg), cfg)
        used = list(ScaledCrossEntropy.used)
    return cfg, used


def test_an_objective_plugin_trains_the_shards_with_its_options(trained, monkeypatch):
    cfg, used = trained
    assert used and set(used) == {2.0}  # the int 2 given for a float, read as 2.0, at every step of both shards
    assert len(RunDir(cfg.out_path).metrics()["shards"]) == 2
    _entry_points(monkeypatch, *PLUGINS)
    path = f"{HERE}:ScaledCrossEntropy"
    assert objective_class(path) is objective_class("scaled-ce") is ScaledCrossEntropy
    objective = build_objective(path, ObjectiveContext(10, options={"end-alpha": 1.0}), '{"note": "x"}')
    assert objective.ctx.options == {"end-alpha": 1.0, "scale": 1.0, "note": "x"}  # beside the flat keys


def test_an_unlearner_plugin_serves_a_forget_through_the_grid_charged_to_the_budget(trained, monkeypatch):
    """``fairforget forget --method forgetful --set unlearner-options=...``: the request's method and
    options travel to the owning node, the plugin runs there with them, and the deletion is approximate:
    the shard's deletion budget is charged, as for the built-in approximate methods."""
    from server.forget import run_forget

    cfg, _ = trained
    _entry_points(monkeypatch, *PLUGINS)
    request = {"unlearn-method": "forgetful", "unlearner-options": '{"passes": 3}'}
    victim = shard_of(cfg, load_dataset(cfg))[0].ids[:2].tolist()
    FORGETFUL.seen.clear()
    run_forget(InProcessGrid(cfg), resolve(cfg.to_mapping(), request), forget_request(victim, **request))
    assert FORGETFUL.seen == [{"passes": 3}]
    rows = [e for e in RunDir(cfg.out_path).ledger.entries() if e.get("shard") == 0]
    assert rows and rows[-1]["method"] == "forgetful-test" and rows[-1]["decision"] == ledger.APPROXIMATE
    assert rows[-1]["capacity_after"] == rows[-1]["capacity_before"] - 2


def test_an_unlearner_plugin_by_module_path_object_or_module(tiny_cfg, monkeypatch):
    assert unlearner(f"{HERE}:FORGETFUL").unlearn == FORGETFUL.unlearn
    assert get_unlearner(HERE) is unlearn and unlearner(HERE).name == "module-test"  # a module: no ":Attr"
    _entry_points(monkeypatch, *PLUGINS)
    assert get_unlearner("forgetful") == FORGETFUL.unlearn
    assert not is_exact("forgetful") and is_exact(f"{HERE}:RETRAINS") and is_exact("exact-sisa")
    cfg = tiny_cfg(**{"unlearn-method": "forgetful", "unlearner-options": '{"passes": 2}'})
    assert unlearn_params(cfg).options == {"passes": 2}
    assert unlearn_params(cfg, "exact-sisa").options == {}  # the exact fallback: not the plugin's options
    assert unlearn_params(cfg, HERE).options == {"passes": 1}  # not the config's method: its defaults


def test_the_budget_decision_follows_what_an_unlearner_declares(tiny_cfg):
    """An exact plugin is sent as asked and never charged; an approximate one is refused (or retrained)
    where the shard's budget is spent, exactly like the built-in finetune."""
    cfg = tiny_cfg(**{"capacity-policy": "refuse"})
    owners, shard_of_node, sizes = {101: list(range(2))}, {101: 0}, {0: 200}
    for method, decision in [(f"{HERE}:RETRAINS", ledger.EXACT_RETRAIN), (f"{HERE}:FORGETFUL", ledger.APPROXIMATE),
                             ("finetune", ledger.APPROXIMATE)]:
        strategy = ShardEnsemble.from_config(cfg, 10)
        [message] = strategy.configure_unlearn(owners, shard_of_node, sizes, method)
        assert strategy.planned()[0] == {"ids": [0, 1], "method": method, "decision": decision}
    big = {101: list(range(150))}
    for method in (f"{HERE}:FORGETFUL", "finetune"):
        with pytest.raises(BudgetExceeded):
            ShardEnsemble.from_config(cfg, 10).configure_unlearn(big, shard_of_node, sizes, method)
    strategy = ShardEnsemble.from_config(cfg, 10)
    strategy.configure_unlearn(big, shard_of_node, sizes, f"{HERE}:RETRAINS")
    assert strategy.planned()[0]["decision"] == ledger.EXACT_RETRAIN


def test_an_attack_plugin_in_the_audit_suite_and_a_site_audit(trained, monkeypatch, tmp_path):
    from fairforget.audit.site import site_audit
    from fairforget.audit.suite import run_audit
    from fairforget.sisa import SisaSettings

    cfg, _ = trained
    _entry_points(monkeypatch, *PLUGINS)
    assert attack_class("scaled-loss") is attack_class(f"{HERE}:ScaledLoss") is ScaledLoss
    audit_cfg = cfg.replace(audit_attacks="loss,scaled-loss", attack_options='{"scaled-loss": {"temperature": 3}}',
                            audit_references=0, audit_bootstrap=0)
    assert parse_attacks(audit_cfg.audit_attacks, audit_cfg.attack_options) == ["loss", "scaled-loss"]
    run = RunDir(cfg.out_path)
    bundle, states = load_dataset(cfg), run.load_models()
    ScaledLoss.seen.clear()
    privacy = run_audit(run, audit_cfg, bundle, states, deleted=set(), shards=False)
    got = privacy["targets"]["ensemble"]
    assert ScaledLoss.seen == [3.0] and got["scaled-loss"]["auc"] == pytest.approx(got["loss"]["auc"])
    from fairforget.model import load_model

    model = load_model(states[0], bundle.num_classes, cfg.model_width)
    site = site_audit({"shard": [model]}, shard_of(cfg, bundle)[0], bundle.heldout, attacks=["loss", "scaled-loss"],
                      settings=SisaSettings.from_config(cfg, bundle.num_classes), references=0, bootstrap=0,
                      seed=0, cache_dir=tmp_path, attack_options=audit_cfg.attack_options)
    assert site["targets"]["shard"]["scaled-loss"]["auc"] == pytest.approx(site["targets"]["shard"]["loss"]["auc"])
    assert build_attack("loss").options == {} and build_attack(f"{HERE}:ScaledLoss").options == {"temperature": 1.0}


def test_a_dataset_plugin_by_module_path_and_entry_point(monkeypatch):
    full = len(load_dataset(resolve({**TINY, "dataset": f"{HERE}:small_digits"})).train)
    _entry_points(monkeypatch, *PLUGINS)
    small_digits.seen.clear()
    half = load_dataset(resolve({**TINY, "dataset": "small-digits", "dataset-options": '{"keep": 0.5}'}))
    assert small_digits.seen == [{"keep": 0.5}] and len(half.train) == int(full * 0.5)  # options: a data key
    _one_line(lambda: load_dataset(resolve({**TINY, "dataset": f"{HERE}:not_a_bundle"})),
              f"config key 'dataset' = '{HERE}:not_a_bundle': its loader returned a dict, not a fairforget.data")


def test_an_unrelated_broken_plugin_breaks_nothing(monkeypatch):
    """Only the entry point asked for is imported: a broken or conflicting plugin of the group fails
    the runs that name it, not the others."""
    _entry_points(monkeypatch, ("objective", "broken", "nowhere.module:X"), ("objective", "twice", "a.b:C"),
                  ("objective", "twice", "d.e:F"), ("objective", "end", "a.b:C"), *PLUGINS)
    assert objective_class("cross-entropy").name == "cross-entropy"
    assert objective_class("scaled-ce") is ScaledCrossEntropy
    _one_line(lambda: objective_class("focal"),
              "config key 'objective' = 'focal': must be one of broken, cross-entropy, end, learned-mixin, rebias, "
              "rubi, scaled-ce, twice")


# ---------------------------------------------------------------------- bad input: one line, the key and the plugin
KINDS = {  # kind: (run-config key, resolve a name, a built-in name, an object of the wrong kind)
    "objective": ("objective", lambda n: build_objective(n, ObjectiveContext(10)), "rubi", f"{HERE}:AbstractObjective"),
    "unlearner": ("unlearn-method", get_unlearner, "finetune", f"{HERE}:NO_EXACT"),
    "attack": ("audit-attacks", attack_class, "loss", f"{HERE}:ScaledCrossEntropy"),
    "dataset": ("dataset", lambda n: load_dataset(resolve({**TINY, "dataset": n})), "celeba", f"{HERE}:NOT_CALLABLE"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_bad_plugin_is_one_line_naming_the_key_and_the_plugin(kind, monkeypatch):
    key, call, builtin, wrong = KINDS[kind]
    group = GROUPS[kind]
    cases = [
        ("nowhere.module:X", [], f"config key '{key}' = 'nowhere.module:X': cannot import it: ModuleNotFoundError"),
        (f"{HERE}:Missing", [], f"config key '{key}' = '{HERE}:Missing': cannot import it: AttributeError"),
        ("broken", [("broken", "nowhere.module:X")],
         f"config key '{key}' = 'broken': plugin 'nowhere.module:X' (entry point group {group}) fails to import: "
         "ModuleNotFoundError"),
        (wrong, [], f"config key '{key}' = '{wrong}': {wrong} is not a fairforget {kind}"),
        ("notone", [("notone", wrong)], f"config key '{key}' = 'notone': {wrong} is not a fairforget {kind}"),
        ("twice", [("twice", "a.b:C"), ("twice", "d.e:F")],
         f"config key '{key}': two plugins register 'twice': 'a.b:C' and 'd.e:F'"),
        (builtin, [(builtin, "a.b:C")], f"config key '{key}': plugin 'a.b:C' registers {builtin!r}, the name of a "
                                        f"built-in {kind}"),
    ]
    for name, plugins, expected in cases:
        _entry_points(monkeypatch, *[(kind, n, v) for n, v in plugins])
        _one_line(lambda name=name: call(name), expected)
    _entry_points(monkeypatch, (kind, "mine", "a.b:C"))
    if kind == "attack":  # an unknown attack: its own line, naming the choices
        _one_line(lambda: parse_attacks("loss,focal"), "config key 'audit-attacks': unknown attack(s): focal (have "
                  "confidence, entropy, lira-offline, lira-online, loss, mine, rmia)", AuditError)
    else:
        _one_line(lambda: call("nothing-here"), f"config key '{key}' = 'nothing-here': must be one of ")
        with pytest.raises(ConfigError, match="mine"):
            call("nothing-here")


OPTIONS = {  # kind: (run-config overrides choosing the plugin, options key, the given options -> the expected line)
    "objective": ({"objective": f"{HERE}:ScaledCrossEntropy"}, "objective-options", [
        ('{"scal": 2}', "config key 'objective-options': objective 'scaled-ce' has no option 'scal' (its options: "
                        "note, scale)"),
        ('{"scale": "2"}', "config key 'objective-options': option 'scale' of objective 'scaled-ce' = '2': "
                           "expected float")]),
    "unlearner": ({"unlearn-method": f"{HERE}:FORGETFUL"}, "unlearner-options", [
        ('{"pass": 2}', "config key 'unlearner-options': unlearner 'forgetful-test' has no option 'pass' (its "
                        "options: passes)"),
        ('{"passes": 2.5}', "config key 'unlearner-options': option 'passes' of unlearner 'forgetful-test' = 2.5: "
                            "expected int")]),
    "attack": ({"audit-attacks": f"loss,{HERE}:ScaledLoss"}, "attack-options", [
        (f'{{"{HERE}:ScaledLoss": {{"temp": 1}}}}', "config key 'attack-options': attack 'scaled-loss' has no "
                                                   "option 'temp' (its options: temperature)"),
        (f'{{"{HERE}:ScaledLoss": {{"temperature": true}}}}', "config key 'attack-options': option 'temperature' "
                                                             "of attack 'scaled-loss' = True: expected float"),
        ('{"loss": {"k": 1}}', "config key 'attack-options': attack 'loss' has no option 'k' (it takes none)"),
        ('{"rmia": {}}', "config key 'attack-options': 'rmia' is not a chosen attack (audit-attacks: loss, "
                         f"{HERE}:ScaledLoss)")]),
    "dataset": ({"dataset": f"{HERE}:small_digits"}, "dataset-options", [
        ('{"kep": 1}', f"config key 'dataset-options': dataset '{HERE}:small_digits' has no option 'kep' (its "
                       "options: keep)"),
        ('{"keep": "all"}', f"config key 'dataset-options': option 'keep' of dataset '{HERE}:small_digits' = "
                            "'all': expected float")]),
}


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_an_unknown_or_mistyped_option_is_refused_before_anything_trains(kind, tiny_cfg):
    """In the preflight every route runs (``strategies.check_config``: ``run_training`` refuses before it
    writes anything), and where the plugin is built."""
    from server.experiment import run_training

    chosen, key, cases = OPTIONS[kind]
    build = {
        "objective": lambda cfg: build_objective(cfg.objective, ObjectiveContext(10), cfg.objective_options),
        "unlearner": lambda cfg: unlearn_params(cfg),
        "attack": lambda cfg: [build_attack(n, cfg.attack_options, parse_attacks(cfg.audit_attacks))
                               for n in parse_attacks(cfg.audit_attacks)],
        "dataset": load_dataset,
    }[kind]
    for given, expected in cases:
        cfg = tiny_cfg(**chosen, **{key: given})
        _one_line(lambda cfg=cfg: run_training(InProcessGrid(cfg), cfg), expected)
        assert not cfg.out_path.exists()
        _one_line(lambda cfg=cfg: build(cfg), expected)


def test_options_of_a_plugin_not_installed_here_are_left_to_where_it_is_built(tiny_cfg):
    """The ServerApp's preflight checks what is installed in its process; a site's plugin that is not
    (deployment: installed at the sites only) is checked by each site when it builds it."""
    cfg = tiny_cfg(objective="site_only_package.objectives:Focal", **{"objective-options": '{"gamma": 2}'})
    strategies.check_config(strategies.strategy_class(cfg.strategy), cfg)  # not refused here
    _one_line(lambda: build_objective(cfg.objective, ObjectiveContext(10), cfg.objective_options),
              "config key 'objective' = 'site_only_package.objectives:Focal': cannot import it: ModuleNotFoundError")


def test_the_option_keys_take_json_objects_only(tiny_cfg):
    for key, value in [("objective-options", "[1]"), ("unlearner-options", "nope"), ("dataset-options", '"x"'),
                       ("attack-options", '{"loss": 1}')]:
        _one_line(lambda key=key, value=value: tiny_cfg(**{key: value}), f"config key '{key}' = {value!r}: must be")


def test_the_options_helper_and_the_registry_are_the_strategies_own():
    """One mechanism: the strategies' registry and option check are these."""
    assert isinstance(strategies.REGISTRY, Registry) and strategies.REGISTRY.group == "fairforget.strategies"
    assert parse_plugin_options("strategy-options", "strategy 'x'", {"a": 0.5, "b": [1]}, '{"a": 1}') == {"a": 1.0,
                                                                                                        "b": [1]}
    _one_line(lambda: parse_plugin_options("k", "dataset 'd'", {"a": 0.5}, {"a": False}),
              "config key 'k': option 'a' of dataset 'd' = False: expected float")
