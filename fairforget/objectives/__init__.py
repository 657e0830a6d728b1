"""Training objectives by name (run-config key ``objective``).

Add one by writing ``fairforget/objectives/<name>.py`` with an :class:`Objective` subclass (its
``loss(model, batch)``, and any trainable parts it owns as submodules) and registering it here;
``tests/test_training.py`` runs the shared contract against every entry.
"""

from __future__ import annotations

from fairforget.config import lookup
from fairforget.objectives.base import Objective, ObjectiveContext
from fairforget.objectives.cross_entropy import CrossEntropy

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (CrossEntropy,)}


def build_objective(name: str, ctx: ObjectiveContext) -> Objective:
    """The objective registered as ``name``; a one-line ConfigError naming ``objective`` otherwise."""
    return lookup("objective", name, OBJECTIVES)(ctx)


__all__ = ["OBJECTIVES", "CrossEntropy", "Objective", "ObjectiveContext", "build_objective"]
