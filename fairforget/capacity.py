"""Deletion capacity (Sekhari, Acharya, Kamath, Suresh, "Remember What You Want to Forget", NeurIPS
2021) and the per-shard deletion budget the server strategy keeps.

Deletion capacity ``m(eps, delta; d, n)`` is the largest number of deletions an (eps, delta)-unlearning
pair (learner, unlearner) can absorb while the expected excess population risk stays below a fixed
gamma (0.01). For n training samples and d parameters of the part that is unlearned:

* Newton-step unlearner (store the Hessian, one Newton correction per request, Gaussian noise)::

      m >= c n sqrt(eps) / (d ln(1 / delta)) ** (1/4)                       (bound "newton")

* any (eps, delta)-DP learner used as its own unlearner (the baseline)::

      m >= c n eps / sqrt(d ln(e ** eps / delta))                            (bound "dp")

* no unlearner can exceed ``c n`` (the upper bound, ``c < 1``); both values are capped there.

Assumptions (stated in the theorem and repeated in the README): the loss is convex, L-Lipschitz and
lambda-strongly convex in the unlearned parameters, with an M-Lipschitz Hessian, and the learner
returns the (regularised) empirical risk minimiser. In this project that holds only for the linear
head (``SimpleConvNet.fc``) on fixed bottleneck features, which is why d counts the head's
parameters. For the whole network, or for the heuristic unlearners (fine-tune, NegGrad+, SCRUB, DEL),
the figure is a *heuristic budget*: an order of magnitude (c ~ 1) that caps how far a model may drift
from exact retraining before the shard is retrained exactly, not a certificate.

:class:`DeletionBudget` is the accountant: per shard a capacity and the deletions used since the
shard was last trained exactly; ``would_exceed`` is checked before a request, ``consume`` is called
for an approximate deletion, ``reset`` after an exact retrain. It is saved with the run
(``OUT/budget.json``, atomic) and restored from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairforget.storage import atomic_write_json, read_json

BOUNDS = ("newton", "dp")
POLICIES = ("retrain", "refuse")


class BudgetExceeded(ValueError):
    """A deletion that would spend more than a shard's remaining capacity."""


def _check(eps: float, delta: float, n: int, d: int, c: float) -> None:
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n = {n}, d = {d}")
    if c <= 0:
        raise ValueError(f"c must be > 0, got {c}")


def newton_capacity(eps: float, delta: float, n: int, d: int, c: float = 1.0) -> int:
    """``floor(c n sqrt(eps) / (d ln(1/delta))^(1/4))``, capped at ``floor(c n)``.

    >>> newton_capacity(1.0, 1e-5, 5000, 5130)   # a 5,130-parameter linear head
    320
    """
    _check(eps, delta, n, d, c)
    m = c * n * math.sqrt(eps) / (d * math.log(1.0 / delta)) ** 0.25
    return int(math.floor(min(m, c * n)))


def dp_capacity(eps: float, delta: float, n: int, d: int, c: float = 1.0) -> int:
    """``floor(c n eps / sqrt(d ln(e^eps / delta)))``, capped at ``floor(c n)``.

    >>> dp_capacity(1.0, 1e-5, 5000, 5130)
    19
    """
    _check(eps, delta, n, d, c)
    m = c * n * eps / math.sqrt(d * (eps - math.log(delta)))  # ln(e^eps / delta) = eps - ln(delta)
    return int(math.floor(min(m, c * n)))


CAPACITY = {"newton": newton_capacity, "dp": dp_capacity}


def capacity(bound: str, eps: float, delta: float, n: int, d: int, c: float = 1.0) -> int:
    if bound not in CAPACITY:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    return CAPACITY[bound](eps, delta, n, d, c)


@dataclass
class ShardBudget:
    n: int  # shard size when it was last trained exactly
    capacity: int
    used: int = 0

    @property
    def remaining(self) -> int:
        return max(self.capacity - self.used, 0)


@dataclass
class DeletionBudget:
    """Per-shard deletion budget (an accountant: check, consume, reset, save, restore)."""

    bound: str
    eps: float
    delta: float
    d: int
    c: float = 1.0
    shards: dict[int, ShardBudget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        capacity(self.bound, self.eps, self.delta, 0, self.d, self.c)  # validates every parameter

    # ------------------------------------------------------------------ accounting
    def capacity_for(self, n: int) -> int:
        return capacity(self.bound, self.eps, self.delta, n, self.d, self.c)

    def track(self, shard: int, n: int) -> ShardBudget:
        """The shard's budget, opened with size ``n`` if the shard has none yet."""
        if shard not in self.shards:
            self.shards[shard] = ShardBudget(n=int(n), capacity=self.capacity_for(int(n)))
        return self.shards[shard]

    def remaining(self, shard: int) -> int:
        return self.shards[shard].remaining

    def would_exceed(self, shard: int, k: int) -> bool:
        """Whether ``k`` more approximate deletions exceed the shard's capacity."""
        b = self.shards[shard]
        return b.used + k > b.capacity

    def consume(self, shard: int, k: int) -> None:
        if self.would_exceed(shard, k):
            b = self.shards[shard]
            raise BudgetExceeded(f"shard {shard}: deletion capacity exhausted: {b.remaining} of {b.capacity} "
                                 f"left, request needs {k}")
        self.shards[shard].used += k

    def reset(self, shard: int, n: int) -> None:
        """After an exact retrain on ``n`` samples: a fresh capacity, nothing used."""
        self.shards[shard] = ShardBudget(n=int(n), capacity=self.capacity_for(int(n)))

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "bound": self.bound, "eps": self.eps, "delta": self.delta, "d": self.d, "c": self.c,
            "shards": {str(k): {"n": b.n, "capacity": b.capacity, "used": b.used}
                       for k, b in sorted(self.shards.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeletionBudget:
        budget = cls(str(data["bound"]), float(data["eps"]), float(data["delta"]), int(data["d"]), float(data["c"]))
        budget.shards = {int(k): ShardBudget(int(v["n"]), int(v["capacity"]), int(v["used"]))
                         for k, v in data["shards"].items()}
        return budget

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load_or_new(cls, path: Path, bound: str, eps: float, delta: float, d: int, c: float = 1.0) -> DeletionBudget:
        """The budget saved at ``path``, or a new one. If the saved parameters differ from these (the
        run config changed), capacities are recomputed with the new parameters; deletions already
        used are kept."""
        fresh = cls(bound, eps, delta, d, c)
        if not Path(path).is_file():
            return fresh
        saved = cls.from_json(read_json(Path(path)))
        if (saved.bound, saved.eps, saved.delta, saved.d, saved.c) == (bound, eps, delta, d, c):
            return saved
        for shard, b in saved.shards.items():
            fresh.shards[shard] = ShardBudget(n=b.n, capacity=fresh.capacity_for(b.n), used=b.used)
        return fresh


def head_parameters(bottleneck_dim: int, num_classes: int) -> int:
    """d of the linear head ``Linear(bottleneck_dim, num_classes)``: weights and biases."""
    return bottleneck_dim * num_classes + num_classes
