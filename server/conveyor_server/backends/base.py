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
  change the count. The count it returns is exact: the number of distinct members at one
  moment between this call's add and its return, also when many replicas add to one group at
  once and when a replica died mid-add. So once every member is in, some add returns the
  full count, and no add ever returns more members than the group has (a chord fires on
  this). Its cost does not grow with the size of the group (except where an engine's
  docstring says so). claim() returns True to exactly one caller per key.
- add_members() and remove_members() are add_member() and remove_member() for many members
  in a round trip per chunk of at most MEMBER_CHUNK (so no call holds an engine long), with
  the same per-member semantics; add_members() returns a count exact as above, taken after
  its last add. A batch is not one atomic step: a failure may leave part of it written, and
  since both are idempotent a retry finishes it.
- members() reads a group in pages: ordered by member name (code point order, as Python
  sorts str), strictly after `after` ("" starts at the first member), at most `limit` (0 = all).
- Expiry. The engine's constructor takes `ttl_seconds`. Every write sets the expiry of what it
  wrote, by its `keep` flag:
  - keep=False (the default): the key may vanish `ttl_seconds` after this write.
  - keep=True: the key never expires, until a later write with keep=False or expire().
  The writes are insert() (each record it creates), compare_and_set() (each applied Update,
  by its own `keep`), add_member() (the whole group, also when the member was already there)
  and a successful claim(). A write that changes nothing (an insert of an existing key, a
  failed compare-and-set, a lost claim) leaves the expiry as it was; remove_member() does not
  change whether a group is kept.
  expire() starts the TTL now for records, groups and claims, kept or not; it is idempotent
  and ignores keys that do not exist (or have already expired).
  Live state (queued, delayed, running, mid-workflow) is written with keep=True, so no TTL can
  remove it; a result starts its TTL when its task ends.
- insert_after() is add_member() then insert(), each with its own semantics and expiry, the
  member first: one step where the engine can (a Redis script, a SQLite transaction), two
  ordered calls where it cannot (the default in _common.DerivedWrites).
- watch() sees writes made by any process or replica sharing the engine.
- take_tokens() is a token bucket (rate limits) shared by every process using the engine: each
  call refills the bucket for the time passed and takes whole tokens in one atomic step, so
  replicas taking at once never get more than the bucket held. Buckets need no expiry flag:
  one never seen, or idle long enough to be full, is full, and the engine may forget it then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

DEFAULT_TTL_SECONDS = 86_400.0
# Members per engine call of add_members() and remove_members(): one Redis script, SQLite
# transaction, MongoDB bulk write or memcached index rewrite.
MEMBER_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Versioned:
    data: bytes
    version: int


@dataclass(frozen=True, slots=True)
class Update:
    """One conditional write: store `data` at `key` if its version is `expected_version`.

    keep=True leaves the record without expiry; keep=False starts its TTL at this write.
    """

    key: str
    expected_version: int
    data: bytes
    keep: bool = False


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A member to add to a group (see add_member()) along with other writes."""

    group: str
    name: str
    payload: bytes
    keep: bool = False


class Changes(frozenset[str]):
    """Keys that may have changed. `versions` holds, for some of them, the version the latest
    of those changes wrote; a key without one may have been written at any version."""

    __slots__ = ("versions",)
    versions: Mapping[str, int]

    def __new__(cls, keys: Iterable[str] = (), versions: Mapping[str, int] | None = None) -> Changes:
        changes = super().__new__(cls, keys)
        changes.versions = versions or {}
        return changes


class ChangeLog:
    """Changes noted since they were last taken: a key's version is kept only while every
    change of it noted since came with one (the highest); one without makes it unknown."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._versions: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._keys)

    def note(self, key: str, version: int | None = None) -> None:
        if version is None or (key in self._keys and key not in self._versions):
            self._versions.pop(key, None)
        else:
            self._versions[key] = max(version, self._versions.get(key, 0))
        self._keys.add(key)

    def note_all(self, changes: Iterable[str]) -> None:
        versions = changes.versions if isinstance(changes, Changes) else {}
        for key in changes:
            self.note(key, versions.get(key))

    def take(self) -> Changes:
        taken = Changes(self._keys, self._versions)
        self._keys, self._versions = set(), {}
        return taken


@runtime_checkable
class Backend(Protocol):
    """Async result store."""

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """Build (not connect) the engine from its URL (`engines.open_backend` picks the class by the
        URL's scheme), expiring what it stores `ttl_seconds` after a write (see Expiry above)."""
        ...

    async def connect(self) -> None:
        """Open connections and create what the engine needs (tables, indexes)."""

    async def close(self) -> None:
        """Release connections; ends any running watch() iterators."""

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        """Create records that do not exist yet, at version 1 (kept, or expiring, by `keep`).

        Returns the keys that already existed; those are left unchanged.
        """

    async def insert_after(self, member: GroupMember, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        """add_member() of `member`, then insert(records, keep), in one round trip where the
        engine allows. The member is stored before any record: a failure between the two leaves
        the member without the records, never a record without the member (an outbox promise
        precedes what it covers). Returns what insert() returns.
        """

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        """Read records; missing (or expired) keys are absent from the answer."""

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        """Apply each update whose expected version matches; one bool per update, in order."""

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        """Record `member` of `group` with `payload` (first write wins).

        Returns how many distinct members the group has after the call. keep=True: the group
        does not expire (until a write with keep=False or expire()); keep=False: it may vanish
        `ttl_seconds` after this call.
        """

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        """add_member() for each of `members` ({member: payload}): a member's first payload wins,
        and `keep` sets the group's expiry as there.

        Returns how many distinct members the group has after the last of these adds (exact, as
        add_member()'s count). An empty `members` writes nothing and returns 0.
        """

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        """Members of `group` with their payloads, ordered by name, strictly after `after`
        ("" = from the first), at most `limit` of them (0 = all)."""

    async def remove_member(self, group: str, member: str) -> None:
        """Forget one member (no-op when absent)."""

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        """Forget each of `members` (absent ones are ignored), as remove_member() does."""

    async def claim(self, key: str, keep: bool = False) -> bool:
        """Atomically claim `key`: True for exactly one caller, False for every other.

        The winner's `keep` decides whether the claim expires `ttl_seconds` from now.
        """

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        """Start the TTL now (`ttl_seconds` from now) for these record keys, group names and
        claim keys, kept or not. Missing ones are ignored; calling it again restarts the TTL."""

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        """Yield sets of keys (among `keys`) that may have changed since the last yield.

        Push where the engine can (pub/sub, change streams), polling otherwise. Spurious
        keys are allowed; missed changes are not. Where the feed learns the version a write
        made, the set's `versions` gives it (a version that is there is right; one that is
        not may be anything). Ends when the backend closes or the consumer stops iterating.
        """
        ...

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        """Take up to `wanted` whole tokens from `bucket`, atomically across every process
        sharing the engine. The bucket holds at most `burst` (>= 1) tokens and gains
        `rate_per_second` (> 0) per second, by the values of this call (a changed limit applies
        at once); a bucket never seen is full.

        Returns (granted, wait): how many were taken (0..wanted), and the seconds until the
        bucket holds a whole token again (0 while one is left). Time is the engine's own clock
        where it has one (Redis), otherwise the caller's wall clock; a clock that went back
        counts as no time passed.
        """
