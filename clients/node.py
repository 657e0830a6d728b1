"""What a SuperNode knows about itself: its shard, its data and its state folder.

The shard is the one the server assigned, carried by every message (:func:`assigned_shard`;
:mod:`fairforget.binding`), never the node's own claim. Simulation: the node rebuilds the dataset from
the run config (deterministic) and takes that partition; its state lives in ``OUT/nodes/shard-K``
(Flower's ``partition-id`` is ignored). Deployment: a hospital site sets ``state-dir`` and, for its own
data, ``data-root`` (then its whole training split is its shard), plus ``partition-id``, its shard: a
message assigning another shard is refused.

Deletions are kept by the data's owner as tombstones keyed on the normalised record id
(:mod:`fairforget.tombstones`: ``DATA_ROOT/.fairforget-tombstones.jsonl`` beside an image folder's
``labels.csv``, at a site and in a simulation over it alike, or the node-config key ``tombstones``;
``OUT/tombstones.jsonl`` for the embedded benchmark data): the node's data leaves them out, so a new
state folder, a new run or a new out-dir never trains on a deleted record. A node handles each
message holding its state folder's lock (:meth:`Node.locked`) and first finishes what a crash
interrupted (:meth:`Node.resume`).
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fairforget import keys
from fairforget.config import RunConfig
from fairforget.data import DataBundle, SampleSet, load_dataset, shard_of
from fairforget.data.image_folder import site_key
from fairforget.locks import LOCK_FILE, locked
from fairforget.privacy.accountant import PrivacyBudgetExceeded
from fairforget.sisa import SisaSettings, SisaShard
from fairforget.site_secret import KEY_FILE, check_key_fingerprint
from fairforget.storage import sweep_leftovers
from fairforget.tombstones import Tombstones
from fairforget.unlearning import approximate, exact

if TYPE_CHECKING:  # diffusers is imported only by a node that augments (a plain message starts faster)
    from clients.augment import Augmenter, AugmentStore


def assigned_shard(content: Any) -> int:
    """The shard the server assigned to this node, from a message's ConfigRecord (``keys.SHARD``);
    a message without one is refused: a node never serves the shard it merely claims."""
    config = content.get(keys.CONFIG) if hasattr(content, "get") else None
    if config is None or keys.SHARD not in config:
        raise ValueError("the message carries no assigned shard (config key 'shard'): refused (the server "
                         "assigns each node its shard; a node never serves the one it claims)")
    value = config[keys.SHARD]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the message's assigned shard {value!r} is not an integer: refused")
    return int(value)


def _claimed(node_config: dict[str, Any]) -> int | None:
    """The node config's ``partition-id`` (None if unset); a one-line error if it is not an integer."""
    raw = node_config.get(keys.NODE_PARTITION_ID)
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"this node's partition-id = {raw!r} is not an integer") from None


def _served_shard(cfg: RunConfig, node_config: dict[str, Any], assigned: int | None) -> int:
    """The shard this node serves: the server's ``assigned`` one, checked (see :meth:`Node.from_context`)."""
    claimed = _claimed(node_config)
    own = bool(node_config.get(keys.NODE_DATA_ROOT) or node_config.get(keys.NODE_STATE_DIR))
    if (assigned is None or own) and claimed is None:
        raise ValueError("this node's config has no partition-id (its shard): start the SuperNode with "
                         '--node-config "partition-id=K site=\"NAME\" data-root=... state-dir=..."')
    if assigned is None:
        return int(claimed)
    if not 0 <= assigned < cfg.num_shards:
        raise ValueError(f"the server assigned shard {assigned}, but the run has shards 0..{cfg.num_shards - 1}")
    if own and claimed != assigned:
        site = node_config.get(keys.NODE_SITE) or f"site-{claimed}"
        raise ValueError(f"site {site!r}: the server assigned shard {assigned}, but this node's partition-id is "
                         f"{claimed}: refused (the operator's binding file and this node's config disagree)")
    return assigned


# ---------------------------------------------------------------------- the worker's cache of nodes
# A Flower worker process handles many messages, of many nodes; what a node loads (its config, data,
# tombstones, SISA index, last checkpoint) is kept here across messages (:meth:`Node.cached`) and
# checked, holding the node's lock, against its state on disk (:meth:`Node.current`), so a crash, a
# resume or another process's write is seen and the node rebuilt. ``FAIRFORGET_NODE_CACHE=0``: no cache.
_NODES: OrderedDict[str, Node] = OrderedDict()


def cache_size() -> int:
    """How many nodes a process keeps (``FAIRFORGET_NODE_CACHE``, default 64; 0 turns the cache off)."""
    try:
        return max(0, int(os.environ.get("FAIRFORGET_NODE_CACHE", "64")))
    except ValueError:
        return 64


def state_stamp(state_dir: Path, also: list[Path]) -> tuple:
    """The version of a node's state on disk: (name, size, mtime, inode) of every file in its state
    folder and the folders in it (its lock file aside), and of the files in ``also`` (its tombstones).
    Every writer replaces or appends a file (:mod:`fairforget.storage`), which changes its entry."""
    out = []
    folders = [state_dir]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for e in entries:
            if e.name == LOCK_FILE:
                continue
            if e.is_dir(follow_symlinks=False):
                if folder == state_dir:  # one level down: checkpoints/, augment/, audit/
                    folders.append(Path(e.path))
                continue
            st = e.stat(follow_symlinks=False)
            out.append((e.path, st.st_size, st.st_mtime_ns, st.st_ino))
    for path in also:
        try:
            st = path.stat()
            out.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        except FileNotFoundError:
            out.append((str(path), -1, 0, 0))
    return tuple(sorted(out))


@dataclass
class Node:
    cfg: RunConfig
    shard: int
    state_dir: Path
    bundle: DataBundle
    data: SampleSet  # the node's originals, tombstoned ones left out
    tombstones: Tombstones
    site: str = ""  # the site's name (node-config key site; default site-<shard>)
    server_has_data: bool = True  # False: a deployment whose server keeps no patient data
    partition_id: int | None = None  # the node config's partition-id: what the node claims, a cross-check only
    own_data: bool = False  # a site with its own data-root (its whole training split is its shard)
    # the worker's cache (Node.cached): the key and arguments it was built from, its config then, and the
    # stamp of its state on disk as this process last left it
    _context: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _cfg_built: RunConfig | None = field(default=None, init=False, repr=False, compare=False)
    _seen: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def cached(cls, run_config: dict[str, Any], node_config: dict[str, Any], assigned: int | None = None) -> Node:
        """:meth:`from_context`, kept in this process across messages (a handler then checks it against
        the state on disk: :meth:`current`)."""
        key = json.dumps([run_config, node_config, assigned], sort_keys=True, default=str)
        node = _NODES.get(key)
        if node is None:
            node = cls.from_context(run_config, node_config, assigned)
            node._context = (key, run_config, node_config, assigned)
            node._cfg_built = node.cfg
            node._seen = node._stamp()  # what it was built from (checked again under the lock: current)
            if cache_size() > 0:
                _NODES[key] = node
                while len(_NODES) > cache_size():
                    _NODES.popitem(last=False)
        else:
            _NODES.move_to_end(key)
        return node

    def _stamp(self) -> tuple:
        return state_stamp(self.state_dir, [self.tombstones.path, *self.tombstones.also])

    def current(self) -> Node:
        """This node if its state on disk is as this process last left it, else a node rebuilt from it
        (replacing the cached one). Call holding the node's lock (:meth:`locked`)."""
        stamp = self._stamp()
        if self._seen is None or self._seen == stamp:
            self._seen = stamp
            return self
        context = self._context
        self.uncache()
        if context is None:
            raise RuntimeError("internal: a node not built by Node.cached cannot be rebuilt")
        node = Node.cached(*context[1:])
        node._seen = stamp
        return node

    def remember(self) -> None:
        """After a handler (still holding the lock): the state folder's changes are this node's own, kept
        in step in its memory. A node whose config a request changed (its own options), or whose
        tombstones changed (its data leaves them out from when it was built), is not kept."""
        before = self._seen
        self._seen = self._stamp()
        tombstones = {str(self.tombstones.path), *map(str, self.tombstones.also)}
        moved = before is None or [e for e in before if e[0] in tombstones] != [e for e in self._seen
                                                                                   if e[0] in tombstones]
        if moved or (self._cfg_built is not None and self.cfg is not self._cfg_built):
            self.uncache()

    def set_config(self, cfg: RunConfig) -> None:
        """Serve one message under ``cfg`` (a request's own options): what was built from the old config
        is built again, and the node is not kept for later messages (:meth:`remember`)."""
        self.cfg = cfg
        for name in ("sisa_settings", "sisa", "augmenter", "augment_store", "heldout"):
            self.__dict__.pop(name, None)

    def uncache(self) -> None:
        """Drop this node from the process's cache (after a failed handler: its memory may be ahead of
        or behind its state on disk)."""
        if self._context is not None and _NODES.get(self._context[0]) is self:
            del _NODES[self._context[0]]

    @classmethod
    def from_context(cls, run_config: dict[str, Any], node_config: dict[str, Any],
                     assigned: int | None = None) -> Node:
        """The node serving ``assigned``, the shard the server assigned (every message carries it:
        :func:`assigned_shard`); the node config's ``partition-id`` never decides. Simulation: that
        partition of the run's data, state in ``OUT/nodes/shard-K``. A site with its own ``data-root`` or
        ``state-dir`` refuses a shard other than its ``partition-id``. ``assigned = None`` (a site-local
        tool, no message): the node config's ``partition-id``."""
        cfg = RunConfig.from_mapping(run_config)
        server_has_data = cfg.server_has_data
        shard = _served_shard(cfg, node_config, assigned)
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
            if cfg.dataset == "image-folder":  # its sample ids are keyed: the state must have the same key
                root = Path(cfg.data_root).expanduser()
                check_key_fingerprint(Path(str(node_config.get(keys.NODE_STATE_DIR))), site_key(root),
                                      root / KEY_FILE)
            tombstones = Tombstones.for_data(cfg, bundle.records, path=node_config.get(keys.NODE_TOMBSTONES))
        else:
            num = int(node_config.get(keys.NODE_NUM_PARTITIONS, cfg.num_shards))
            if num != cfg.num_shards:
                raise ValueError(f"the federation has {num} nodes but num-shards = {cfg.num_shards}")
            bundle = load_dataset(cfg)
            data = shard_of(cfg, bundle)[shard]
            tombstones = Tombstones.for_data(cfg, bundle.records, run_dir=Path(cfg.out_dir),
                                             path=node_config.get(keys.NODE_TOMBSTONES))
        gone = tombstones.ids()  # the node's data leaves out every tombstoned record
        if gone:
            data = data.subset([i for i, sid in enumerate(data.ids.tolist()) if sid not in gone])
        default_dir = Path(cfg.out_dir) / "nodes" / f"shard-{shard}"
        state_dir = Path(str(node_config.get(keys.NODE_STATE_DIR) or default_dir))
        return cls(cfg, shard, state_dir, bundle, data, tombstones, site, server_has_data,
                   partition_id=_claimed(node_config), own_data=bool(node_config.get(keys.NODE_DATA_ROOT)))

    # ------------------------------------------------------------------ crash safety
    @contextmanager
    def locked(self) -> Iterator[Node]:
        """Hold this node's state folder (waiting for a handler of another run or process to finish)."""
        with locked(self.state_dir, f"node of shard {self.shard}", wait=float("inf")):
            yield self

    def pin_key(self) -> None:
        """Record the site key's fingerprint in the state folder (once, holding the state lock), so a
        lost or swapped key is noticed before a shard trained under the old one is touched."""
        if self.own_data and self.cfg.dataset == "image-folder":
            root = Path(self.cfg.data_root).expanduser()
            check_key_fingerprint(self.state_dir, site_key(root), root / KEY_FILE, pin=True)

    def resume(self) -> None:
        """Finish what a crash interrupted, before handling anything: leftover folders of an
        interrupted removal or swap (:func:`fairforget.storage.sweep_leftovers`); a deletion whose
        tombstone was written but whose shard still holds the id (finished by exact unlearning); an
        invalidated generator's removal; an approximate deletion committed without its approximate
        model, or a retrain that stopped short of its target stage (finished by an exact retrain:
        :func:`fairforget.unlearning.approximate.resume`)."""
        sweep_leftovers(self.state_dir, tmp_files=True)  # every writer here holds the node's lock
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
            try:
                exact.unlearn(shard, unfinished)
            except PrivacyBudgetExceeded:
                # DP, an approximate deletion that crashed before its commit, and the exact retrain past the
                # cap: the ids leave the index all the same, and the clean checkpoint serves (approximate.resume)
                shard.remove(unfinished, retrain_to=approximate.target_stage(shard))
                approximate.clear(shard)
        else:
            approximate.resume(shard)

    def delete(self, ids: list[int]) -> None:
        """Record a deletion at the data's owner, durable (fsynced) before it returns, after every check
        that could refuse it and before the shard changes; a failed write raises, nothing deleted."""
        self.tombstones.add(ids)

    @functools.cached_property
    def heldout(self) -> SampleSet:
        """This site's non-members: its own held-out split (deployment with ``data-root``), or its
        share of the run's held-out split (simulation)."""
        if self.own_data:  # a site's own data: its whole held-out split
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
                         FilterSettings.from_config(self.cfg), retire_order=self.cfg.augment_retire_order)
