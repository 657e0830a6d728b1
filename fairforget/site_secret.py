"""A site's secrets: what only the site knows, and so what no other party can reproduce.

Two things at a hospital site must be secret from the server and from the other sites:

* **the record key** (:func:`load_site_key`): 32 bytes from the operating system's secure randomness
  (:func:`secrets.token_bytes`), kept beside the site's data (``DATA_ROOT/.fairforget-site.key``, mode
  0600) or where the node-config key ``site-key`` points. A record id (a pseudonym such as ``P-0007``)
  becomes a sample id by a keyed hash (:func:`keyed_sample_id`: HMAC-SHA256 under that key, 61 bits),
  so whoever sees sample ids (the server's ledger, the wire) cannot test guesses of record numbers
  or link one patient's records across sites: two sites' ``P-0003`` get unrelated sample ids.
* **DP-SGD's randomness** (:mod:`fairforget.sisa`): the seeds of each training's noise and Poisson
  masks, drawn fresh at the site from the same source and recorded in its state folder (mode 0600,
  never sent, never logged), so a site can replay its own training bit for bit and nobody else can.

Files holding a secret are written with :func:`write_private_json` / created with mode 0600 from the
start (never readable by others, not even for the instant before a ``chmod``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import secrets
import unicodedata
from pathlib import Path
from typing import Any

from fairforget.storage import atomic_write_bytes, finite, fsync_dir, write_all

KEY_FILE = ".fairforget-site.key"
KEY_BYTES = 32


class SiteSecretError(ValueError):
    """A site key that cannot be used; the message is one line naming the file."""


def normalise_record_id(record_id: str, *, path: bool = False) -> str:
    """The canonical text of a record id: surrounding blanks dropped, Unicode NFC; for an id that is a
    file path (a ``labels.csv`` without an ``id`` column), ``./img/1.png``, ``img//1.png`` and
    ``img\\1.png`` are one record."""
    text = unicodedata.normalize("NFC", str(record_id).strip())
    if path:
        text = posixpath.normpath(text.replace("\\", "/"))
    return text


def secure_seed() -> int:
    """A fresh 63-bit seed from the operating system's secure randomness."""
    return secrets.randbits(63)


def load_site_key(path: Path, *, create: bool = True) -> bytes:
    """The site's record key at ``path``; made (32 secure random bytes, mode 0600) if missing and
    ``create``. A missing key that may not be created, an unreadable one, or one of the wrong length is
    a one-line :class:`SiteSecretError`."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise SiteSecretError(f"site key {path} does not exist (node-config key site-key)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this site made it first: use theirs
            return load_site_key(path, create=False)
        except OSError as exc:
            raise SiteSecretError(f"cannot create site key {path}: {exc.strerror}") from None
        try:
            write_all(fd, secrets.token_bytes(KEY_BYTES), path)  # a short write is continued
            os.fsync(fd)
        except OSError as exc:  # a full disk: no half-written key is left behind
            os.close(fd)
            path.unlink(missing_ok=True)
            raise SiteSecretError(exc.strerror or str(exc)) from None
        else:
            os.close(fd)
        fsync_dir(path.parent)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise SiteSecretError(f"cannot read site key {path}: {exc.strerror}") from None
    if len(key) != KEY_BYTES:
        raise SiteSecretError(f"site key {path} has {len(key)} bytes, not {KEY_BYTES} (a torn or foreign file; "
                              "restore the site's key from its backup)")
    return key


def keyed_sample_id(key: bytes, record_id: str, *, path: bool = False) -> int:
    """The sample id of a site record id: 61 bits of HMAC-SHA256 under the site's key (below the
    synthetic ids' range)."""
    text = normalise_record_id(record_id, path=path)
    digest = hmac.new(key, f"record:{text}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 3


def write_private_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as JSON to ``path`` with mode 0600 (never readable by others, not even
    as the temporary file: ``mkstemp`` creates it 0600)."""
    atomic_write_bytes(path, (json.dumps(finite(obj), indent=2, allow_nan=False) + "\n").encode("utf-8"), mode=0o600)


def key_fingerprint(key: bytes) -> str:
    """A public name for a key (HMAC of a constant): tells whether a state folder was made under the
    same key, and reveals nothing of it."""
    return hmac.new(key, b"fairforget key fingerprint", hashlib.sha256).hexdigest()[:16]


def check_key_fingerprint(state_dir: Path, key: bytes, key_path: Path, *, pin: bool = False) -> None:
    """A site's state folder remembers which record key its sample ids were made under
    (``STATE/site-key.json``); a state folder made under another key (the key file lost and made
    anew, or swapped) is a one-line :class:`SiteSecretError` instead of a shard whose ids match
    nothing. ``pin``: record the fingerprint if the folder has none yet (a node does so, holding its
    state lock, before it trains)."""
    path = Path(state_dir) / "site-key.json"
    mine = key_fingerprint(key)
    if path.is_file():
        try:
            seen = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError) as exc:
            raise SiteSecretError(f"{path} is unreadable: {exc}") from None
        if seen != mine:
            raise SiteSecretError(f"site key {key_path} is not the key state folder {state_dir} was made under "
                                  f"(fingerprint {mine}, state {seen}): restore the site's key from its backup")
    elif pin:
        write_private_json(path, {"fingerprint": mine})
