"""The dataset loaders, on tiny fixtures written in the real on-disk formats (nothing is downloaded).

``load_dataset`` is cached per process on the config's data keys, so every test uses its own
``tmp_path`` as ``data-root``; the determinism tests call the loader itself to get fresh objects.
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fairforget.config import resolve
from fairforget.data import DATASETS, DatasetError, load_dataset, shard_of
from fairforget.data.base import BIASED_MNIST_COLOURS, split_unit
from server import cli
from tests.fixtures_formats import (
    BLOND_RGB,
    CLASS_RGB,
    DARK_RGB,
    MNIST_FILES,
    Boom,
    cifar_images,
    cifar_pickle,
    idx_bytes,
    write_celeba,
    write_cifar,
    write_image_tree,
    write_labels_csv,
    write_mnist,
    write_png,
)


def make_cfg(**overrides):
    """A validated RunConfig; snake-case keyword names become kebab-case keys."""
    values = {"image-size": 8, "device": "cpu"}
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return resolve(values)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, f"not a one-line message: {text!r}"
    return text


def check_split(s, size: int) -> None:
    """Shapes, dtypes and value ranges every SampleSet must have."""
    assert s.x.dtype == torch.float32 and s.x.shape[1:] == (3, size, size)
    assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0
    assert len(s.y) == len(s.private) == len(s.ids) == len(s.site) == len(s.x)
    assert len(set(s.ids.tolist())) == len(s), "duplicate sample ids"


def counts(t: torch.Tensor, n: int) -> np.ndarray:
    return np.bincount(t.numpy(), minlength=n)


def long_tail(n: int, imbalance: float, k: int, num_classes: int = 10) -> int:
    """What ``long_tail_keep`` documents: class k keeps imbalance ** (-k / (K - 1)) of n, at least 1."""
    return max(1, int(round(imbalance ** (-k / (num_classes - 1)) * n)))


# ====================================================================== biased-digits (embedded)
DIGITS = DATASETS["biased-digits"]


def test_digits_deterministic_for_a_seed():
    a, b = DIGITS(make_cfg(seed=3)), DIGITS(make_cfg(seed=3))
    for split in ("train", "heldout", "test_biased", "test_unbiased"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert torch.equal(sa.ids, sb.ids), split
        assert torch.equal(sa.private, sb.private), split
        assert torch.equal(sa.x, sb.x), split
    c = DIGITS(make_cfg(seed=4))
    assert set(c.train.ids.tolist()) != set(a.train.ids.tolist())
    assert set(c.test_biased.ids.tolist()) != set(a.test_biased.ids.tolist())


def test_digits_ids_unique_and_splits_disjoint():
    b = DIGITS(make_cfg(seed=0))
    train, held, test = (set(s.ids.tolist()) for s in (b.train, b.heldout, b.test_biased))
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, 8)
    assert not train & held and not (train | held) & test
    # without class imbalance every one of the 1,797 rows of load_digits is used exactly once
    assert train | held | test == set(range(1797))
    # fractions: test 0.2, heldout 0.2 of all rows (stratified per class, so within rounding)
    assert abs(len(test) - 0.2 * 1797) <= 10 and abs(len(held) - 0.2 * 1797) <= 10
    # unbiased test ids are 10 * id + colour: unique, and every biased test id in all 10 colours
    uid = b.test_unbiased.ids.numpy()
    assert np.array_equal(uid % 10, b.test_unbiased.private.numpy())
    assert collections.Counter((uid // 10).tolist()) == {i: 10 for i in test}
    assert b.num_classes == 10 and b.num_private == 10 and b.num_groups == 100


@pytest.mark.parametrize("size", [8, 16])
def test_digits_image_shape_and_range(size):
    b = DIGITS(make_cfg(image_size=size, seed=1))
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, size)
        assert int(s.y.min()) >= 0 and int(s.y.max()) <= 9
        assert int(s.private.min()) >= 0 and int(s.private.max()) <= 9
    # colourised: white strokes (g=1 -> 1.0) over the background colour; a pixel's value is never
    # below its background colour's, so the per-channel minimum over an image is that colour's
    bg = torch.as_tensor(BIASED_MNIST_COLOURS)[b.train.private]
    assert torch.all(b.train.x.amin(dim=(2, 3)) >= bg - 1e-5)
    # a grayscale digit in colour: the image is not constant per channel (strokes exist)
    assert float((b.train.x.amax(dim=(2, 3)) - b.train.x.amin(dim=(2, 3))).max()) > 0.5


@pytest.mark.parametrize("rho", [0.9, 0.99, 0.5])
def test_digits_colour_class_correlation_is_rho(rho):
    b = DIGITS(make_cfg(rho=rho, seed=2))
    for s in (b.train, b.heldout, b.test_biased):
        aligned = float((s.private == s.y).float().mean())
        assert abs(aligned - rho) <= 0.02, (aligned, rho)
    # the misaligned samples use the other nine colours, not one
    mis = b.train.private[b.train.private != b.train.y]
    if rho <= 0.9:
        assert len(set(mis.tolist())) == 10


def test_digits_unbiased_test_populates_every_group_evenly():
    b = DIGITS(make_cfg(rho=0.99, seed=0))
    u = b.test_unbiased
    table = np.zeros((10, 10), dtype=int)
    np.add.at(table, (u.y.numpy(), u.private.numpy()), 1)
    assert (table > 0).all()
    # colour is independent of the class: within each class every colour has the same count ...
    assert all(len(set(row.tolist())) == 1 for row in table)
    # ... that count is the class's number of biased test images (each rendered once per colour)
    assert np.array_equal(table[:, 0], counts(b.test_biased.y, 10))
    # ... and across classes the counts differ only by the stratified split's rounding (35..37)
    assert table.max() - table.min() <= 2
    assert float((u.private == u.y).float().mean()) == pytest.approx(0.1, abs=0.002)


def test_digits_class_imbalance():
    b = DIGITS(make_cfg(class_imbalance=10.0, seed=0))
    train = counts(b.train.y, 10)
    held = counts(b.heldout.y, 10)
    # class k keeps 10 ** (-k / 9) of its ~144 pool rows, so class 9 keeps ~14 and the train split
    # (3/4 of the pool) ~10-11 of them; +-1 rounding at each of the two stages moves the ratio by
    # ~+-10%, and the load_digits class sizes (174..183) by another ~3%: 8..13 covers it.
    assert 8.0 <= train.max() / train.min() <= 13.0, train
    assert all(train[k] >= train[k + 1] for k in range(9)), train  # long-tailed: class 0 largest
    pool = train + held
    assert 8.0 <= pool.max() / pool.min() <= 12.0, pool
    balanced = counts(DIGITS(make_cfg(seed=0)).train.y, 10)
    assert balanced.max() / balanced.min() < 1.1


def test_load_dataset_is_cached_on_data_keys():
    cfg = make_cfg(seed=11)
    assert load_dataset(cfg) is load_dataset(cfg.replace(num_shards=2))  # not a data key
    assert load_dataset(cfg) is not load_dataset(cfg.replace(rho=0.5))


# ====================================================================== biased-mnist (raw IDX files)
def mnist_cfg(root: Path, **kw):
    return make_cfg(dataset="biased-mnist", data_root=str(root), **kw)


def test_mnist_loads_from_raw_idx(tmp_path):
    labels = write_mnist(tmp_path, n_train=60, n_test=20)
    b = load_dataset(mnist_cfg(tmp_path, rho=0.8, image_size=8))
    assert b.name == "biased-mnist" and b.num_classes == 10 and b.num_private == 10
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, 8)
    # members + non-members are the 60 training rows; heldout is 20% of each class (round(1.2) = 1)
    assert len(b.train) == 50 and len(b.heldout) == 10
    assert set(b.train.ids.tolist()) | set(b.heldout.ids.tolist()) == set(range(60))
    assert not set(b.train.ids.tolist()) & set(b.heldout.ids.tolist())
    assert sorted(b.test_biased.ids.tolist()) == list(range(20))
    assert len(b.test_unbiased) == 200
    # labels are read from the label files, row for row
    for s, which in ((b.train, "train"), (b.heldout, "train"), (b.test_biased, "test")):
        assert np.array_equal(s.y.numpy(), labels[which][s.ids.numpy()])
    # colours applied: the corners are pure background (the digit is a centred block) ...
    for s in (b.train, b.test_biased, b.test_unbiased):
        corner = s.x[:, :, 0, 0]
        assert torch.allclose(corner, torch.as_tensor(BIASED_MNIST_COLOURS)[s.private], atol=1e-4)
        # ... and the centre is the white stroke
        assert float(s.x[:, :, 3:5, 3:5].amin()) > 0.6
    # 5 training images per class, rho = 0.8: exactly 4 of each class in its own colour
    assert float((b.train.private == b.train.y).float().mean()) == pytest.approx(0.8)
    u = b.test_unbiased
    assert np.array_equal(u.ids.numpy() % 10, u.private.numpy())
    assert np.array_equal(counts(u.private, 10), np.full(10, 20))


def test_mnist_max_samples_caps_the_pool(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=20)
    b = load_dataset(mnist_cfg(tmp_path, max_samples=30))
    assert len(b.train) + len(b.heldout) == 30
    assert len(b.test_biased) == 20  # the test cap is max(100, max-samples // 4)


def _trunc(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


CORRUPTIONS = {
    "truncated-images": lambda r: _trunc(r / MNIST_FILES["train_images"], 1000),
    "truncated-labels": lambda r: _trunc(r / MNIST_FILES["train_labels"], 30),
    "empty-test-images": lambda r: (r / MNIST_FILES["test_images"]).write_bytes(b""),
    "missing-test-labels": lambda r: (r / MNIST_FILES["test_labels"]).unlink(),
    "not-idx": lambda r: (r / MNIST_FILES["train_labels"]).write_bytes(b"this is not an idx file"),
    "labels-in-images-file": lambda r: (r / MNIST_FILES["train_images"]).write_bytes(
        (r / MNIST_FILES["train_labels"]).read_bytes()),
    # well-formed IDX of float32 labels (type code 0x0D): torchvision raises TypeError
    "float-labels": lambda r: (r / MNIST_FILES["train_labels"]).write_bytes(
        struct.pack(">II", 0x0D01, 60) + np.zeros(60, dtype=">f4").tobytes()),
    # type code 0x0A is in the IDX range but has no dtype: torchvision raises KeyError
    "unknown-type-code": lambda r: (r / MNIST_FILES["train_labels"]).write_bytes(
        struct.pack(">II", 0x0A01, 60) + bytes(60)),
    "more-labels-than-images": lambda r: (r / MNIST_FILES["train_labels"]).write_bytes(
        idx_bytes(np.arange(70) % 10, 2049)),
    "fewer-labels-than-images": lambda r: (r / MNIST_FILES["train_labels"]).write_bytes(
        idx_bytes(np.arange(50) % 10, 2049)),
    "label-out-of-range": lambda r: (r / MNIST_FILES["test_labels"]).write_bytes(idx_bytes(np.full(20, 200), 2049)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_mnist_corrupt_root_raises_dataset_error(tmp_path, corruption):
    write_mnist(tmp_path)
    CORRUPTIONS[corruption](tmp_path / "MNIST" / "raw")
    with pytest.raises(DatasetError) as exc:
        load_dataset(mnist_cfg(tmp_path))
    assert "MNIST" in one_line(exc)


@pytest.mark.parametrize("root", ["missing", "empty", "unset"])
def test_mnist_missing_root_raises_dataset_error(tmp_path, root):
    path = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path), "unset": ""}[root]
    with pytest.raises(DatasetError) as exc:
        load_dataset(make_cfg(dataset="biased-mnist", data_root=path))
    one_line(exc)


# ====================================================================== cifar10-skewed (pickled batches)
def cifar_cfg(root: Path, **kw):
    return make_cfg(dataset="cifar10-skewed", data_root=str(root), **kw)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar_loads_python_batches(tmp_path, style):
    labels = write_cifar(tmp_path, per_batch=80, n_test=40, style=style)
    b = load_dataset(cifar_cfg(tmp_path))
    assert b.name == "cifar10-skewed" and b.num_classes == 10 and b.num_private == 1
    members = set(b.train.ids.tolist()) | set(b.heldout.ids.tolist())
    assert members == set(range(400)) and len(b.train) + len(b.heldout) == 400
    assert sorted(b.test_biased.ids.tolist()) == list(range(40))
    assert np.array_equal(counts(b.test_unbiased.y, 10), np.full(10, 4))
    for s, which in ((b.train, "train"), (b.heldout, "train"), (b.test_biased, "test"), (b.test_unbiased, "test")):
        check_split(s, 8)
        assert int(s.private.abs().sum()) == 0
        assert np.array_equal(s.y.numpy(), labels[which][s.ids.numpy()])
        # pixels travel with their rows, channels in the format's order (R, G, B planes)
        red = ((10 * s.y + 5).float() / 255.0)[:, None, None].expand(-1, 8, 8)
        green = ((s.ids % 251).float() / 255.0)[:, None, None].expand(-1, 8, 8)
        assert torch.allclose(s.x[:, 0], red, atol=1e-4)
        assert torch.allclose(s.x[:, 1], green, atol=1e-4)
        assert float(s.x[:, 2].abs().max()) < 1e-4


def test_cifar_class_imbalance_skews_counts(tmp_path):
    write_cifar(tmp_path, per_batch=80, n_test=40)
    b = load_dataset(cifar_cfg(tmp_path, class_imbalance=10.0))
    pool = counts(b.train.y, 10) + counts(b.heldout.y, 10)
    assert pool.tolist() == [long_tail(40, 10.0, k) for k in range(10)]  # 40, 31, 24, ..., 4
    train = counts(b.train.y, 10)
    assert all(train[k] >= train[k + 1] for k in range(9)) and train.max() / train.min() >= 8
    # the biased test split is long-tailed like the training data, the unbiased one balanced
    assert counts(b.test_biased.y, 10).tolist() == [long_tail(4, 10.0, k) for k in range(10)]
    assert np.array_equal(counts(b.test_unbiased.y, 10), np.full(10, 4))


def _batch(extra: dict | None = None, n: int = 10) -> dict:
    ids = np.arange(n)
    return {b"data": cifar_images(ids % 10, ids), b"labels": [int(i % 10) for i in ids], **(extra or {})}


@pytest.mark.parametrize("payload", ["os-system", "class-object", "builtins-eval", "numpy-object-array"])
def test_cifar_forbidden_global_is_refused_not_executed(tmp_path, payload):
    write_cifar(tmp_path, per_batch=20, n_test=10)
    marker = tmp_path / "pwned"
    bad = {
        "os-system": lambda: pickle.dumps(_batch({b"x": Boom(f"touch {marker}")})),
        "class-object": lambda: pickle.dumps(_batch({b"x": collections.OrderedDict})),
        "builtins-eval": lambda: pickle.dumps(_batch({b"x": _Eval(f"open({str(marker)!r}, 'w')")})),
        "numpy-object-array": lambda: pickle.dumps(_batch({b"x": np.array([Boom(f"touch {marker}")], dtype=object)})),
    }[payload]()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(bad)
    with pytest.raises(DatasetError) as exc:
        load_dataset(cifar_cfg(tmp_path))
    text = one_line(exc)
    assert "data_batch_3" in text and "forbidden global" in text
    assert not marker.exists(), "the pickle's payload ran"


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


MALFORMED_BATCHES = {
    "truncated": lambda: cifar_pickle(_batch())[:500],
    "empty": lambda: b"",
    "not-a-pickle": lambda: b"\x00\x01 plain bytes",
    "not-a-dict": lambda: cifar_pickle([1, 2, 3]),
    "no-labels-key": lambda: cifar_pickle({b"data": _batch()[b"data"]}),
    "cifar100-keys": lambda: cifar_pickle({b"data": _batch()[b"data"], b"fine_labels": list(range(10))}),
    "wrong-row-length": lambda: cifar_pickle({b"data": np.zeros((10, 3000), np.uint8), b"labels": [0] * 10}),
    "label-count-mismatch": lambda: cifar_pickle({b"data": _batch()[b"data"], b"labels": [0] * 9}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_BATCHES))
def test_cifar_malformed_batch_raises_dataset_error(tmp_path, kind):
    write_cifar(tmp_path, per_batch=20, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(MALFORMED_BATCHES[kind]())
    with pytest.raises(DatasetError) as exc:
        load_dataset(cifar_cfg(tmp_path))
    assert "test_batch" in one_line(exc)


@pytest.mark.parametrize("root", ["no-folder", "missing-batch", "unset"])
def test_cifar_missing_files_raise_dataset_error(tmp_path, root):
    if root == "missing-batch":
        write_cifar(tmp_path, per_batch=20, n_test=10)
        (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    path = "" if root == "unset" else str(tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_dataset(make_cfg(dataset="cifar10-skewed", data_root=path))
    one_line(exc)


# ====================================================================== celeba
# (partition, Blond_Hair, Male): train pool 24 rows over all four groups, 3 validation rows, and a
# test split of 9 with the (blond, male) group empty; interleaved so row order != partition order
CELEBA_ROWS = (
    [(0, 0, 0)] * 8 + [(0, 0, 1)] * 6 + [(0, 1, 0)] * 6 + [(0, 1, 1)] * 4
    + [(1, 0, 0), (1, 1, 1), (1, 0, 1)]
    + [(2, 0, 0)] * 4 + [(2, 0, 1)] * 3 + [(2, 1, 0)] * 2
)
CELEBA_ROWS = [CELEBA_ROWS[i] for i in np.random.default_rng(5).permutation(len(CELEBA_ROWS))]


def celeba_cfg(root: Path, **kw):
    return make_cfg(dataset="celeba", data_root=str(root), **kw)


def test_celeba_loads_standard_layout(tmp_path):
    write_celeba(tmp_path, CELEBA_ROWS)
    b = load_dataset(celeba_cfg(tmp_path))
    rows = np.array(CELEBA_ROWS)
    assert b.name == "celeba" and b.num_classes == 2 and b.num_private == 2 and b.num_groups == 4
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, 8)
        # ids are rows of the attribute file; target = Blond_Hair, private = Male
        assert np.array_equal(s.y.numpy(), rows[s.ids.numpy(), 1])
        assert np.array_equal(s.private.numpy(), rows[s.ids.numpy(), 2])
        # the JPEG's pixels belong to the row (blond images are yellow, others dark blue)
        red = s.x[:, 0].mean(dim=(1, 2))
        expect = torch.where(s.y == 1, BLOND_RGB[0] / 255.0, DARK_RGB[0] / 255.0)
        assert torch.allclose(red, expect.float(), atol=0.05)
    members = set(b.train.ids.tolist()) | set(b.heldout.ids.tolist())
    assert not set(b.train.ids.tolist()) & set(b.heldout.ids.tolist())
    assert members == set(np.flatnonzero(rows[:, 0] == 0).tolist())  # partition 0
    assert set(b.test_biased.ids.tolist()) == set(np.flatnonzero(rows[:, 0] == 2).tolist())  # partition 2
    # the unbiased test set: the 3 populated groups of the test split, 2 images each (the smallest)
    groups = collections.Counter(zip(b.test_unbiased.y.tolist(), b.test_unbiased.private.tolist(), strict=True))
    assert groups == {(0, 0): 2, (0, 1): 2, (1, 0): 2}
    assert set(b.test_unbiased.ids.tolist()) <= set(b.test_biased.ids.tolist())


def test_celeba_target_and_private_are_configurable(tmp_path):
    write_celeba(tmp_path, CELEBA_ROWS)
    b = load_dataset(celeba_cfg(tmp_path, celeba_target="Male", celeba_private="Blond_Hair"))
    rows = np.array(CELEBA_ROWS)
    assert np.array_equal(b.train.y.numpy(), rows[b.train.ids.numpy(), 2])
    assert np.array_equal(b.train.private.numpy(), rows[b.train.ids.numpy(), 1])


@pytest.mark.parametrize("key", ["celeba-target", "celeba-private"])
def test_celeba_unknown_attribute_raises_dataset_error(tmp_path, key):
    write_celeba(tmp_path, CELEBA_ROWS)
    with pytest.raises(DatasetError) as exc:
        load_dataset(resolve({"dataset": "celeba", "data-root": str(tmp_path), "image-size": 8, key: "Purple_Hair"}))
    assert "Purple_Hair" in one_line(exc)


CELEBA_BREAKAGES = {
    "no-partition-file": lambda b: (b / "list_eval_partition.txt").unlink(),
    "no-attribute-file": lambda b: (b / "list_attr_celeba.txt").unlink(),
    "missing-image": lambda b: next(iter(sorted((b / "img_align_celeba").iterdir()))).unlink(),
    "corrupt-image": lambda b: next(iter(sorted((b / "img_align_celeba").iterdir()))).write_bytes(b"not a jpeg"),
    "ragged-attribute-row": lambda b: (b / "list_attr_celeba.txt").write_text(
        (b / "list_attr_celeba.txt").read_text() + "999999.jpg 1 -1\n"),
    "bad-partition-row": lambda b: (b / "list_eval_partition.txt").write_text("000001.jpg train\n"),
}


@pytest.mark.parametrize("kind", sorted(CELEBA_BREAKAGES))
def test_celeba_broken_root_raises_dataset_error(tmp_path, kind):
    # every row in partition 0 or 2 so that the first image file is always read
    write_celeba(tmp_path, [(0, i % 2, (i // 2) % 2) for i in range(8)] + [(2, i % 2, 0) for i in range(4)])
    CELEBA_BREAKAGES[kind](tmp_path / "celeba")
    with pytest.raises(DatasetError) as exc:
        load_dataset(celeba_cfg(tmp_path))
    one_line(exc)


# ====================================================================== image-folder
def folder_cfg(root: Path, **kw):
    return make_cfg(dataset="image-folder", data_root=str(root), **kw)


def test_image_folder_labels_csv_and_site_partition(tmp_path):
    rows = write_labels_csv(tmp_path, ["benign", "malignant"], sites=3, per_cell=5)  # 60 images
    cfg = folder_cfg(tmp_path, partition="site", num_shards=3)
    b = load_dataset(cfg)
    assert b.name == "image-folder" and b.num_classes == 2 and b.num_private == 2
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, 8)
    label_of = {"benign": 0, "malignant": 1}
    site_of = np.array([int(r["site"].split("-")[1]) for r in rows])
    row_of = {r["path"]: n for n, r in enumerate(rows)}  # without an id column a record is named by its path

    def rows_of(s):
        return np.array([row_of[b.records[i]] for i in s.ids.tolist()], dtype=np.int64)

    for s in (b.train, b.heldout, b.test_biased):
        ids = rows_of(s)
        assert np.array_equal(s.y.numpy(), [label_of[rows[i]["label"]] for i in ids])
        assert np.array_equal(s.private.numpy(), [int(rows[i]["private"]) for i in ids])
        assert np.array_equal(s.site.numpy(), site_of[ids])
        # the PNG's colour is its label's
        colour = torch.tensor(CLASS_RGB, dtype=torch.float32)[s.y] / 255.0
        assert torch.allclose(s.x.mean(dim=(2, 3)), colour, atol=1e-3)
    all_ids = [set(rows_of(s).tolist()) for s in (b.train, b.heldout, b.test_biased)]
    assert not (all_ids[0] & all_ids[1] or all_ids[0] & all_ids[2] or all_ids[1] & all_ids[2])
    assert set().union(*all_ids) == set(range(60))
    # the test split is drawn by record id (not row): exactly the records whose hash falls below test-fraction
    drawn = {r for r in b.records.values() if split_unit(cfg.seed, "test", r) < cfg.test_fraction}
    assert {b.records[i] for i in b.test_biased.ids.tolist()} == drawn and 6 <= len(drawn) <= 18
    shards = shard_of(cfg, b)
    assert len(shards) == 3
    for k, shard in enumerate(shards):
        assert set(shard.site.tolist()) == {k}
        expect = {i for i, n in zip(b.train.ids.tolist(), rows_of(b.train), strict=True) if site_of[n] == k}
        assert set(shard.ids.tolist()) == expect and expect
    assert sum(len(s) for s in shards) == len(b.train)
    with pytest.raises(DatasetError) as exc:
        shard_of(cfg.replace(num_shards=2), b)
    assert "3 sites" in one_line(exc)


def test_image_folder_csv_split_column_and_numeric_labels(tmp_path):
    lines = ["path,label,split"]
    for i in range(24):
        label = ["2", "10"][i % 2]  # numeric labels sort as numbers: "2" -> 0, "10" -> 1
        write_png(tmp_path / f"{i}.png", CLASS_RGB[i % 2])
        lines.append(f"{i}.png,{label},{'test' if i >= 18 else ''}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    b = load_dataset(folder_cfg(tmp_path))
    row = {i: int(b.records[i].split(".")[0]) for i in b.records}  # record id = path = "<row>.png"
    assert sorted(row[i] for i in b.test_biased.ids.tolist()) == list(range(18, 24))
    assert np.array_equal(b.train.y.numpy(), np.array([row[i] for i in b.train.ids.tolist()]) % 2)
    assert b.num_private == 1 and set(b.train.site.tolist()) == {-1}


def test_image_folder_torchvision_layout(tmp_path):
    write_image_tree(tmp_path, ["wasps", "ants", "bees"], per_class=10)
    cfg = folder_cfg(tmp_path, num_shards=2)
    b = load_dataset(cfg)
    assert b.num_classes == 3 and b.num_private == 1
    sizes = len(b.train) + len(b.heldout) + len(b.test_biased)
    drawn = {r for r in b.records.values() if split_unit(cfg.seed, "test", r) < cfg.test_fraction}
    assert sizes == 30 and {b.records[i] for i in b.test_biased.ids.tolist()} == drawn and 2 <= len(drawn) <= 10
    for s in (b.train, b.heldout, b.test_biased, b.test_unbiased):
        check_split(s, 8)
        assert set(s.private.tolist()) == {0} and set(s.site.tolist()) == {-1}
        # classes are the sorted folder names: ants 0, bees 1, wasps 2 (wasps were written first)
        colour_index = {0: 1, 1: 2, 2: 0}
        colour = torch.tensor([CLASS_RGB[colour_index[int(y)]] for y in s.y], dtype=torch.float32) / 255.0
        assert torch.allclose(s.x.mean(dim=(2, 3)), colour, atol=1e-3)
    shards = shard_of(cfg, b)
    assert len(shards) == 2 and sorted(i for s in shards for i in s.ids.tolist()) == sorted(b.train.ids.tolist())
    with pytest.raises(DatasetError) as exc:
        shard_of(cfg.replace(partition="site", num_shards=1), b)
    assert "site column" in one_line(exc)


def test_image_folder_csv_without_label_column(tmp_path):
    write_labels_csv(tmp_path, ["a", "b"], sites=1, per_cell=3, columns=("path", "private", "site"))
    with pytest.raises(DatasetError) as exc:
        load_dataset(folder_cfg(tmp_path))
    assert "path,label" in one_line(exc)


@pytest.mark.parametrize("kind", ["missing-root", "empty-root", "missing-image", "empty-label", "bad-split"])
def test_image_folder_broken_root_raises_dataset_error(tmp_path, kind):
    root = tmp_path / "data"
    root.mkdir()
    if kind in ("missing-image", "empty-label", "bad-split"):
        rows = write_labels_csv(root, ["a", "b"], sites=1, per_cell=3)
        if kind == "missing-image":
            (root / rows[0]["path"]).unlink()
        else:
            text = (root / "labels.csv").read_text().splitlines()
            if kind == "empty-label":
                text[1] = text[1].replace(",a,", ",,")
            else:
                text = ["path,label,split"] + [f"{r['path']},{r['label']},validation" for r in rows]
            (root / "labels.csv").write_text("\n".join(text) + "\n")
    path = tmp_path / "nope" if kind == "missing-root" else root
    with pytest.raises(DatasetError) as exc:
        load_dataset(folder_cfg(path))
    one_line(exc)


# ====================================================================== the CLI on a bad data root
@pytest.mark.parametrize("root", ["missing", "empty", "truncated", "label-count-mismatch"])
def test_cli_bad_data_root_is_one_line_exit_2(tmp_path, capsys, root):
    data = tmp_path / "data"
    if root != "missing":
        data.mkdir()
    if root in ("truncated", "label-count-mismatch"):
        write_mnist(data)
        CORRUPTIONS["truncated-images" if root == "truncated" else "more-labels-than-images"](data / "MNIST" / "raw")
    out = tmp_path / "out"
    code = cli.main(["simulate", "--set", "dataset=biased-mnist", "--set", f"data-root={data}", "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2
    assert err.startswith("fairforget: error:") and "\n" not in err and "Traceback" not in err
    assert str(data) in err
    assert not out.exists()
    assert "training" not in captured.out


def _site_folder(root, rows: list[str], header: str = "id,path,label,private,split"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(len(rows)):
        write_png(root / f"{i}.png", CLASS_RGB[i % 2])
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_site_record_ids_are_the_sites_own_and_survive_reordering(tmp_path):
    """Record ids come from the id column, never the row number: reordering labels.csv renames nothing;
    rows marked heldout are never members, rows marked train always are."""
    rows = [f"P-{i:04d},{i}.png,{i % 2},{(i // 2) % 2},{'heldout' if i < 4 else 'train' if i < 8 else ''}"
            for i in range(24)]
    from fairforget.data import _load_cached

    a = load_dataset(folder_cfg(_site_folder(tmp_path / "a", rows)))
    _load_cached.cache_clear()
    b = load_dataset(folder_cfg(_site_folder(tmp_path / "a", rows[::-1])))  # the same site, its rows reordered
    other = load_dataset(folder_cfg(_site_folder(tmp_path / "c", rows)))  # another site: its own key
    for bundle in (a, b):
        members = {bundle.records[i] for i in bundle.train.ids.tolist()}
        held = {bundle.records[i] for i in bundle.heldout.ids.tolist()}
        assert {f"P-{i:04d}" for i in range(4)} <= held and not {f"P-{i:04d}" for i in range(4)} & members
        assert {f"P-{i:04d}" for i in range(4, 8)} <= members
    assert a.records == b.records  # same record -> same sample id, whatever the row order
    assert not set(a.records) & set(other.records)  # the same record ids at another site: unrelated sample ids
    known, unknown = a.sample_ids(["P-0005", "P-9999"])
    assert [a.records[k] for k in known] == ["P-0005"] and unknown == ["P-9999"]


@pytest.mark.parametrize("rows,expected", [
    (["P-1,0.png,0,0,", "P-1,1.png,1,1,"], "duplicate record id 'P-1'"),
    (["P-1,../0.png,0,0,", "P-2,1.png,1,1,"], "outside the data root"),
    (["P-1,missing.png,0,0,", "P-2,1.png,1,1,"], "missing.png does not exist"),
    (["P-1,0.png,0,,", "P-2,1.png,1,1,"], "empty 'private' value"),
    ([",0.png,0,0,", "P-2,1.png,1,1,"], "empty 'id'"),
])
def test_bad_site_labels_are_one_line_errors(tmp_path, rows, expected):
    root = _site_folder(tmp_path / "site", rows)
    (tmp_path / "0.png").write_bytes((root / "0.png").read_bytes())  # a real file outside the root
    with pytest.raises(DatasetError) as exc:
        load_dataset(folder_cfg(root))
    assert expected in one_line(exc)


def test_rows_added_to_a_site_folder_move_no_record_to_another_shard(tmp_path):
    """A simulation over an image folder, iid over 3 shards: each record's shard follows from its record
    id, so rows appended to labels.csv move no existing record between shards (a row-position cut would)."""
    from fairforget.data import _load_cached, shard_of

    def rows(n: int) -> list[str]:
        return [f"P-{i:04d},{i}.png,{i % 2},{(i // 2) % 2},{'test' if i % 5 == 0 else 'train'}" for i in range(n)]

    cfg = folder_cfg(_site_folder(tmp_path / "site", rows(36)), num_shards=3)

    def owners():
        bundle = load_dataset(cfg)
        return {bundle.records[int(i)]: k for k, part in enumerate(shard_of(cfg, bundle)) for i in part.ids.tolist()}

    before = owners()
    _load_cached.cache_clear()
    _site_folder(tmp_path / "site", rows(54))
    after = owners()
    assert len(after) > len(before) > 20 and len(set(before.values())) == 3
    assert {r: after[r] for r in before} == before
