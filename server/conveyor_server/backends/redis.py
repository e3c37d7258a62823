"""Redis result store (redis-py asyncio).

Layout, all under `{prefix}:`:
- `r:{key}`  record hash {d: data, v: version}
- `g:{group}` group hash {member: payload}
- `c:{key}`  chord claim, SET NX
- channel `w:{key}` gets a PUBLISH after every successful record write.

Writes run as Lua scripts so the version check, the write, the expiry and the PUBLISH are
one atomic step; a batch of records is one EVALSHA. One channel per key means Redis only
delivers a change to the replicas watching that key, and one shared pub/sub connection per
backend serves every watch(), so a watch of 1,000 keys is one SUBSCRIBE command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from ..redis_pool import open_redis
from ._common import split_prefix
from ._watch import Feed, Registry, Watcher, WatchHub
from .base import DEFAULT_TTL_SECONDS, Update, Versioned

log = logging.getLogger(__name__)

# Keys per EVALSHA: bounds how long one script blocks the Redis event loop.
_CHUNK = 500
# The pub/sub reader wakes this often so redis-py can PING: a silently dead connection
# would otherwise block the reader forever and every watch would miss changes.
_READ_SECONDS = 1.0
_HEALTH_CHECK_SECONDS = 15

# KEYS: record keys. ARGV: ttl_ms, channel prefix, record-prefix length, data...
# Returns the 1-based indexes of keys that already existed.
_INSERT = """
local ttl, chan, cut = ARGV[1], ARGV[2], tonumber(ARGV[3]) + 1
local existed = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    existed[#existed + 1] = i
  else
    redis.call('HSET', key, 'd', ARGV[3 + i], 'v', 1)
    redis.call('PEXPIRE', key, ttl)
    redis.call('PUBLISH', chan .. string.sub(key, cut), '')
  end
end
return existed
"""

# KEYS: record keys. ARGV: ttl_ms, channel prefix, record-prefix length, then
# (expected version, data) per key. Returns 1/0 per key, applied in order.
_COMPARE_AND_SET = """
local ttl, chan, cut = ARGV[1], ARGV[2], tonumber(ARGV[3]) + 1
local applied = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('HGET', key, 'v')
  if current and tonumber(current) == tonumber(ARGV[2 + 2 * i]) then
    redis.call('HSET', key, 'd', ARGV[3 + 2 * i], 'v', tonumber(current) + 1)
    redis.call('PEXPIRE', key, ttl)
    redis.call('PUBLISH', chan .. string.sub(key, cut), '')
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""

# KEYS: group hash. ARGV: member, payload, ttl_ms. Returns the member count.
_ADD_MEMBER = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HLEN', KEYS[1])
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class _Subscriptions:
    """The pub/sub feed: one connection shared by every watch() of a backend, one channel per key."""

    def __init__(self, client: aioredis.Redis, channel_prefix: str) -> None:
        self._pubsub: PubSub = client.pubsub()
        self._prefix = channel_prefix.encode()
        self._registry = Registry()
        # Futures resolved by the server's subscribe confirmation, in send order.
        self._pending: dict[bytes, list[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    def _channel(self, key: str) -> bytes:
        return self._prefix + key.encode()

    async def add(self, watcher: Watcher) -> None:
        """Return once Redis confirms every channel, so no later PUBLISH can be missed."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        async with self._lock:  # keeps SUBSCRIBE/UNSUBSCRIBE in the order we decided them
            asked: dict[bytes, asyncio.Future[None]] = {}
            for key in self._registry.add(watcher):
                channel = self._channel(key)
                asked[channel] = loop.create_future()
                self._pending.setdefault(channel, []).append(asked[channel])
            for key in watcher.keys:
                waits.extend(self._pending.get(self._channel(key), ()))
            if asked:
                try:
                    await self._pubsub.subscribe(*asked)
                except BaseException:
                    self._forget(watcher, asked)
                    raise
                if self._reader is None:
                    self._reader = asyncio.create_task(self._read(), name="conveyor-redis-watch")
        if waits:
            await asyncio.gather(*(asyncio.shield(wait) for wait in waits))

    def _forget(self, watcher: Watcher, asked: dict[bytes, asyncio.Future[None]]) -> None:
        """Undo add() after a failed SUBSCRIBE."""
        for channel, wait in asked.items():
            waits = self._pending.get(channel, [])
            if wait in waits:
                waits.remove(wait)
            if not waits:
                self._pending.pop(channel, None)
        self._registry.remove(watcher)

    async def remove(self, watcher: Watcher) -> None:
        async with self._lock:
            gone = [self._channel(key) for key in self._registry.remove(watcher)]
            if gone and self._pubsub.connection is not None:
                try:
                    await self._pubsub.unsubscribe(*gone)
                except Exception:
                    # A dead connection has no subscriptions left to drop.
                    log.warning("redis unsubscribe failed", exc_info=True)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._registry.close_all()
        for waits in self._pending.values():
            for wait in waits:
                if not wait.done():
                    wait.set_result(None)  # lets a starting watch() see it is closed
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=_READ_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # redis-py reconnects and resubscribes on the next read; the resubscribe
                # confirmations below then mark every key as changed.
                log.warning("redis watch connection lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            waits = self._pending.get(channel)
            if waits:
                waits.pop(0).set_result(None)
                if not waits:
                    del self._pending[channel]
                return
            # Unasked-for confirmation: a resubscribe after reconnecting; changes during
            # the outage were not delivered, so report the key as possibly changed.
        elif kind != "message":
            return
        self._registry.dispatch(channel[len(self._prefix) :].decode())


class RedisBackend:
    def __init__(self, url: str, prefix: str = "conveyor", ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._url = url
        self._prefix = prefix
        self._ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._client: aioredis.Redis | None = None
        self._hub = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """redis://host:port/db?prefix=name (default prefix "conveyor")."""
        clean, prefix = split_prefix(url)
        return cls(clean, prefix, ttl_seconds)

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisBackend is not connected")
        return self._client

    def _record(self, key: str) -> str:
        return f"{self._prefix}:r:{key}"

    def _group(self, group: str) -> str:
        return f"{self._prefix}:g:{group}"

    async def connect(self) -> None:
        client = open_redis(self._url, health_check_interval=_HEALTH_CHECK_SECONDS)
        await client.ping()
        self._client = client
        self._insert = client.register_script(_INSERT)
        self._compare_and_set = client.register_script(_COMPARE_AND_SET)
        self._add_member = client.register_script(_ADD_MEMBER)

    async def close(self) -> None:
        await self._hub.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _script_head(self) -> list[str | int | bytes]:
        # Lua's string.sub counts bytes, so the record prefix length is in bytes too.
        return [self._ttl_ms, f"{self._prefix}:w:", len(self._record("").encode())]

    async def insert(self, records: Mapping[str, bytes]) -> list[str]:
        keys = list(records)
        existing: list[str] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            args: list[str | int | bytes] = [*self._script_head(), *(records[key] for key in chunk)]
            found = await self._insert(keys=[self._record(key) for key in chunk], args=args)
            existing.extend(chunk[int(index) - 1] for index in found)
        return existing

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        if not keys:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self._record(key), "d", "v")
        rows = await pipe.execute()
        found: dict[str, Versioned] = {}
        for key, (data, version) in zip(keys, rows, strict=True):
            if data is not None and version is not None:
                found[key] = Versioned(bytes(data), int(version))
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        applied: list[bool] = []
        for start in range(0, len(updates), _CHUNK):
            chunk = updates[start : start + _CHUNK]
            args: list[str | int | bytes] = self._script_head()
            for update in chunk:
                args += [update.expected_version, update.data]
            result = await self._compare_and_set(keys=[self._record(u.key) for u in chunk], args=args)
            applied.extend(bool(flag) for flag in result)
        return applied

    async def add_member(self, group: str, member: str, payload: bytes) -> int:
        count = await self._add_member(keys=[self._group(group)], args=[member, payload, self._ttl_ms])
        return int(count)

    async def members(self, group: str) -> dict[str, bytes]:
        found = await self._redis.hgetall(self._group(group))
        return {_text(member): _bytes(payload) for member, payload in found.items()}

    async def remove_member(self, group: str, member: str) -> None:
        await self._redis.hdel(self._group(group), member)

    async def claim(self, key: str) -> bool:
        won = await self._redis.set(f"{self._prefix}:c:{key}", b"1", nx=True, px=self._ttl_ms)
        return bool(won)

    async def _open_feed(self) -> Feed:
        return _Subscriptions(self._redis, f"{self._prefix}:w:")

    def watch(self, keys: Collection[str]) -> AsyncIterator[set[str]]:
        return self._hub.watch(keys)
