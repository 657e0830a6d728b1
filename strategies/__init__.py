"""Server strategies by name (run-config key ``strategy``).

Add one by writing ``strategies/<name>.py`` with a class that subclasses a Flower strategy and
:class:`strategies.base.FairforgetStrategy`, then registering it here. ``tests/test_strategies.py``
runs the shared contract against every entry.
"""

from __future__ import annotations

from typing import Any

from fairforget.config import lookup
from strategies.base import FairforgetStrategy
from strategies.fedavg import FedAvgBaseline
from strategies.shard_ensemble import ShardEnsemble

STRATEGIES: dict[str, type[FairforgetStrategy]] = {
    ShardEnsemble.name: ShardEnsemble,
    FedAvgBaseline.name: FedAvgBaseline,
}


def strategy_class(name: str) -> type[FairforgetStrategy]:
    """The strategy registered as ``name``; a one-line ConfigError naming ``strategy`` otherwise."""
    return lookup("strategy", name, STRATEGIES)


def build_strategy(cfg: Any, num_classes: int) -> FairforgetStrategy:
    """The run's strategy (``cfg.strategy``), built from its config."""
    return strategy_class(cfg.strategy).from_config(cfg, num_classes)


__all__ = ["STRATEGIES", "FairforgetStrategy", "FedAvgBaseline", "ShardEnsemble", "build_strategy", "strategy_class"]
