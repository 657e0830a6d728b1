"""CelebA from its standard on-disk layout (``ROOT/celeba/``: ``img_align_celeba/``,
``list_attr_celeba.txt``, ``list_eval_partition.txt``); a target and a private attribute.

torchvision's CelebA class verifies the official files' MD5 sums, so this loader parses the same
files itself (same format) and reads images with PIL and torchvision transforms. Partition 0 gives
the members and non-members, partition 2 the test splits; ``max-samples`` caps the training pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fairforget.data.base import DataBundle, DatasetError, image_bundle, load_image_file, make_sampleset


def _read_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"CelebA attribute file missing: {path}")
    try:
        lines = path.read_text().splitlines()
        names = lines[1].split()
        files, rows = [], []
        for line in lines[2:]:
            parts = line.split()
            if not parts:
                continue
            files.append(parts[0])
            rows.append([int(v) for v in parts[1:]])
        values = np.asarray(rows, dtype=np.int64)
        if values.ndim != 2 or values.shape[1] != len(names):
            raise ValueError("ragged attribute rows")
    except (IndexError, ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"CelebA attribute file {path} is malformed: {exc}") from None
    return names, files, values


def _read_partition(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DatasetError(f"CelebA partition file missing: {path}")
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise DatasetError(f"CelebA partition file {path} cannot be read: {exc}") from None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            if parts:
                raise DatasetError(f"CelebA partition file {path} is malformed at: {line!r}")
            continue
        out[parts[0]] = int(parts[1])
    return out


def load(cfg) -> DataBundle:
    if not cfg.data_root:
        raise DatasetError("dataset 'celeba' needs data-root (the folder that holds celeba/)")
    base = Path(cfg.data_root).expanduser() / "celeba"
    names, files, values = _read_attrs(base / "list_attr_celeba.txt")
    for attr in (cfg.celeba_target, cfg.celeba_private):
        if attr not in names:
            raise DatasetError(f"CelebA has no attribute {attr!r} (have e.g. {', '.join(names[:5])})")
    part = _read_partition(base / "list_eval_partition.txt")
    y = (values[:, names.index(cfg.celeba_target)] > 0).astype(np.int64)
    private = (values[:, names.index(cfg.celeba_private)] > 0).astype(np.int64)
    split = np.array([part.get(f, -1) for f in files])
    rng = np.random.default_rng(cfg.seed + 32452843)
    pool = np.flatnonzero(split == 0)
    test = np.flatnonzero(split == 2)
    if cfg.max_samples and len(pool) > cfg.max_samples:
        pool = np.sort(rng.choice(pool, cfg.max_samples, replace=False))
        test = np.sort(rng.choice(test, min(len(test), max(100, cfg.max_samples // 4)), replace=False))
    if len(pool) == 0 or len(test) == 0:
        raise DatasetError(f"CelebA under {base} has no training (0) or test (2) partition rows")
    img_dir = base / "img_align_celeba"

    def to_set(pos: np.ndarray):
        x = torch.stack([load_image_file(str(img_dir / files[i]), cfg.image_size) for i in pos])
        return make_sampleset(x, y[pos], private[pos], pos)

    return image_bundle(
        "celeba", to_set(pool), to_set(test), num_classes=2, num_private=2,
        class_imbalance=cfg.class_imbalance, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
    )
