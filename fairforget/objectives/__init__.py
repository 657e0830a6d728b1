"""Training objectives by name (run-config key ``objective``).

Add one by writing ``fairforget/objectives/<name>.py`` with an :class:`Objective` subclass (its
``loss(model, batch)``, and any trainable parts it owns as submodules) and registering it here;
``tests/test_training.py`` runs the shared contract against every entry. Hyper-parameters are
run-config keys listed in :data:`OPTION_KEYS` (defaults in ``pyproject.toml``); the SISA settings
pass them in :class:`ObjectiveContext` ``options``.

* ``cross-entropy``: vanilla;
* ``end``: EnD (Tartaglione et al. 2021), ``end-alpha``, ``end-beta``, ``end-refit-epochs``
  (its head refitted on the frozen bottleneck after training, :mod:`.head_refit`);
* ``learned-mixin``: Learned-Mixin + H (Clark et al. 2019), ``learned-mixin-entropy``;
* ``rubi``: RUBi (Cadene et al. 2019);
* ``rebias``: ReBias (Bahng et al. 2020), ``rebias-lambda``, ``rebias-lambda-g``.
"""

from __future__ import annotations

from typing import Any

from fairforget.config import lookup
from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.cross_entropy import CrossEntropy
from fairforget.objectives.end import EnD
from fairforget.objectives.learned_mixin import LearnedMixin
from fairforget.objectives.rebias import ReBias
from fairforget.objectives.rubi import RUBi

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CrossEntropy, EnD, LearnedMixin, RUBi, ReBias)}

OPTION_KEYS = ("end-alpha", "end-beta", "end-refit-epochs", "learned-mixin-entropy", "rebias-lambda", "rebias-lambda-g")


def objective_options(cfg: Any) -> tuple[tuple[str, float], ...]:
    """The objectives' run-config keys and their values in ``cfg`` (a RunConfig)."""
    return tuple((k, float(getattr(cfg, k.replace("-", "_")))) for k in OPTION_KEYS)


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    """The objective registered as ``name``; a one-line ConfigError naming ``objective`` otherwise."""
    return lookup("objective", name, OBJECTIVES)(ctx)


__all__ = ["OBJECTIVES", "OPTION_KEYS", "CrossEntropy", "EnD", "LearnedMixin", "Objective", "ObjectiveContext",
           "RUBi", "ReBias", "build_objective", "objective_options"]
