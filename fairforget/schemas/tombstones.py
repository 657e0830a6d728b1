"""Tombstone lines (the deletion list a data owner keeps, :mod:`fairforget.tombstones`) as typed
records, and the migration of the lines older versions wrote.

Versions:

* **1** ``{"id", "request", "time"}``: the record's sample id. For data with record ids of its own
  (an image folder) that id was an unkeyed hash of the record id
  (:func:`fairforget.tombstones.legacy_sample_id`), which a keyed site secret has replaced since;
* **2** (:data:`TOMBSTONE_SCHEMA_VERSION`) adds ``record``, the normalised record id, where the data
  has one: a record stays deleted whatever sample id it gets later.

A line without ``record`` is read as version 1 (its ``id`` is matched as a sample id and as an old
unkeyed id), a line with one as version 2; a line naming a ``schema_version`` newer than this one is
read for the fields this version declares. A site's deletion list is migrated on read, never refused
nor rewritten. Lines written since version 2 name their ``schema_version``; the older lines carry
none, and their shape tells the two versions apart (the releases that wrote version 1 read version 2's
lines as they are: they ignore the keys they do not know).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fairforget.schemas.base import Record, SchemaError, doc

TOMBSTONE_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class TombstoneLine(Record):
    """One line of a tombstone file: a deleted record."""

    TITLE: ClassVar[str] = "fairforget tombstone line"

    schema_version: int | None = doc("the line's format version, where a writer names one (else told by its "
                                     "shape: 2 with `record`, 1 without)")
    id: int | None = doc("the record's sample id when it was deleted (version 1, image folders: an unkeyed hash "
                         "of its record id)")
    record: str | None = doc("the site's record id, normalised (`img/1.png`), where the data has record ids")
    request: int | None = doc("the deletion request that tombstoned it")
    time: str | None = doc("when, UTC, ISO 8601 to the second")

    @property
    def version(self) -> int:
        if self.schema_version is not None:
            return self.schema_version
        return TOMBSTONE_SCHEMA_VERSION if self.record is not None else 1

    @property
    def legacy(self) -> bool:
        """A line that names no record: its ``id`` may be an older version's unkeyed id of one."""
        return self.record is None


def parse_line(obj: Mapping[str, Any], where: str) -> TombstoneLine:
    """A tombstone line read from ``where`` (``FILE line N``), checked and migrated; a line that
    names neither a sample id nor a record, or whose fields have other types, is a one-line
    :class:`SchemaError` (a deletion is never dropped silently)."""
    line = TombstoneLine.parse(obj, where)
    if line.id is None and line.record is None:
        raise SchemaError(f"{where}: a tombstone naming no 'id' and no 'record'")
    return line


def new_line(sample_id: int, record: str | None, request: int | None, time: str) -> dict[str, Any]:
    """The JSON object :meth:`fairforget.tombstones.Tombstones.add` appends (version 2)."""
    line = TombstoneLine(schema_version=TOMBSTONE_SCHEMA_VERSION, id=int(sample_id), record=record, request=request,
                         time=time)
    obj = {"schema_version": line.schema_version, "id": line.id,
           **({"record": line.record} if line.record is not None else {}), "request": line.request, "time": line.time}
    parse_line(obj, "the tombstone to append")
    return obj
