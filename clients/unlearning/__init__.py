"""Unlearning methods by name (client side). Each module exposes ``unlearn(shard, ids) -> dict``.

``exact-sisa`` retrains the shard from its last clean checkpoint; it is the only method whose
result equals retraining from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clients.unlearning import exact

UNLEARNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "exact-sisa": exact.unlearn,
}
