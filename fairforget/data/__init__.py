"""Datasets by name, and the partition of the training set into shards.

``DATASETS`` maps a run-config ``dataset`` name to a loader ``load(cfg) -> DataBundle``. A loader
is a module with a ``load`` function; add one by writing the module and registering it here.

Or, without editing fairforget, from a package of your own (:mod:`fairforget.plugins`; installed at
every site): ``dataset = "my_package.data:load"`` (or a module with a ``load``), or a name registered
in the ``fairforget.datasets`` entry-point group. The loader is called as ``load(data_cfg)``: a
namespace with the data keys of the run config (:data:`_DATA_KEYS`: ``data_root``, ``image_size``,
``seed``, ...), ``dataset_options`` among them: the loader's own options, read from
``dataset-options`` with their defaults filled in (it declares ``options``, name -> default, as an
attribute of the loader, or of the module when the plugin is one). It returns a :class:`DataBundle`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from fairforget.config import ConfigError
from fairforget.data import biased_digits, biased_mnist, celeba, cifar10_skewed, image_folder
from fairforget.data.base import DataBundle, DatasetError, SampleSet
from fairforget.data.partition import partition_shards
from fairforget.plugins import Registry, declared_options

DATASETS: dict[str, Callable[..., DataBundle]] = {
    "biased-digits": biased_digits.load,
    "biased-mnist": biased_mnist.load,
    "cifar10-skewed": cifar10_skewed.load,
    "celeba": celeba.load,
    "image-folder": image_folder.load,
}

REGISTRY: Registry[Any] = Registry(
    "dataset", "dataset", DATASETS, modules=True,
    check=lambda obj: callable(getattr(obj, "load", None) if isinstance(obj, ModuleType) else obj),
    expected="a fairforget dataset (a callable load(data_cfg) -> fairforget.data.DataBundle, or a module with one)")

#: what a dataset declares of itself (a module attribute of its loader, or one of the loader itself):
#: ``EMBEDDED``: the data ships with the loader and needs no ``data-root``, so the ServerApp holds it
#: wherever the loader is installed (a simulation's evaluation and audit run on the server);
#: ``OWNS_RECORDS``: the data on disk has record ids of its own, so its tombstones live beside it
DECLARATIONS = ("EMBEDDED", "OWNS_RECORDS")

_DATA_KEYS = (
    "dataset", "data_root", "image_size", "rho", "class_imbalance", "heldout_fraction",
    "test_fraction", "max_samples", "celeba_target", "celeba_private", "seed", "dataset_options",
)


def load_dataset(cfg) -> DataBundle:
    """The run's data; deterministic in the data keys of ``cfg`` and cached per process on them
    alone (a run with other shards or another out-dir reuses it)."""
    return _load_cached(tuple((k, getattr(cfg, k)) for k in _DATA_KEYS))


@functools.lru_cache(maxsize=4)
def _load_cached(data_keys: tuple) -> DataBundle:
    data_cfg = SimpleNamespace(**dict(data_keys))
    plugin = REGISTRY.resolve(data_cfg.dataset)
    data_cfg.dataset_options = REGISTRY.parse_options(data_cfg.dataset, declared_options(plugin),
                                                      data_cfg.dataset_options)
    bundle = _loader(plugin)(data_cfg)
    if not isinstance(bundle, DataBundle):
        raise ConfigError(f"config key 'dataset' = {data_cfg.dataset!r}: its loader returned a "
                          f"{type(bundle).__name__}, not a fairforget.data.DataBundle")
    return bundle


def _loader(plugin: Any) -> Callable[..., DataBundle]:
    """The ``load`` of a dataset plugin: the callable itself, or a module's ``load``."""
    return plugin.load if isinstance(plugin, ModuleType) else plugin


def check_dataset_options(cfg: Any) -> None:
    """``dataset-options`` against the run's dataset, where its loader is installed."""
    plugin = REGISTRY.find(cfg.dataset)
    if plugin is not None:
        REGISTRY.parse_options(cfg.dataset, declared_options(plugin), cfg.dataset_options)


def dataset_declares(name: str, flag: str) -> bool:
    """What a dataset declares of itself (:data:`DECLARATIONS`), as an attribute of its loader or,
    failing that, of the loader's module (a plugin's ``EMBEDDED = True``); undeclared: False."""
    if flag not in DECLARATIONS:
        raise ValueError(f"unknown dataset declaration {flag!r} (have {', '.join(DECLARATIONS)})")
    plugin = REGISTRY.resolve(name)
    if hasattr(plugin, flag):
        return bool(getattr(plugin, flag))
    module = plugin if isinstance(plugin, ModuleType) else sys.modules.get(getattr(plugin, "__module__", ""))
    return bool(getattr(module, flag, False))


def shard_of(cfg, bundle: DataBundle) -> list[SampleSet]:
    """The training set split into ``num-shards`` shards by ``partition``."""
    return partition_shards(bundle.train, cfg.num_shards, cfg.partition, cfg.seed, bundle.records)


__all__ = ["DATASETS", "DECLARATIONS", "REGISTRY", "DataBundle", "DatasetError", "SampleSet", "check_dataset_options",
           "dataset_declares", "load_dataset", "partition_shards", "shard_of"]
