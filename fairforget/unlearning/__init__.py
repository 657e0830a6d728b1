"""Unlearning methods by name (run-config key ``unlearn-method``; ``fairforget forget --method``).

Each module exposes ``NAME``, ``check(shard, ids, params=None)`` (every refusal, raised with nothing
written: a node runs it before it tombstones the ids) and ``unlearn(shard, ids, params=None) ->
UnlearnResult`` (``params``: :class:`approximate.UnlearnParams`). ``exact-sisa`` (:mod:`.exact`) retrains the shard
from its last clean checkpoint; it is the only method whose result equals retraining from scratch.
The others are approximate (one file each; they share the SISA bookkeeping of :mod:`.approximate`)
and spend the shard's deletion budget (:mod:`fairforget.capacity`): ``finetune`` (on the retained
data), ``neggrad`` (NegGrad+), ``scrub`` (SCRUB), ``newton`` (noisy Newton step on the linear head,
certified in the convex case), ``del`` (DEL-style localised reset and fine-tune) and ``rem`` (REM,
redirection of corrupted data to neurons added at unlearning time and then discarded; its options
through ``unlearner-options``).

Or, without editing fairforget, from a package of your own (:mod:`fairforget.plugins`; installed at
every site and where the ServerApp runs): ``unlearn-method = "my_package.my_method"`` (a module) or
``"my_package.my_method:METHOD"`` (an object), or a name registered in the ``fairforget.unlearners``
entry-point group. A plugin exposes ``NAME``, ``check``, ``unlearn`` as above and declares ``EXACT``:
True only if its result equals retraining the shard from scratch without the ids (the deletion then
resets the shard's deletion budget, like ``exact-sisa``); False, and every deletion it serves is
charged to the budget (refused or retrained exactly when spent, ``capacity-policy``), like the
built-in approximate methods, whose bookkeeping (:func:`approximate.approximate`) it should share.
Its own parameters: ``options`` (name -> default), set through ``unlearner-options`` (a JSON object),
in ``params.options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fairforget.plugins import Registry, declared_options
from fairforget.unlearning import del_reset, exact, finetune, neggrad, newton, rem, scrub
from fairforget.unlearning.approximate import UnlearnParams
from fairforget.unlearning.result import UnlearnResult

EXACT = exact.NAME
UNLEARNERS: dict[str, Callable[..., UnlearnResult]] = {
    m.NAME: m.unlearn for m in (exact, finetune, neggrad, scrub, newton, del_reset, rem)
}
CHECKS: dict[str, Callable[..., None]] = {
    m.NAME: m.check for m in (exact, finetune, neggrad, scrub, newton, del_reset, rem)
}


@dataclass(frozen=True)
class Unlearner:
    """One unlearning method as the registry gives it: its ``check`` and ``unlearn``, whether it is
    exact (its result equals retraining without the ids) and the options it declares."""

    name: str
    check: Callable[..., None]
    unlearn: Callable[..., UnlearnResult]
    exact: bool
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, plugin: Any) -> Unlearner:
        return cls(str(plugin.NAME), plugin.check, plugin.unlearn, bool(plugin.EXACT), declared_options(plugin))


def _is_unlearner(obj: Any) -> bool:
    return (isinstance(getattr(obj, "NAME", None), str) and callable(getattr(obj, "check", None))
            and callable(getattr(obj, "unlearn", None)) and isinstance(getattr(obj, "EXACT", None), bool))


REGISTRY: Registry[Unlearner] = Registry(
    "unlearner", "unlearn-method",
    {m.NAME: Unlearner(m.NAME, m.check, m.unlearn, m is exact) for m in (exact, finetune, neggrad, scrub, newton,
                                                                          del_reset)}
    | {rem.NAME: Unlearner.of(rem)},  # REM declares options (unlearner-options)
    check=_is_unlearner, adapt=Unlearner.of, modules=True,
    expected=("a fairforget unlearner (a module or object with NAME, EXACT = True or False, "
              "check(shard, ids, params=None) and unlearn(shard, ids, params=None))"))


def unlearner(name: str) -> Unlearner:
    """The unlearning method ``name`` names: built-in, ``package.module[:Attr]`` or an installed
    plugin's entry point; a one-line ConfigError naming ``unlearn-method`` otherwise."""
    return REGISTRY.resolve(name)


def get_unlearner(name: str) -> Callable[..., UnlearnResult]:
    """The ``unlearn`` of the method ``name`` (:func:`unlearner`)."""
    return unlearner(name).unlearn


def get_check(name: str) -> Callable[..., None]:
    """The pre-check of the unlearner ``name`` (``check(shard, ids, params)``); a one-line ConfigError
    naming ``unlearn-method`` for an unknown method."""
    return unlearner(name).check


def is_exact(name: str) -> bool:
    """Whether the method ``name`` is exact (a deletion it serves resets the shard's deletion budget)
    or approximate (charged to it)."""
    return unlearner(name).exact


def unlearn_params(cfg: Any, method: str | None = None) -> UnlearnParams:
    """The parameters a deletion by ``method`` (default: the config's ``unlearn-method``) runs with:
    the flat keys (:meth:`UnlearnParams.from_config`) and, in ``options``, every option the method
    declares, from ``unlearner-options`` when ``method`` is the config's method (another one, the
    exact fallback of a spent budget, gets its defaults)."""
    method = method or cfg.unlearn_method
    chosen = unlearner(method)
    given = cfg.unlearner_options if method == cfg.unlearn_method else ""
    options = REGISTRY.parse_options(chosen.name, chosen.options, given)
    return dataclasses.replace(UnlearnParams.from_config(cfg), options=options)


def check_unlearner_options(cfg: Any) -> None:
    """``unlearner-options`` against the run's ``unlearn-method``, where it is installed."""
    found = REGISTRY.find(cfg.unlearn_method)
    if found is not None:
        REGISTRY.parse_options(found.name, found.options, cfg.unlearner_options)


__all__ = ["CHECKS", "EXACT", "REGISTRY", "UNLEARNERS", "UnlearnResult", "Unlearner", "check_unlearner_options",
           "get_check", "get_unlearner", "is_exact", "unlearn_params", "unlearner"]
