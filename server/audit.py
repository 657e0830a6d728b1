"""Site audits (``query.audit``): every node audits the ensemble on its own members and held-out data
and replies with ROC statistics only (:mod:`fairforget.audit.site`). The server's own audit of the
ensemble and of every shard model is :func:`fairforget.audit.suite.run_audit`."""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fairforget import keys
from fairforget.records import pack_shards


def site_audits(grid: Any, states: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Ask every node to audit the ensemble on its own members and held-out data; each replies with
    ROC statistics only. Returns ``{"site-K": {attack: summary}}``."""
    arrays = pack_shards({k: ArrayRecord(v) for k, v in states.items()})
    messages = [Message(RecordDict({keys.ARRAYS: arrays}), dst_node_id=n, message_type=keys.MSG_AUDIT)
                for n in grid.get_node_ids()]
    out: dict[str, Any] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            out[f"node-{reply.metadata.src_node_id}"] = {"error": reply.error.reason}
            continue
        shard = int(reply.content[keys.METRICS][keys.SHARD])
        out[f"site-{shard}"] = json.loads(reply.content[keys.CONFIG][keys.AUDIT_JSON])
    return dict(sorted(out.items()))
