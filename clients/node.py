"""What a SuperNode knows about itself: its shard, its data and its state folder.

Simulation: Flower sets ``partition-id`` / ``num-partitions`` in the node config; the node
rebuilds the dataset from the run config (deterministic) and takes its partition; its state lives in
``OUT/nodes/shard-K``. Deployment: a hospital site sets ``state-dir`` and, for its own data,
``data-root`` (then its whole training split is its shard), plus ``partition-id`` as its shard id.

Deletions are kept by the data's owner as tombstones (:mod:`fairforget.tombstones`: ``OUT/tombstones.jsonl``
in simulation, ``DATA_ROOT/.fairforget-tombstones.jsonl`` at a site, or the node-config key
``tombstones``): the node's data leaves them out, so a new state folder or a new run never trains on
a deleted record. A node handles each message holding its state folder's lock
(:meth:`Node.locked`) and first finishes what a crash interrupted (:meth:`Node.resume`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fairforget import keys
from fairforget.config import RunConfig
from fairforget.data import DataBundle, SampleSet, load_dataset, shard_of
from fairforget.locks import locked
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.tombstones import Tombstones
from fairforget.unlearning import exact

if TYPE_CHECKING:  # diffusers is imported only by a node that augments (a plain message starts faster)
    from clients.augment import Augmenter, AugmentStore


@dataclass
class Node:
    cfg: RunConfig
    shard: int
    state_dir: Path
    bundle: DataBundle
    data: SampleSet  # the node's originals, tombstoned ones left out
    tombstones: Tombstones
    site: str = ""  # the site's name (node-config key site; default site-<partition-id>)
    server_has_data: bool = True  # False: a deployment whose server keeps no patient data

    @classmethod
    def from_context(cls, run_config: dict[str, Any], node_config: dict[str, Any]) -> Node:
        cfg = RunConfig.from_mapping(run_config)
        server_has_data = cfg.server_has_data
        if keys.NODE_PARTITION_ID not in node_config:
            raise ValueError("this node's config has no partition-id (its shard): start the SuperNode with "
                             '--node-config "partition-id=K site=\"NAME\" data-root=... state-dir=..."')
        shard = int(node_config[keys.NODE_PARTITION_ID])
        site = str(node_config.get(keys.NODE_SITE) or f"site-{shard}")
        if not server_has_data and not node_config.get(keys.NODE_DATA_ROOT):
            raise ValueError(f"site {site!r}: the run keeps no data on the server, so this node needs data-root "
                             "(its own image folder) in its node config")
        if node_config.get(keys.NODE_DATA_ROOT) and not node_config.get(keys.NODE_STATE_DIR):
            raise ValueError(f"site {site!r}: a node with its own data-root needs state-dir (where its shard's "
                             "checkpoints live) in its node config")
        if node_config.get(keys.NODE_DATA_ROOT):
            cfg = cfg.replace(data_root=str(node_config[keys.NODE_DATA_ROOT]))
            bundle = load_dataset(cfg)
            data = bundle.train
            tombstones = Tombstones.of_site(Path(cfg.data_root))
        else:
            num = int(node_config.get(keys.NODE_NUM_PARTITIONS, cfg.num_shards))
            if num != cfg.num_shards:
                raise ValueError(f"the federation has {num} nodes but num-shards = {cfg.num_shards}")
            bundle = load_dataset(cfg)
            data = shard_of(cfg, bundle)[shard]
            tombstones = Tombstones.of_run(Path(cfg.out_dir))
        if node_config.get(keys.NODE_TOMBSTONES):
            tombstones = Tombstones(Path(str(node_config[keys.NODE_TOMBSTONES])))
        gone = tombstones.ids()
        if gone:
            data = data.subset([i for i, sid in enumerate(data.ids.tolist()) if sid not in gone])
        default_dir = Path(cfg.out_dir) / "nodes" / f"shard-{shard}"
        state_dir = Path(str(node_config.get(keys.NODE_STATE_DIR) or default_dir))
        return cls(cfg, shard, state_dir, bundle, data, tombstones, site, server_has_data)

    # ------------------------------------------------------------------ crash safety
    @contextmanager
    def locked(self) -> Iterator[Node]:
        """Hold this node's state folder (waiting for a handler of another run or process to finish)."""
        with locked(self.state_dir, f"node of shard {self.shard}", wait=float("inf")):
            yield self

    def resume(self) -> None:
        """Finish what a crash interrupted, before handling anything: a deletion whose tombstone was
        written but whose shard still holds the id (finished by exact unlearning), an invalidated
        generator's removal, a retrain that stopped short of its target stage."""
        if not (self.state_dir / "index.json").exists():
            return  # nothing trained here yet (a fresh index leaves the tombstoned ids out)
        shard, tomb = self.sisa, self.tombstones.ids()
        unfinished = sorted(shard.live_ids() & tomb)
        if self.augmented:  # also originals only the generator still holds (retired ones)
            store = self.augment_store
            held = store.retired | set(store.state["generator_trained_on"])
            unfinished = sorted((shard.live_ids() & tomb) | ((tomb - store.deleted) & held))
            if unfinished:
                self.augmenter.forget(unfinished)
            self.augmenter.resume()
        elif unfinished:
            exact.unlearn(shard, unfinished)
        else:
            shard.resume()

    def delete(self, ids: list[int]) -> None:
        """Record a deletion at the data's owner (fsynced) before the shard changes."""
        self.tombstones.add(ids)

    @functools.cached_property
    def heldout(self) -> SampleSet:
        """This site's non-members: its own held-out split (deployment with ``data-root``), or its
        share of the run's held-out split (simulation)."""
        if self.data is self.bundle.train:
            return self.bundle.heldout
        parts = np.array_split(np.arange(len(self.bundle.heldout)), self.cfg.num_shards)
        return self.bundle.heldout.subset(parts[self.shard])

    @property
    def augmented(self) -> bool:
        """Whether this node has augmentation state (without importing the diffusion stack)."""
        return (self.state_dir / "augment" / "state.json").exists()

    @functools.cached_property
    def augment_store(self) -> AugmentStore:
        from clients.augment import AugmentStore

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
        if self.augmented:
            synth, _ = self.augment_store.synthetic(tuple(self.data.x.shape[1:]))
            data = SampleSet.concat([self.data, synth]) if len(synth) else self.data
        return SisaShard(self.state_dir, self.shard, data, settings)

    @functools.cached_property
    def augmenter(self) -> Augmenter:
        from clients.augment import Augmenter
        from fairforget.diffusion.filter import FilterSettings
        from fairforget.diffusion.generator import GeneratorSettings

        settings = GeneratorSettings.from_config(self.cfg, self.bundle.num_classes, self.bundle.num_private)
        return Augmenter(self.data, self.sisa, self.augment_store, settings, self.cfg.seed,
                         self.cfg.augment_kl_threshold, self.cfg.augment_on_delete, self.heldout,
                         FilterSettings.from_config(self.cfg))
