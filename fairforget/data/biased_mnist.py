"""Biased-MNIST from torchvision's on-disk MNIST (``ROOT/MNIST/raw/*-ubyte``; nothing is downloaded).

Rendered as in Bahng et al. 2020 (see :mod:`fairforget.data.base`). Training ids are MNIST's
training-set row numbers; test ids are the test-set row numbers. ``max-samples`` caps the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fairforget.data.base import DataBundle, DatasetError, biased_mnist_bundle, resize

if TYPE_CHECKING:
    from torchvision.datasets import MNIST


def _read(root: Path, train: bool) -> MNIST:
    try:
        from torchvision.datasets import MNIST  # torchvision is slow to import: only when used

        ds = MNIST(str(root), train=train, download=False)
    except (RuntimeError, ValueError, OSError, AssertionError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"MNIST not found or malformed under {root} (expected {root}/MNIST/raw/*-idx?-ubyte): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    split = "train" if train else "t10k"
    if len(ds.data) != len(ds.targets):
        raise DatasetError(f"MNIST under {root} is malformed: {split} files hold {len(ds.data)} images "
                           f"but {len(ds.targets)} labels")
    if len(ds.targets) and not 0 <= int(ds.targets.min()) <= int(ds.targets.max()) <= 9:
        raise DatasetError(f"MNIST under {root} is malformed: {split} labels outside 0-9")
    return ds


def load(cfg) -> DataBundle:
    if not cfg.data_root:
        raise DatasetError("dataset 'biased-mnist' needs data-root (the folder that holds MNIST/raw)")
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data-root {root} is not a folder")
    tr, te = _read(root, True), _read(root, False)
    rng = np.random.default_rng(cfg.seed + 104729)
    pool = np.arange(len(tr.targets))
    if cfg.max_samples and len(pool) > cfg.max_samples:
        pool = np.sort(rng.choice(pool, cfg.max_samples, replace=False))
    test = np.arange(len(te.targets))
    max_test = max(100, cfg.max_samples // 4) if cfg.max_samples else len(test)
    if len(test) > max_test:
        test = np.sort(rng.choice(test, max_test, replace=False))

    def gray(ds: MNIST, pos: np.ndarray) -> torch.Tensor:
        return resize(ds.data[torch.as_tensor(pos)].float().unsqueeze(1) / 255.0, cfg.image_size)

    return biased_mnist_bundle(
        "biased-mnist",
        gray(tr, pool), tr.targets.numpy()[pool], pool,
        gray(te, test), te.targets.numpy()[test], test,
        rho=cfg.rho,
        class_imbalance=cfg.class_imbalance,
        heldout_fraction=cfg.heldout_fraction,
        seed=cfg.seed,
    )
