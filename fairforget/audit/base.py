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
    """The audited (target) model's outputs an attack scores.

    Parameters
    ----------
    cand_probs : numpy.ndarray
        (N, K) the target's softmax on the N candidates (members and non-members).
    y : numpy.ndarray
        (N,) the candidates' labels.
    pop_probs : numpy.ndarray
        (Z, K) the target's softmax on Z population samples (RMIA's z).
    pop_y : numpy.ndarray
        (Z,) their labels.
    """

    cand_probs: np.ndarray  # (N, K) target's softmax on the candidates
    y: np.ndarray  # (N,) candidates' labels
    pop_probs: np.ndarray  # (Z, K) target's softmax on population samples
    pop_y: np.ndarray  # (Z,)


class Attack(ABC):
    """A membership-inference attack: one score per candidate, higher meaning member.

    A subclass sets :attr:`name` and implements :meth:`scores`; it is registered by name in
    ``fairforget.audit.ATTACKS`` (or found as a plugin) and chosen with ``audit-attacks``.

    Attributes
    ----------
    name : str
        The attack's registered name.
    reference_mode : str or None
        The reference models it needs: None (none), ``"offline"`` (trained without the candidates,
        cacheable) or ``"online"`` (shadows trained with and without each candidate).
    min_references : int
        The fewest reference models it works with; :meth:`check` refuses fewer.
    options : Mapping[str, Any]
        A plugin attack's own options (``attack-options``, keyed by its name): option name -> default
        on the class, the values in effect on the instance.
    """

    name: ClassVar[str]
    reference_mode: ClassVar[str | None] = None
    min_references: ClassVar[int] = 0
    #: a plugin attack's own parameters (``attack-options``, keyed by its name): option name -> default on
    #: the class; the values in effect on the instance :func:`fairforget.audit.build_attack` makes
    options: Mapping[str, Any] = {}

    @abstractmethod
    def scores(self, target: TargetOutputs, refs: ReferenceOutputs | None) -> np.ndarray:
        """One score per candidate; higher means member.

        Parameters
        ----------
        target : TargetOutputs
            The audited model's softmax on the candidates and the population, and their labels.
        refs : ReferenceOutputs or None
            The reference models' outputs on the same samples (None for an attack with no
            :attr:`reference_mode`).

        Returns
        -------
        numpy.ndarray
            (N,) float scores, one per candidate, in the order of ``target.cand_probs``; the audit
            turns them into a ROC curve against the true membership.
        """

    def check(self, refs: ReferenceOutputs | None) -> None:
        """Refuse too few reference models.

        Parameters
        ----------
        refs : ReferenceOutputs or None
            The reference models the audit trained (None: none).

        Raises
        ------
        AuditError
            Fewer than :attr:`min_references` reference models.
        """
        have = 0 if refs is None else refs.count
        if have < self.min_references:
            raise AuditError(f"attack '{self.name}' needs at least {self.min_references} reference models, got {have}")
