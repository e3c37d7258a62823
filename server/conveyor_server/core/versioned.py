"""Versioned records at keys the caller names, changed only by conditional writes.

The write rules of the task store (core/store.py) for records that need none of its extras
(the cache of recent writes, write listeners, the task-specific expiry): a record is inserted
where there is none and otherwise compare-and-set against the version it was read at; a write
that loses to another writer is retried on a fresh read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError

from ..backends.base import Backend, Update
from .store import MAX_CAS_ROUNDS, ConflictError

log = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Stored(Generic[M]):
    """A record as read, with the version a conditional write must expect."""

    record: M
    version: int


class VersionedRecords(Generic[M]):
    """Read and conditionally write records of one type: `parse` turns stored bytes into one
    (raising ValueError or DecodeError when they are unreadable), `serialize` back. Records keep
    the backend's TTL, or none with `keep`; a change gives up after `rounds` lost writes."""

    def __init__(
        self, backend: Backend, parse: Callable[[bytes], M], serialize: Callable[[M], bytes], *, keep: bool = False,
        rounds: int = MAX_CAS_ROUNDS,
    ) -> None:
        self.backend = backend
        self._parse = parse
        self._serialize = serialize
        self._keep = keep
        self._rounds = rounds

    async def load(self, keys: Sequence[str]) -> dict[str, Stored[M]]:
        """The readable records among `keys`; an unreadable one is logged and left out."""
        if not keys:
            return {}
        loaded: dict[str, Stored[M]] = {}
        for key, found in (await self.backend.get(keys)).items():
            try:
                loaded[key] = Stored(self._parse(found.data), found.version)
            except (ValueError, DecodeError):
                log.error("record %s is unreadable; ignoring it", key)
        return loaded

    async def put(self, key: str, read: Stored[M] | None, record: M) -> bool:
        """One conditional write of `record` over what was `read` (None: there was no record).
        False when another writer got there first."""
        data = self._serialize(record)
        if read is None:
            return not await self.backend.insert({key: data}, keep=self._keep)
        return (await self.backend.compare_and_set([Update(key, read.version, data, self._keep)]))[0]

    async def change(self, key: str, edit: Callable[[Stored[M] | None], M | None]) -> M | None:
        """Read, edit and write until the write sticks. `edit` gets the record as read (None when
        there is none) and returns the record to write, or None to leave it; it may run more than
        once, and must decide from what it is given. Returns the record written (None: none)."""
        for _ in range(self._rounds):
            read = (await self.load([key])).get(key)
            record = edit(read)
            if record is None:
                return None
            if await self.put(key, read, record):
                return record
        raise ConflictError(f"{key} kept changing under concurrent writers")
