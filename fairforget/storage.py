"""Atomic file writes and model hashing.

Every file the project saves (checkpoints, shard index, metrics, report) is written to a temporary
file in the same folder, flushed, fsynced and renamed over the target, and the folder is fsynced
after the rename, so a crash (or a power cut) leaves either the old file or the new one, never half
of either, and never loses a rename or an unlink that returned. Append-only logs (the deletion
ledger, the tombstones) get whole lines appended and fsynced (:func:`durable_append_lines`: a short
write is continued, a write the disk refuses is a one-line error with nothing appended); a reader
reports a torn last line (:class:`TornLine`) instead of failing on it. What a crash leaves behind
(a folder renamed aside for removal, the old half of a folder swap) is cleared at start-up by
:func:`sweep_leftovers`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a tensor is saved, loaded or hashed (a command's start-up needs none)
    import torch


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (a rename, a new or unlinked file) durable."""
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, folder fsync). The
    temporary file is created 0600 (``mkstemp``); ``mode`` sets it before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def durable_unlink(path: Path) -> bool:
    """Remove a file (if there) and fsync its folder; True if it was there."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def durable_rmtree(path: Path) -> None:
    """Remove a folder tree: first renamed aside (one durable step, so it is never half-present under
    its name), then deleted."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.replace(path, aside)
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete folder ``src`` (written beside ``dst``) in place of ``dst``: the old folder is
    renamed aside (``.NAME.old``), the new one in, the parent fsynced, the old one deleted. A crash
    between the two renames leaves ``dst`` absent and the old folder aside, which
    :func:`recover_dir` renames back; never a half-written ``dst``."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: Path) -> None:
    """Undo a :func:`replace_dir` cut short between its renames: the old folder goes back in place."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if not dst.exists() and old.is_dir():
        os.replace(old, dst)
        fsync_dir(dst.parent)


def write_all(fd: int, data: bytes, path: Path) -> None:
    """``os.write`` until every byte of ``data`` is written (a short write is continued); a write that
    writes nothing or fails (a full disk: ENOSPC) is an :class:`OSError` whose message is one line
    naming ``path``."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        if n <= 0:
            raise OSError(errno.ENOSPC, f"cannot write {path}: the disk took no bytes (full?)")
        view = view[n:]


def durable_append_lines(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines (each ending in a newline) to a log and fsync it (and its folder when the
    file is new) before returning. A short write is continued until every byte is written; a write
    that writes nothing or fails (a full disk) raises a one-line :class:`OSError` naming the file,
    after cutting off what it appended, so no line is left half there. A crash can tear at most the
    last line; such a torn line (an append that never returned) is cut off before the next append,
    so every line stays whole."""
    path = Path(path)
    data = "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode("utf-8")
    if not data:
        return
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # a torn last line (a crash mid-append, never fsynced whole) is cut off first
            whole = path.read_bytes()
            if not whole.endswith(b"\n"):
                size = whole.rfind(b"\n") + 1
                os.ftruncate(fd, size)
        try:
            write_all(fd, data, path)
            os.fsync(fd)
        except OSError as exc:
            try:  # the lines appended so far are cut off again: nothing half there
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass  # a torn tail is cut off by the next append and skipped by readers
            if str(path) in str(exc.strerror):
                raise
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def sweep_leftovers(folder: Path, *, tmp_files: bool = False) -> list[str]:
    """Finish what a crash left in ``folder`` (a node's state folder, a run folder) and its subfolders:
    a :func:`replace_dir` cut short between its renames is undone (:func:`recover_dir`), and leftover
    ``.NAME.removing-PID`` folders (:func:`durable_rmtree`) and ``.NAME.old`` folders (a finished
    :func:`replace_dir`) are deleted; with ``tmp_files`` also the ``.NAME.*.tmp`` files of atomic
    writes a crash cut short (only where every writer holds the folder's lock). A subfolder with a
    lock of its own (``.lock``: a node's state folder inside a run folder) is left to its owner. Call
    it holding ``folder``'s lock, or before anything else uses the folder. Returns what it removed or
    restored."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    if tmp_files:
        for path in sorted(folder.glob(".*.tmp")):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                done.append(str(path))
        if done:
            fsync_dir(folder)
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        name = path.name
        if name.startswith(".") and name.endswith(".old") and len(name) > len("..old"):
            dst = path.with_name(name[1 : -len(".old")])
            if not dst.exists():  # the old folder is the only copy: it goes back in place
                recover_dir(dst)
                done.append(f"{path} (restored)")
                continue
        elif not (name.startswith(".") and ".removing-" in name):
            if not (path / ".lock").exists():
                done += sweep_leftovers(path, tmp_files=tmp_files)
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            fsync_dir(folder)
            done.append(str(path))
    return done


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(finite(dict(r)), sort_keys=True, allow_nan=False) + "\n"
                                    for r in rows))


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: Path) -> Any:
    """Load a checkpoint written by :func:`atomic_torch_save` (tensors and plain types only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path) -> Any:
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


class TornLine(ValueError):
    """A JSON-lines file with a line that is not a JSON object; the message is one line."""


def read_jsonl(path: Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] if there is none). A line that does not parse is a
    :class:`TornLine` error, except, with ``allow_torn_tail``, an unterminated last line (a crash
    mid-append), which is skipped."""
    return [row for _, row in read_jsonl_numbered(path, allow_torn_tail=allow_torn_tail)]


def read_jsonl_numbered(path: Path, error: type[ValueError] = TornLine, *,
                        allow_torn_tail: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each JSON object of a JSON-lines file ([] if there is none); blank
    lines skipped. A line that does not parse is an ``error`` naming the file and line, except, with
    ``allow_torn_tail``, an unterminated last line (a crash mid-append), which is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if allow_torn_tail and n == len(lines):  # the last line, with no newline after it
                continue
            raise error(f"{path} line {n} is not a JSON object (a torn or hand-edited line): {line[:60]!r}") from None
        rows.append((n, row))
    return rows


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in key order (16 hex chars)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]
