"""fairforget ClientApp: one SuperNode per shard. Thin: each handler lives in :mod:`clients.handlers`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import handlers
from clients.node import Node

app = ClientApp()


def _node(context: Context) -> Node:
    return Node.from_context(dict(context.run_config), dict(context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(handlers.train(msg.content, _node(context)), reply_to=msg)


@app.train("unlearn")
def unlearn(msg: Message, context: Context) -> Message:
    return Message(handlers.unlearn(msg.content, _node(context)), reply_to=msg)


@app.train("augment")
def augment(msg: Message, context: Context) -> Message:
    return Message(handlers.augment(msg.content, _node(context)), reply_to=msg)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    return Message(handlers.audit(msg.content, _node(context)), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    return Message(handlers.describe(msg.content, _node(context)), reply_to=msg)
