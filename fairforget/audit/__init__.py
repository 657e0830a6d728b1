"""Privacy audits: membership-inference attacks by name, attribute-inference probes, ROC figures.

An attack is named in ``audit-attacks`` (comma-separated): a built-in (:data:`ATTACKS`), an
:class:`Attack` subclass of your own as ``"package.module:Class"``, or a name registered in the
``fairforget.attacks`` entry-point group (:mod:`fairforget.plugins`; installed where the audit runs:
the server, and every site for its site audit). Its own parameters: ``options`` (name -> default),
set through ``attack-options``, a JSON object keyed by attack name (``{"my-attack": {"k": 3}}``), in
``self.options`` of the instance :func:`build_attack` makes.
"""

from __future__ import annotations

import inspect
from typing import Any

from fairforget.audit.base import Attack, AuditError, TargetOutputs
from fairforget.audit.confidence import ConfidenceAttack, EntropyAttack
from fairforget.audit.lira import LiraOffline, LiraOnline
from fairforget.audit.loss import LossAttack
from fairforget.audit.rmia import RmiaOffline
from fairforget.config import ConfigError
from fairforget.plugins import Registry, json_object

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (LossAttack, ConfidenceAttack, EntropyAttack, LiraOffline, LiraOnline, RmiaOffline)
}

REGISTRY: Registry[type[Attack]] = Registry(
    "attack", "audit-attacks", ATTACKS,
    check=lambda obj: (isinstance(obj, type) and issubclass(obj, Attack) and not inspect.isabstract(obj)
                       and isinstance(getattr(obj, "name", None), str)),
    expected="a fairforget attack (a subclass of fairforget.audit.Attack with a name and scores)")


def parse_attacks(text: str, options: str = "") -> list[str]:
    """The attack names of ``audit-attacks`` (comma-separated), each resolved by the registry; with
    ``options`` (``attack-options``), each chosen attack's options checked too."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if REGISTRY.find(n) is None]
    if unknown:
        raise AuditError(f"config key 'audit-attacks': unknown attack(s): {', '.join(unknown)} "
                         f"(have {', '.join(REGISTRY.names())})")
    if not names:
        raise AuditError("no attacks chosen (audit-attacks is empty)")
    if options:
        attack_options(names, options)
    return names


def attack_class(name: str) -> type[Attack]:
    """The attack ``name`` names (built-in, module path or entry point); one line naming
    ``audit-attacks`` otherwise."""
    return REGISTRY.resolve(name)


def attack_options(names: list[str], text: str, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``attack-options`` read for the chosen attacks ``names``: each one's (of ``only``, default all)
    every declared option, defaults filled in. An entry for an attack not chosen, or an unknown or
    mistyped option, is one line naming the key and the attack."""
    key = REGISTRY.options_key
    given = json_object(key, text, "of options by attack name")
    stray = sorted(set(given) - set(names))
    if stray:
        raise ConfigError(f"config key '{key}': {stray[0]!r} is not a chosen attack "
                          f"(audit-attacks: {', '.join(names)})")
    out = {}
    for name in names if only is None else only:
        cls = attack_class(name)
        value = given.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': the options of attack {cls.name!r} = {value!r}: must be a JSON "
                              "object")
        out[name] = REGISTRY.parse_options(cls.name, cls.options, value)
    return out


def build_attack(name: str, options: str = "", chosen: list[str] | None = None) -> Attack:
    """An instance of the attack ``name``, ``self.options`` set to its options from ``attack-options``
    (the run's attacks: ``chosen``, default ``[name]``)."""
    attack = attack_class(name)()
    attack.options = attack_options(chosen or [name], options, only=[name])[name]
    return attack


def check_attack_options(cfg: Any) -> None:
    """``attack-options`` against the run's attacks, those installed here (the others' where the
    audit runs); nothing to check with ``audit = false`` and no options."""
    if not (cfg.audit or cfg.attack_options.strip()):
        return
    names = [n.strip() for n in cfg.audit_attacks.split(",") if n.strip()]
    attack_options(names, cfg.attack_options, only=[n for n in names if REGISTRY.find(n) is not None])


__all__ = ["ATTACKS", "REGISTRY", "Attack", "AuditError", "TargetOutputs", "attack_class", "attack_options",
           "build_attack", "check_attack_options", "parse_attacks"]
