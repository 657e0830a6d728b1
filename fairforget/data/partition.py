"""Partition of the training set (the members) into S disjoint shards.

``iid``: a seeded random permutation cut into S near-equal parts (a site's records: each in the shard
its record id draws, so an added row moves no record). ``site``: one shard per value of
the data's site column (S must equal the number of sites), as hospitals each holding their own
data. The partition is a pure function of the ids, the seed and S, so the CLI can route a deletion
request to its owning shard without asking the clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fairforget.data.base import DatasetError, SampleSet, split_unit


def partition_shards(train: SampleSet, num_shards: int, how: str, seed: int,
                     records: Mapping[int, str] | None = None) -> list[SampleSet]:
    """``records`` (sample id -> the site's record id, data read from a site's folder): ``iid`` puts
    each record in the shard its record id draws (:func:`fairforget.data.base.split_unit`), so rows
    added to ``labels.csv`` move no existing record to another shard; without record ids (the
    embedded benchmark data) a seeded permutation of the rows is cut into near-equal parts."""
    if how == "iid":
        if len(train) < num_shards:
            raise DatasetError(f"{len(train)} training samples cannot fill {num_shards} shards")
        if records:
            draws = np.array([int(split_unit(seed, "shard", records[int(i)]) * num_shards) for i in train.ids.tolist()])
            parts = [np.flatnonzero(draws == k) for k in range(num_shards)]
            empty = [k for k, p in enumerate(parts) if not len(p)]
            if empty:
                raise DatasetError(f"{len(train)} training records leave shard(s) {empty} empty when each record "
                                   f"draws its shard by its id: use fewer than {num_shards} shards")
            return [train.subset(p) for p in parts]
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
