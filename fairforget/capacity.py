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

Assumptions (stated in the theorem and repeated in docs/explanation/deletion-capacity.md): the loss is
convex, L-Lipschitz and
lambda-strongly convex in the unlearned parameters, with an M-Lipschitz Hessian, and the learner
returns the (regularised) empirical risk minimiser. In this project that holds only for the linear
head (``SimpleConvNet.fc``) on fixed bottleneck features, which is why d counts the head's
parameters. For the whole network, or for the heuristic unlearners (fine-tune, NegGrad+, SCRUB, DEL),
the figure is a *heuristic budget*: an order of magnitude (c ~ 1) that caps how far a model may drift
from exact retraining before the shard is retrained exactly, not a certificate.

:class:`DeletionBudget` is the accountant: per shard a capacity and the deletions used since the
shard was last trained exactly; ``would_exceed`` is checked before a request, ``consume`` is called
for an approximate deletion, ``reset`` after an exact retrain. Like an Opacus accountant it is pure
accounting (``state_dict`` / ``load_state_dict``): the strategy that decides with it owns it
(``strategies/shard_ensemble.py``), and its caller saves it (``OUT/budget.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BOUNDS = ("newton", "dp")
POLICIES = ("retrain", "refuse")


class BudgetExceeded(ValueError):
    """A deletion that would spend more than a shard's remaining capacity; one line for the user."""

    def __init__(self, shard: int, remaining: int, capacity: int, needed: int, note: str = "") -> None:
        self.shard, self.remaining, self.capacity, self.needed = shard, remaining, capacity, needed
        super().__init__(f"shard {shard}: deletion capacity exhausted: {remaining} of {capacity} left, "
                         f"request needs {needed}{note}")


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
    def capacity_for(self, n: int, eps: float | None = None) -> int:
        """The capacity of a shard of ``n`` samples; ``eps`` overrides the budget's epsilon (a shard
        trained with DP-SGD: the DP baseline at the epsilon that shard has spent)."""
        return capacity(self.bound, self.eps if eps is None else eps, self.delta, n, self.d, self.c)

    def track(self, shard: int, n: int, eps: float | None = None) -> ShardBudget:
        """The shard's budget, opened with size ``n`` if the shard has none yet."""
        if shard not in self.shards:
            self.shards[shard] = ShardBudget(n=int(n), capacity=self.capacity_for(int(n), eps))
        return self.shards[shard]

    def remaining(self, shard: int) -> int:
        return self.shards[shard].remaining

    def would_exceed(self, shard: int, k: int) -> bool:
        """Whether ``k`` more approximate deletions exceed the shard's capacity."""
        b = self.shards[shard]
        return b.used + k > b.capacity

    def grant(self, shard: int, k: int) -> int:
        """How many of ``k`` wanted deletions fit in the shard's remaining capacity."""
        return max(0, min(int(k), self.remaining(shard)))

    def consume(self, shard: int, k: int) -> None:
        if self.would_exceed(shard, k):
            b = self.shards[shard]
            raise BudgetExceeded(shard, b.remaining, b.capacity, k)
        self.shards[shard].used += k

    def reset(self, shard: int, n: int, eps: float | None = None) -> None:
        """After an exact retrain on ``n`` samples: a fresh capacity, nothing used."""
        self.shards[shard] = ShardBudget(n=int(n), capacity=self.capacity_for(int(n), eps))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "bound": self.bound, "eps": self.eps, "delta": self.delta, "d": self.d, "c": self.c,
            "shards": {str(k): {"n": b.n, "capacity": b.capacity, "used": b.used}
                       for k, b in sorted(self.shards.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved budget, validated: its parameters must be this budget's (they are fixed when
        the run is created: a budget recomputed with other ones would let a request raise its own
        bound), and every shard's ``n``, ``capacity`` and ``used`` whole numbers with
        ``0 <= used <= capacity``. Anything else is a one-line :class:`BudgetStateError`; nothing of
        this budget changes then."""
        if not isinstance(state, Mapping):
            raise BudgetStateError("not a deletion budget (expected a JSON object)")
        missing = [k for k in ("bound", "eps", "delta", "d", "c", "shards") if k not in state]
        if missing:
            raise BudgetStateError(f"missing field(s) {', '.join(missing)}")
        saved = (state["bound"], _number(state, "eps"), _number(state, "delta"), _whole(state, "d"),
                 _number(state, "c"))
        mine = (self.bound, self.eps, self.delta, self.d, self.c)
        if saved != mine:
            names = ("bound", "eps", "delta", "d", "c")
            diff = ", ".join(f"{n} {a!r} (run: {b!r})" for n, a, b in zip(names, saved, mine, strict=True) if a != b)
            raise BudgetStateError(f"parameters differ from the run's: {diff}; the capacity parameters are fixed "
                                   "when the run is created")
        if not isinstance(state["shards"], Mapping):
            raise BudgetStateError("shards is not an object")
        shards = {}
        for k, v in state["shards"].items():
            if not (isinstance(k, str) and k.isdigit()) or not isinstance(v, Mapping):
                raise BudgetStateError(f"shard {k!r}: not a shard number with an object")
            n, cap, used = (_whole(v, f, f"shard {k}: ") for f in ("n", "capacity", "used"))
            if used > cap:
                raise BudgetStateError(f"shard {k}: used {used} is more than its capacity {cap}")
            shards[int(k)] = ShardBudget(n=n, capacity=cap, used=used)
        self.shards = shards


class BudgetStateError(ValueError):
    """A saved budget that cannot be trusted (a missing, negative or inconsistent field, or other
    parameters than the run's); one line for the user."""


def _whole(state: Mapping[str, Any], key: str, where: str = "") -> int:
    """``state[key]``, a whole number >= 0."""
    if key not in state:
        raise BudgetStateError(f"{where}missing field {key}")
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BudgetStateError(f"{where}{key} = {v!r} is not a whole number >= 0")
    return v


def _number(state: Mapping[str, Any], key: str) -> float:
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise BudgetStateError(f"{key} = {v!r} is not a number > 0")
    return float(v)


def head_parameters(bottleneck_dim: int, num_classes: int) -> int:
    """d of the linear head ``Linear(bottleneck_dim, num_classes)``: weights and biases."""
    return bottleneck_dim * num_classes + num_classes
