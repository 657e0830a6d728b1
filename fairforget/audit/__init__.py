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



def parse_attacks(text: str) -> list[str]:
    """The attack names of ``audit-attacks`` (comma-separated), each checked against the registry."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise AuditError(f"unknown attack(s): {', '.join(unknown)} (have {', '.join(sorted(ATTACKS))})")
    if not names:
        raise AuditError("no attacks chosen (audit-attacks is empty)")
    return names


__all__ = ["ATTACKS", "Attack", "AuditError", "TargetOutputs", "parse_attacks"]
