"""A site's own images: a folder with ``labels.csv`` (columns ``path,label`` and optionally
``id``, ``private``, ``site``, ``split``), or, without a CSV, torchvision's ImageFolder layout
(``ROOT/<class>/<image>``, private label 0).

Record ids belong to the site: the ``id`` column (a pseudonymous patient or image id), else the
row's ``path``; never the row number, so editing or reordering ``labels.csv`` renames nothing. A
sample's id inside the framework is a 61-bit keyed hash of its normalised record id under the site's
secret key (:func:`record_key`; the key is ``ROOT/.fairforget-site.key``, made on first use, mode
0600, never sent): the server's ledger holds sample ids it cannot invert or link across sites. The
bundle keeps the map back (``DataBundle.records``), and deletion requests name records by site and
record id. ``path`` is relative to the root and must stay inside it. ``split``: ``test`` rows are the test
split (without any, a ``test-fraction`` is drawn), ``train`` rows are always members, ``heldout``
rows never (the audits' non-members); unmarked rows are split by ``heldout-fraction``. Every split
drawn here follows from the record id alone (a hash of the seed and the normalised record id against
the fraction: :func:`fairforget.data.base.id_split`), not from the row, so adding rows to
``labels.csv`` never moves an existing record between train, held-out and test (class balance is
the expected one, not exact; a split that would take no row at all takes each class's first-ranked).
``site`` feeds ``partition = "site"`` (one shard per site).

Bad input is a one-line :class:`DatasetError` at start-up: a missing or unreadable file, a path
outside the root, duplicate record ids, an empty label or private value.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from fairforget.data.base import (
    DataBundle,
    DatasetError,
    id_split,
    image_bundle,
    load_image_file,
    make_sampleset,
)
from fairforget.site_secret import KEY_FILE, SiteSecretError, keyed_sample_id, load_site_key, normalise_record_id

OWNS_RECORDS = True  # the site's record ids (labels.csv): its tombstones live beside the data


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


def record_key(record_id: str, key: bytes, *, path: bool = False) -> int:
    """The sample id of a site record id: 61 bits of HMAC-SHA256 under the site's secret key
    (:func:`fairforget.site_secret.keyed_sample_id`), so nobody without the key can tell which record
    a sample id is, nor link two sites' records with one id."""
    return keyed_sample_id(key, record_id, path=path)


def site_key(root: Path) -> bytes:
    """The site's record key, ``ROOT/.fairforget-site.key`` (made on first use, mode 0600)."""
    try:
        return load_site_key(Path(root) / KEY_FILE)
    except SiteSecretError as exc:
        raise DatasetError(str(exc)) from None


def _record_ids(rows: list[dict[str, str]], root: Path) -> list[str]:
    if "id" in rows[0]:
        ids = [(r.get("id") or "").strip() for r in rows]
        empty = [n for n, v in enumerate(ids, 2) if not v]
        if empty:
            raise DatasetError(f"{root}/labels.csv: empty 'id' on line(s) {', '.join(map(str, empty[:5]))}")
    else:
        ids = [r["path"].strip() for r in rows]
    seen: dict[str, int] = {}
    for n, v in enumerate(ids, 2):
        if v in seen:
            raise DatasetError(f"{root}/labels.csv: duplicate record id {v!r} (lines {seen[v]} and {n})")
        seen[v] = n
    return ids


def _paths(rows: list[dict[str, str]], root: Path) -> list[str]:
    base = root.resolve()
    out = []
    for n, r in enumerate(rows, 2):
        rel = (r.get("path") or "").strip()
        path = (root / rel).resolve()
        if not rel or not path.is_relative_to(base):
            raise DatasetError(f"{root}/labels.csv line {n}: path {rel!r} is outside the data root")
        if not path.is_file():
            raise DatasetError(f"{root}/labels.csv line {n}: {rel} does not exist")
        out.append(str(path))
    return out


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
        paths = _paths(rows, root)
        records = _record_ids(rows, root)
        y, classes = _codes([r["label"] for r in rows], "label")
        private = _codes([r.get("private") if "private" in r else "0" for r in rows], "private")[0]
        site = _codes([r.get("site") or "0" for r in rows], "site")[0] if "site" in rows[0] else None
        split = [(r.get("split") or "").strip().lower() for r in rows]
        bad = sorted({s for s in split if s not in ("", "train", "heldout", "test")})
        if bad:
            raise DatasetError(f"labels.csv split values must be train/heldout/test, got {bad}")
    else:
        try:
            from torchvision.datasets import ImageFolder  # torchvision is slow to import

            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(f"{root} has no labels.csv and is not an image folder: {exc}") from None
        paths = [p for p, _ in folder.samples]
        records = [str(Path(p).relative_to(root)) for p in paths]
        y = np.array([t for _, t in folder.samples], dtype=np.int64)
        classes = folder.classes
        private, site, split = np.zeros(len(y), dtype=np.int64), None, [""] * len(y)
    x = torch.stack([load_image_file(p, cfg.image_size) for p in paths])
    key = site_key(root)
    by_path = not (root / "labels.csv").is_file() or "id" not in rows[0]
    records = [normalise_record_id(r, path=by_path) for r in records]
    ids = np.array([record_key(r, key, path=by_path) for r in records], dtype=np.int64)
    if len(set(ids.tolist())) != len(ids):
        raise DatasetError(f"{root}: two record ids hash to the same sample id; rename one of them")
    full = make_sampleset(x, y, private, ids, site)
    split_arr = np.array(split)
    test_pos = np.flatnonzero(split_arr == "test")
    if len(test_pos) == 0:  # drawn by record id, never by row: an added row moves no other record
        free = np.flatnonzero(split_arr == "")
        take = id_split([records[i] for i in free], y[free], cfg.test_fraction, cfg.seed, "test", fallback="class")
        test_pos = free[take]
    pool_pos = np.setdiff1d(np.arange(len(y)), test_pos)
    if len(pool_pos) < 2 or len(test_pos) == 0:
        raise DatasetError(f"{root}: too few images to split into train and test ({len(y)})")
    num_private = int(private.max()) + 1
    return image_bundle(
        "image-folder", full.subset(pool_pos), full.subset(test_pos),
        num_classes=len(classes), num_private=num_private,
        class_imbalance=cfg.class_imbalance, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
        roles=split_arr[pool_pos], records=dict(zip(ids.tolist(), records, strict=True)),
    )
