"""A site's own images: a folder with ``labels.csv`` (columns ``path,label`` and optionally
``private``, ``site``, ``split``), or, without a CSV, torchvision's ImageFolder layout
(``ROOT/<class>/<image>``, private label 0).

``path`` is relative to the root. ``split = test`` marks test rows (without any, a stratified
``test-fraction`` is drawn); the rest are split into members and held-out non-members. ``site``
feeds ``partition = "site"`` (one shard per site).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from fairforget.data.base import (
    DataBundle,
    DatasetError,
    image_bundle,
    load_image_file,
    make_sampleset,
    stratified_split,
)


def _read_csv(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{root}/labels.csv must have columns path,label (got {reader.fieldnames})")
        return list(reader)


def _codes(values: list[str], column: str) -> tuple[np.ndarray, list[str]]:
    if any(v is None or v == "" for v in values):
        raise DatasetError(f"labels.csv has an empty '{column}' value")
    uniq = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    lookup = {v: i for i, v in enumerate(uniq)}
    return np.array([lookup[v] for v in values], dtype=np.int64), uniq


def load(cfg) -> DataBundle:
    if not cfg.data_root:
        raise DatasetError("dataset 'image-folder' needs data-root (a folder with labels.csv or class folders)")
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data-root {root} is not a folder")
    if (root / "labels.csv").is_file():
        rows = _read_csv(root)
        if not rows:
            raise DatasetError(f"{root}/labels.csv has no rows")
        paths = [str(root / r["path"]) for r in rows]
        y, classes = _codes([r["label"] for r in rows], "label")
        private = _codes([r.get("private") or "0" for r in rows], "private")[0]
        site = _codes([r.get("site") or "0" for r in rows], "site")[0] if "site" in rows[0] else None
        split = [(r.get("split") or "").strip().lower() for r in rows]
        bad = sorted({s for s in split if s not in ("", "train", "heldout", "test")})
        if bad:
            raise DatasetError(f"labels.csv split values must be train/heldout/test, got {bad}")
    else:
        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(f"{root} has no labels.csv and is not an image folder: {exc}") from None
        paths = [p for p, _ in folder.samples]
        y = np.array([t for _, t in folder.samples], dtype=np.int64)
        classes = folder.classes
        private, site, split = np.zeros(len(y), dtype=np.int64), None, [""] * len(y)
    x = torch.stack([load_image_file(p, cfg.image_size) for p in paths])
    ids = np.arange(len(y))
    full = make_sampleset(x, y, private, ids, site)
    split_arr = np.array(split)
    rng = np.random.default_rng(cfg.seed)
    test_pos = np.flatnonzero(split_arr == "test")
    if len(test_pos) == 0:
        free = np.flatnonzero(split_arr == "")
        t, _ = stratified_split(y[free], (cfg.test_fraction,), rng)
        test_pos = free[t]
    pool_pos = np.setdiff1d(np.arange(len(y)), test_pos)
    if len(pool_pos) < 2 or len(test_pos) == 0:
        raise DatasetError(f"{root}: too few images to split into train and test ({len(y)})")
    num_private = int(private.max()) + 1
    return image_bundle(
        "image-folder", full.subset(pool_pos), full.subset(test_pos),
        num_classes=len(classes), num_private=num_private,
        class_imbalance=cfg.class_imbalance, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
    )
