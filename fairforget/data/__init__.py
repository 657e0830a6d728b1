"""Datasets by name, and the partition of the training set into shards.

``DATASETS`` maps a run-config ``dataset`` name to a loader ``load(cfg) -> DataBundle``. A loader
is a module with a ``load`` function; add one by writing the module and registering it here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

from fairforget.config import lookup
from fairforget.data import biased_digits, biased_mnist, celeba, cifar10_skewed, image_folder
from fairforget.data.base import DataBundle, DatasetError, SampleSet
from fairforget.data.partition import partition_shards

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "biased-digits": biased_digits.load,
    "biased-mnist": biased_mnist.load,
    "cifar10-skewed": cifar10_skewed.load,
    "celeba": celeba.load,
    "image-folder": image_folder.load,
}

_DATA_KEYS = (
    "dataset", "data_root", "image_size", "rho", "class_imbalance", "heldout_fraction",
    "test_fraction", "max_samples", "celeba_target", "celeba_private", "seed",
)


def load_dataset(cfg) -> DataBundle:
    """The run's data; deterministic in the data keys of ``cfg`` and cached per process on them
    alone (a run with other shards or another out-dir reuses it)."""
    return _load_cached(tuple((k, getattr(cfg, k)) for k in _DATA_KEYS))


@functools.lru_cache(maxsize=4)
def _load_cached(data_keys: tuple) -> DataBundle:
    data_cfg = SimpleNamespace(**dict(data_keys))
    return lookup("dataset", data_cfg.dataset, DATASETS)(data_cfg)


def shard_of(cfg, bundle: DataBundle) -> list[SampleSet]:
    """The training set split into ``num-shards`` shards by ``partition``."""
    return partition_shards(bundle.train, cfg.num_shards, cfg.partition, cfg.seed, bundle.records)


__all__ = ["DATASETS", "DataBundle", "DatasetError", "SampleSet", "load_dataset", "partition_shards", "shard_of"]
