"""Which Flower node serves which shard: bound on first contact, kept with the run.

A node says who it is (its shard, from its ``partition-id``, and its site name) in its reply to a
``query.identify`` message, which carries nothing else. The server binds each node id to one shard
and saves the binding in ``OUT/nodes.json``; from then on messages go to bound nodes only, and:

* a second connected node claiming a bound shard is an error (:class:`BindingError`), never a silent
  overwrite of that shard's model;
* a node whose reply names another shard than its binding is an error;
* a restarted SuperNode (a new node id) takes over its shard only once the node it replaces has left
  the federation;
* more nodes than shards: the extra ones are never sent anything; fewer: the driver waits up to
  ``reply-timeout`` and then goes on with the bound shards if there are at least ``min-shards`` of
  them, or stops with a one-line error naming the missing shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairforget.storage import atomic_write_json, read_json


class BindingError(RuntimeError):
    """A node that does not fit the run's binding, or too few shards; the message is one line."""


@dataclass
class Binding:
    """``node_of``: shard -> node id; ``site_of``: shard -> site name."""

    num_shards: int
    node_of: dict[int, int] = field(default_factory=dict)
    site_of: dict[int, str] = field(default_factory=dict)
    task: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> (num_classes, num_private)

    @classmethod
    def load(cls, path: Path, num_shards: int) -> Binding:
        if not Path(path).is_file():
            return cls(num_shards)
        raw = read_json(path)
        return cls(num_shards, {int(k): int(v["node"]) for k, v in raw["shards"].items()},
                   {int(k): str(v["site"]) for k, v in raw["shards"].items()},
                   {int(k): tuple(v["task"]) for k, v in raw["shards"].items() if "task" in v})

    def save(self, path: Path) -> None:
        shards = {k: {**v, **({"task": list(self.task[int(k)])} if int(k) in self.task else {})}
                  for k, v in self.as_dict().items()}
        atomic_write_json(path, {"shards": shards})

    # ------------------------------------------------------------------ binding
    def shard_of(self, node_id: int) -> int | None:
        return next((k for k, n in self.node_of.items() if n == node_id), None)

    def bind(self, node_id: int, shard: int, site: str, connected: Iterable[int]) -> bool:
        """Bind ``node_id`` (which says it serves ``shard`` at ``site``); True if the binding changed."""
        connected = set(connected)
        if not 0 <= shard < self.num_shards:
            raise BindingError(f"node {node_id} says it serves shard {shard}, but the run has shards "
                               f"0..{self.num_shards - 1} (check its partition-id)")
        other = self.shard_of(node_id)
        if other is not None and other != shard:
            raise BindingError(f"node {node_id} is bound to shard {other} but now says shard {shard}")
        bound = self.node_of.get(shard)
        if bound == node_id:
            return False
        if bound is not None and bound in connected:
            raise BindingError(f"nodes {bound} and {node_id} both claim shard {shard} (site "
                               f"{self.site_of.get(shard, '?')!r}); give each site its own partition-id")
        if shard in self.site_of and self.site_of[shard] != site:
            raise BindingError(f"node {node_id} claims shard {shard} as site {site!r}, but the run bound it to "
                               f"site {self.site_of[shard]!r}")
        self.node_of[shard], self.site_of[shard] = int(node_id), str(site)
        return True

    def shard_of_site(self, site: str) -> int:
        found = [k for k, s in self.site_of.items() if s == site]
        if not found:
            raise BindingError(f"no shard of this run belongs to site {site!r} (sites: "
                               f"{', '.join(sorted(set(self.site_of.values()))) or 'none bound yet'})")
        return found[0]

    def missing(self, connected: Iterable[int] | None = None) -> list[int]:
        """Shards without a (connected) node."""
        alive = None if connected is None else set(connected)
        return [k for k in range(self.num_shards)
                if k not in self.node_of or (alive is not None and self.node_of[k] not in alive)]

    def require(self, required: int, connected: Iterable[int], what: str) -> list[int]:
        """The shards without a connected node; a :class:`BindingError` if fewer than ``required`` are left."""
        missing = self.missing(connected)
        if self.num_shards - len(missing) < required:
            raise BindingError(f"{what}: shard(s) {', '.join(map(str, missing))} have no connected node and "
                               f"min-shards = {required} of {self.num_shards}")
        return missing

    def as_dict(self) -> Mapping[str, Any]:
        return {str(k): {"node": self.node_of[k], "site": self.site_of.get(k, "")} for k in sorted(self.node_of)}
