"""In-process result store for tests and single-process use; nothing survives a restart.

Expiry is exact (monotonic clock; a kept key has an infinite deadline). Expired records and
claims are dropped when next looked at; an expired group when next written or read.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

from ._common import DerivedWrites
from ._tokens import TokenBuckets
from ._watch import Feed, LocalFeed, WatchHub
from .base import DEFAULT_TTL_SECONDS, Changes, Update, Versioned
from .memory_task_index import MemoryTaskIndex


@dataclass
class _Group:
    expires: float
    payloads: dict[str, bytes] = field(default_factory=dict)
    # Member names in order, for paging; kept sorted as members come and go.
    names: list[str] = field(default_factory=list)


class MemoryBackend(DerivedWrites):
    def __init__(
        self, ttl_seconds: float = DEFAULT_TTL_SECONDS, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        # What expiry is measured on (a test passes a clock it moves).
        self._clock = clock
        self._records: dict[str, tuple[Versioned, float]] = {}
        self._groups: dict[str, _Group] = {}
        self._claims: dict[str, float] = {}
        self._feed = LocalFeed()
        self._watches = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """`memory://`: records in this process only, so the URL has nothing more to say."""
        return cls(ttl_seconds)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        await self._watches.close()

    async def _open_feed(self) -> Feed:
        return self._feed

    def _expires(self, keep: bool) -> float:
        return math.inf if keep else self._clock() + self._ttl

    def _live(self, key: str) -> Versioned | None:
        found = self._records.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            del self._records[key]
            return None
        return found[0]

    def _group(self, group: str) -> _Group | None:
        found = self._groups.get(group)
        if found is not None and found.expires <= self._clock():
            del self._groups[group]
            return None
        return found

    def _changed(self, versions: Mapping[str, int | None]) -> None:
        self._feed.changed(versions)

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        existing: list[str] = []
        expires = self._expires(keep)
        for key, data in records.items():
            if self._live(key) is not None:
                existing.append(key)
            else:
                self._records[key] = (Versioned(data, 1), expires)
        # A new record's version is left unknown: one created again after it expired
        # restarts at 1, below what a reader of the old one holds.
        self._changed(dict.fromkeys(set(records) - set(existing)))
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
        written: dict[str, int | None] = {}
        for update in updates:
            current = self._live(update.key)
            ok = current is not None and current.version == update.expected_version
            if ok and current is not None:
                record = Versioned(update.data, current.version + 1)
                self._records[update.key] = (record, self._expires(update.keep))
                written[update.key] = record.version
            applied.append(ok)
        self._changed(written)
        return applied

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        if not members:
            return 0
        found = self._group(group)
        if found is None:
            found = self._groups[group] = _Group(0.0)
        found.expires = self._expires(keep)
        for member, payload in members.items():
            if member not in found.payloads:
                found.payloads[member] = payload
                bisect.insort(found.names, member)
        return len(found.payloads)

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        found = self._group(group)
        if found is None:
            return {}
        start = bisect.bisect_right(found.names, after) if after else 0
        names = found.names[start : start + limit] if limit > 0 else found.names[start:]
        return {name: found.payloads[name] for name in names}

    async def remove_member(self, group: str, member: str) -> None:
        await self.remove_members(group, [member])

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        found = self._group(group)
        if found is None:
            return
        for member in members:
            if found.payloads.pop(member, None) is not None:
                del found.names[bisect.bisect_left(found.names, member)]

    async def claim(self, key: str, keep: bool = False) -> bool:
        if self._claims.get(key, 0.0) > self._clock():
            return False
        self._claims[key] = self._expires(keep)
        return True

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        expires = self._expires(False)
        for key in records:
            record = self._live(key)
            if record is not None:
                self._records[key] = (record, expires)
        for name in groups:
            found = self._group(name)
            if found is not None:
                found.expires = expires
        for key in claims:
            if self._claims.get(key, 0.0) > self._clock():
                self._claims[key] = expires

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        return self._watches.watch(keys)

    # -- token buckets (rate limits) ------------------------------------------------------

    # Made on first use; a test may set its own first, with a clock it controls.
    token_buckets: TokenBuckets | None = None

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        if self.token_buckets is None:
            self.token_buckets = TokenBuckets()
        return self.token_buckets.take(bucket, rate_per_second, burst, wanted)

    # -- task index (listing tasks: backends/task_index.py) -------------------------------

    _task_index: MemoryTaskIndex | None = None

    def task_index(self) -> MemoryTaskIndex:
        """One per backend, shared by every core that uses it (a scan per query)."""
        if self._task_index is None:
            self._task_index = MemoryTaskIndex(self._ttl)
        return self._task_index
