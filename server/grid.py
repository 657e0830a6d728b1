"""The ServerApp's view of the federation: Flower's Grid with the run's node binding, a reply
timeout on every exchange, and a log of what each reply carried.

Every driver wraps the Grid it is given (:func:`site_grid`). Then:

* ``send_and_receive`` gives up on the nodes that have not answered once no reply has come for
  ``reply-timeout`` seconds (a dead or hung node cannot hang the server; its reply is simply
  missing; a long exchange whose replies keep coming is not cut off), and checks each reply
  against the binding: a reply from an unbound node, or one naming another shard than its node is
  bound to, is an error;
* :meth:`SiteGrid.bound_nodes` identifies the connected nodes (``query.identify``: each says its
  shard and site, nothing else), binds them (:mod:`fairforget.binding`, saved in ``OUT/nodes.json``),
  waits up to ``reply-timeout`` for missing shards, and returns the bound nodes; with fewer than
  ``min-shards`` shards it stops with a one-line error;
* ``OUT/wire.jsonl`` gets one line per reply: its type, its node, and for each record its kind and
  its entries' types and lengths, never values, so anyone can check that no reply carried samples,
  ids or per-group counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fairforget import keys
from fairforget.binding import Binding, BindingError
from fairforget.config import RunConfig
from fairforget.run import RunDir
from fairforget.storage import durable_append_lines

__all__ = ["BindingError", "SiteGrid", "site_grid"]

PULL_INTERVAL = 0.2  # seconds between polls for replies


class SiteGrid(Grid):
    def __init__(self, grid: Grid, cfg: RunConfig, run: RunDir) -> None:
        self.inner, self.cfg, self.run_dir = grid, cfg, run
        self.binding = Binding.load(run.path / "nodes.json", cfg.num_shards)
        self._identified = False
        self.missing_shards: list[int] = []
        self._task = self.binding.task  # shard -> (num_classes, num_private) it reported

    # ------------------------------------------------------------------ the binding
    def bound_nodes(self) -> list[int]:
        """The node of every bound shard, after identifying the connected nodes (once per run)."""
        if not self._identified:
            self._identify()
        return [self.binding.node_of[k] for k in sorted(self.binding.node_of)
                if k not in self.missing_shards]

    def node_of(self, shard: int) -> int:
        self.bound_nodes()
        if shard not in self.binding.node_of or shard in self.missing_shards:
            raise BindingError(f"shard {shard} has no connected node")
        return self.binding.node_of[shard]

    def _identify(self) -> None:
        b = self.binding
        if len(b.node_of) == b.num_shards and set(b.node_of.values()) <= set(self.inner.get_node_ids()) \
                and len(b.task) == b.num_shards:  # the saved binding, every node still connected: no new round trip
            self._identified = True
            return
        deadline = time.monotonic() + self.cfg.reply_timeout
        asked: set[int] = set()
        while True:
            connected = list(self.inner.get_node_ids())
            new = [n for n in connected if n not in asked]
            if new:
                msgs = [Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=n,
                                message_type=keys.MSG_IDENTIFY) for n in new]
                for reply in self._exchange(msgs, self.cfg.reply_timeout):
                    self._log(reply)
                    if reply.has_error():
                        log(WARNING, "fairforget: node %s did not identify: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                        continue
                    m = reply.content[keys.METRICS]
                    self.binding.bind(reply.metadata.src_node_id, int(m[keys.SHARD]),
                                      str(reply.content[keys.CONFIG][keys.SITE]), connected)
                    self._task[int(m[keys.SHARD])] = (int(m[keys.NUM_CLASSES]), int(m[keys.NUM_PRIVATE]))
                    asked.add(reply.metadata.src_node_id)
            if not self.binding.missing(connected) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self.missing_shards = self.binding.require(self.cfg.required_shards, connected,
                                                   f"after waiting {self.cfg.reply_timeout:g}s for the sites")
        if self.missing_shards:
            log(WARNING, "fairforget: going on without shard(s) %s (min-shards = %d)", self.missing_shards,
                self.cfg.required_shards)
        self.binding.save(self.run_dir.path / "nodes.json")
        self._identified = True

    def task(self) -> tuple[int, int]:
        """(num_classes, num_private) the sites reported; they must agree."""
        self.bound_nodes()
        found = set(self._task.values())
        if len(found) != 1:
            raise BindingError(f"the sites disagree on the task (classes, private values per shard): {self._task}")
        return found.pop()

    # ------------------------------------------------------------------ exchanges
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull replies until every node has answered or none has for ``timeout``
        (default ``reply-timeout``) seconds: the wait restarts with each reply, so an exchange whose
        nodes answer one after another (the simulation engine runs a few ClientApps at a time) is not
        cut off, while a dead or hung node holds the server ``timeout`` seconds at most."""
        messages = list(messages)
        limit = timeout or self.cfg.reply_timeout
        replies = self._exchange(messages, limit)
        for reply in replies:
            self._log(reply)
            self._check(reply)
        answered = {r.metadata.src_node_id for r in replies}
        lost = sorted(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered)
        if lost:
            log(WARNING, "fairforget: no reply from node(s) %s for %gs", lost, limit)
        return replies

    def _exchange(self, messages: list[Message], limit: float) -> list[Message]:
        """Push, then pull until every message is answered or no reply has come for ``limit`` seconds."""
        waiting = set(self.inner.push_messages(messages))
        replies: list[Message] = []
        last_reply = time.monotonic()
        while waiting:
            got = list(self.inner.pull_messages(waiting))
            if got:
                replies += got
                waiting -= {r.metadata.reply_to_message_id for r in got}
                last_reply = time.monotonic()
            elif time.monotonic() - last_reply >= limit:
                break
            else:
                time.sleep(PULL_INTERVAL)
        return replies

    def _check(self, reply: Message) -> None:
        if reply.has_error() or keys.METRICS not in reply.content or keys.SHARD not in reply.content[keys.METRICS]:
            return
        node, shard = reply.metadata.src_node_id, int(reply.content[keys.METRICS][keys.SHARD])
        bound = self.binding.shard_of(node)
        if self.binding.node_of and bound is None:
            raise BindingError(f"a reply from node {node}, which is bound to no shard of this run")
        if bound is not None and bound != shard:
            raise BindingError(f"node {node} is bound to shard {bound} but replied as shard {shard}")

    def _log(self, reply: Message) -> None:
        line: dict[str, Any] = {"message_type": reply.metadata.message_type, "src_node_id": reply.metadata.src_node_id}
        if reply.has_error():
            line["error"] = reply.error.reason
        else:
            line["records"] = {name: _describe(rec) for name, rec in reply.content.items()}
        durable_append_lines(self.run_dir.path / "wire.jsonl", [json.dumps(line, sort_keys=True)])

    # ------------------------------------------------------------------ the rest of the Grid, as is
    @property
    def run(self) -> Any:
        return self.inner.run

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    def create_message(self, *a: Any, **k: Any) -> Message:
        return self.inner.create_message(*a, **k)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)


def _describe(record: Any) -> dict[str, Any]:
    """A record's kind and its entries' types and sizes (no values)."""
    if isinstance(record, ArrayRecord):
        return {"kind": "arrays", "count": len(record), "bytes": sum(a.numpy().nbytes for a in record.values())}
    kind = "metrics" if isinstance(record, MetricRecord) else "config" if isinstance(record, ConfigRecord) else "other"
    entries = {}
    for k, v in record.items():
        entries[k] = {"type": type(v).__name__, **({"len": len(v)} if isinstance(v, list | str | bytes) else {})}
    return {"kind": kind, "entries": entries}


def site_grid(grid: Grid, cfg: RunConfig) -> SiteGrid:
    """``grid`` wrapped for the run (a wrapped grid is returned as it is)."""
    return grid if isinstance(grid, SiteGrid) else SiteGrid(grid, cfg, RunDir(cfg.out_path))
