"""Small helpers shared by the backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

from ..engine_urls import split_prefix
from .base import MEMBER_CHUNK, GroupMember, Update

# Re-exported for tests/http/conftest.py, which reads it from here.
__all__ = ["DerivedWrites", "KeyedLocks", "compare_and_set_per_key", "member_chunks", "split_prefix"]


class DerivedWrites:
    """Writes built from an engine's own: add_member() is add_members() of one member (every
    engine writes members in batches; first payload wins, `keep` as there), and insert_after()
    is add_member() then insert(), two round trips, for engines that cannot send both at once."""

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        raise NotImplementedError  # each backend's own

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        raise NotImplementedError  # each backend's own

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        return await self.add_members(group, {member: payload}, keep)

    async def insert_after(self, member: GroupMember, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        await self.add_member(member.group, member.name, member.payload, member.keep)
        return await self.insert(records, keep)


def member_chunks(members: Iterable[str]) -> Iterator[list[str]]:
    """Member names in lists of at most MEMBER_CHUNK, each name once (in first-seen order)."""
    unique = list(dict.fromkeys(members))
    for start in range(0, len(unique), MEMBER_CHUNK):
        yield unique[start : start + MEMBER_CHUNK]


async def compare_and_set_per_key(
    updates: Sequence[Update], apply_one: Callable[[Update], Awaitable[bool]]
) -> list[bool]:
    """compare_and_set() for engines that write one record at a time: different keys run
    concurrently, updates of one key run in order (as the protocol requires)."""
    applied = [False] * len(updates)
    by_key: dict[str, list[int]] = {}
    for index, update in enumerate(updates):
        by_key.setdefault(update.key, []).append(index)

    async def apply(indexes: list[int]) -> None:
        for index in indexes:
            applied[index] = await apply_one(updates[index])

    await asyncio.gather(*(apply(indexes) for indexes in by_key.values()))
    return applied


class KeyedLocks:
    """One asyncio.Lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
