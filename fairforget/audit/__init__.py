"""Privacy audits: membership-inference attacks by name, attribute-inference probes, ROC figures."""

from __future__ import annotations

from fairforget.audit.base import Attack, AuditError, TargetOutputs
from fairforget.audit.confidence import ConfidenceAttack, EntropyAttack
from fairforget.audit.lira import LiraOffline, LiraOnline
from fairforget.audit.loss import LossAttack
from fairforget.audit.rmia import RmiaOffline

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (LossAttack, ConfidenceAttack, EntropyAttack, LiraOffline, LiraOnline, RmiaOffline)
}

__all__ = ["ATTACKS", "Attack", "AuditError", "TargetOutputs"]
