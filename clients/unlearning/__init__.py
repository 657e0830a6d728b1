"""Unlearning methods by name (client side). Each module exposes
``unlearn(shard, ids, params=None) -> dict`` (``params``: :class:`approx_state.UnlearnParams`).

``exact-sisa`` retrains the shard from its last clean checkpoint; it is the only method whose
result equals retraining from scratch. The others are approximate (one file each; they share the
SISA bookkeeping of :mod:`clients.unlearning.approx_state`) and spend the shard's deletion budget
(:mod:`fairforget.capacity`): ``finetune`` (on the retained data), ``neggrad`` (NegGrad+),
``scrub`` (SCRUB), ``newton`` (noisy Newton step on the linear head, certified in the convex case)
and ``del`` (DEL-style localised reset and fine-tune).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clients.unlearning import del_reset, exact, finetune, neggrad, newton, scrub

EXACT = "exact-sisa"
UNLEARNERS: dict[str, Callable[..., dict[str, Any]]] = {
    EXACT: exact.unlearn,
    finetune.NAME: finetune.unlearn,
    neggrad.NAME: neggrad.unlearn,
    scrub.NAME: scrub.unlearn,
    newton.NAME: newton.unlearn,
    del_reset.NAME: del_reset.unlearn,
}
