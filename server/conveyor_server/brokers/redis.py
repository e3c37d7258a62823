"""Redis broker (redis.asyncio): crash-safe queues with leases, priorities and delays.

Layout per queue `q`, keys `prefix:{q}:msg` and so on (all share the hash tag `{q}`, so one
queue lives in one cluster slot and every script touches one slot):

- `msg`     hash   id -> body
- `meta`    hash   id -> "<priority>:<message_id>"
- `dc`      hash   id -> deliveries so far (incremented by each fetch)
- `lease`   zset   id -> lease deadline (ms, Redis server clock)
- `delayed` zset   id -> due time (ms, Redis server clock)
- `r0`..`r9` lists of ready ids, one per priority: FIFO within a priority, higher first.

Queue names are kept in the set `prefix:queues` (the registry), which recover_expired() and
queues() read. Losing that key must not strand a lease, so every publish, fetch and extend
adds its queue again (an SADD in the same round trip as the script; a no-op when present),
and the first recover_expired() of a process also finds queues by their lease keys (one
SCAN), so a restarted replica recovers the leases of a queue nobody touches any more.

Ids are broker-made UUIDs, so a task republished under the same message_id never collides
with an older copy still leased. A receipt is "<id>:<dc>": the delivery count changes on
every lease, so a stale ack/nack/extend after a re-lease matches nothing and is a no-op.

Every state change is one Lua script, so several server replicas can fetch, recover and
forward delayed messages at once without double delivery. The hot scripts (publish, fetch,
ack) work on their whole batch with variadic commands (HSET, HMGET, ZADD, ZMSCORE, ZREM,
HDEL, RPUSH, LMPOP), so a batch of hundreds costs Redis about the commands of one message. Time comes from Redis `TIME`,
so replicas with skewed clocks agree on leases and due times. Waiting fetches wake on a
pub/sub signal (`prefix:signal:q`) and fall back to a bounded poll if a signal is lost.

Needs Redis >= 6.2 (`LPOP key count`, `ZMSCORE`), and pops across the priority lists with one
`LMPOP` on Redis >= 7.0; connect() checks the server's version and refuses an
older one. Every command has a socket timeout (`socket_timeout`, `socket_connect_timeout`
in the URL override the defaults below), so a dead peer fails a call instead of hanging it;
no command blocks on the server (no BLPOP), and the pub/sub reader waits in slices shorter
than the socket timeout. A Redis still loading its data after a restart answers `LOADING`,
which redis-py raises as `BusyLoadingError`, a subclass of its `ConnectionError`: callers
see it as the connection error it is.

Redis Cluster (`redis+cluster://host:port,host:port/?prefix=...`, or `redis://...?cluster=1`;
see redis_cluster.py) needs no other key names: the hash tag puts each queue in one slot, so
every script still runs on one node, and single-node deployments keep their keys. What spans
queues works key by key: a round trip of scripts is a non-transactional cluster pipeline (redis-py
sends each node its share), the registry is one set in one slot (while its master is down, the
calls that register a queue again, recovery and queues() can fail as transient), the first recovery SCANs
every master, and the signals are cluster-wide PUBLISHes read on a connection to every master
(a master down: its listener resubscribes when it is back, and the others still hear every
signal, through the bus); a broker's own publishes and nacks wake its own fetches directly. A restarted
master has an empty script cache: the NOSCRIPT reply reloads the scripts. Without replicas,
only what a master had fsynced survives its crash: run cluster masters with `appendonly yes`
and `appendfsync always` for the guarantee a single Redis gives with the same settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from ..background import stop_tasks
from ..engine_urls import DEFAULT_PREFIX, EngineUrl
from ..random_ids import hex_tokens
from ..redis_cluster import is_cluster_url, open_redis_cluster
from ..redis_pool import open_redis
from ..redis_scripts import run_scripts
from ._wakeups import Taker, Wakeups, fetch_unless_drained, publish_handing_over
from .base import Delivery, OutgoingMessage, QueueStats

log = logging.getLogger(__name__)

# Messages per publish script call: keeps each script short so Redis stays responsive.
PUBLISH_CHUNK = 500
# Signals remembered to drop the copies a cluster's other masters deliver late (a few ms apart).
HEARD_SIGNALS = 4096
# Ids moved per forwarder / recovery / purge script call, for the same reason.
BATCH = 1000
# Upper bound on a waiting fetch's sleep, in case a pub/sub signal was lost.
POLL_SECONDS = 1.0
# LPOP with a count (fetch, purge) and ZMSCORE (ack) came in Redis 6.2.
MIN_REDIS_VERSION = (6, 2)
# LMPOP (one pop across the priority lists) came in Redis 7.0; older servers pop list by list.
LMPOP_REDIS_VERSION = (7, 0)
# A call on a dead peer fails after this long instead of hanging (URL options override them).
SOCKET_TIMEOUT_SECONDS = 5.0
SOCKET_CONNECT_TIMEOUT_SECONDS = 3.0
# The pub/sub reader waits this long per read: below the socket timeout, and often enough
# for redis-py to PING the connection (health checks), so a dead one is noticed.
SIGNAL_READ_SECONDS = 1.0
HEALTH_CHECK_SECONDS = 15
# Keys per SCAN call when looking for queues by their lease keys.
SCAN_COUNT = 1000

# Every broker script runs on one queue and gets that queue's keys as KEYS, in _Keys order:
# KEYS[1] msg, KEYS[2] meta, KEYS[3] dc, KEYS[4] lease, KEYS[5] delayed, KEYS[6..15] r0..r9.
# Each script is sent with this prelude in front: now_ms() (the Redis clock), ready(id) (push a
# stored message onto its priority's list), forward(now, limit) (move due delayed messages to
# ready, returns how many) and leased(id, dc) (whether that delivery still holds its lease).
_LUA_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ready(id)
  local meta = redis.call('HGET', KEYS[2], id)
  if meta then
    redis.call('RPUSH', KEYS[6 + tonumber(string.sub(meta, 1, 1))], id)
    return true
  end
  return false
end
local function forward(now, limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, limit)
  if #due == 0 then return 0 end
  redis.call('ZREM', KEYS[5], unpack(due))
  for _, id in ipairs(due) do ready(id) end
  return #due
end
local function leased(id, dc)
  return redis.call('ZSCORE', KEYS[4], id) and redis.call('HGET', KEYS[3], id) == dc
end
-- A batch costs a few commands, not a few per message: each command below takes a whole
-- batch, CHUNK items per call, as unpack() is bounded by Lua's stack.
local CHUNK = 1000
local function each_chunk(command, key, flat, width)
  local step = CHUNK * width
  for s = 1, #flat, step do
    redis.call(command, key, unpack(flat, s, math.min(s + step - 1, #flat)))
  end
end
local function read_all(command, key, ids)
  local out = {}
  for s = 1, #ids, CHUNK do
    local part = redis.call(command, key, unpack(ids, s, math.min(s + CHUNK - 1, #ids)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end
"""

# PUBLISH -- store messages; each is ready now or delayed by its delay_ms. A batch of any size
# costs two HSETs, a ZADD if any is delayed and one RPUSH per priority it holds.
# KEYS: the queue's keys. ARGV: channel, sender, then (id, meta, delay_ms, body) per message;
# meta's first character is the priority.
# Returns 0. Signals the channel (the sender as the payload) when it stored anything.
_PUBLISH = """
local now = nil
local bodies, metas, delayed, ready_ids = {}, {}, {}, {}
for i = 3, #ARGV, 4 do
  local id, meta, delay = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  bodies[#bodies + 1] = id
  bodies[#bodies + 1] = ARGV[i + 3]
  metas[#metas + 1] = id
  metas[#metas + 1] = meta
  if delay > 0 then
    now = now or now_ms()
    delayed[#delayed + 1] = now + delay
    delayed[#delayed + 1] = id
  else
    local list = 6 + tonumber(string.sub(meta, 1, 1))
    ready_ids[list] = ready_ids[list] or {}
    table.insert(ready_ids[list], id)
  end
end
if #bodies == 0 then return 0 end
each_chunk('HSET', KEYS[1], bodies, 2)
each_chunk('HSET', KEYS[2], metas, 2)
if #delayed > 0 then each_chunk('ZADD', KEYS[5], delayed, 2) end
for list = 15, 6, -1 do
  if ready_ids[list] then each_chunk('RPUSH', KEYS[list], ready_ids[list], 1) end
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 0
"""

# FETCH -- forward due messages, then lease up to `max` ready ones, highest priority first.
# A fetch of any size costs one LMPOP per priority list it empties (Redis >= 7; else one LPOP
# per priority), three HMGETs, an HSET and a ZADD.
# KEYS: the queue's keys. ARGV: max, lease_ms, forward limit, "1" to pop with LMPOP.
# Returns {now_ms, next due time in ms (-1 if none, or if anything was leased), then
# (id, meta, dc, body) per leased message}.
_FETCH = """
local now = now_ms()
forward(now, tonumber(ARGV[3]))
local want = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local ids = {}
if ARGV[4] == '1' then
  while #ids < want do
    local got = redis.call('LMPOP', 10, KEYS[15], KEYS[14], KEYS[13], KEYS[12], KEYS[11],
      KEYS[10], KEYS[9], KEYS[8], KEYS[7], KEYS[6], 'LEFT', 'COUNT', want - #ids)
    if not got then break end
    for _, id in ipairs(got[2]) do ids[#ids + 1] = id end
  end
else
  for p = 9, 0, -1 do
    if #ids >= want then break end
    local got = redis.call('LPOP', KEYS[6 + p], want - #ids)
    if got then for _, id in ipairs(got) do ids[#ids + 1] = id end end
  end
end
local out = {now, -1}
if #ids > 0 then
  local bodies = read_all('HMGET', KEYS[1], ids)
  local metas = read_all('HMGET', KEYS[2], ids)
  local counts = read_all('HMGET', KEYS[3], ids)
  local dcs, leases = {}, {}
  for i, id in ipairs(ids) do
    if bodies[i] then
      local dc = (tonumber(counts[i]) or 0) + 1
      dcs[#dcs + 1] = id
      dcs[#dcs + 1] = dc
      leases[#leases + 1] = deadline
      leases[#leases + 1] = id
      local n = #out
      out[n + 1] = id
      out[n + 2] = metas[i]
      out[n + 3] = dc
      out[n + 4] = bodies[i]
    end
  end
  if #dcs > 0 then
    each_chunk('HSET', KEYS[3], dcs, 2)
    each_chunk('ZADD', KEYS[4], leases, 2)
  end
end
if #ids < want then  -- drained: when the next delayed message is due
  local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  if #first > 0 then out[2] = tonumber(first[2]) end
end
return out
"""

# ACK -- delete the messages whose delivery still holds its lease. A batch of any size costs
# an HMGET, a ZMSCORE, a ZREM and three HDELs.
# KEYS: the queue's keys. ARGV: (id, dc) pairs. Returns the number deleted.
_ACK = """
local ids, dcs = {}, {}
for i = 1, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  dcs[#dcs + 1] = ARGV[i + 1]
end
if #ids == 0 then return 0 end
local counts = read_all('HMGET', KEYS[3], ids)
local deadlines = read_all('ZMSCORE', KEYS[4], ids)
local done, seen = {}, {}
for i, id in ipairs(ids) do
  if deadlines[i] and counts[i] == dcs[i] and not seen[id] then
    seen[id] = true
    done[#done + 1] = id
  end
end
if #done > 0 then
  each_chunk('ZREM', KEYS[4], done, 1)
  each_chunk('HDEL', KEYS[1], done, 1)
  each_chunk('HDEL', KEYS[2], done, 1)
  each_chunk('HDEL', KEYS[3], done, 1)
end
return #done
"""

# NACK -- give leased messages back: ready now, or delayed by delay_ms.
# KEYS: the queue's keys. ARGV: channel, sender, delay_ms, (id, dc) pairs.
# Returns the number given back. Signals the channel (the sender as the payload) when that is
# more than 0.
_NACK = """
local delay = tonumber(ARGV[3])
local now = now_ms()
local n = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if leased(id, ARGV[i + 1]) then
    redis.call('ZREM', KEYS[4], id)
    if delay > 0 then redis.call('ZADD', KEYS[5], now + delay, id) else ready(id) end
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
"""

# EXTEND -- move the lease deadline of held deliveries to now + lease_ms.
# KEYS: the queue's keys. ARGV: lease_ms, (id, dc) pairs. Returns the number extended.
_EXTEND = """
local deadline = now_ms() + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV, 2 do
  if leased(ARGV[i], ARGV[i + 1]) then
    redis.call('ZADD', KEYS[4], 'XX', deadline, ARGV[i])
    n = n + 1
  end
end
return n
"""

# RECOVER -- make up to `limit` expired leases ready again and forward up to `limit` due messages.
# KEYS: the queue's keys. ARGV: channel, limit.
# Returns {recovered, forwarded}. Signals the channel when either is more than 0.
_RECOVER = """
local now = now_ms()
local limit = tonumber(ARGV[2])
local forwarded = forward(now, limit)
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, limit)
if #expired > 0 then
  redis.call('ZREM', KEYS[4], unpack(expired))
  for _, id in ipairs(expired) do ready(id) end
end
if #expired + forwarded > 0 then redis.call('PUBLISH', ARGV[1], '1') end
return {#expired, forwarded}
"""

# STATS -- forward due messages, then count.
# KEYS: the queue's keys. ARGV: forward limit. Returns {ready, delayed, in_flight}.
_STATS = """
forward(now_ms(), tonumber(ARGV[1]))
local ready_count = 0
for p = 0, 9 do ready_count = ready_count + redis.call('LLEN', KEYS[6 + p]) end
return {ready_count, redis.call('ZCARD', KEYS[5]), redis.call('ZCARD', KEYS[4])}
"""

# PURGE -- drop up to `limit` ready or delayed messages (leased ones stay).
# KEYS: the queue's keys. ARGV: limit. Returns {number dropped, their metas}.
_PURGE = """
local limit = tonumber(ARGV[1])
local dropped = {}
for p = 9, 0, -1 do
  if #dropped >= limit then break end
  local ids = redis.call('LPOP', KEYS[6 + p], limit - #dropped)
  if ids then for _, id in ipairs(ids) do dropped[#dropped + 1] = id end end
end
if #dropped < limit then
  local ids = redis.call('ZRANGE', KEYS[5], 0, limit - #dropped - 1)
  if #ids > 0 then
    redis.call('ZREM', KEYS[5], unpack(ids))
    for _, id in ipairs(ids) do dropped[#dropped + 1] = id end
  end
end
local metas = {}
if #dropped > 0 then
  metas = redis.call('HMGET', KEYS[2], unpack(dropped))
  redis.call('HDEL', KEYS[1], unpack(dropped))
  redis.call('HDEL', KEYS[2], unpack(dropped))
  redis.call('HDEL', KEYS[3], unpack(dropped))
end
return {#dropped, metas}
"""

_SCRIPTS = {
    "publish": _PUBLISH,
    "fetch": _FETCH,
    "ack": _ACK,
    "nack": _NACK,
    "extend": _EXTEND,
    "recover": _RECOVER,
    "stats": _STATS,
    "purge": _PURGE,
}

_Call = tuple[str, list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class _Keys:
    """Key names of one queue, in the KEYS order every script expects."""

    all: list[str]

    @classmethod
    def of(cls, prefix: str, queue: str) -> _Keys:
        base = f"{prefix}:{{{queue}}}:"
        names = ["msg", "meta", "dc", "lease", "delayed", *(f"r{p}" for p in range(10))]
        return cls([base + name for name in names])


def _ms(seconds: float) -> int:
    # Round up so a delay or lease is never shorter than asked.
    return max(0, -int(-seconds * 1000 // 1))


def _glob_escape(text: str) -> str:
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def _split_receipt(receipt: str) -> tuple[str, str]:
    message_id, _, count = receipt.partition(":")
    return message_id, count


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version(text: str) -> tuple[int, ...]:
    """"7.0.15" -> (7, 0, 15); stops at the first part that is not a number."""
    parts: list[int] = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def check_version(version: str) -> None:
    """Raises RuntimeError unless `version` (INFO's redis_version) is at least MIN_REDIS_VERSION."""
    needed = ".".join(map(str, MIN_REDIS_VERSION))
    if _version(version) < MIN_REDIS_VERSION:
        raise RuntimeError(
            f"the Redis broker needs Redis >= {needed} (it uses LPOP with a count); "
            f"the server runs Redis {version or 'of an unknown version'}"
        )


class RedisBroker:
    """Broker on Redis >= 6.2 (LPOP with a count; scripts use TIME, which needs effect replication)."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, poll_seconds: float = POLL_SECONDS) -> None:
        self._url = url
        self._prefix = prefix
        self._poll_seconds = poll_seconds
        self._client: aioredis.Redis | RedisCluster | None = None
        # One pub/sub connection for the signals, or one per master of a cluster (below).
        self._pubsubs: list[Any] = []
        self._listeners: list[asyncio.Task[None]] = []
        self._scripts: dict[str, AsyncScript] = {}
        # Whether every server (every master of a cluster) has LMPOP.
        self._lmpop = False
        # Whether this process looked for queues by their lease keys yet (first recovery).
        self._scanned = False
        # Waiting fetches, woken by the pub/sub signal of their queue.
        self._wakeups = Wakeups()
        # The payload of this process's signals: it wakes its own fetches as it writes
        # (_wake_here), so the echo of its signal is not a wake-up; one would make a fetch look
        # again at a queue it just drained.
        self._sender = uuid.uuid4().hex
        self._sender_bytes = self._sender.encode()
        self._signal_numbers = itertools.count()
        # The latest signals heard (a cluster delivers each once per master): a late copy of
        # one already heard would wake the waiting fetches again, each to look at a drained queue.
        self._heard: dict[bytes, None] = {}

    @classmethod
    def from_url(cls, url: str) -> Self:
        """`redis://host:port/db?prefix=NAME&poll=1.0`; other query options go to redis-py.
        Redis Cluster: `redis+cluster://host:port,host:port/?prefix=NAME` (or `cluster=1`).

        `poll` bounds how long a waiting fetch sleeps without a signal (a lost pub/sub message).
        """
        options = EngineUrl(url)
        return cls(
            options.without({"prefix", "poll"}),
            prefix=options.prefix,
            poll_seconds=options.number("poll", POLL_SECONDS),
        )

    def portable_receipts(self) -> bool:
        """A receipt names the message and its delivery count: any replica's scripts can act on it."""
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
            "health_check_interval": HEALTH_CHECK_SECONDS,
        }
        cluster = is_cluster_url(self._url)
        client = open_redis_cluster(self._url, **options) if cluster else open_redis(self._url, **options)
        try:
            versions = await _versions(client)
            for version in versions:
                check_version(version)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._lmpop = all(_version(version) >= LMPOP_REDIS_VERSION for version in versions)
        await self._load_scripts()
        # A signal PUBLISHed on a cluster master reaches the other masters' subscribers only
        # through the cluster bus, which held about 1 in 100 for 40 ms: the signals are read on
        # every master, so each arrives at once from the master of its queue (and again, late,
        # from the others: those copies are dropped, _news).
        self._pubsubs = (
            [client.pubsub(node=node) for node in client.get_primaries()] if isinstance(client, RedisCluster)
            else [client.pubsub()]
        )
        for pubsub in self._pubsubs:
            await pubsub.psubscribe(_glob_escape(self._channel_prefix) + "*")
            # Wait for the confirmation, so no signal sent after connect() returns is missed.
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is None or message["type"] == "psubscribe":
                    break
        self._listeners = [
            asyncio.create_task(self._listen(pubsub), name="conveyor-redis-signals") for pubsub in self._pubsubs
        ]

    async def close(self) -> None:
        await stop_tasks(*self._listeners)
        self._listeners = []
        for pubsub in self._pubsubs:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        self._pubsubs = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._wakeups.wake_all()

    @property
    def _redis(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisBroker is not connected; call connect() first")
        return self._client

    # -- scripts -----------------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        """Registers every script with this connection's client and loads it into Redis now,
        so the first calls run in one round trip."""
        for name, body in _SCRIPTS.items():
            script = self._scripts[name] = self._redis.register_script(_LUA_PRELUDE + body)
            await self._redis.script_load(script.script)

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return (await self._eval_many([(name, keys, args)]))[0]

    async def _eval_many(self, calls: Sequence[_Call], register: Sequence[str] = ()) -> list[Any]:
        """Runs scripts in one round trip (redis_scripts.py: a script Redis lost is loaded again).
        `register`: queues to add to the registry set in the same round trip."""

        def registering(pipe: Any) -> int:
            for queue in register:
                pipe.sadd(self._registry, queue)
            return len(register)

        scripts = [(self._scripts[name], keys, args) for name, keys, args in calls]
        return await run_scripts(self._redis, scripts, registering)

    # -- naming ------------------------------------------------------------------------------

    @property
    def _registry(self) -> str:
        return f"{self._prefix}:queues"

    @property
    def _channel_prefix(self) -> str:
        return f"{self._prefix}:signal:"

    def _channel(self, queue: str) -> str:
        return self._channel_prefix + queue

    def _keys(self, queue: str) -> list[str]:
        return _Keys.of(self._prefix, queue).all

    def _queue_of(self, lease_key: str) -> str | None:
        """`prefix:{q}:lease` -> `q`; None for a key of another layout."""
        head, tail = f"{self._prefix}:{{", "}:lease"
        if lease_key.startswith(head) and lease_key.endswith(tail) and len(lease_key) > len(head) + len(tail):
            return lease_key[len(head):-len(tail)]
        return None

    # -- signals -----------------------------------------------------------------------------

    async def _listen(self, pubsub: Any) -> None:
        backoff = 0.1
        while True:
            try:
                # A bounded read, below the socket timeout: an idle connection is not an error.
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=SIGNAL_READ_SECONDS
                )
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: redis-py resubscribes on the next read
                log.warning("redis signal listener: %s; retrying in %.1fs", exc, backoff)
                self._wakeups.wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if message is not None and message.get("type") == "pmessage" and self._news(message["data"]):
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                self._wakeups.wake(name[len(self._channel_prefix):])

    def _signal(self) -> str:
        """The payload of a signal of this process's: its sender id and a number of its own."""
        return f"{self._sender}.{next(self._signal_numbers)}"

    def _news(self, payload: bytes) -> bool:
        """Whether a signal wakes this process's fetches: not its own (_wake_here woke them) and
        not a copy of one heard already."""
        if payload.partition(b".")[0] == self._sender_bytes:
            return False
        if b"." not in payload:  # a recovery's, or a replica's of an earlier version
            return True
        if payload in self._heard:
            return False
        self._heard[payload] = None
        if len(self._heard) > HEARD_SIGNALS:
            del self._heard[next(iter(self._heard))]
        return True

    def _wake_here(self, queue: str) -> None:
        """Wake this process's fetches on `queue` after its own write there, without waiting
        for the PUBLISH to come back: in a cluster the signal may come through the cluster bus,
        which held about 1 in 100 of them for 40 ms (one Redis: the two arrive together, and
        the wakes fold into one)."""
        self._wakeups.wake(queue)

    # -- protocol ----------------------------------------------------------------------------

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        keys = self._keys(queue)
        calls: list[_Call] = []
        message_keys = hex_tokens(len(messages))
        for start in range(0, len(messages), PUBLISH_CHUNK):
            args: list[Any] = [self._channel(queue), self._signal()]
            for message in messages[start:start + PUBLISH_CHUNK]:
                priority = min(max(message.priority, 0), 9)
                meta = f"{priority}:{message.message_id}"
                args += [next(message_keys), meta, _ms(message.delay), message.body]
            calls.append(("publish", keys, args))

        async def publish_then_take(taker: Taker | None) -> list[Delivery]:
            # A fetch waiting here gets its look in the publish's round trip, right after it.
            looks = [("fetch", keys, taker.args)] if taker is not None else []
            # Registered on every publish, so a lost registry key comes back with the next one.
            replies = await self._eval_many([*calls, *looks], register=[queue])
            return self._deliveries(queue, replies[-1][2:]) if looks else []

        if await publish_handing_over(self._wakeups, queue, messages, publish_then_take, self.nack):
            self._wake_here(queue)  # (a delayed message among them: the waiting fetches learn when it is due)

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []
        keys = self._keys(queue)
        args = [max_messages, _ms(lease_seconds), BATCH, int(self._lmpop)]

        async def attempt() -> tuple[list[Delivery], float]:
            # Registered on every fetch too: a message leased here is recoverable even when the
            # registry key went missing after it was published.
            reply = (await self._eval_many([("fetch", keys, args)], register=[queue]))[0]
            look_again = self._poll_seconds
            now_ms, next_due = int(reply[0]), int(reply[1])
            if next_due >= 0:
                look_again = min(look_again, max((next_due - now_ms) / 1000, 0.001))
            return self._deliveries(queue, reply[2:]), look_again

        return await fetch_unless_drained(self._wakeups, queue, max_messages, attempt, wait_seconds, take_args=args)

    @staticmethod
    def _deliveries(queue: str, flat: list[Any]) -> list[Delivery]:
        deliveries = []
        for index in range(0, len(flat), 4):
            broker_id = flat[index].decode()
            message_id = flat[index + 1].decode().partition(":")[2]
            count = int(flat[index + 2])
            receipt = f"{broker_id}:{count}"
            deliveries.append(Delivery(message_id, bytes(flat[index + 3]), queue, receipt, count))
        return deliveries

    @staticmethod
    def _by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
        """queue -> flat (id, dc) ARGV pairs."""
        grouped: dict[str, list[str]] = {}
        for delivery in deliveries:
            grouped.setdefault(delivery.queue, []).extend(_split_receipt(delivery.receipt))
        return grouped

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        grouped = self._by_queue(deliveries)
        await self._eval_many([("ack", self._keys(queue), pairs) for queue, pairs in grouped.items()])

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        grouped = self._by_queue(deliveries)
        await self._eval_many([
            ("nack", self._keys(queue), [self._channel(queue), self._signal(), _ms(delay), *pairs])
            for queue, pairs in grouped.items()
        ])
        for queue in grouped:
            self._wake_here(queue)

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        grouped = self._by_queue(deliveries)
        await self._eval_many(
            [("extend", self._keys(queue), [_ms(lease_seconds), *pairs]) for queue, pairs in grouped.items()],
            register=list(grouped),
        )

    async def _rediscover(self) -> None:
        """Adds to the registry every queue that has a lease key (one SCAN of the database)."""
        pattern = f"{_glob_escape(self._prefix)}:{{*}}:lease"
        found: set[str] = set()
        async for key in self._redis.scan_iter(match=pattern, count=SCAN_COUNT, _type="zset"):
            queue = self._queue_of(_text(key))
            if queue is not None:
                found.add(queue)
        if found:
            await self._redis.sadd(self._registry, *found)

    async def recover_expired(self) -> int:
        if not self._scanned:
            # Once per process: a queue whose registry entry was lost and that nobody publishes
            # to or fetches from any more still has its expired leases recovered.
            await self._rediscover()
            self._scanned = True
        pending = await self.queues()
        recovered = 0
        while pending:
            replies = await self._eval_many([
                ("recover", self._keys(queue), [self._channel(queue), BATCH]) for queue in pending
            ])
            recovered += sum(int(reply[0]) for reply in replies)
            for queue, reply in zip(pending, replies, strict=True):
                if int(reply[0]) or int(reply[1]):
                    self._wake_here(queue)  # its fetches here may wait on a queue they drained
            # Another round only for queues that filled a whole batch.
            pending = [
                queue for queue, reply in zip(pending, replies, strict=True)
                if max(int(reply[0]), int(reply[1])) >= BATCH
            ]
        return recovered

    async def stats(self, queue: str) -> QueueStats:
        ready, delayed, in_flight = await self._eval("stats", self._keys(queue), [BATCH])
        return QueueStats(ready=int(ready), delayed=int(delayed), in_flight=int(in_flight))

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        # Messages are stored under a key of their own, one per publish; the meta hash maps it to
        # "<priority>:<message_id>" while the message is ready, delayed or leased. One pass over it
        # answers any number of ids, as SQLite's one scan of the queue does.
        wanted = set(message_ids)
        held: set[str] = set()
        meta_key = _Keys.of(self._prefix, queue).all[1]
        async for _, meta in self._redis.hscan_iter(meta_key, count=SCAN_COUNT):
            message_id = _text(meta).partition(":")[2]
            if message_id in wanted:
                held.add(message_id)
        return held

    async def queues(self) -> list[str]:
        members = await self._redis.smembers(self._registry)
        return sorted(_text(member) for member in members)

    async def delete_queue(self, queue: str) -> bool:
        if _holds_messages(await self.stats(queue)):
            return False
        await self._redis.srem(self._registry, queue)
        # The registry and the queue's keys are in different slots, so no one script sees both:
        # a publish between the two reads keeps its queue listed.
        if _holds_messages(await self.stats(queue)):
            await self._redis.sadd(self._registry, queue)
            return False
        return True

    async def purge(self, queue: str) -> list[str]:
        keys = self._keys(queue)
        purged: list[str] = []
        while True:
            dropped, metas = await self._eval("purge", keys, [BATCH])
            # meta is "<priority>:<message_id>"; a missing one (never expected) is skipped.
            purged += [_text(meta).partition(":")[2] for meta in metas if meta is not None]
            if int(dropped) < BATCH:
                return purged


async def _versions(client: aioredis.Redis | RedisCluster) -> list[str]:
    """INFO's redis_version of the server, or of every master of a cluster."""
    if isinstance(client, RedisCluster):
        replies = await client.info("server", target_nodes=RedisCluster.PRIMARIES)
        return [_text(info.get("redis_version", "")) for info in replies.values()]
    info = await client.info("server")
    return [_text(info.get("redis_version", ""))]


def _holds_messages(stats: QueueStats) -> bool:
    return stats.ready + stats.delayed + stats.in_flight > 0
