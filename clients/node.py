"""What a SuperNode knows about itself: its shard, its data and its state folder.

Simulation: Flower sets ``partition-id`` / ``num-partitions`` in the node config; the node
rebuilds the dataset from the run config (deterministic) and takes its partition; its state lives in
``OUT/nodes/shard-K``. Deployment: a hospital site sets ``state-dir`` and, for its own data,
``data-root`` (then its whole training split is its shard), plus ``partition-id`` as its shard id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.augment import Augmenter, AugmentStore
from fairforget import keys
from fairforget.config import RunConfig
from fairforget.data import DataBundle, SampleSet, load_dataset, shard_of
from fairforget.diffusion.generator import GeneratorSettings
from fairforget.sisa import SisaSettings, SisaShard


@dataclass
class Node:
    cfg: RunConfig
    shard: int
    state_dir: Path
    bundle: DataBundle
    data: SampleSet

    @classmethod
    def from_context(cls, run_config: dict[str, Any], node_config: dict[str, Any]) -> Node:
        cfg = RunConfig.from_mapping(run_config)
        shard = int(node_config.get(keys.NODE_PARTITION_ID, 0))
        if node_config.get(keys.NODE_DATA_ROOT):
            cfg = cfg.replace(data_root=str(node_config[keys.NODE_DATA_ROOT]))
            bundle = load_dataset(cfg)
            data = bundle.train
        else:
            num = int(node_config.get(keys.NODE_NUM_PARTITIONS, cfg.num_shards))
            if num != cfg.num_shards:
                raise ValueError(f"the federation has {num} nodes but num-shards = {cfg.num_shards}")
            bundle = load_dataset(cfg)
            data = shard_of(cfg, bundle)[shard]
        default_dir = Path(cfg.out_dir) / "nodes" / f"shard-{shard}"
        state_dir = Path(str(node_config.get(keys.NODE_STATE_DIR) or default_dir))
        return cls(cfg, shard, state_dir, bundle, data)

    @functools.cached_property
    def heldout(self) -> SampleSet:
        """This site's non-members: its own held-out split (deployment with ``data-root``), or its
        share of the run's held-out split (simulation)."""
        if self.data is self.bundle.train:
            return self.bundle.heldout
        parts = np.array_split(np.arange(len(self.bundle.heldout)), self.cfg.num_shards)
        return self.bundle.heldout.subset(parts[self.shard])

    @functools.cached_property
    def augment_store(self) -> AugmentStore:
        return AugmentStore(self.state_dir, self.shard)

    @functools.cached_property
    def sisa_settings(self) -> SisaSettings:
        """The training recipe (objective, optimizer, SISA slices) from the run config."""
        return SisaSettings.from_config(self.cfg, self.bundle.num_classes, self.bundle.num_private)

    @functools.cached_property
    def sisa(self) -> SisaShard:
        """The shard's SISA state; its samples are the node's originals plus its live synthetic ones."""
        settings = self.sisa_settings
        data = self.data
        if self.augment_store.active:
            synth, _ = self.augment_store.synthetic(tuple(self.data.x.shape[1:]))
            data = SampleSet.concat([self.data, synth]) if len(synth) else self.data
        return SisaShard(self.state_dir, self.shard, data, settings)

    @functools.cached_property
    def augmenter(self) -> Augmenter:
        settings = GeneratorSettings.from_config(self.cfg, self.bundle.num_classes, self.bundle.num_private)
        return Augmenter(self.data, self.sisa, self.augment_store, settings, self.cfg.seed,
                         self.cfg.augment_kl_threshold, self.cfg.augment_on_delete, self.heldout)
