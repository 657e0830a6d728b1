"""Which Flower node serves which shard: fixed by the operator, or assigned by the server; never
what a node says about itself.

Flower authenticates a SuperNode by its key: the SuperLink derives the node's id from the public key
that ``flwr supernode register KEY.pub --name SITE --format json`` registered (it prints it as
``"node-id"``), and the ServerApp sees that id as the source of every reply. The binding ties each
shard to such an id:

* **The operator's binding file** (run-config key ``binding``: a path on the machine where the
  ServerApp runs; required when the sites keep their own data), one ``[[site]]`` table per site::

      [[site]]
      name = "site-a"       # the site's name: deletions are addressed to it
      shard = 0             # its shard, 0 .. num-shards - 1
      node-id = 1234567     # what `flwr supernode register` printed for the site's key

  A site name, a shard or a node id listed twice, a shard out of range, an unreadable or invalid
  file: each a one-line :class:`BindingError` naming the file, before anything is sent or stored.
  What a node says (its ``partition-id`` and ``site`` in its ``query.identify`` reply) and the name its
  key was registered under (Flower's ``NodeInfo.name``, where the grid reports one: optional and not
  unique) are cross-checks only: a disagreement stops the run with one line.
* **No binding file** (simulation: node ids are random per run and unnamed): the server assigns the
  shards to the node ids it sees. Bound nodes still connected keep their shard; free shards go to the
  unbound nodes in id order; extra nodes are never sent anything.

Either way every message the server sends carries the shard it assigned (``keys.SHARD`` in the
message's ConfigRecord, :mod:`server.grid`), and the ClientApp serves that shard
(:meth:`clients.node.Node.from_context`; a site with its own data refuses a shard other than its
``partition-id``). The binding in use is saved in ``OUT/nodes.json`` with the task each node reported.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairforget.storage import atomic_write_json, read_json

SITE_KEYS = ("name", "shard", "node-id")
MAX_NODE_ID = 2**64 - 1  # Flower's node ids are unsigned 64-bit integers


class BindingError(RuntimeError):
    """A node that does not fit the run's binding, a bad binding file, or too few shards; one line."""


@dataclass
class Binding:
    """``node_of``: shard -> node id; ``site_of``: shard -> site name (the binding file's; empty when
    the server assigned the shards); ``source``: the binding file ('' when the server assigned)."""

    num_shards: int
    node_of: dict[int, int] = field(default_factory=dict)
    site_of: dict[int, str] = field(default_factory=dict)
    task: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> (num_classes, num_private)
    source: str = ""

    @property
    def fixed(self) -> bool:
        """Whether the operator's binding file fixes the binding (else the server assigns shards)."""
        return bool(self.source)

    @property
    def where(self) -> str:
        return f"binding file {self.source}" if self.source else "the server's shard assignment (no binding file)"

    # ------------------------------------------------------------------ the operator's binding file
    @classmethod
    def read(cls, path: str | Path, num_shards: int) -> Binding:
        """The operator's binding file; a one-line :class:`BindingError` naming it for any bad input."""
        where = f"binding file {path}"
        try:
            with Path(path).open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise BindingError(f"{where}: not found (config key 'binding' is a path on the machine where the "
                               "ServerApp runs)") from None
        except OSError as exc:
            raise BindingError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BindingError(f"{where}: not valid TOML ({one_line(str(exc))})") from None
        extra = sorted(k for k in raw if k != "site")
        sites = raw.get("site")
        if extra or not isinstance(sites, list) or not sites or not all(isinstance(e, dict) for e in sites):
            raise BindingError(f"{where}: must hold one [[site]] table per site (name, shard, node-id)"
                               + (f", not {', '.join(map(repr, extra))}" if extra else ""))
        b = cls(num_shards, source=str(path))
        node_site: dict[int, str] = {}
        for n, entry in enumerate(sites, 1):
            what = f"{where}: [[site]] #{n}"
            unknown = sorted(set(entry) - set(SITE_KEYS))
            missing = [k for k in SITE_KEYS if k not in entry]
            if unknown or missing:
                raise BindingError(f"{what}: " + "; ".join(
                    ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
                    + ([f"missing key(s) {', '.join(missing)}"] if missing else []))
                    + " (each site has name, shard and node-id)")
            name, shard, node = entry["name"], entry["shard"], entry["node-id"]
            if not isinstance(name, str) or not name.strip() or name != name.strip():
                raise BindingError(f"{what}: name = {name!r} must be the site's name (a non-empty string)")
            what = f"{where}: site {name!r}"
            if not isinstance(shard, int) or isinstance(shard, bool):
                raise BindingError(f"{what}: shard = {shard!r} must be an integer, 0..{num_shards - 1}")
            if not 0 <= shard < num_shards:
                raise BindingError(f"{what}: shard = {shard!r} is out of range: the run has shards "
                                   f"0..{num_shards - 1} (num-shards = {num_shards})")
            if isinstance(node, str) and node.isascii() and node.isdigit():
                node = int(node)
            if not isinstance(node, int) or isinstance(node, bool) or not 0 < node <= MAX_NODE_ID:
                raise BindingError(f"{what}: node-id = {node!r} must be the positive integer that `flwr supernode "
                                   "register` printed for the site's key")
            if name in b.site_of.values():
                raise BindingError(f"{what} is listed twice")
            if shard in b.node_of:
                raise BindingError(f"{where}: two nodes for shard {shard} (site {b.site_of[shard]!r}: node "
                                   f"{b.node_of[shard]}; site {name!r}: node {node})")
            if node in node_site:
                raise BindingError(f"{where}: node {node} is bound to two shards ({b.shard_of(node)} as site "
                                   f"{node_site[node]!r}, {shard} as site {name!r})")
            b.node_of[shard], b.site_of[shard], node_site[node] = node, name, name
        return b

    # ------------------------------------------------------------------ OUT/nodes.json
    @classmethod
    def load(cls, path: Path, num_shards: int) -> Binding:
        """The binding a run saved (empty if none)."""
        if not Path(path).is_file():
            return cls(num_shards)
        raw = read_json(path)
        return cls(num_shards, {int(k): int(v["node"]) for k, v in raw["shards"].items()},
                   {int(k): str(v["site"]) for k, v in raw["shards"].items() if v.get("site")},
                   {int(k): tuple(v["task"]) for k, v in raw["shards"].items() if "task" in v},
                   str(raw.get("source", "")))

    def save(self, path: Path) -> None:
        shards = {k: {**v, **({"task": list(self.task[int(k)])} if int(k) in self.task else {})}
                  for k, v in self.as_dict().items()}
        atomic_write_json(path, {"source": self.source, "shards": shards})

    def adopt_tasks(self, saved: Binding) -> None:
        """The tasks ``saved`` (a run's earlier binding) knows for shards that a binding file bound to the
        same node and site then, so their identities were cross-checked (no new round trip)."""
        self.task.update({k: t for k, t in saved.task.items() if saved.fixed and saved.node_of.get(k) ==
                          self.node_of.get(k) and saved.site_of.get(k) == self.site_of.get(k)})

    # ------------------------------------------------------------------ the server's assignment
    def assign(self, connected: Iterable[int]) -> bool:
        """No binding file: bound nodes still connected keep their shard, the others lose it; free shards
        go to the connected unbound nodes in id order. True if the binding changed."""
        if self.fixed:
            raise BindingError(f"{self.where} fixes the binding: the server assigns no shard")
        alive = set(connected)
        changed = False
        for k in [k for k, n in self.node_of.items() if n not in alive]:
            del self.node_of[k]
            self.task.pop(k, None)
            self.site_of.pop(k, None)
            changed = True
        free = [k for k in range(self.num_shards) if k not in self.node_of]
        bound = set(self.node_of.values())
        for k, n in zip(free, sorted(alive - bound), strict=False):
            self.node_of[k] = int(n)
            changed = True
        return changed

    # ------------------------------------------------------------------ lookups
    def shard_of(self, node_id: int) -> int | None:
        return next((k for k, n in self.node_of.items() if n == node_id), None)

    def shard_of_site(self, site: str) -> int:
        if not self.fixed:
            raise BindingError(f"a deletion names site {site!r}, but no site is bound by name: the run has no "
                               "binding file (config key 'binding'), the server assigned its shards")
        found = [k for k, s in self.site_of.items() if s == site]
        if not found:
            raise BindingError(f"site {site!r} is not bound in {self.where} (sites: "
                               f"{', '.join(sorted(set(self.site_of.values()))) or 'none'})")
        return found[0]

    def describe(self, shard: int) -> str:
        """``shard 0 (site 'site-a', node 123)``, for messages."""
        parts = ([f"site {self.site_of[shard]!r}"] if shard in self.site_of else []) + (
            [f"node {self.node_of[shard]}"] if shard in self.node_of else [])
        return f"shard {shard}" + (f" ({', '.join(parts)})" if parts else "")

    def missing(self, connected: Iterable[int] | None = None) -> list[int]:
        """Shards without a (connected) node."""
        alive = None if connected is None else set(connected)
        return [k for k in range(self.num_shards)
                if k not in self.node_of or (alive is not None and self.node_of[k] not in alive)]

    def as_dict(self) -> Mapping[str, Any]:
        return {str(k): {"node": self.node_of[k], "site": self.site_of.get(k, "")} for k in sorted(self.node_of)}


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def binding_toml(sites: Iterable[tuple[str, int, int]]) -> str:
    """A binding file's text for ``(site name, shard, node id)`` triples (the operator's file, as
    :meth:`Binding.read` reads it)."""
    return "".join(f'[[site]]\nname = "{name}"\nshard = {shard}\nnode-id = {node}\n\n' for name, shard, node in sites)
