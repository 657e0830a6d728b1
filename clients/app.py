"""fairforget ClientApp: one SuperNode per shard. Thin: each handler lives in :mod:`clients.handlers`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients import handlers
from clients.node import Node, assigned_shard
from fairforget import keys

app = ClientApp()


def local_epochs_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for the messages that ask for it, a pass-through for the rest.

    FedAvg under user-level DP with client-side clipping (:mod:`strategies.fedavg_dp`) sends the
    clipping norm in its local-epochs train config (Flower's ``DifferentialPrivacyClientSideFixedClipping``);
    Flower's mod then clips this node's update (its model minus the one it received) to that norm
    before it leaves. Flower's mod answers every message without the norm with an error, so messages
    without it (SISA stages, plain FedAvg) pass untouched; a clipping norm on anything but local
    epochs is refused rather than ignored."""
    config = msg.content.get(keys.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if config.get(keys.TRAIN_MODE) != keys.TRAIN_MODE_LOCAL:
        raise ValueError(f"a clipping norm was sent with train-mode {config.get(keys.TRAIN_MODE)!r}: client-side "
                         f"clipping is for FedAvg's {keys.TRAIN_MODE_LOCAL!r} only")
    return fixedclipping_mod(msg, context, call_next)


def _node(msg: Message, context: Context) -> Node:
    """This node, serving the shard the server assigned in ``msg`` (never the one its config claims)."""
    return Node.cached(dict(context.run_config), dict(context.node_config), assigned_shard(msg.content))


@app.train(mods=[local_epochs_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return Message(handlers.train(msg.content, _node(msg, context)), reply_to=msg)


@app.train("unlearn")
def unlearn(msg: Message, context: Context) -> Message:
    return Message(handlers.unlearn(msg.content, _node(msg, context)), reply_to=msg)


@app.train("augment")
def augment(msg: Message, context: Context) -> Message:
    return Message(handlers.augment(msg.content, _node(msg, context)), reply_to=msg)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    return Message(handlers.audit(msg.content, _node(msg, context)), reply_to=msg)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    # not under the state lock (it reads no state), but a kept node whose data changed on disk is rebuilt
    return Message(handlers.identify(msg.content, _node(msg, context).current()), reply_to=msg)


@app.query("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    return Message(handlers.evaluate(msg.content, _node(msg, context)), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    return Message(handlers.describe(msg.content, _node(msg, context)), reply_to=msg)
