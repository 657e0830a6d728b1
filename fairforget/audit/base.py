"""The contract of a membership-inference attack.

An attack turns the target model's softmax outputs on the candidates (and, for reference-based
attacks, the reference models' outputs) into one score per candidate; higher means "member".
``reference_mode`` says which references it needs: none, ``offline`` (trained without any
candidate) or ``online`` (each candidate IN for about half of them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fairforget.audit.references import ReferenceOutputs


class AuditError(ValueError):
    """An audit that cannot run as asked; the message is one line for the user."""


@dataclass
class TargetOutputs:
    cand_probs: np.ndarray  # (N, K) target's softmax on the candidates
    y: np.ndarray  # (N,) candidates' labels
    pop_probs: np.ndarray  # (Z, K) target's softmax on population samples
    pop_y: np.ndarray  # (Z,)


class Attack(ABC):
    name: ClassVar[str]
    reference_mode: ClassVar[str | None] = None
    min_references: ClassVar[int] = 0
    #: a plugin attack's own parameters (``attack-options``, keyed by its name): option name -> default on
    #: the class; the values in effect on the instance :func:`fairforget.audit.build_attack` makes
    options: Mapping[str, Any] = {}

    @abstractmethod
    def scores(self, target: TargetOutputs, refs: ReferenceOutputs | None) -> np.ndarray:
        """One score per candidate; higher means member."""

    def check(self, refs: ReferenceOutputs | None) -> None:
        have = 0 if refs is None else refs.count
        if have < self.min_references:
            raise AuditError(f"attack '{self.name}' needs at least {self.min_references} reference models, got {have}")
