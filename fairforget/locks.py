"""Exclusive locks on run folders and node state folders (``fcntl.flock``).

Every command that writes a run folder (``simulate``, ``forget``, ``audit``, the ServerApp's
drivers) holds ``RUN/.lock`` while it writes; a second one fails at once with a one-line
:class:`LockBusy` naming the holder, so two deletions never interleave their reads and rewrites of
the ledger, the budget and the models. A node holds ``STATE/.lock`` while it handles a message
(waiting for the previous holder: a node's messages are sequential anyway), so a shard index is
never read by one handler while another rewrites it.

``flock`` locks belong to an open file: the kernel drops them when the holder exits or dies, so a
crashed command never leaves a stale lock behind. The lock file itself (pid, command, time) is only
there to name the holder in the message.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = ".lock"


class LockBusy(RuntimeError):
    """Another command holds the lock; the message is one line for the user."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return text or "another process"


@contextmanager
def locked(folder: Path, what: str, *, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` body.

    ``wait``: seconds to wait for a holder to finish (0: fail at once; ``float('inf')``: wait as long
    as it takes). Raises :class:`LockBusy` when the lock stays taken."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(f"{folder} is in use by {_holder(path)}; wait for it to finish and "
                                   "try again") from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())) or 0.05)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"fairforget {what} (pid {os.getpid()}, since {stamp})".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def check_free(folder: Path, what: str) -> None:
    """Fail with :class:`LockBusy` now if ``folder`` is locked (a command about to start a Flower run,
    whose ServerApp takes the lock itself, says so before starting)."""
    if (Path(folder) / LOCK_FILE).exists():
        with locked(folder, what):
            pass
