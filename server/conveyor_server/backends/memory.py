"""In-process result store for tests and single-process use; nothing survives a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence

from .base import DEFAULT_TTL_SECONDS, Update, Versioned


class MemoryBackend:
    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._ttl = ttl_seconds
        self._records: dict[str, tuple[Versioned, float]] = {}
        self._groups: dict[str, dict[str, bytes]] = {}
        self._claims: dict[str, float] = {}
        self._watchers: set[tuple[frozenset[str], asyncio.Queue[set[str] | None]]] = set()

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        for _, queue in list(self._watchers):
            queue.put_nowait(None)

    def _live(self, key: str) -> Versioned | None:
        found = self._records.get(key)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del self._records[key]
            return None
        return found[0]

    def _changed(self, keys: set[str]) -> None:
        for watched, queue in self._watchers:
            hits = keys & watched
            if hits:
                queue.put_nowait(hits)

    async def insert(self, records: Mapping[str, bytes]) -> list[str]:
        existing: list[str] = []
        expires = time.monotonic() + self._ttl
        for key, data in records.items():
            if self._live(key) is not None:
                existing.append(key)
            else:
                self._records[key] = (Versioned(data, 1), expires)
        self._changed(set(records) - set(existing))
        return existing

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        found: dict[str, Versioned] = {}
        for key in keys:
            record = self._live(key)
            if record is not None:
                found[key] = record
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        applied: list[bool] = []
        expires = time.monotonic() + self._ttl
        for update in updates:
            current = self._live(update.key)
            ok = current is not None and current.version == update.expected_version
            if ok and current is not None:
                self._records[update.key] = (Versioned(update.data, current.version + 1), expires)
            applied.append(ok)
        self._changed({u.key for u, ok in zip(updates, applied, strict=True) if ok})
        return applied

    async def add_member(self, group: str, member: str, payload: bytes) -> int:
        members = self._groups.setdefault(group, {})
        members.setdefault(member, payload)
        return len(members)

    async def members(self, group: str) -> dict[str, bytes]:
        return dict(self._groups.get(group, {}))

    async def remove_member(self, group: str, member: str) -> None:
        self._groups.get(group, {}).pop(member, None)

    async def claim(self, key: str) -> bool:
        now = time.monotonic()
        if self._claims.get(key, 0.0) > now:
            return False
        self._claims[key] = now + self._ttl
        return True

    async def watch(self, keys: Collection[str]) -> AsyncIterator[set[str]]:
        queue: asyncio.Queue[set[str] | None] = asyncio.Queue()
        entry = (frozenset(keys), queue)
        self._watchers.add(entry)
        try:
            # Everything once, now that changes are tracked: a write that raced the caller's
            # first read is not missed (the other engines start the same way).
            yield set(keys)
            while True:
                changed = await queue.get()
                if changed is None:
                    return
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        return
                    changed |= more
                yield changed
        finally:
            self._watchers.discard(entry)
