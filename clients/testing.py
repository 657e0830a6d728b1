"""An in-process grid for tests of strategies and drivers: its nodes are the real ClientApp handlers,
called in the calling process, so a strategy's contract suite (:mod:`server.testing`) runs without Ray
or a network. Used by this project's tests and by a plugin package's own tests::

    from clients.testing import InProcessGrid, make_tiny_cfg
    from server.testing import Harness, check_strategy
    check_strategy(MyStrategy, Harness(make_tiny_cfg, InProcessGrid, tmp_path))
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import handlers
from clients.node import Node, assigned_shard
from fairforget import keys
from fairforget.config import RunConfig, resolve

#: the tiny run config of the tests (8 px, width 4, 2 shards of 2 slices, one epoch)
TINY: dict[str, Any] = {
    "num-shards": 2, "slices": 2, "epochs-per-slice": 1, "model-width": 4, "image-size": 8,
    "batch-size": 64, "rounds": 2, "local-epochs": 1, "device": "cpu", "audit-bootstrap": 50,
}


def set_task_identity() -> None:
    """Flower's Message needs a run and node identity; the server is node 0 of run 1."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are the real ClientApp handlers, called in this process.

    Node ids are 101, 102, ... for partitions 0, 1, ...; a handler exception becomes an error reply,
    as Flower turns a ClientApp exception into one. Every message sent is recorded in ``sent``.

    :param cfg: the run config; one node per shard (``cfg.num_shards``), each node's state where
        ``cfg`` puts it (under ``out-dir``)
    """

    HANDLERS = {keys.MSG_TRAIN: handlers.train, keys.MSG_UNLEARN: handlers.unlearn,
                keys.MSG_DESCRIBE: handlers.describe, keys.MSG_AUDIT: handlers.audit,
                keys.MSG_AUGMENT: handlers.augment, keys.MSG_IDENTIFY: handlers.identify,
                keys.MSG_EVALUATE: handlers.evaluate}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.nodes = {101 + k: k for k in range(cfg.num_shards)}
        self.sent: list[Message] = []
        self.outbox: dict[str, Message] = {}  # message id -> its reply, until pulled

    def node(self, node_id: int, assigned: int | None = None) -> Node:
        """Node ``node_id`` (its config's partition-id: ``self.nodes[node_id]``) serving ``assigned``, the
        shard a message assigned it (None: its partition-id, for tests that look at a node's state)."""
        return Node.from_context(self.cfg.to_mapping(), {
            keys.NODE_PARTITION_ID: self.nodes[node_id], keys.NODE_NUM_PARTITIONS: self.cfg.num_shards,
        }, assigned)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids, one per shard (101, 102, ...)."""
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Each of ``messages`` handled now, and the replies; ``timeout`` is ignored (nothing waits)."""
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Runs each message's handler now; its reply waits for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            self.sent.append(msg)
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            self.outbox[msg.metadata.message_id] = self.reply(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def reply(self, msg: Message) -> Message:
        """The node's handler's reply to ``msg``, as the ClientApp builds it (the node serves the shard the
        message assigns: :func:`clients.node.assigned_shard`); an exception becomes an error reply."""
        try:
            node = self.node(msg.metadata.dst_node_id, assigned_shard(msg.content))
            content = self.HANDLERS[msg.metadata.message_type](msg.content, node)
            return Message(content, reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - mirrors Flower's error replies
            traceback.print_exc()  # shown with a failing test's captured output
            return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that :meth:`push_messages` stored (each handed out once)."""
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]

    # fairforget's drivers only call get_node_ids, send_and_receive, push and pull; the rest must stay unused
    def set_run(self, run_id: int) -> None:
        raise AssertionError("set_run is not used by fairforget's drivers")

    @property
    def run(self) -> Any:
        raise AssertionError("run is not used by fairforget's drivers")

    def create_message(self, *a: Any, **k: Any) -> Message:
        raise AssertionError("create_message is not used by fairforget's drivers")


def make_tiny_cfg(out: Path | str, **overrides: Any) -> RunConfig:
    """The tiny run config writing under ``out``, with ``overrides`` (run-config keys) on top; the task
    identity Flower's messages need is set too (a test calls this before it builds any message)."""
    set_task_identity()
    return resolve({**TINY, "out-dir": str(out), **overrides})
