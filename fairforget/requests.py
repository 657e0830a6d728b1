"""Commands travel as files beside the server, and as messages to the one site that must act: never
in the run config.

Flower hands a run's ``run_config`` to the ServerApp **and to every ClientApp**, so whatever a run
config says, every hospital learns. A deletion request (which ids, which site, which record) must
reach the ServerApp and the owning site only. So the command that starts a run writes the request
into the run folder, which only the ServerApp reads (it runs beside that folder: the coordinator in
deployment, this machine in simulation), and passes Flower one opaque key, ``request``, a random id
that names nothing::

    OUT/requests/<id>.json         the request (mode 0600): mode, ids or site + record ids, per-request
                                   options (unlearn-method, capacity-policy, ...)
    OUT/requests/<id>.status.json  how the run that served it ended: ok, a one-line error, the ledger
                                   requests it completed, the deletions still pending, the ids that
                                   were already deleted (satisfied by an earlier request)

The ServerApp then sends ``query.describe`` / ``train.unlearn`` to the owning node alone; no other
site receives a message naming the request. The per-request status file is how the command that
chose the id learns the outcome of *its own* run (two concurrent commands on one run folder each read
their own; one refused by the other's lock reads its refusal).

A run config without ``request`` is a training (what ``flwr run`` of a deployment starts).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fairforget.site_secret import write_private_json
from fairforget.storage import read_json

SIMULATE = "simulate"
FORGET = "forget"
MODES = (SIMULATE, FORGET)
FOLDER = "requests"
# Run-config keys a single deletion request may set for itself (the capacity parameters are fixed
# when the run is created: whoever asks for a deletion cannot raise the deletion capacity).
OPTION_PREFIXES = ("unlearn-", "unlearner-options", "newton-", "capacity-policy", "augment-on-delete")
FIXED_KEYS = ("capacity-bound", "capacity-eps", "capacity-delta", "capacity-c")  # never per request
_ID = re.compile(r"^[0-9a-f]{16}$")


class RequestError(ValueError):
    """A request file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class Request:
    """One command for the ServerApp: train (``simulate``) or delete (``forget``)."""

    id: str
    mode: str = SIMULATE
    ids: tuple[int, ...] = ()  # sample ids (simulation: the run's own data)
    site: str = ""  # deployment: the site whose record ids ``records`` are
    records: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # kebab-case run-config keys for this request

    # ------------------------------------------------------------------ construction
    @classmethod
    def simulate(cls) -> Request:
        return cls(new_id(), SIMULATE)

    @classmethod
    def forget(cls, ids: list[int] | tuple[int, ...] = (), *, site: str = "", records: list[str] | tuple[str, ...] = (),
               options: Mapping[str, Any] | None = None) -> Request:
        """A deletion (no ids and no records: finish the unfinished ones, nothing else)."""
        req = cls(new_id(), FORGET, tuple(int(i) for i in ids), site.strip(),
                  tuple(r.strip() for r in records if r.strip()), dict(options or {}))
        req.validate()
        return req

    def validate(self, where: str = "request") -> None:
        if not _ID.match(self.id):
            raise RequestError(f"{where}: request id {self.id!r} is not 16 hex digits")
        if self.mode not in MODES:
            raise RequestError(f"{where}: mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.records and not self.site:
            raise RequestError(f"{where}: record ids need the site whose records they are")
        if self.mode == SIMULATE and (self.ids or self.records):
            raise RequestError(f"{where}: a training request names no ids")
        if len(set(self.ids)) != len(self.ids) or any(i < 0 for i in self.ids):
            raise RequestError(f"{where}: sample ids must be distinct non-negative integers")
        bad = sorted(k for k in self.options if not str(k).startswith(OPTION_PREFIXES) or k in FIXED_KEYS)
        if bad:
            raise RequestError(f"{where}: a request may set only the unlearn-*, unlearner-options, newton-*, "
                               f"capacity-policy and augment-on-delete keys, got {', '.join(bad)}")

    # ------------------------------------------------------------------ files
    def save(self, run_dir: Path) -> Path:
        """Write the request into the run folder (mode 0600); returns its path."""
        self.validate()
        path = request_path(run_dir, self.id)
        write_private_json(path, {"request": self.id, "mode": self.mode, "ids": list(self.ids), "site": self.site,
                                  "records": list(self.records), "options": dict(self.options),
                                  "created": datetime.now(UTC).isoformat(timespec="seconds")})
        return path

    @classmethod
    def load(cls, run_dir: Path, request_id: str) -> Request:
        """The request the run config's ``request`` names; a missing or broken file is one line."""
        if not _ID.match(str(request_id)):
            raise RequestError(f"config key 'request' = {request_id!r}: must be the 16-hex-digit id a "
                               "`fairforget` command printed")
        path = request_path(run_dir, request_id)
        try:
            raw = read_json(path)
        except FileNotFoundError:
            raise RequestError(f"request {request_id}: no file {path} (write it with `fairforget request` on the "
                               "machine where the ServerApp runs, in its out-dir)") from None
        except (OSError, ValueError) as exc:
            raise RequestError(f"request file {path} is unreadable: {exc}") from None
        try:
            ids = tuple(int(i) for i in raw.get("ids", []))
            req = cls(str(raw["request"]), str(raw["mode"]), ids, str(raw.get("site", "")),
                      tuple(str(r) for r in raw.get("records", [])), dict(raw.get("options", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"request file {path} is not a fairforget request: {exc}") from None
        if req.id != request_id:
            raise RequestError(f"request file {path} names request {req.id}, not {request_id}")
        req.validate(str(path))
        return req

    def write_status(self, run_dir: Path, *, ok: bool, error: str = "", **details: Any) -> None:
        write_private_json(status_path(run_dir, self.id), {
            "request": self.id, "mode": self.mode, "ok": ok, "error": error,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"), **details})


def new_id() -> str:
    return secrets.token_hex(8)


def request_path(run_dir: Path, request_id: str) -> Path:
    return Path(run_dir) / FOLDER / f"{request_id}.json"


def status_path(run_dir: Path, request_id: str) -> Path:
    return Path(run_dir) / FOLDER / f"{request_id}.status.json"


def read_status(run_dir: Path, request_id: str) -> dict[str, Any] | None:
    path = status_path(run_dir, request_id)
    return read_json(path) if path.is_file() else None


def parse_records(text: str) -> list[str]:
    """``"P-0003, P-0004"`` -> the record ids (a site's own ids: any text without commas)."""
    return [r.strip() for r in text.replace("\n", ",").split(",") if r.strip()]

