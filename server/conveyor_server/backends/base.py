"""The Backend protocol: what the server needs from a result store.

Every engine (memory, sqlite, redis, mongodb, memcached) implements this protocol and
passes tests/conformance/test_backend.py. Values are opaque bytes; the server stores
serialized conveyor.internal.v1 messages in them. All state machines (task states,
workflows) live in the core and use only these primitives, so no engine has workflow code.

Semantics every engine must keep:
- Records are versioned. insert() creates at version 1; compare_and_set() writes only when
  the stored version equals the expected one and then bumps it by one. This is the single
  primitive that makes "first terminal result wins" true across replicas.
- add_member() is idempotent per (group, member): the first payload wins, duplicates do not
  change the count. claim() returns True to exactly one caller per key.
- Every write (insert, compare_and_set, add_member, claim) keeps the key alive for
  `ttl_seconds` from now (the engine's constructor takes it); after that it may vanish.
- watch() sees writes made by any process or replica sharing the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_TTL_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class Versioned:
    data: bytes
    version: int


@dataclass(frozen=True, slots=True)
class Update:
    """One conditional write: store `data` at `key` if its version is `expected_version`."""

    key: str
    expected_version: int
    data: bytes


@runtime_checkable
class Backend(Protocol):
    """Async result store."""

    async def connect(self) -> None:
        """Open connections and create what the engine needs (tables, indexes)."""

    async def close(self) -> None:
        """Release connections; ends any running watch() iterators."""

    async def insert(self, records: Mapping[str, bytes]) -> list[str]:
        """Create records that do not exist yet, at version 1.

        Returns the keys that already existed; those are left unchanged.
        """

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        """Read records; missing (or expired) keys are absent from the answer."""

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        """Apply each update whose expected version matches; one bool per update, in order."""

    async def add_member(self, group: str, member: str, payload: bytes) -> int:
        """Record `member` of `group` with `payload` (first write wins).

        Returns how many distinct members the group has after the call.
        """

    async def members(self, group: str) -> dict[str, bytes]:
        """Every member of `group` with its payload."""

    async def remove_member(self, group: str, member: str) -> None:
        """Forget one member (no-op when absent)."""

    async def claim(self, key: str) -> bool:
        """Atomically claim `key`: True for exactly one caller, False for every other."""

    def watch(self, keys: Collection[str]) -> AsyncIterator[set[str]]:
        """Yield sets of keys (among `keys`) that may have changed since the last yield.

        Push where the engine can (pub/sub, change streams), polling otherwise. Spurious
        keys are allowed; missed changes are not. Ends when the backend closes or the
        consumer stops iterating.
        """
        ...
