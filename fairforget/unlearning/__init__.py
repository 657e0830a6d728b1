"""Unlearning methods by name (run-config key ``unlearn-method``; ``fairforget forget --method``).

Each module exposes ``NAME``, ``check(shard, ids, params=None)`` (every refusal, raised with nothing
written: a node runs it before it tombstones the ids) and ``unlearn(shard, ids, params=None) ->
UnlearnResult`` (``params``: :class:`approximate.UnlearnParams`). ``exact-sisa`` (:mod:`.exact`) retrains the shard
from its last clean checkpoint; it is the only method whose result equals retraining from scratch.
The others are approximate (one file each; they share the SISA bookkeeping of :mod:`.approximate`)
and spend the shard's deletion budget (:mod:`fairforget.capacity`): ``finetune`` (on the retained
data), ``neggrad`` (NegGrad+), ``scrub`` (SCRUB), ``newton`` (noisy Newton step on the linear head,
certified in the convex case) and ``del`` (DEL-style localised reset and fine-tune).
"""

from __future__ import annotations

from collections.abc import Callable

from fairforget.config import lookup
from fairforget.unlearning import del_reset, exact, finetune, neggrad, newton, scrub
from fairforget.unlearning.result import UnlearnResult

EXACT = exact.NAME
UNLEARNERS: dict[str, Callable[..., UnlearnResult]] = {
    m.NAME: m.unlearn for m in (exact, finetune, neggrad, scrub, newton, del_reset)
}
CHECKS: dict[str, Callable[..., None]] = {
    m.NAME: m.check for m in (exact, finetune, neggrad, scrub, newton, del_reset)
}


def get_unlearner(name: str) -> Callable[..., UnlearnResult]:
    """The unlearner registered as ``name``; a one-line ConfigError naming ``unlearn-method`` otherwise."""
    return lookup("unlearn-method", name, UNLEARNERS)


def get_check(name: str) -> Callable[..., None]:
    """The pre-check of the unlearner ``name`` (``check(shard, ids, params)``); a one-line ConfigError
    naming ``unlearn-method`` for an unknown method."""
    return lookup("unlearn-method", name, CHECKS)


__all__ = ["CHECKS", "EXACT", "UNLEARNERS", "UnlearnResult", "get_check", "get_unlearner"]
