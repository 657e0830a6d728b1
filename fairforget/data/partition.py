"""Partition of the training set (the members) into S disjoint shards.

``iid``: a seeded random permutation cut into S near-equal parts. ``site``: one shard per value of
the data's site column (S must equal the number of sites), as hospitals each holding their own
data. The partition is a pure function of the ids, the seed and S, so the CLI can route a deletion
request to its owning shard without asking the clients.
"""

from __future__ import annotations

import numpy as np

from fairforget.data.base import DatasetError, SampleSet


def partition_shards(train: SampleSet, num_shards: int, how: str, seed: int) -> list[SampleSet]:
    if how == "iid":
        if len(train) < num_shards:
            raise DatasetError(f"{len(train)} training samples cannot fill {num_shards} shards")
        order = np.random.default_rng(seed + 2_147_483).permutation(len(train))
        return [train.subset(np.sort(part)) for part in np.array_split(order, num_shards)]
    if how == "site":
        sites = train.site.numpy()
        values = sorted(set(sites.tolist()) - {-1})
        if not values:
            raise DatasetError("partition = 'site' needs data with a site column (image-folder labels.csv)")
        if len(values) != num_shards:
            raise DatasetError(f"partition = 'site': the data has {len(values)} sites but num-shards = {num_shards}")
        return [train.subset(np.flatnonzero(sites == v)) for v in values]
    raise DatasetError(f"unknown partition {how!r}")
