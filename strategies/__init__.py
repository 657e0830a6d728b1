"""Server strategies by name (run-config key ``strategy``).

Add one by writing ``strategies/<name>.py`` with a class that subclasses a Flower strategy and
:class:`strategies.base.FairforgetStrategy`, declaring its capabilities there (``keeps_shard_models``,
``exact_unlearning``, ``forget_refusal``, ``dp_mechanism``, ``supports_augment``, ``predictor()``: the
framework asks these, never the name), then registering it here. ``tests/test_strategies.py`` runs
the contract suite (:mod:`server.testing`, chosen by those capabilities) against every entry.
"""

from __future__ import annotations

from typing import Any

from fairforget.config import ConfigError
from fairforget.plugins import Registry, check_options
from strategies.base import FairforgetStrategy
from strategies.fedavg import FedAvgBaseline
from strategies.shard_ensemble import ShardEnsemble

STRATEGIES: dict[str, type[FairforgetStrategy]] = {
    ShardEnsemble.name: ShardEnsemble,
    FedAvgBaseline.name: FedAvgBaseline,
}


ENTRY_POINT_GROUP = "fairforget.strategies"  # a package's strategies: [project.entry-points."fairforget.strategies"]

REGISTRY: Registry[type[FairforgetStrategy]] = Registry(
    "strategy", "strategy", STRATEGIES, group=ENTRY_POINT_GROUP,
    check=lambda obj: isinstance(obj, type) and issubclass(obj, FairforgetStrategy),
    expected="a fairforget strategy (a subclass of strategies.base.FairforgetStrategy)")


def strategy_class(name: str) -> type[FairforgetStrategy]:
    """The strategy ``name`` names: a built-in one (:data:`STRATEGIES`), one a package installed where
    the ServerApp runs registers in the ``fairforget.strategies`` entry-point group, or
    ``"package.module:Class"``; a one-line ConfigError naming ``strategy`` (and the plugin) otherwise
    (:class:`fairforget.plugins.Registry`, the mechanism every kind of plugin shares)."""
    return REGISTRY.resolve(name)


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
    check_options(cfg)  # the other plugins' options (objective, unlearner, dataset, attacks), installed here
    if cfg.augment and not cls.supports_augment:
        able = ", ".join(f'"{n}"' for n, c in sorted(STRATEGIES.items()) if c.supports_augment) or "none registered"
        raise ConfigError(f"config key 'augment' = true needs a strategy that keeps shard models to unlearn from "
                          f"(strategy = {able}), not {cfg.strategy!r}")
    if cfg.dp and cls.dp_mechanism is None:
        raise ConfigError(f"config key 'dp' = true: strategy {cfg.strategy!r} declares no DP mechanism")
    if cfg.dp and cls.dp_mechanism == "dp-sgd":
        from fairforget.objectives import REGISTRY as OBJECTIVES

        objective = OBJECTIVES.find(cfg.objective)  # not installed here: refused at the site, by its training
        if objective is not None and not objective.per_sample:
            raise ConfigError(f"objective {cfg.objective!r} couples the samples of a batch, so DP-SGD's "
                              "per-sample clipping bounds no sample's influence: use it without dp, or with a "
                              "strategy whose dp is user-level")


__all__ = ["ENTRY_POINT_GROUP", "REGISTRY", "STRATEGIES", "FairforgetStrategy", "FedAvgBaseline", "ShardEnsemble",
           "build_strategy", "check_config", "refusal", "strategy_class"]
