"""Server strategies by name (run-config key ``strategy``).

Add one by writing ``strategies/<name>.py`` with a class that subclasses a Flower strategy and
:class:`strategies.base.FairforgetStrategy`, then registering it here. ``tests/test_strategies.py``
runs the shared contract against every entry.
"""

from __future__ import annotations

from strategies.base import FairforgetStrategy
from strategies.fedavg import FedAvgBaseline
from strategies.shard_ensemble import ShardEnsemble

STRATEGIES: dict[str, type[FairforgetStrategy]] = {
    ShardEnsemble.name: ShardEnsemble,
    FedAvgBaseline.name: FedAvgBaseline,
}

__all__ = ["STRATEGIES", "FairforgetStrategy", "FedAvgBaseline", "ShardEnsemble"]
