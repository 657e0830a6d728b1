"""Several shard models in one Flower ``ArrayRecord`` and back.

Flower's ``Strategy.start`` loop carries one ArrayRecord between rounds, and an audit request carries
models in one; packing every shard's arrays under ``shard-K/<name>`` lets one record hold an ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

SEP = "/"


def pack_shards(shards: Mapping[int, ArrayRecord]) -> ArrayRecord:
    """One ArrayRecord holding every shard's arrays under ``shard-K/<name>``."""
    packed = ArrayRecord()
    for shard, record in sorted(shards.items()):
        for name, array in record.items():
            packed[f"shard-{shard}{SEP}{name}"] = array
    return packed


def unpack_shards(packed: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
    """``shard -> state dict`` from a record made by :func:`pack_shards`."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, array in packed.items():
        head, _, name = key.partition(SEP)
        shard = int(head.removeprefix("shard-"))
        out.setdefault(shard, {})[name] = torch.from_numpy(array.numpy().copy())
    return out
