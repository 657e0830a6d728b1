"""CIFAR-10, class-skewed, from the standard on-disk python batches (``ROOT/cifar-10-batches-py``).

The skewed subset follows the augmentation paper's setting (a long-tailed class distribution,
``class-imbalance`` = largest / smallest class). CIFAR-10 has no private attribute: every sample's
private label is 0, so groups are classes. The batches are pickles; they are read with an
unpickler that admits only the numpy types the format uses, never arbitrary objects.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from fairforget.data.base import DataBundle, DatasetError, image_bundle, long_tail_keep, make_sampleset, resize

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            d = _SafeUnpickler(fh, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-10 batch missing: {path}") from None
    except OSError as exc:
        raise DatasetError(f"CIFAR-10 batch {path} cannot be read: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, AttributeError, IndexError,
            MemoryError) as exc:
        raise DatasetError(f"CIFAR-10 batch {path} is malformed: {exc}") from None
    if len(data) != len(labels):
        raise DatasetError(f"CIFAR-10 batch {path} is malformed: {len(data)} images, {len(labels)} labels")
    return data, labels


def load(cfg) -> DataBundle:
    if not cfg.data_root:
        raise DatasetError("dataset 'cifar10-skewed' needs data-root (the folder that holds cifar-10-batches-py)")
    base = Path(cfg.data_root).expanduser() / "cifar-10-batches-py"
    if not base.is_dir():
        raise DatasetError(f"CIFAR-10 not found: {base} is not a folder")
    parts = [_read_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_batch(base / "test_batch")
    rng = np.random.default_rng(cfg.seed + 15485863)
    pool = np.arange(len(y_tr))
    if cfg.max_samples and len(pool) > cfg.max_samples:
        pool = np.sort(rng.choice(pool, cfg.max_samples, replace=False))

    def to_set(x: np.ndarray, y: np.ndarray, pos: np.ndarray) -> object:
        images = resize(torch.as_tensor(x[pos]).float() / 255.0, cfg.image_size)
        return make_sampleset(images, y[pos], np.zeros(len(pos), dtype=np.int64), pos)

    train_pool = to_set(x_tr, y_tr, pool)
    test = to_set(x_te, y_te, np.arange(len(y_te)))
    bundle = image_bundle(
        "cifar10-skewed", train_pool, test, num_classes=10, num_private=1,
        class_imbalance=cfg.class_imbalance, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
    )
    # the biased test set is long-tailed like the training data; the unbiased one is balanced
    bundle.test_biased = test.subset(long_tail_keep(test.y.numpy(), cfg.class_imbalance, rng, 10))
    return bundle
