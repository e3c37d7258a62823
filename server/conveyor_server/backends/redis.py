"""Redis result store (redis-py asyncio).

Layout, all under `{prefix}:`:
- `r:{key}`  record hash {d: data, v: version}
- `g:{group}` group hash {member: payload}; HLEN is the count
- `gi:{group}` sorted set of the group's member names, all at score 0, so ZRANGEBYLEX pages
  through them in byte (hence code point) order; written with the hash in one script
- `c:{key}`  chord claim, SET NX
- channel `w:{key}` gets a PUBLISH after every successful record write: the version an update
  wrote, or nothing for a new record (whose version a reader must not trust: a record created
  again after it expired starts over at 1).

Writes run as Lua scripts so the version check, the write, the expiry and the PUBLISH are
one atomic step; a batch of records is one EVALSHA. A kept key has no TTL (PERSIST, or SET
without PX); expire() is one PEXPIRE per key. One channel per key means Redis only
delivers a change to the replicas watching that key, and one shared pub/sub connection per
backend serves every watch(), so a watch of 1,000 keys is one SUBSCRIBE command
(redis_subscriptions.py).

Every connection has socket and connect timeouts (5 s; `socket_timeout` and
`socket_connect_timeout` in the URL's query override them, in seconds), so a dead peer fails
a call instead of hanging it; nothing is retried here, the core decides that.

Redis Cluster (`redis+cluster://host:port,host:port/?prefix=...` or `redis://...?cluster=1`; see
redis_cluster.py): a record is one key, so its updates stay in one slot with the names above;
a batch of records runs as one script per slot (one pipelined round trip). Only the two keys of
a group get a hash tag, `g:{g:group}` and `gi:{g:group}` (braces included), so its script runs in
one slot; single-node deployments keep the names above. The task index keeps its keys under the tag
`{ti:prefix}` (redis_task_index.py). Watch channels are cluster-wide PUBLISHes, each read on the
node that owns its record, where the write PUBLISHes it (one pub/sub connection per node).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from ..engine_urls import DEFAULT_PREFIX, split_prefix
from ..redis_cluster import is_cluster_url, open_redis_cluster
from ..redis_pool import open_redis
from ..redis_scripts import run_scripts
from ._common import DerivedWrites, member_chunks
from ._tokens import check_bucket
from ._watch import Feed, WatchHub
from .base import DEFAULT_TTL_SECONDS, Changes, GroupMember, Update, Versioned
from .redis_subscriptions import Subscriptions
from .redis_task_index import RedisTaskIndex

# Keys per EVALSHA: bounds how long one script blocks the Redis event loop.
_CHUNK = 500
_HEALTH_CHECK_SECONDS = 15
# Defaults for a dead TCP peer; the URL's query can override them.
SOCKET_TIMEOUT_SECONDS = 5.0
SOCKET_CONNECT_TIMEOUT_SECONDS = 5.0
# Member names per ZRANGEBYLEX + HMGET: bounds one script's run and reply.
_PAGE = 1000

# In every script, a ttl_ms of 0 means keep: the key is left without expiry (PERSIST).

# Lua functions the scripts below share. insert_records: creates KEYS[first..] at version 1
# from ARGV[at + 1..] (one value per key), each expiring after ttl_ms (0 = keep), announced on
# the key's channel; returns the 1-based positions (among those keys) of keys that already
# existed, left unchanged.
_INSERT_RECORDS_LUA = """
local function insert_records(first, at, ttl, chan, cut)
  local existed = {}
  for i = first, #KEYS do
    local key = KEYS[i]
    if redis.call('EXISTS', key) == 1 then
      existed[#existed + 1] = i - first + 1
    else
      redis.call('HSET', key, 'd', ARGV[at + i - first + 1], 'v', 1)
      if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
      redis.call('PUBLISH', chan .. string.sub(key, cut), '')
    end
  end
  return existed
end
"""

# add_members: adds (member, payload) pairs from ARGV[at + 1..] to the group (hash, name index);
# the first payload of a member wins; both keys expire after ttl_ms (0 = keep).
_ADD_MEMBERS_LUA = """
local function add_members(hash, index, at, ttl)
  for i = at + 1, #ARGV, 2 do
    if redis.call('HSETNX', hash, ARGV[i], ARGV[i + 1]) == 1 then
      redis.call('ZADD', index, 0, ARGV[i])
    end
  end
  for _, key in ipairs({hash, index}) do
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
  end
end
"""

# KEYS: record keys. ARGV: ttl_ms (0 = keep), channel prefix, record-prefix length, data...
# Returns the 1-based indexes of keys that already existed (left unchanged).
_INSERT = _INSERT_RECORDS_LUA + """
return insert_records(1, 3, tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]) + 1)
"""

# KEYS: group hash, group name index, then record keys. ARGV: the member's ttl_ms, the
# records' ttl_ms, channel prefix, record-prefix length, then data per record, then member,
# payload. The member first, then the records, in one atomic step; returns as _INSERT.
_INSERT_AFTER = _ADD_MEMBERS_LUA + _INSERT_RECORDS_LUA + """
local records = #KEYS - 2
add_members(KEYS[1], KEYS[2], 4 + records, tonumber(ARGV[1]))
return insert_records(3, 4, tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]) + 1)
"""

# KEYS: record keys. ARGV: channel prefix, record-prefix length, then
# (expected version, data, ttl_ms (0 = keep)) per key. Returns 1/0 per key, applied in order.
_COMPARE_AND_SET = """
local chan, cut = ARGV[1], tonumber(ARGV[2]) + 1
local applied = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('HGET', key, 'v')
  if current and tonumber(current) == tonumber(ARGV[3 * i]) then
    local version = tonumber(current) + 1
    redis.call('HSET', key, 'd', ARGV[3 * i + 1], 'v', version)
    local ttl = tonumber(ARGV[3 * i + 2])
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
    redis.call('PUBLISH', chan .. string.sub(key, cut), version)
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""

# KEYS: record keys. Returns (data, version) per key, flat; false for both of a missing key.
# One command for many records: a pipeline of HMGETs costs the client far more per key.
_GET = """
local found = {}
for i, key in ipairs(KEYS) do
  local row = redis.call('HMGET', key, 'd', 'v')
  found[2 * i - 1], found[2 * i] = row[1], row[2]
end
return found
"""

# KEYS: group hash, group name index. ARGV: ttl_ms (0 = keep), then (member, payload) per
# member, a chunk of at most MEMBER_CHUNK (the first payload of a member wins). Returns the
# member count (HLEN: O(1) at any group size).
_ADD_MEMBERS = _ADD_MEMBERS_LUA + """
add_members(KEYS[1], KEYS[2], 1, tonumber(ARGV[1]))
return redis.call('HLEN', KEYS[1])
"""

# KEYS: group hash, group name index. ARGV: members. Returns how many of them were members.
_REMOVE_MEMBERS = """
redis.call('ZREM', KEYS[2], unpack(ARGV))
return redis.call('HDEL', KEYS[1], unpack(ARGV))
"""

# KEYS: group hash, group name index. ARGV: after ('' = from the first), limit (> 0).
# Returns {names, payloads}: up to `limit` names after `after`, in order, with their payloads.
# A group written before the index existed gets its index (re)built here, once.
_MEMBERS = """
local hash, index = KEYS[1], KEYS[2]
if redis.call('ZCARD', index) ~= redis.call('HLEN', hash) then
  redis.call('DEL', index)
  local names = redis.call('HKEYS', hash)
  for i = 1, #names, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #names) do
      args[#args + 1] = 0
      args[#args + 1] = names[j]
    end
    redis.call('ZADD', index, unpack(args))
  end
  local ttl = redis.call('PTTL', hash)
  if ttl > 0 then redis.call('PEXPIRE', index, ttl) end
end
local low = '-'
if ARGV[1] ~= '' then low = '(' .. ARGV[1] end
local names = redis.call('ZRANGEBYLEX', index, low, '+', 'LIMIT', 0, tonumber(ARGV[2]))
if #names == 0 then return {{}, {}} end
return {names, redis.call('HMGET', hash, unpack(names))}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class RedisBackend(DerivedWrites):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._url = url
        self._prefix = prefix
        self._ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._cluster = is_cluster_url(url)
        self._client: aioredis.Redis | RedisCluster | None = None
        self._hub = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """redis://host:port/db?prefix=name (default prefix "conveyor"); Redis Cluster:
        redis+cluster://host:port,host:port/?prefix=name (or cluster=1)."""
        clean, prefix = split_prefix(url)
        return cls(clean, prefix, ttl_seconds)

    @property
    def _redis(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisBackend is not connected")
        return self._client

    def _record(self, key: str) -> str:
        return f"{self._prefix}:r:{key}"

    def _group(self, group: str) -> list[str]:
        """The group's keys: its hash of payloads and its index of names (one slot in a cluster)."""
        if self._cluster:
            # The tag is never empty (`{}` would hash the whole key), whatever the group's name.
            return [f"{self._prefix}:g:{{g:{group}}}", f"{self._prefix}:gi:{{g:{group}}}"]
        return [f"{self._prefix}:g:{group}", f"{self._prefix}:gi:{group}"]

    def _claim(self, key: str) -> str:
        return f"{self._prefix}:c:{key}"

    async def connect(self) -> None:
        # The URL's query (socket_timeout=..., socket_connect_timeout=...) wins over these.
        options: dict[str, Any] = {
            "health_check_interval": _HEALTH_CHECK_SECONDS,
            "socket_timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
            "retry": Retry(NoBackoff(), 0),
        }
        client = open_redis_cluster(self._url, **options) if self._cluster else open_redis(self._url, **options)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._insert = client.register_script(_INSERT)
        self._insert_after = client.register_script(_INSERT_AFTER)
        self._get = client.register_script(_GET)
        self._compare_and_set = client.register_script(_COMPARE_AND_SET)
        self._add_members = client.register_script(_ADD_MEMBERS)
        self._remove_members = client.register_script(_REMOVE_MEMBERS)
        self._members = client.register_script(_MEMBERS)

    async def close(self) -> None:
        await self._hub.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _script_head(self) -> list[str | int | bytes]:
        # Lua's string.sub counts bytes, so the record prefix length is in bytes too.
        return [f"{self._prefix}:w:", len(self._record("").encode())]

    def _ttl(self, keep: bool) -> int:
        return 0 if keep else self._ttl_ms

    def _by_slot(self, keys: Sequence[str]) -> list[list[int]]:
        """Positions in `keys` (record names) grouped so one script may take each group: all of
        them on one Redis, one group per slot of their record keys (in order) in a cluster."""
        if not self._cluster:
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key_slot(self._record(key).encode()), []).append(index)
        return list(groups.values())

    async def _run_per_slot(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Runs `script` once per (keys, args); several calls (a cluster's slots) share one
        pipelined round trip, loading the script on a node that lost its cache (a restart)."""
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys=keys, args=args)]
        return await run_scripts(self._redis, [(script, keys, args) for keys, args in calls])

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        keys = list(records)
        existing: list[str] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            groups = [[chunk[index] for index in group] for group in self._by_slot(chunk)]
            calls = [
                ([self._record(key) for key in group],
                 [self._ttl(keep), *self._script_head(), *(records[key] for key in group)])
                for group in groups
            ]
            for group, found in zip(groups, await self._run_per_slot(self._insert, calls), strict=True):
                existing.extend(group[int(index) - 1] for index in found)
        return existing

    async def insert_after(self, member: GroupMember, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        if self._cluster or not records:
            # The group and the records hash to different slots: no one script may take them.
            return await super().insert_after(member, records, keep)
        keys = list(records)
        first, rest = keys[:_CHUNK], keys[_CHUNK:]
        args = [self._ttl(member.keep), self._ttl(keep), *self._script_head(), *(records[key] for key in first),
                member.name, member.payload]
        found = await self._insert_after(keys=[*self._group(member.group), *map(self._record, first)], args=args)
        existing = [first[int(index) - 1] for index in found]
        if rest:
            existing += await self.insert({key: records[key] for key in rest}, keep)
        return existing

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        if not keys:
            return {}
        if self._cluster:
            # Each record key hashes to its own slot: one HMGET per key, pipelined per node.
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(self._record(key), "d", "v")
            rows = [value for row in await pipe.execute() for value in row]
        else:
            chunks = [keys[start:start + _CHUNK] for start in range(0, len(keys), _CHUNK)]
            calls: list[tuple[list[str], list[Any]]] = [([self._record(key) for key in chunk], []) for chunk in chunks]
            rows = [value for reply in await self._run_per_slot(self._get, calls) for value in reply]
        found: dict[str, Versioned] = {}
        for index, key in enumerate(keys):
            data, version = rows[2 * index], rows[2 * index + 1]
            if data is not None and version is not None:
                found[key] = Versioned(bytes(data), int(version))
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        applied: list[bool] = []
        for start in range(0, len(updates), _CHUNK):
            chunk = updates[start : start + _CHUNK]
            # Updates of one key share a slot, so they stay in one script, in order.
            groups = self._by_slot([update.key for update in chunk])
            calls: list[tuple[list[str], list[Any]]] = []
            for group in groups:
                args: list[Any] = self._script_head()
                for index in group:
                    args += [chunk[index].expected_version, chunk[index].data, self._ttl(chunk[index].keep)]
                calls.append(([self._record(chunk[index].key) for index in group], args))
            flags = [False] * len(chunk)
            for group, result in zip(groups, await self._run_per_slot(self._compare_and_set, calls), strict=True):
                for index, flag in zip(group, result, strict=True):
                    flags[index] = bool(flag)
            applied.extend(flags)
        return applied

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        count = 0
        for chunk in member_chunks(members):
            args: list[str | int | bytes] = [self._ttl(keep)]
            for member in chunk:
                args += [member, members[member]]
            count = int(await self._add_members(keys=self._group(group), args=args))
        return count

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        # Page by page, so no single script blocks Redis for a whole large group.
        found: dict[str, bytes] = {}
        while True:
            page = min(limit - len(found), _PAGE) if limit > 0 else _PAGE
            names, payloads = await self._members(keys=self._group(group), args=[after, page])
            for name, payload in zip(names, payloads, strict=True):
                if payload is not None:
                    found[_text(name)] = _bytes(payload)
            if len(names) < page or (limit > 0 and len(found) >= limit):
                return found
            after = _text(names[-1])

    async def remove_member(self, group: str, member: str) -> None:
        await self.remove_members(group, [member])

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        for chunk in member_chunks(members):
            await self._remove_members(keys=self._group(group), args=chunk)

    async def claim(self, key: str, keep: bool = False) -> bool:
        won = await self._redis.set(self._claim(key), b"1", nx=True, px=None if keep else self._ttl_ms)
        return bool(won)

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        keys = [self._record(key) for key in records] + [self._claim(key) for key in claims]
        keys += [key for group in groups for key in self._group(group)]
        for start in range(0, len(keys), _CHUNK):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys[start : start + _CHUNK]:
                pipe.pexpire(key, self._ttl_ms)  # a no-op on a missing key
            await pipe.execute()

    async def _open_feed(self) -> Feed:
        client = self._redis
        if isinstance(client, RedisCluster):
            # A record's scripts PUBLISH on the node that owns the record: its channel is read there.
            return Subscriptions(client, f"{self._prefix}:w:", lambda key: client.get_node_from_key(self._record(key)))
        return Subscriptions(client, f"{self._prefix}:w:")

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        return self._hub.watch(keys)

    # -- token buckets (rate limits) ------------------------------------------------------

    # KEYS: bucket hash {t: tokens, u: when counted, in seconds of the Redis server's clock}.
    # ARGV: rate_per_second, burst, wanted. Returns {granted, wait in seconds (as text: Lua
    # numbers come back as truncated integers)}. The hash expires once the bucket would be
    # full again, when a missing bucket means the same.
    _TAKE_TOKENS = """
local rate, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens = burst
if state[1] and state[2] then
  tokens = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
end
local granted = math.max(0, math.min(wanted, math.floor(tokens + 1e-9)))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'u', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate + 1) * 1000))
local wait = 0
if tokens + 1e-9 < 1 then wait = (1 - tokens) / rate end
return {granted, string.format('%.17g', wait)}
"""
    _token_script: AsyncScript | None = None

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        check_bucket(rate_per_second, burst, wanted)
        script = self._token_script
        if script is None or script.registered_client is not self._redis:  # made again after a reconnect
            script = self._token_script = self._redis.register_script(self._TAKE_TOKENS)
        args: list[str | int] = [repr(float(rate_per_second)), repr(float(burst)), wanted]
        granted, wait = await script(keys=[f"{self._prefix}:tb:{bucket}"], args=args)
        return int(granted), float(wait)

    # -- task index (listing tasks: backends/redis_task_index.py) --------------------------

    def task_index(self) -> RedisTaskIndex:
        # In a cluster, every index key gets the hash tag {ti:prefix} (never empty): the index's
        # scripts span them.
        prefix = f"{{ti:{self._prefix}}}" if self._cluster else self._prefix
        return RedisTaskIndex(lambda: self._redis, prefix, self._ttl_ms / 1000)
