"""Sample sets, splits and the Biased-MNIST colouring shared by every dataset.

Every sample carries a stable integer id, its target label and its private (bias) label. A
:class:`DataBundle` holds the four splits a run needs: ``train`` (the members, partitioned into
shards), ``heldout`` (non-members, kept for audits), ``test_biased`` (drawn like the training data)
and ``test_unbiased`` (private attribute independent of the label).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

# Biased-MNIST background colours (Bahng et al. 2020), RGB 0-255; colour k is class k's own colour.
BIASED_MNIST_COLOURS = np.array(
    [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [225, 225, 0], [225, 0, 225],
        [0, 255, 255], [255, 128, 0], [255, 0, 128], [128, 0, 255], [128, 128, 128],
    ],
    dtype=np.float32,
) / 255.0
UNBIASED_RHO = 0.1
# Synthetic samples (diffusion augmentation) get ids from here on: SYNTHETIC_ID_BASE + shard * 2**28
# + serial, far above any dataset's ids, so an id alone says whether a sample is real.
SYNTHETIC_ID_BASE = 1 << 62  # above every record id (site record ids hash below 1 << 61)


def is_synthetic(ids: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64) >= SYNTHETIC_ID_BASE


class DatasetError(ValueError):
    """A dataset root that is missing or malformed; the message is one line for the user."""


@dataclass
class SampleSet:
    """Images ``x`` (N, C, H, W) float32 in [0, 1] with per-sample ``y``, ``private``, ``ids``
    and ``site`` (-1 where the data has no site column).

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W) float32 images in [0, 1].
    y : torch.Tensor
        (N,) int64 class labels.
    private : torch.Tensor
        (N,) int64 private (bias) attribute values, 0..``num_private`` - 1.
    ids : torch.Tensor
        (N,) int64 sample ids, unique across the dataset's splits (what deletions name).
    site : torch.Tensor
        (N,) int64 site index, -1 where the data has no site column.
    """

    x: torch.Tensor
    y: torch.Tensor
    private: torch.Tensor
    ids: torch.Tensor
    site: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("y", "private", "ids", "site"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SampleSet.{name} has {len(getattr(self, name))} rows, x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> SampleSet:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return SampleSet(self.x[idx], self.y[idx], self.private[idx], self.ids[idx], self.site[idx])

    @staticmethod
    def concat(sets: list[SampleSet]) -> SampleSet:
        """The samples of ``sets``, one after the other."""
        return SampleSet(*(torch.cat([getattr(s, f) for s in sets]) for f in ("x", "y", "private", "ids", "site")))

    def select_ids(self, ids: list[int] | np.ndarray) -> SampleSet:
        """The samples with these ids, in the order given."""
        pos = {int(i): p for p, i in enumerate(self.ids.tolist())}
        missing = [int(i) for i in ids if int(i) not in pos]
        if missing:
            raise KeyError(f"unknown sample id(s): {missing[:10]}")
        return self.subset([pos[int(i)] for i in ids])


@dataclass
class DataBundle:
    """A dataset as a run uses it: its four splits and what they hold.

    Parameters
    ----------
    name : str
        The dataset's registered name.
    train : SampleSet
        The training split, partitioned over the shards.
    heldout : SampleSet
        Never trained on: the audit's non-members and population.
    test_biased : SampleSet
        A test split biased as the training data is.
    test_unbiased : SampleSet
        A test split with every (class, private value) group equally likely.
    num_classes : int
        Classes.
    num_private : int
        Values of the private attribute.
    records : dict of int to str
        Sample id -> the site's own record id, for data with record ids (an image folder); empty
        otherwise.
    """

    name: str
    train: SampleSet
    heldout: SampleSet
    test_biased: SampleSet
    test_unbiased: SampleSet
    num_classes: int
    num_private: int
    records: dict[int, str] = field(default_factory=dict)  # sample id -> the site's own record id (site data)

    def record_of(self, sample_id: int) -> str:
        """The site's record id of a sample (its int id for data without record ids)."""
        return self.records.get(int(sample_id), str(int(sample_id)))

    def sample_ids(self, records: list[str]) -> tuple[list[int], list[str]]:
        """(the sample ids of the given record ids, the record ids this data does not have)."""
        if not self.records:
            known = [int(r) for r in records if r.strip().lstrip("-").isdigit()]
            return known, [r for r in records if not r.strip().lstrip("-").isdigit()]
        from fairforget.site_secret import normalise_record_id

        back = {v: k for k, v in self.records.items()}

        def find(r: str) -> int | None:  # a record id as the site's loader normalised it (a path id too)
            for text in (normalise_record_id(r), normalise_record_id(r, path=True)):
                if text in back:
                    return back[text]
            return None

        found = {r: find(r) for r in records}
        return [i for i in found.values() if i is not None], [r for r, i in found.items() if i is None]

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_private


def make_sampleset(
    x: torch.Tensor,
    y: np.ndarray,
    private: np.ndarray,
    ids: np.ndarray,
    site: np.ndarray | None = None,
) -> SampleSet:
    n = len(y)
    return SampleSet(
        x=x.float().contiguous(),
        y=torch.as_tensor(np.asarray(y), dtype=torch.long),
        private=torch.as_tensor(np.asarray(private), dtype=torch.long),
        ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
        site=torch.as_tensor(np.full(n, -1) if site is None else np.asarray(site), dtype=torch.long),
    )


# ---------------------------------------------------------------------- splits
def stratified_split(
    labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split positions into len(fractions)+1 parts per class; the last part takes the rest."""
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for p, frac in enumerate(fractions):
            take = int(round(frac * len(idx)))
            parts[p].extend(idx[start : start + take].tolist())
            start += take
        parts[-1].extend(idx[start:].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def split_unit(seed: int, what: str, key: str) -> float:
    """A number in [0, 1) that depends on (seed, what, key) alone: where a record falls in a split
    drawn by its record id (``key``), whatever the row it is on and whatever other rows there are."""
    digest = hashlib.sha256(f"fairforget-split:{int(seed)}:{what}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def id_split(keys: list[str], labels: np.ndarray, fraction: float, seed: int, what: str,
             fallback: str = "") -> np.ndarray:
    """The rows (a boolean mask) a split ``what`` of ``fraction`` takes, each by its record id alone:
    row i is taken when ``split_unit(seed, what, keys[i]) < fraction``, so adding rows never moves an
    existing record between splits; the class balance is the expected one, not exact. When that takes
    no row at all (a tiny folder), ``fallback`` takes the lowest-ranked row of each class (``"class"``)
    or overall (``"one"``); as rows are added such a row can only leave the split, never join it
    from the other side, so no member is ever taken out of training."""
    units = np.array([split_unit(seed, what, k) for k in keys], dtype=np.float64)
    take = units < fraction
    if len(keys) and fraction > 0 and not take.any():
        labels = np.asarray(labels)
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if fallback == "class" else \
            [np.arange(len(keys))] if fallback == "one" else []
        for idx in groups:
            take[idx[np.argmin(units[idx])]] = True
    return take


def long_tail_keep(
    labels: np.ndarray, imbalance: float, rng: np.random.Generator, num_classes: int
) -> np.ndarray:
    """Positions kept so that class k keeps ``imbalance ** (-k / (K - 1))`` of its samples: a
    long-tailed distribution whose largest / smallest class ratio is ``imbalance``."""
    if imbalance <= 1.0 or num_classes < 2:
        return np.arange(len(labels))
    keep: list[int] = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        frac = imbalance ** (-c / (num_classes - 1))
        keep.extend(idx[: max(1, int(round(frac * len(idx))))].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


# ---------------------------------------------------------------------- Biased-MNIST colouring
def assign_colours(labels: np.ndarray, rho: float, rng: np.random.Generator, num_colours: int = 10) -> np.ndarray:
    """Background colour per sample: a fraction ``rho`` of each class gets the class's own colour
    (class k -> colour k mod 10), the rest are spread evenly over the other colours."""
    colours = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        own = int(c) % num_colours
        n_own = int(round(rho * len(idx)))
        colours[idx[:n_own]] = own
        others = np.array([k for k in range(num_colours) if k != own])
        rest = idx[n_own:]
        colours[rest] = others[rng.permutation(np.arange(len(rest)) % len(others))]
    return colours


def colourise(gray: torch.Tensor, colours: np.ndarray) -> torch.Tensor:
    """White strokes on a coloured background: ``x = g * white + (1 - g) * colour``.

    ``gray`` is (N, 1, H, W) in [0, 1]; returns (N, 3, H, W)."""
    bg = torch.as_tensor(BIASED_MNIST_COLOURS[colours]).view(-1, 3, 1, 1)
    return gray + (1.0 - gray) * bg


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size) with torchvision's antialiased bilinear resize."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    from torchvision.transforms import InterpolationMode  # torchvision is slow to import: only when used
    from torchvision.transforms import functional as TF

    out = TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out.clamp(0.0, 1.0)


def biased_mnist_bundle(
    name: str,
    gray_pool: torch.Tensor,
    labels_pool: np.ndarray,
    ids_pool: np.ndarray,
    gray_test: torch.Tensor,
    labels_test: np.ndarray,
    ids_test: np.ndarray,
    *,
    rho: float,
    class_imbalance: float,
    heldout_fraction: float,
    seed: int,
) -> DataBundle:
    """Render a grayscale digit dataset the Biased-MNIST way.

    The pool is split into members (train) and non-members (heldout), both coloured at ``rho``
    and both long-tailed by ``class_imbalance``. The test images are rendered twice: at ``rho``
    (biased) and once in every one of the 10 colours (unbiased: colour independent of the label,
    rho = 0.1 exactly, every (class, colour) group populated). Unbiased test ids are
    ``10 * id + colour``.
    """
    rng = np.random.default_rng(seed)
    keep = long_tail_keep(labels_pool, class_imbalance, rng, 10)
    gray_pool, labels_pool, ids_pool = gray_pool[keep], labels_pool[keep], ids_pool[keep]
    heldout_pos, train_pos = stratified_split(labels_pool, (heldout_fraction,), rng)

    def coloured(pos: np.ndarray, gray: torch.Tensor, labels: np.ndarray, ids: np.ndarray) -> SampleSet:
        colours = assign_colours(labels[pos], rho, rng)
        return make_sampleset(colourise(gray[pos], colours), labels[pos], colours, ids[pos])

    train = coloured(train_pos, gray_pool, labels_pool, ids_pool)
    heldout = coloured(heldout_pos, gray_pool, labels_pool, ids_pool)
    all_test = np.arange(len(labels_test))
    test_biased = coloured(all_test, gray_test, labels_test, ids_test)
    reps = len(BIASED_MNIST_COLOURS)
    colours_u = np.tile(np.arange(reps), len(labels_test))
    pos_u = np.repeat(all_test, reps)
    test_unbiased = make_sampleset(
        colourise(gray_test[pos_u], colours_u), labels_test[pos_u], colours_u, ids_test[pos_u] * reps + colours_u
    )
    return DataBundle(name, train, heldout, test_biased, test_unbiased, num_classes=10, num_private=reps)


def image_bundle(
    name: str,
    pool: SampleSet,
    test: SampleSet,
    *,
    num_classes: int,
    num_private: int,
    class_imbalance: float,
    heldout_fraction: float,
    seed: int,
    roles: np.ndarray | None = None,
    records: dict[int, str] | None = None,
) -> DataBundle:
    """Splits for datasets that come with their own private attribute (CelebA, site folders).

    Members and non-members are split from ``pool`` after the long-tail subsampling; the biased test
    set keeps the test split's own (class, private) distribution; the unbiased test set subsamples
    every populated (class, private) group of the test split to the same size.

    Data with record ids (``records``: a site's folder) is split by record id alone
    (:func:`id_split`: a hash of the seed and the record id against the fraction), so a row added to
    ``labels.csv`` later moves no existing record between members, non-members and the long-tail
    cut, and a trained shard's ids stay in its data. Data without (CelebA: fixed files) is split per
    class by a seeded permutation, exactly stratified.
    """
    rng = np.random.default_rng(seed)
    y = pool.y.numpy()
    if records:
        keys = [records[int(i)] for i in pool.ids.tolist()]
        frac = (class_imbalance ** (-y / (num_classes - 1)) if class_imbalance > 1.0 and num_classes > 1
                else np.ones(len(y)))
        keep = np.flatnonzero(np.array([split_unit(seed, "long-tail", k) for k in keys]) < frac)
    else:
        keep = long_tail_keep(y, class_imbalance, rng, num_classes)
    pool = pool.subset(keep)
    roles = np.full(len(pool), "", dtype=object) if roles is None else np.asarray(roles, dtype=object)[keep]
    free = np.flatnonzero(roles == "")  # rows a site marked train / heldout keep their role
    if records:
        keys = [records[int(i)] for i in pool.ids[free].tolist()]
        held = id_split(keys, pool.y.numpy()[free], heldout_fraction, seed, "heldout", fallback="one")
        held_free, train_free = np.flatnonzero(held), np.flatnonzero(~held)
    else:
        held_free, train_free = stratified_split(pool.y.numpy()[free], (heldout_fraction,), rng)
    heldout_pos = np.sort(np.concatenate([np.flatnonzero(roles == "heldout"), free[held_free]]).astype(np.int64))
    train_pos = np.sort(np.concatenate([np.flatnonzero(roles == "train"), free[train_free]]).astype(np.int64))
    groups = test.y.numpy() * num_private + test.private.numpy()
    present = [g for g in np.unique(groups)]
    per_group = min(int((groups == g).sum()) for g in present)
    if records:  # each group's lowest-ranked records by id
        rank = np.array([split_unit(seed, "unbiased", records[int(i)]) for i in test.ids.tolist()])
        order = [np.flatnonzero(groups == g) for g in present]
        balanced = np.sort(np.concatenate([idx[np.argsort(rank[idx], kind="stable")][:per_group] for idx in order]))
    else:
        balanced = np.sort(np.concatenate([rng.permutation(np.flatnonzero(groups == g))[:per_group]
                                           for g in present]))
    return DataBundle(
        name,
        pool.subset(train_pos),
        pool.subset(heldout_pos),
        test,
        test.subset(balanced),
        num_classes=num_classes,
        num_private=num_private,
        records=dict(records or {}),
    )


def load_image_file(path: str, size: int, channels: int = 3) -> torch.Tensor:
    """One image file -> (C, size, size) float in [0, 1], via PIL and torchvision transforms."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            t = TF.pil_to_tensor(img).float() / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    return resize(t.unsqueeze(0), size)[0]
