"""The ServerApp's view of the federation: Flower's Grid with the run's node binding, a reply
timeout on every exchange, checks on every reply, and a log of what each reply carried.

Every driver wraps the Grid it is given (:func:`site_grid`). Then:

* :meth:`SiteGrid.bound_nodes` fixes which node serves which shard (:mod:`fairforget.binding`: the
  operator's binding file, required when the sites keep their own data, or the server's assignment
  of shards to the node ids it sees), waits up to ``reply-timeout`` for the bound nodes to connect,
  sends each a ``query.identify`` (the answer: the task's label counts, and the node's own
  ``partition-id`` and ``site``, cross-checked against the binding file), saves the binding in
  ``OUT/nodes.json`` and returns the bound nodes; with fewer than ``min-shards`` shards it stops with
  a one-line error naming each missing shard and why;
* messages go to bound nodes only, and each carries its node's shard (``keys.SHARD`` in its
  ConfigRecord): the ClientApp serves the shard the server assigned, never one it claims;
* ``send_and_receive`` gives up on the nodes that have not answered once no reply has come for
  ``reply-timeout`` seconds (a dead or hung node cannot hang the server; a long exchange whose
  replies keep coming is not cut off), and refuses (one line in the log and in ``OUT/wire.jsonl``;
  the reply is dropped, nothing of it stored) a reply to a message this exchange did not send, a
  second reply to one message (a duplicate or a replay), a reply whose source is not the node the
  message went to or is bound to no shard, and a reply naming another shard than its node's;
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
from fairforget.binding import Binding, BindingError, one_line
from fairforget.config import RunConfig
from fairforget.run import RunDir
from fairforget.storage import durable_append_lines

__all__ = ["BindingError", "SiteGrid", "site_grid"]

PULL_INTERVAL = 0.2  # seconds between polls for replies


class SiteGrid(Grid):
    def __init__(self, grid: Grid, cfg: RunConfig, run: RunDir) -> None:
        self.inner, self.cfg, self.run_dir = grid, cfg, run
        saved = Binding.load(run.path / "nodes.json", cfg.num_shards)
        if cfg.binding.strip():
            self.binding = Binding.read(cfg.binding.strip(), cfg.num_shards)
            self.binding.adopt_tasks(saved)
        elif not cfg.server_has_data:
            raise BindingError("config key 'binding' is empty, but the sites keep their own data: bind each "
                               "site's shard to the node id its key was registered under in a binding file "
                               "([[site]] name, shard, node-id) and set binding to its path")
        else:  # the server assigns shards to the node ids it sees (a saved assignment is kept where it holds)
            self.binding = saved if not saved.fixed else Binding(cfg.num_shards)
        self._identified = False
        self.missing_shards: list[int] = []
        self._why: dict[int, str] = {}  # shard -> why it has no usable node
        self._task = self.binding.task  # shard -> (num_classes, num_private) it reported
        self._sent: dict[str, tuple[int, int, str]] = {}  # message id -> (node, shard, type), every exchange
        self._answered: set[str] = set()  # message ids with an accepted (or refused-as-wrong) reply
        self._refused: dict[int, str] = {}  # node -> why its last reply was refused

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
            raise BindingError(f"shard {shard} has no connected node ({self._why.get(shard, 'not bound')})")
        return self.binding.node_of[shard]

    def _identify(self) -> None:
        b, timeout = self.binding, self.cfg.reply_timeout
        connected = set(self.inner.get_node_ids())
        if not b.fixed:
            b.assign(connected)
        self._check_names()
        if not b.missing(connected) and len(b.task) == b.num_shards:  # the saved binding, every node still
            self._identified = True  # connected and its task known: no new round trip
            return
        deadline = time.monotonic() + timeout
        asked: set[int] = set()
        ok: set[int] = set()
        while True:
            connected = set(self.inner.get_node_ids())
            if not b.fixed:
                b.assign(connected)
            new = [n for k, n in sorted(b.node_of.items()) if n in connected and n not in asked]
            if new:
                self._check_names()
                msgs = [Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=n,
                                message_type=keys.MSG_IDENTIFY) for n in new]
                for reply in self._exchange(msgs, timeout):
                    shard = b.shard_of(reply.metadata.src_node_id)
                    if reply.has_error():
                        self._why[shard] = f"node {reply.metadata.src_node_id} failed to identify: " \
                                           f"{one_line(reply.error.reason)}"
                        log(WARNING, "fairforget: %s", self._why[shard])
                        continue
                    if self._accept_identity(reply, shard):
                        ok.add(shard)
                asked |= set(new)
            # wait for the bound nodes not yet connected (no binding file: for nodes for the free shards)
            waiting = [k for k, n in b.node_of.items() if n not in connected] if b.fixed else b.missing(connected)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self._settle(connected, asked, ok)

    def _accept_identity(self, reply: Message, shard: int) -> bool:
        """Cross-check a node's ``query.identify`` reply against the binding file (a disagreement stops the
        run); keep its task. False for a reply without one."""
        b, node = self.binding, reply.metadata.src_node_id
        m = reply.content.get(keys.METRICS)
        if m is None or keys.NUM_CLASSES not in m or keys.NUM_PRIVATE not in m:
            self._why[shard] = f"node {node} sent a query.identify reply without its task"
            return False
        site = str(reply.content[keys.CONFIG].get(keys.SITE, "")) if keys.CONFIG in reply.content else ""
        if b.fixed:
            claimed = int(m[keys.NODE_PARTITION_ID]) if keys.NODE_PARTITION_ID in m else shard
            if claimed != shard or site != b.site_of[shard]:
                raise BindingError(f"{b.where} binds node {node} to shard {shard} as site {b.site_of[shard]!r}, but "
                                   f"the node says partition-id = {claimed}, site = {site!r}: refused (fix the "
                                   "binding file or the node's config)")
        self._task[shard] = (int(m[keys.NUM_CLASSES]), int(m[keys.NUM_PRIVATE]))
        return True

    def _check_names(self) -> None:
        """Where the grid reports the name each node's key was registered under (``flwr supernode register
        --name``), it must be the bound site's name (a cross-check: the name is optional, not unique)."""
        b = self.binding
        if not b.fixed:
            return
        try:
            infos = list(self.inner.get_nodes())
        except Exception:  # noqa: BLE001 - a grid without node infos: nothing to cross-check
            return
        for info in infos:
            shard, name = b.shard_of(int(info.node_id)), str(getattr(info, "name", "") or "")
            if shard is not None and name and name != b.site_of[shard]:
                raise BindingError(f"{b.where} binds node {info.node_id} to site {b.site_of[shard]!r} (shard "
                                   f"{shard}), but its key was registered as {name!r}: refused (check the node-id)")

    def _settle(self, connected: set[int], asked: set[int], ok: set[int]) -> None:
        """Which shards go on without a node, and why; a one-line error with fewer than ``min-shards``."""
        b, timeout = self.binding, self.cfg.reply_timeout
        for k in range(b.num_shards):
            if k in ok or k in self._why:
                continue
            node = b.node_of.get(k)
            if node is None:
                self._why[k] = (f"not in {b.where}" if b.fixed else
                                f"no node ({len(connected)} connected for {b.num_shards} shards)")
            elif node not in connected:
                self._why[k] = (f"node {node} ({b.where}) never connected within reply-timeout = {timeout:g}s "
                                "(not among the SuperLink's nodes: a wrong node-id, or the site's SuperNode is "
                                "down)" if b.fixed else f"node {node} left the federation")
            elif node in self._refused:
                self._why[k] = f"its reply was refused: {self._refused[node]}"
            else:
                self._why[k] = f"node {node} did not answer query.identify within reply-timeout = {timeout:g}s"
        self.missing_shards = [k for k in range(b.num_shards) if k not in ok and k in self._why]
        left = b.num_shards - len(self.missing_shards)
        if left < self.cfg.required_shards:
            raise BindingError("; ".join(f"{b.describe(k)}: {self._why[k]}" for k in self.missing_shards)
                               + f" (min-shards = {self.cfg.required_shards} of {b.num_shards})")
        if self.missing_shards:
            log(WARNING, "fairforget: going on without shard(s) %s (min-shards = %d): %s", self.missing_shards,
                self.cfg.required_shards, "; ".join(f"shard {k}: {self._why[k]}" for k in self.missing_shards))
        b.save(self.run_dir.path / "nodes.json")
        self._identified = True

    def task(self) -> tuple[int, int]:
        """(num_classes, num_private) the sites reported; they must agree."""
        self.bound_nodes()
        found = {t for k, t in self._task.items() if k not in self.missing_shards}
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
        if messages:
            self.bound_nodes()
        limit = timeout or self.cfg.reply_timeout
        replies = self._exchange(messages, limit)
        answered = {r.metadata.src_node_id for r in replies}
        lost = sorted(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered)
        if lost:
            log(WARNING, "fairforget: no reply from node(s) %s for %gs%s", lost, limit,
                "".join(f"; node {n}: refused {self._refused[n]}" for n in lost if n in self._refused))
        return replies

    def _stamped(self, msg: Message) -> Message:
        """``msg`` for a bound node, carrying that node's shard (a new message: Flower's strategies send
        one RecordDict to every node)."""
        node = msg.metadata.dst_node_id
        shard = self.binding.shard_of(node)
        if shard is None:
            raise BindingError(f"refusing to send {msg.metadata.message_type} to node {node}, which is bound to no "
                               f"shard in {self.binding.where}")
        content = RecordDict(dict(msg.content.items()))
        config = ConfigRecord(dict(content[keys.CONFIG].items())) if keys.CONFIG in content else ConfigRecord({})
        if int(config.get(keys.SHARD, shard)) != shard:
            raise BindingError(f"a {msg.metadata.message_type} message to node {node} names shard "
                               f"{config[keys.SHARD]}, but the node serves shard {shard}")
        config[keys.SHARD] = shard
        content[keys.CONFIG] = config
        return Message(content, dst_node_id=node, message_type=msg.metadata.message_type, ttl=msg.metadata.ttl,
                       group_id=msg.metadata.group_id)

    def _exchange(self, messages: list[Message], limit: float) -> list[Message]:
        """Push, then pull until every message is answered or no accepted reply has come for ``limit``
        seconds. Each reply is logged; the ones :meth:`_refusal` names are dropped."""
        messages = [self._stamped(m) for m in messages]
        if not messages:
            return []
        pushed = list(self.inner.push_messages(messages))
        sent: dict[str, tuple[int, int, str]] = {}
        for msg, pushed_id in zip(messages, pushed, strict=False):
            mid = msg.metadata.message_id or pushed_id
            if mid:
                sent[mid] = (msg.metadata.dst_node_id, self.binding.shard_of(msg.metadata.dst_node_id),
                             msg.metadata.message_type)
        self._sent.update(sent)
        waiting = set(sent)
        replies: list[Message] = []
        last_reply = time.monotonic()
        while waiting:
            got = list(self.inner.pull_messages([m for m in sent if m in waiting]))  # in sending order
            for reply in got:
                why, settled = self._refusal(reply, sent)
                self._log(reply, why)
                mid = reply.metadata.reply_to_message_id
                if settled:
                    self._answered.add(mid)
                    waiting.discard(mid)
                if why:
                    self._refused[reply.metadata.src_node_id] = why
                    log(WARNING, "fairforget: refused a %s reply from node %s: %s", reply.metadata.message_type,
                        reply.metadata.src_node_id, why)
                    continue
                replies.append(reply)
                last_reply = time.monotonic()
            if time.monotonic() - last_reply >= limit:  # refused replies do not keep the exchange open
                break
            if not got:
                time.sleep(PULL_INTERVAL)
        return replies

    def _refusal(self, reply: Message, sent: dict[str, tuple[int, int, str]]) -> tuple[str, bool]:
        """(why ``reply`` is refused, '' if it is not; whether it settles the message it answers)."""
        mid, src = reply.metadata.reply_to_message_id, reply.metadata.src_node_id
        short = mid[:16]
        if mid not in sent:
            if mid in self._sent:
                return f"a replayed reply to message {short} of an earlier exchange", False
            return f"a reply to message {short}, which this exchange did not send", False
        if mid in self._answered:
            return f"a second reply to message {short} (a duplicate)", False
        node, shard, kind = sent[mid]
        if src != node:
            bound = self.binding.shard_of(src)
            return (f"node {src} answered a {kind} sent to node {node}"
                    + ("" if bound is not None else f" (node {src} is bound to no shard)")), False
        if reply.metadata.message_type != kind:
            return f"a {reply.metadata.message_type} reply to a {kind} message", True
        if not reply.has_error() and keys.METRICS in reply.content and keys.SHARD in reply.content[keys.METRICS]:
            said = int(reply.content[keys.METRICS][keys.SHARD])
            if said != shard:
                return f"node {src} is bound to shard {shard} but replied as shard {said}", True
        return "", True

    def _log(self, reply: Message, refused: str = "") -> None:
        line: dict[str, Any] = {"message_type": reply.metadata.message_type, "src_node_id": reply.metadata.src_node_id}
        if refused:
            line["refused"] = refused
        if reply.has_error():
            line["error"] = reply.error.reason
        else:
            line["records"] = {name: _describe(rec) for name, rec in reply.content.items()}
        durable_append_lines(self.run_dir.path / "wire.jsonl", [json.dumps(line, sort_keys=True)])

    # ------------------------------------------------------------------ the rest of the Grid
    @property
    def run(self) -> Any:
        return self.inner.run

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    def create_message(self, *a: Any, **k: Any) -> Message:
        return self.inner.create_message(*a, **k)

    def get_node_ids(self) -> Iterable[int]:
        """The bound nodes only (a strategy that samples the grid's nodes never reaches another)."""
        return self.bound_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise BindingError("SiteGrid.push_messages: use send_and_receive (every reply is checked there)")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise BindingError("SiteGrid.pull_messages: use send_and_receive (every reply is checked there)")


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
