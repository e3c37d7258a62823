"""Memcached result store (aiomcache).

Keys are `{prefix}:{kind}:{name}`, or `{prefix}:{kind}#{sha1(name)}` when the name is too
long or has bytes memcached keys cannot hold (space, control, non-ASCII); deterministic, so
every replica finds the same item.

- record `r`: 8-byte big-endian version + data. insert is `add`; compare-and-set is
  gets + cas, retried only while the version still matches.
- group `g`: an index {generation, names, touched, kept} updated by a gets/cas loop; each
  payload is a marker item `m` keyed by (generation, member) and written with `add`, so the
  first payload wins and the index holds only names. A new generation after the group
  expires keeps old markers from leaking into a new group. Markers of an expiring group live
  twice the TTL and are touched again when the group outlives half of it, so a marker never
  vanishes before its index; markers of a kept group never expire.
  The count is exact (the index is the truth, changed only by cas), but the index is one item
  rewritten by every add: an add costs O(group size) in bytes, and a group holds as many
  names as fit in one item (about 200,000 names of 36 characters with `-I 8m`). A batch
  (add_members(), remove_members()) rewrites the index once per chunk of members. members()
  pages by sorting the names client-side and fetching only the page's markers.
- claim `c`: `add`.

Every write sets the expiry: exptime 0 (never) for a kept item, the TTL otherwise; expire()
is a `touch` (a cas of the index for a group). remove_member() rewrites the index too, so it
restarts an expiring group's TTL. Memcached counts whole seconds on a clock that ticks once a second, so the TTL
is rounded up plus one second (an item lives at least the TTL and at most two seconds more);
times beyond 30 days are sent as absolute timestamps, as memcached requires. Values are
limited by the server's item size: run memcached with `-I 8m` (the default is 1 MB).

Approximations: memcached is a cache. It may evict any item under memory pressure, kept
items included (they are merely never *expired*), and loses everything on restart; give it
enough `-m` and use another engine where live state must survive. When a group switches
between kept and expiring, its markers are touched one by one (O(group size), once per
switch): kept before the index says so, expiring only after; if a keep=True and a keep=False
write to one group race, a marker may be left expiring under a kept index.

watch() polls: one meta-get (`mg key c`, memcached >= 1.6) per watched key every 50 ms on a
dedicated connection, comparing CAS tokens, which change on every write and cost no data.

Timeouts: aiomcache has none, so a frozen server (SIGSTOP, a hung host: its port accepts
connections, nothing answers) hung every call, and with them the pool, for as long as it
stayed frozen. Here a call that holds a connection `timeout` seconds (default 2; the URL's
`timeout=`) without its reply fails with TimeoutError and its connection is closed, not reused
(its reply may still come); connecting has the same bound. Callers see a transient error
(UNAVAILABLE) and retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self, TypeVar

import aiomcache
from aiomcache.pool import Connection, MemcachePool

from ..engine_urls import DEFAULT_PREFIX, EngineUrl
from . import _tokens
from ._common import DerivedWrites, compare_and_set_per_key, member_chunks
from ._watch import Feed, PollFeed, WatchHub
from .base import DEFAULT_TTL_SECONDS, Changes, Update, Versioned

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PORT = 11211
MAX_KEY_BYTES = 250
# Relative expiry times above this are read by memcached as Unix timestamps.
MAX_RELATIVE_EXPTIME = 30 * 24 * 3600
# Keys per get / meta-get round trip.
_CHUNK = 200
# A CAS loop only retries after another writer succeeded, so this is never reached in practice.
_MAX_RACES = 10_000
_VERSION = struct.Struct(">Q")
# How long a call may wait for its reply (or a connection) before it fails.
CALL_TIMEOUT_SECONDS = 2.0


def _exptime(seconds: float) -> int:
    # Memcached's clock ticks once a second, so N can end up to a second early: add one.
    whole = math.ceil(seconds) + 1
    return whole if whole <= MAX_RELATIVE_EXPTIME else int(time.time()) + whole


def _safe(name: str) -> bool:
    return all("!" <= char <= "~" for char in name)


def _pack(version: int, data: bytes) -> bytes:
    return _VERSION.pack(version) + data


def _unpack(value: bytes) -> Versioned:
    return Versioned(value[_VERSION.size :], _VERSION.unpack_from(value)[0])


@dataclass
class _Index:
    """A group's member names; payloads live in marker items of its generation."""

    generation: str = field(default_factory=lambda: uuid.uuid4().hex)
    touched: float = field(default_factory=time.time)
    names: dict[str, None] = field(default_factory=dict)
    # Whether the index (and so every marker) is stored without expiry.
    kept: bool = False

    def encode(self) -> bytes:
        raw = {"g": self.generation, "t": self.touched, "m": list(self.names), "k": self.kept}
        return json.dumps(raw).encode()

    @classmethod
    def decode(cls, value: bytes) -> _Index:
        raw = json.loads(value)
        return cls(str(raw["g"]), float(raw["t"]), dict.fromkeys(raw["m"]), bool(raw.get("k", False)))


class _DeadlinePool(MemcachePool):
    """aiomcache's pool, where a call gets `timeout` seconds to connect and `timeout` seconds, from when it
    took its connection, to be done with it; past that its connection is broken: the call fails at once
    (TimeoutError, or ConnectionResetError mid-write) and aiomcache closes the connection instead of
    pooling it again."""

    def __init__(self, host: str, port: int, size: int, timeout: float) -> None:
        super().__init__(host, port, minsize=size, maxsize=size)
        self._timeout = timeout
        self._deadlines: dict[Connection, asyncio.TimerHandle] = {}

    async def _create_new_conn(self) -> Connection | None:
        async with asyncio.timeout(self._timeout):
            return await super()._create_new_conn()

    async def acquire(self) -> Connection:
        conn = await super().acquire()
        self._deadlines[conn] = asyncio.get_running_loop().call_later(self._timeout, self._expire, conn)
        return conn

    def release(self, conn: Connection) -> None:
        deadline = self._deadlines.pop(conn, None)
        if deadline is not None:
            deadline.cancel()
        super().release(conn)

    def _expire(self, conn: Connection) -> None:
        self._deadlines.pop(conn, None)
        conn.reader.set_exception(TimeoutError(f"memcached sent no reply within {self._timeout} s"))
        conn.writer.close()


class _Client(aiomcache.Client):
    """aiomcache's client on a `_DeadlinePool`."""

    def __init__(self, host: str, port: int, pool_size: int, timeout: float) -> None:
        super().__init__(host, port, pool_size=pool_size)
        self._pool = _DeadlinePool(host, port, pool_size, timeout)


class _CasReader:
    """Meta-get of CAS tokens on a dedicated connection (aiomcache has no meta commands)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def tokens(self, keys: list[bytes]) -> list[int | None]:
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._tokens(keys)
            except BaseException:
                # A half-read reply would poison the next request: start over.
                self.close()
                raise

    async def _tokens(self, keys: list[bytes]) -> list[int | None]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(b"".join(b"mg " + key + b" c\r\n" for key in keys) + b"mn\r\n")
        await writer.drain()
        found: list[int | None] = []
        while (line := await reader.readline()) != b"MN\r\n":
            if line.startswith(b"HD "):
                found.append(int(line.split()[1][1:]))
            elif line == b"EN\r\n":
                found.append(None)
            else:
                raise ConnectionError(f"unexpected memcached reply {line!r}")
        if len(found) != len(keys):
            raise ConnectionError("memcached meta-get reply count mismatch")
        return found

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


class MemcachedBackend(DerivedWrites):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        prefix: str = DEFAULT_PREFIX,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        pool_size: int = 16,
        timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        if not prefix or not _safe(prefix) or len(prefix) > 100:
            raise ValueError(f"memcached prefix {prefix!r}: use 1-100 printable ASCII characters, no spaces")
        self._host = host
        self._port = port
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._pool_size = pool_size
        self._timeout = timeout
        self._client: aiomcache.Client | None = None
        self._cas_reader: _CasReader | None = None
        self._hub = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """memcached://host:port?prefix=name&pool_size=16&timeout=2 (seconds)."""
        options = EngineUrl(url)
        return cls(
            options.parts.hostname or "127.0.0.1",
            options.parts.port or DEFAULT_PORT,
            options.prefix,
            ttl_seconds,
            options.integer("pool_size", 16),
            options.number("timeout", CALL_TIMEOUT_SECONDS),
        )

    @property
    def _mc(self) -> aiomcache.Client:
        if self._client is None:
            raise RuntimeError("MemcachedBackend is not connected")
        return self._client

    def _key(self, kind: str, name: str) -> bytes:
        plain = f"{self._prefix}:{kind}:{name}"
        if _safe(name) and len(plain) <= MAX_KEY_BYTES:
            return plain.encode()
        # ':' vs '#' after the kind keeps hashed keys apart from plain ones.
        return f"{self._prefix}:{kind}#{hashlib.sha1(name.encode()).hexdigest()}".encode()

    def _marker(self, generation: str, member: str) -> bytes:
        return self._key("m", f"{generation}:{member}")

    @staticmethod
    async def _safely(call: Awaitable[T]) -> T:
        # aiomcache returns a connection to its pool even when a call is cancelled
        # mid-reply; shielding lets the call finish so the connection stays in sync.
        return await asyncio.shield(call)

    async def connect(self) -> None:
        client = _Client(self._host, self._port, self._pool_size, self._timeout)
        try:
            await client.version()
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._cas_reader = _CasReader(self._host, self._port, self._timeout)

    async def close(self) -> None:
        await self._hub.close()
        if self._cas_reader is not None:
            self._cas_reader.close()
            self._cas_reader = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _exptime(self, keep: bool) -> int:
        return 0 if keep else _exptime(self._ttl)

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        exptime = self._exptime(keep)
        keys = list(records)
        adds = (self._mc.add(self._key("r", key), _pack(1, records[key]), exptime) for key in keys)
        added = await asyncio.gather(*(self._safely(add) for add in adds))
        return [key for key, ok in zip(keys, added, strict=True) if not ok]

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        unique = list(dict.fromkeys(keys))
        found: dict[str, Versioned] = {}
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            values = await self._safely(self._mc.multi_get(*(self._key("r", key) for key in chunk)))
            for key, value in zip(chunk, values, strict=True):
                if value is not None:
                    found[key] = _unpack(value)
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        # Different keys run concurrently; updates of one key run in order.
        return await compare_and_set_per_key(updates, self._compare_and_set_one)

    async def _compare_and_set_one(self, update: Update) -> bool:
        key = self._key("r", update.key)
        value = _pack(update.expected_version + 1, update.data)
        for _ in range(_MAX_RACES):
            current, token = await self._safely(self._mc.gets(key))
            if current is None or token is None or _unpack(current).version != update.expected_version:
                return False
            if await self._safely(self._mc.cas(key, value, token, self._exptime(update.keep))):
                return True
            # Another write won the race; it bumped the version unless the record expired and
            # was inserted again, so read again instead of failing.
        return False

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        count = 0
        for chunk in member_chunks(members):
            count = await self._add_chunk(group, {name: members[name] for name in chunk}, keep)
        return count

    async def _add_chunk(self, group: str, members: Mapping[str, bytes], keep: bool) -> int:
        """Add the members' markers, then their names to the index in one cas."""
        key = self._key("g", group)
        exptime = 0 if keep else self._marker_exptime()
        for _ in range(_MAX_RACES):
            current, token = await self._safely(self._mc.gets(key))
            index = _Index() if current is None else _Index.decode(current)
            # First payload wins within this generation of the group.
            await self._on_markers(
                index.generation, members, lambda marker, name: self._mc.add(marker, members[name], exptime)
            )
            index.names.update(dict.fromkeys(members))
            if await self._write_index(key, index, token if current is not None else None, keep):
                return len(index.names)
        raise RuntimeError(f"memcached group {group!r}: too many concurrent writers")

    async def _write_index(self, key: bytes, index: _Index, token: int | None, keep: bool) -> bool:
        """Store the index (add when new, else cas), kept or expiring; keeps the markers
        outliving it."""
        now = time.time()
        refresh = not keep and (index.kept or now - index.touched > self._ttl / 2)
        if keep and not index.kept:
            # Before the index says kept: a marker must never expire under a kept index.
            await self._touch_markers(index, 0)
        index.kept = keep
        if refresh:
            index.touched = now
        value, exptime = index.encode(), self._exptime(keep)
        if token is None:
            stored = await self._safely(self._mc.add(key, value, exptime))
        else:
            stored = await self._safely(self._mc.cas(key, value, token, exptime))
        if stored and refresh:
            # After: only once this (expiring) state is the stored one.
            await self._touch_markers(index, self._marker_exptime())
        return stored

    async def _touch_markers(self, index: _Index, exptime: int) -> None:
        await self._on_markers(index.generation, index.names, lambda marker, _: self._mc.touch(marker, exptime))

    async def _on_markers(
        self, generation: str, names: Iterable[str], call: Callable[[bytes, str], Awaitable[bool]]
    ) -> None:
        """call(marker key, member name) for each name, _CHUNK calls at a time."""
        listed = list(names)
        for start in range(0, len(listed), _CHUNK):
            chunk = listed[start : start + _CHUNK]
            await asyncio.gather(*(self._safely(call(self._marker(generation, name), name)) for name in chunk))

    def _marker_exptime(self) -> int:
        # Twice the TTL, refreshed every half TTL: a marker always outlives its index.
        return _exptime(2 * self._ttl)

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        current = await self._safely(self._mc.get(self._key("g", group)))
        if current is None:
            return {}
        index = _Index.decode(current)
        names = sorted(name for name in index.names if name > after or not after)
        if limit > 0:
            names = names[:limit]
        found: dict[str, bytes] = {}
        for start in range(0, len(names), _CHUNK):
            chunk = names[start : start + _CHUNK]
            markers = list(dict.fromkeys(self._marker(index.generation, name) for name in chunk))
            values = dict(zip(markers, await self._safely(self._mc.multi_get(*markers)), strict=True))
            for name in chunk:
                payload = values[self._marker(index.generation, name)]
                if payload is not None:
                    found[name] = payload
        return found

    async def remove_member(self, group: str, member: str) -> None:
        await self.remove_members(group, [member])

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        for chunk in member_chunks(members):
            await self._remove_chunk(group, chunk)

    async def _remove_chunk(self, group: str, members: list[str]) -> None:
        """Take the members' names out of the index in one cas, then delete their markers."""
        key = self._key("g", group)
        for _ in range(_MAX_RACES):
            current, token = await self._safely(self._mc.gets(key))
            if current is None or token is None:
                return
            index = _Index.decode(current)
            gone = [member for member in members if member in index.names]
            if not gone:
                return
            for member in gone:
                del index.names[member]
            if await self._write_index(key, index, token, index.kept):
                await self._on_markers(index.generation, gone, lambda marker, _: self._mc.delete(marker))
                return
        raise RuntimeError(f"memcached group {group!r}: too many concurrent writers")

    async def claim(self, key: str, keep: bool = False) -> bool:
        return await self._safely(self._mc.add(self._key("c", key), b"1", self._exptime(keep)))

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        exptime = self._exptime(False)
        keys = [self._key("r", key) for key in records] + [self._key("c", key) for key in claims]
        for start in range(0, len(keys), _CHUNK):
            # touch on a missing key is a no-op (NOT_FOUND).
            touches = (self._mc.touch(key, exptime) for key in keys[start : start + _CHUNK])
            await asyncio.gather(*(self._safely(touch) for touch in touches))
        for group in dict.fromkeys(groups):
            await self._expire_group(group)

    async def _expire_group(self, group: str) -> None:
        key = self._key("g", group)
        for _ in range(_MAX_RACES):
            current, token = await self._safely(self._mc.gets(key))
            if current is None or token is None:
                return
            if await self._write_index(key, _Index.decode(current), token, keep=False):
                return
        raise RuntimeError(f"memcached group {group!r}: too many concurrent writers")

    async def _cas_tokens(self, keys: list[str]) -> dict[str, Hashable]:
        """CAS token per existing record; it changes on every write, even a re-insert."""
        if self._cas_reader is None:
            raise RuntimeError("MemcachedBackend is not connected")
        found: dict[str, Hashable] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            tokens = await self._cas_reader.tokens([self._key("r", key) for key in chunk])
            found.update((key, token) for key, token in zip(chunk, tokens, strict=True) if token is not None)
        return found

    async def _open_feed(self) -> Feed:
        return PollFeed(self._cas_tokens, "memcached")

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        return self._hub.watch(keys)

    # -- token buckets (rate limits) ------------------------------------------------------

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        """Item `tb` holds {t: tokens, u: when counted (wall clock)}, changed by a gets/cas loop
        (`add` for a new bucket); it expires once the bucket would be full again."""
        _tokens.check_bucket(rate_per_second, burst, wanted)
        key = self._key("tb", bucket)
        exptime = _exptime(_tokens.full_after(rate_per_second, burst))
        for _ in range(_MAX_RACES):
            current, token = await self._safely(self._mc.gets(key))
            now = time.time()
            tokens = burst
            if current is not None:
                state = json.loads(current)
                tokens = _tokens.refill(float(state["t"]), float(state["u"]), now, rate_per_second, burst)
            taken = _tokens.take(tokens, wanted, rate_per_second)
            value = json.dumps({"t": taken.left, "u": now}).encode()
            if current is None or token is None:
                stored = await self._safely(self._mc.add(key, value, exptime))
            else:
                stored = await self._safely(self._mc.cas(key, value, token, exptime))
            if stored:
                return taken.granted, taken.wait
            # Another replica took tokens (or made the bucket) first: count again from its state.
        raise RuntimeError(f"memcached token bucket {bucket!r}: too many concurrent writers")
