"""Server strategies by name (run-config key ``strategy``).

Add one by writing ``strategies/<name>.py`` with a class that subclasses a Flower strategy and
:class:`strategies.base.FairforgetStrategy`, declaring its capabilities there (``keeps_shard_models``,
``exact_unlearning``, ``forget_refusal``, ``dp_mechanism``, ``supports_augment``, ``predictor()``: the
framework asks these, never the name), then registering it here. ``tests/test_strategies.py`` runs
the contract suite (:mod:`server.testing`, chosen by those capabilities) against every entry.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from fairforget.config import ConfigError, lookup
from strategies.base import FairforgetStrategy
from strategies.fedavg import FedAvgBaseline
from strategies.shard_ensemble import ShardEnsemble

STRATEGIES: dict[str, type[FairforgetStrategy]] = {
    ShardEnsemble.name: ShardEnsemble,
    FedAvgBaseline.name: FedAvgBaseline,
}


ENTRY_POINT_GROUP = "fairforget.strategies"  # a package's strategies: [project.entry-points."fairforget.strategies"]


def strategy_class(name: str) -> type[FairforgetStrategy]:
    """The strategy ``name`` names: a built-in one (:data:`STRATEGIES`), one a package installed where
    the ServerApp runs registers in the ``fairforget.strategies`` entry-point group, or
    ``"package.module:Class"``; a one-line ConfigError naming ``strategy`` (and the plugin) otherwise."""
    if ":" in name:
        return _checked(name, _import(name), name)
    plugins = _plugins()  # first: a plugin that takes a built-in name is refused, never silently shadowed
    if name in STRATEGIES:
        return STRATEGIES[name]
    if name in plugins:
        ep = plugins[name]
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a plugin is one line
            raise ConfigError(f"config key 'strategy' = {name!r}: plugin {ep.value!r} (entry point group "
                              f"{ENTRY_POINT_GROUP}) fails to import: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        return _checked(name, obj, ep.value)
    return lookup("strategy", name, {**STRATEGIES, **plugins})


def _import(path: str) -> Any:
    """The object ``package.module:Attr`` names; one-line ConfigError if it cannot be imported."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - a missing module, a failing import, a missing class
        raise ConfigError(f"config key 'strategy' = {path!r}: cannot import it: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return obj


def _checked(name: str, obj: Any, origin: str) -> type[FairforgetStrategy]:
    if not (isinstance(obj, type) and issubclass(obj, FairforgetStrategy)):
        raise ConfigError(f"config key 'strategy' = {name!r}: {origin} is not a fairforget strategy (a subclass of "
                          "strategies.base.FairforgetStrategy)")
    return obj


def _plugins() -> dict[str, Any]:
    """The ``fairforget.strategies`` entry points by name; a name two plugins (or a plugin and a built-in
    strategy) register is a one-line ConfigError naming both."""
    out: dict[str, Any] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in STRATEGIES:
            raise ConfigError(f"config key 'strategy': plugin {ep.value!r} registers {ep.name!r}, the name of a "
                              "built-in strategy")
        if ep.name in out and out[ep.name].value != ep.value:
            raise ConfigError(f"config key 'strategy': two plugins register {ep.name!r}: {out[ep.name].value!r} "
                              f"and {ep.value!r}")
        out[ep.name] = ep
    return out


def build_strategy(cfg: Any, num_classes: int) -> FairforgetStrategy:
    """The run's strategy (``cfg.strategy``), built from its config once :func:`check_config` passes."""
    cls = strategy_class(cfg.strategy)
    check_config(cls, cfg)
    return cls.from_config(cfg, num_classes)


def refusal(cls: Any, name: str) -> str:
    """The one line ``forget`` refuses a strategy without exact unlearning with: its declared reason
    (``forget_refusal``) and the registered strategies that do support it."""
    able = ", ".join(n for n, c in sorted(STRATEGIES.items()) if c.exact_unlearning) or "none registered"
    return (f"strategy '{name}' does not support exact unlearning ({cls.forget_refusal}); "
            f"exact unlearning needs {able}")


def check_config(cls: type[FairforgetStrategy], cfg: Any) -> None:
    """What the run config asks of the strategy, against what the class declares (its capabilities);
    a one-line ConfigError naming the key otherwise."""
    cls.parse_options(cfg.strategy_options)  # unknown or mistyped strategy-options
    if cfg.augment and not cls.supports_augment:
        able = ", ".join(f'"{n}"' for n, c in sorted(STRATEGIES.items()) if c.supports_augment) or "none registered"
        raise ConfigError(f"config key 'augment' = true needs a strategy that keeps shard models to unlearn from "
                          f"(strategy = {able}), not {cfg.strategy!r}")
    if cfg.dp and cls.dp_mechanism is None:
        raise ConfigError(f"config key 'dp' = true: strategy {cfg.strategy!r} declares no DP mechanism")
    if cfg.dp and cls.dp_mechanism == "dp-sgd":
        from fairforget.objectives import OBJECTIVES

        objective = OBJECTIVES.get(cfg.objective)  # an unknown name is refused by the registry, where used
        if objective is not None and not objective.per_sample:
            raise ConfigError(f"objective {cfg.objective!r} couples the samples of a batch, so DP-SGD's "
                              "per-sample clipping bounds no sample's influence: use it without dp, or with a "
                              "strategy whose dp is user-level")


__all__ = ["STRATEGIES", "FairforgetStrategy", "FedAvgBaseline", "ShardEnsemble", "build_strategy", "check_config",
           "refusal", "strategy_class"]
