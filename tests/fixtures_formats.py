"""Writers of tiny datasets in the real on-disk formats the loaders read (nothing is downloaded).

* MNIST: torchvision's raw IDX files (``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``),
  big-endian magic 2051 (uint8, 3 dims) for images and 2049 (uint8, 1 dim) for labels.
* CIFAR-10: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}``, pickles of dicts with
  ``b"data"`` (uint8 (N, 3072), channel-major) and ``b"labels"`` (list of int), written either the
  way the official files were (Python 2 cPickle, protocol 2: byte strings as ``STRING`` opcodes,
  ``numpy.core.multiarray._reconstruct``) or by Python 3's default pickler.
* CelebA: ``ROOT/celeba/list_attr_celeba.txt`` (count line, attribute-name line, ``file -1 1 ...``
  rows), ``ROOT/celeba/list_eval_partition.txt`` (``file 0|1|2``) and JPEGs in ``img_align_celeba/``.
* Image folders: ``labels.csv`` (``path,label,private,site``) or torchvision's ImageFolder layout.

The images encode what they are so tests can check that pixels travel with their labels and ids.
"""

from __future__ import annotations

import csv
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------------- MNIST (IDX)
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one big-endian uint32 per dimension, then the raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_images(labels: np.ndarray) -> np.ndarray:
    """28x28 digits: black background and a white block in the middle whose size depends on the
    label (so the corners stay pure background after a resize)."""
    imgs = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        half = 3 + int(c) // 2
        imgs[i, 14 - half : 14 + half, 14 - half : 14 + half] = 255
    return imgs


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    """``root/MNIST/raw`` with ``n_train`` / ``n_test`` images, labels cycling 0..9."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    y_tr = (np.arange(n_train) % 10).astype(np.uint8)
    y_te = ((np.arange(n_test) * 3) % 10).astype(np.uint8)
    (raw / MNIST_FILES["train_images"]).write_bytes(idx_bytes(mnist_images(y_tr), 2051))
    (raw / MNIST_FILES["train_labels"]).write_bytes(idx_bytes(y_tr, 2049))
    (raw / MNIST_FILES["test_images"]).write_bytes(idx_bytes(mnist_images(y_te), 2051))
    (raw / MNIST_FILES["test_labels"]).write_bytes(idx_bytes(y_te, 2049))
    return {"train": y_tr.astype(np.int64), "test": y_te.astype(np.int64)}


# ---------------------------------------------------------------------- CIFAR-10 (pickled batches)
def cifar_images(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Constant-colour 32x32 images, (N, 3072) channel-major like the real batches: red encodes
    the label (10 * label + 5), green the row id (id % 251), blue is 0."""
    x = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    x[:, 0] = (10 * labels + 5)[:, None, None]
    x[:, 1] = (ids % 251)[:, None, None]
    return x.reshape(len(labels), 3072)


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the official CIFAR-10 batches: every
    string as a byte string (``SHORT_BINSTRING`` / ``BINSTRING``, read back as bytes with
    ``encoding="bytes"``) and numpy's reconstructor under its old name ``numpy.core.multiarray``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if obj is np._core.multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def cifar_pickle(d: dict, style: str = "py2") -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(d)
        return buf.getvalue()
    return pickle.dumps(d)  # Python 3's default protocol


def write_cifar(root: Path, per_batch: int = 80, n_test: int = 40, style: str = "py2") -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` with five training batches of ``per_batch`` and a test batch;
    labels cycle 0..9 (a balanced dataset)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    all_labels = []
    for b in range(5):
        ids = np.arange(b * per_batch, (b + 1) * per_batch)
        labels = ids % 10
        all_labels.append(labels)
        d = {b"batch_label": f"training batch {b + 1} of 5".encode(), b"labels": [int(v) for v in labels],
             b"data": cifar_images(labels, ids), b"filenames": [f"img_{i}.png".encode() for i in ids]}
        (base / f"data_batch_{b + 1}").write_bytes(cifar_pickle(d, style))
    ids = np.arange(n_test)
    labels = ids % 10
    d = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels],
         b"data": cifar_images(labels, ids), b"filenames": [f"t_{i}.png".encode() for i in ids]}
    (base / "test_batch").write_bytes(cifar_pickle(d, style))
    return {"train": np.concatenate(all_labels), "test": labels}


class Boom:
    """A class whose unpickling runs a command (the classic pickle exploit)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


# ---------------------------------------------------------------------- CelebA
CELEBA_ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Eyeglasses", "Male", "Smiling"]
BLOND_RGB = (230, 200, 40)
DARK_RGB = (30, 20, 90)


def write_celeba(root: Path, rows: list[tuple[int, int, int]], size: tuple[int, int] = (12, 14)) -> list[str]:
    """``root/celeba`` with one image per ``(partition, blond, male)`` row; a blond image is
    yellow, a non-blond one dark blue. Returns the file names in row order."""
    base = root / "celeba"
    img_dir = base / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    files = [f"{i + 1:06d}.jpg" for i in range(len(rows))]
    attr_lines = [str(len(rows)), " ".join(CELEBA_ATTRS) + " "]
    part_lines = []
    for i, (fname, (part, blond, male)) in enumerate(zip(files, rows, strict=True)):
        vals = {"5_o_Clock_Shadow": i % 2, "Blond_Hair": blond, "Eyeglasses": 0, "Male": male, "Smiling": (i // 2) % 2}
        attr_lines.append(fname + " " + " ".join(f"{1 if vals[a] else -1:2d}" for a in CELEBA_ATTRS))
        part_lines.append(f"{fname} {part}")
        Image.new("RGB", size, BLOND_RGB if blond else DARK_RGB).save(img_dir / fname, format="JPEG", quality=95)
    (base / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return files


# ---------------------------------------------------------------------- image folders
CLASS_RGB = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def write_png(path: Path, rgb: tuple[int, int, int], size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format="PNG")


def write_labels_csv(root: Path, labels: list[str], sites: int = 3, per_cell: int = 5,
                     columns: tuple[str, ...] = ("path", "label", "private", "site")) -> list[dict[str, str]]:
    """``root/labels.csv`` and ``root/img/*.png``: ``per_cell`` images for every (site, label,
    private in {0, 1}); the image colour encodes the label's position in ``labels``."""
    rows = []
    for s in range(sites):
        for li, label in enumerate(labels):
            for p in (0, 1):
                for k in range(per_cell):
                    rel = f"img/s{s}_{li}_{p}_{k}.png"
                    write_png(root / rel, CLASS_RGB[li % len(CLASS_RGB)])
                    rows.append({"path": rel, "label": label, "private": str(p), "site": f"hospital-{s}"})
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_image_tree(root: Path, classes: list[str], per_class: int = 10) -> None:
    """torchvision's ImageFolder layout: ``root/<class>/<n>.png``."""
    for ci, name in enumerate(classes):
        for k in range(per_class):
            write_png(root / name / f"{k}.png", CLASS_RGB[ci % len(CLASS_RGB)])
