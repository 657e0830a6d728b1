"""Training objectives by name (run-config key ``objective``).

Add one by writing ``fairforget/objectives/<name>.py`` with an :class:`Objective` subclass (its
``loss(model, batch)``, and any trainable parts it owns as submodules) and registering it here;
``tests/test_training.py`` runs the shared contract against every entry. Hyper-parameters are
run-config keys listed in :data:`OPTION_KEYS` (defaults in ``pyproject.toml``); the SISA settings
pass them in :class:`ObjectiveContext` ``options``.

Or, without editing fairforget, from a package of your own (:mod:`fairforget.plugins`, installed at
every site): ``objective = "my_package.focal:Focal"``, or a name registered in the
``fairforget.objectives`` entry-point group. Such an objective declares ``options`` (name -> default),
set through the run-config key ``objective-options`` (a JSON object) and read from ``ctx.options``.

* ``cross-entropy``: vanilla;
* ``end``: EnD (Tartaglione et al. 2021), ``end-alpha``, ``end-beta``, ``end-refit-epochs``
  (its head refitted on the frozen bottleneck after training, :mod:`.head_refit`);
* ``learned-mixin``: Learned-Mixin + H (Clark et al. 2019), ``learned-mixin-entropy``;
* ``rubi``: RUBi (Cadene et al. 2019);
* ``rebias``: ReBias (Bahng et al. 2020), ``rebias-lambda``, ``rebias-lambda-g``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.cross_entropy import CrossEntropy
from fairforget.objectives.end import EnD
from fairforget.objectives.learned_mixin import LearnedMixin
from fairforget.objectives.rebias import ReBias
from fairforget.objectives.rubi import RUBi
from fairforget.plugins import Registry

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CrossEntropy, EnD, LearnedMixin, RUBi, ReBias)}

REGISTRY: Registry[type[Objective]] = Registry(
    "objective", "objective", OBJECTIVES,
    check=lambda obj: (isinstance(obj, type) and issubclass(obj, Objective) and not inspect.isabstract(obj)
                       and isinstance(getattr(obj, "name", None), str)),
    expected="a fairforget objective (a subclass of fairforget.objectives.Objective with a name and a loss)")

OPTION_KEYS = ("end-alpha", "end-beta", "end-refit-epochs", "learned-mixin-entropy", "rebias-lambda", "rebias-lambda-g")


def objective_options(cfg: Any) -> tuple[tuple[str, float], ...]:
    """The objectives' run-config keys and their values in ``cfg`` (a RunConfig)."""
    return tuple((k, float(getattr(cfg, k.replace("-", "_")))) for k in OPTION_KEYS)


def objective_class(name: str) -> type[Objective]:
    """The objective ``name`` names: built-in, ``package.module:Class`` or an installed plugin's entry
    point; a one-line ConfigError naming ``objective`` otherwise."""
    return REGISTRY.resolve(name)


def build_objective(name: str, ctx: ObjectiveContext, options: str | Mapping[str, Any] = "") -> Objective:
    """The objective ``name`` names (:func:`objective_class`), built with ``ctx``; ``options`` (the
    JSON text of ``objective-options``) are checked against what its class declares and added to
    ``ctx.options`` (every declared option, defaults filled in)."""
    cls = objective_class(name)
    parsed = REGISTRY.parse_options(cls.name, cls.options, options)
    if parsed:
        ctx = dataclasses.replace(ctx, options={**ctx.options, **parsed})
    return cls(ctx)


def check_objective_options(cfg: Any) -> None:
    """``objective-options`` against the run's objective, where it is installed (one line otherwise)."""
    cls = REGISTRY.find(cfg.objective)
    if cls is not None:
        REGISTRY.parse_options(cls.name, cls.options, cfg.objective_options)


__all__ = ["OBJECTIVES", "OPTION_KEYS", "REGISTRY", "CrossEntropy", "EnD", "LearnedMixin", "Objective",
           "ObjectiveContext", "RUBi", "ReBias", "build_objective", "check_objective_options", "objective_class",
           "objective_options"]
