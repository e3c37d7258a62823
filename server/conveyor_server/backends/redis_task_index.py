"""The Redis backend's task index: sorted sets per state, queue and name, with bounded retention.

Layout, all under `{prefix}:ti:`:
- `e`           hash task id -> JSON [submitted_us, queue, name] (written once: these never change)
- `st`          hash task id -> state
- `all`         sorted set of every task id, scored by submission time (microseconds)
- `s:{state}`, `q:{queue}`, `n:{name}`  the same, one set per state, queue and task name
- `x`           terminal entries scored by when they expire (epoch ms)

Equal scores order by member, so every set is in (submission time, task id) order, the index's
order. A batch of entries is one script, which sends one variadic command per key it changes
(not per entry), and a state change moves the id between state sets atomically.
Retention is bounded: each write script also forgets up to TRIM_BATCH entries that expired (a
terminal entry lives `ttl` after its last write, as its record does) and, past `max_entries`,
the oldest ones; each find forgets what expired too. Empty sets vanish by themselves.

On Redis Cluster the backend passes the prefix `{ti:prefix}` (braces included): every key of the
index then has that hash tag, so the scripts, which build key names from the prefix, stay in one
slot; each script call names the state hash as its one key, which routes it to that slot's master.

An id prefix is looked up by HSCAN over the entries (no index of its own: one fewer sorted
set per task; a prefix search is rare and costs milliseconds per 100,000 tasks).

find() scans the smallest set among the query's filters (by ZCARD) from the cursor's rank,
checks the other filters against the entries, and stops after SCAN_BUDGET ids, so one call
never blocks Redis for long (the caller resumes from the returned cursor).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from .task_index import Cursor, Found, IndexEntry, TaskQuery, ordered

# Entries per write script, ids a find may look at, expired/excess entries forgotten per write.
WRITE_CHUNK = 500
SCAN_BUDGET = 2_000
TRIM_BATCH = 1_000
# Past this many entries the oldest are forgotten (live or not): a bound on memory.
MAX_ENTRIES = 5_000_000
# Ids an id-prefix query looks at, and the fields each HSCAN of the entries covers.
PREFIX_CANDIDATES = 1_000
PREFIX_SCAN_COUNT = 20_000
# A UUID (as the server assigns ids): a prefix this long is looked up as an id first.
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# A prelude, not a script: forget(p, ids) removes those tasks from every set and hash under
# prefix p. Like a write, it gathers the ids per key and sends one variadic command per key: a
# busy server forgets a task for every task it adds, so this is as hot as writing.
_FORGET = """
local function forget(p, ids)
  if #ids == 0 then return 0 end
  local entries = redis.call('HMGET', p .. 'e', unpack(ids))
  local states = redis.call('HMGET', p .. 'st', unpack(ids))
  local rems = {}
  local function put(key, id)
    local list = rems[key]
    if not list then list = {}; rems[key] = list end
    list[#list + 1] = id
  end
  for i, id in ipairs(ids) do
    if entries[i] then
      local e = cjson.decode(entries[i])
      put(p .. 'q:' .. e[2], id)
      put(p .. 'n:' .. e[3], id)
    end
    if states[i] then put(p .. 's:' .. states[i], id) end
  end
  for key, members in pairs(rems) do redis.call('ZREM', key, unpack(members)) end
  redis.call('HDEL', p .. 'e', unpack(ids))
  redis.call('HDEL', p .. 'st', unpack(ids))
  redis.call('ZREM', p .. 'all', unpack(ids))
  redis.call('ZREM', p .. 'x', unpack(ids))
  return #ids
end
"""

# KEYS: the state hash, unused but for routing (names are built from the prefix).
# ARGV: prefix, now_ms, ttl_ms, max_entries, trim_batch, and the entries as one JSON array of
# strings, five per entry: id, state, submitted_us, queue, name (one argument, so the client
# encodes one string per batch, not five per entry). A known entry only changes state: the
# queue, name and time of a task never change. The batch's changes are gathered per key and
# sent as one variadic ZADD, ZREM or HSET per key: a command per key, not per entry, is what
# keeps a batch cheap. Returns the number of entries the trim forgot.
_WRITE = _FORGET + """
local p, now, ttl, cap, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local terminal = {['5'] = true, ['6'] = true, ['7'] = true, ['8'] = true}
local items = cjson.decode(ARGV[6])
if #items > 0 then
  local ids = {}
  for i = 1, #items, 5 do ids[#ids + 1] = items[i] end
  local olds = redis.call('HMGET', p .. 'st', unpack(ids))
  local adds, rems, entries, states = {}, {}, {}, {}
  local function put(t, key, a, b)
    local list = t[key]
    if not list then list = {}; t[key] = list end
    list[#list + 1] = a
    if b ~= nil then list[#list + 1] = b end
  end
  for k, id in ipairs(ids) do
    local i = (k - 1) * 5 + 1
    local state, us, old = items[i + 1], items[i + 2], olds[k]
    if not old then
      local queue, name = items[i + 3], items[i + 4]
      put(adds, p .. 'all', us, id)
      put(adds, p .. 'q:' .. queue, us, id)
      put(adds, p .. 'n:' .. name, us, id)
      entries[#entries + 1] = id
      entries[#entries + 1] = cjson.encode({us, queue, name})
    end
    if old ~= state then
      if old then put(rems, p .. 's:' .. old, id) end
      put(adds, p .. 's:' .. state, us, id)
      states[#states + 1] = id
      states[#states + 1] = state
      if not terminal[state] and old and terminal[old] then put(rems, p .. 'x', id) end
    end
    if terminal[state] then put(adds, p .. 'x', now + ttl, id) end
  end
  for key, members in pairs(rems) do redis.call('ZREM', key, unpack(members)) end
  for key, pairs_ in pairs(adds) do redis.call('ZADD', key, unpack(pairs_)) end
  if #entries > 0 then redis.call('HSET', p .. 'e', unpack(entries)) end
  if #states > 0 then redis.call('HSET', p .. 'st', unpack(states)) end
end
local forgotten = forget(p, redis.call('ZRANGEBYSCORE', p .. 'x', '-inf', now, 'LIMIT', 0, batch))
local over = redis.call('ZCARD', p .. 'all') - cap
if over > 0 then
  forgotten = forgotten + forget(p, redis.call('ZRANGE', p .. 'all', 0, math.min(over, batch) - 1))
end
return forgotten
"""

# KEYS: the state hash (routing only). ARGV: prefix, ids... Forgets them. Returns 0.
_DROP = _FORGET + """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
forget(ARGV[1], ids)
return 0
"""

# KEYS: the state hash (routing only).
# ARGV: prefix, candidate set suffixes (a JSON array), oldest_first (0/1), limit, budget,
# cursor us ('' = none), cursor id, since_us ('' = open), until_us ('' = open),
# states (','-separated, '' = any), queue, name, now_ms, trim_batch. Forgets up to trim_batch
# expired entries first, so a read never shows one (also when nothing was written lately).
# Returns {more (0/1), last scanned id, last scanned us, then id, state, entry JSON per match}:
# in order; `more` = 1 when the scan stopped (page full or budget spent) before the set's end.
_FIND = _FORGET + """
local p, asc, limit, budget = ARGV[1], ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])
local cur_us, cur_id, since, untl = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local queue, name = ARGV[11], ARGV[12]
local states = {}
for s in string.gmatch(ARGV[10], '[^,]+') do states[s] = true end
local any_state = ARGV[10] == ''
forget(p, redis.call('ZRANGEBYSCORE', p .. 'x', '-inf', ARGV[13], 'LIMIT', 0, tonumber(ARGV[14])))
-- the smallest candidate set
local key, size = nil, nil
for _, suffix in ipairs(cjson.decode(ARGV[2])) do
  local n = redis.call('ZCARD', p .. suffix)
  if size == nil or n < size then key, size = p .. suffix, n end
end
-- rank to start from: past the cursor and the time bound on the near side
local start = 0
if asc then
  if since ~= '' then start = redis.call('ZCOUNT', key, '-inf', '(' .. since) end
  if cur_us ~= '' then
    local skip = redis.call('ZCOUNT', key, '-inf', '(' .. cur_us)
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, cur_us, cur_us)) do
      if m <= cur_id then skip = skip + 1 end
    end
    if skip > start then start = skip end
  end
else
  if untl ~= '' then start = redis.call('ZCOUNT', key, untl, '+inf') end
  if cur_us ~= '' then
    local skip = redis.call('ZCOUNT', key, '(' .. cur_us, '+inf')
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, cur_us, cur_us)) do
      if m >= cur_id then skip = skip + 1 end
    end
    if skip > start then start = skip end
  end
end
local out = {0, '', ''}
local found, scanned, rank = 0, 0, start
local step = 200
while scanned < budget and found < limit do
  local ids
  if asc then ids = redis.call('ZRANGE', key, rank, rank + step - 1, 'WITHSCORES')
  else ids = redis.call('ZREVRANGE', key, rank, rank + step - 1, 'WITHSCORES') end
  if #ids == 0 then return out end
  local members = {}
  for i = 1, #ids, 2 do members[#members + 1] = ids[i] end
  local entries = redis.call('HMGET', p .. 'e', unpack(members))
  local current = redis.call('HMGET', p .. 'st', unpack(members))
  for i, id in ipairs(members) do
    local score = tonumber(ids[2 * i])
    if asc and untl ~= '' and score >= tonumber(untl) then return out end
    if (not asc) and since ~= '' and score < tonumber(since) then return out end
    scanned = scanned + 1
    out[2], out[3] = id, ids[2 * i]
    local raw, state = entries[i], current[i]
    if raw and state and (any_state or states[state]) then
      local e = cjson.decode(raw)
      if (queue == '' or e[2] == queue) and (name == '' or e[3] == name) then
        out[#out + 1] = id
        out[#out + 1] = state
        out[#out + 1] = raw
        found = found + 1
        if found >= limit then break end
      end
    end
    if scanned >= budget then break end
  end
  rank = rank + step
end
out[1] = 1
return out
"""

# KEYS: the state hash (routing only).
# ARGV: prefix, ids... Returns id, state, entry JSON of those that are in the index.
_ENTRIES = """
local p = ARGV[1]
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local entries = redis.call('HMGET', p .. 'e', unpack(ids))
local current = redis.call('HMGET', p .. 'st', unpack(ids))
local out = {}
for i, raw in ipairs(entries) do
  if raw and current[i] then
    out[#out + 1] = ids[i]
    out[#out + 1] = current[i]
    out[#out + 1] = raw
  end
end
return out
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(flat: Sequence[bytes | str]) -> list[IndexEntry]:
    """Entries from a script's flat reply of (task id, state, entry JSON) triples."""
    found = []
    for task_id, state, raw in zip(flat[::3], flat[1::3], flat[2::3], strict=True):
        submitted, queue, name = json.loads(raw)
        found.append(IndexEntry(_text(task_id), int(state), queue, name, int(submitted)))
    return found


class RedisTaskIndex:
    def __init__(self, client: Callable[[], aioredis.Redis | RedisCluster], prefix: str, ttl_seconds: float,
                 max_entries: int = MAX_ENTRIES) -> None:
        self._client = client
        self._prefix = f"{prefix}:ti:"
        # What each script names as its key: it routes the call to the index's slot in a cluster.
        self._route = [f"{self._prefix}st"]
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._max_entries = max_entries
        self._scripts: dict[str, AsyncScript] = {}

    def _script(self, source: str) -> AsyncScript:
        """The script, registered again after the backend reconnected (a new client)."""
        client = self._client()
        script = self._scripts.get(source)
        if script is None or script.registered_client is not client:
            script = self._scripts[source] = client.register_script(source)
        return script

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        for start in range(0, len(entries), WRITE_CHUNK):
            items: list[str] = []
            for e in entries[start : start + WRITE_CHUNK]:
                # Strings all: Lua would print a microsecond score as 1.7e+15.
                items += (e.task_id, str(e.state), str(e.submitted_us), e.queue, e.name)
            args: list[Any] = [self._prefix, int(time.time() * 1000), self._ttl_ms, self._max_entries, TRIM_BATCH,
                               json.dumps(items, separators=(",", ":"))]
            await self._script(_WRITE)(keys=self._route, args=args)

    async def drop(self, task_ids: Sequence[str]) -> None:
        for start in range(0, len(task_ids), WRITE_CHUNK):
            await self._script(_DROP)(keys=self._route, args=[self._prefix, *task_ids[start : start + WRITE_CHUNK]])

    async def find(self, query: TaskQuery) -> Found:
        if query.id_prefix:
            return await self._by_prefix(query)
        candidates = ["all"]
        if query.queue:
            candidates.append(f"q:{query.queue}")
        if query.name:
            candidates.append(f"n:{query.name}")
        if len(query.states) == 1:
            candidates.append(f"s:{next(iter(query.states))}")
        after = query.after
        args: list[Any] = [
            self._prefix, json.dumps(candidates), int(query.oldest_first), query.limit, SCAN_BUDGET,
            "" if after is None else str(after.submitted_us), "" if after is None else after.task_id,
            "" if query.since_us is None else str(query.since_us),
            "" if query.until_us is None else str(query.until_us),
            ",".join(str(s) for s in sorted(query.states)), query.queue, query.name,
            int(time.time() * 1000), TRIM_BATCH,
        ]
        reply = await self._script(_FIND)(keys=self._route, args=args)
        more, last_id, last_us, *flat = reply
        resume = Cursor(int(_text(last_us)), _text(last_id)) if int(more) else None
        return Found(_entries(flat), resume)

    async def _by_prefix(self, query: TaskQuery) -> Found:
        """Ids that start with the prefix: HSCAN of the entries (a few thousand per call, so Redis
        is never held for long), up to PREFIX_CANDIDATES of them; then their entries."""
        if UUID.match(query.id_prefix):
            exact = _entries(await self._script(_ENTRIES)(keys=self._route, args=[self._prefix, query.id_prefix]))
            if exact:  # no other server-made id starts with a whole one
                return ordered([e for e in exact if query.matches(e)], query)
        client = self._client()
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in query.id_prefix) + "*"
        ids: list[str] = []
        # The state hash: small values (NOVALUES needs Redis 7.4).
        async for field, _ in client.hscan_iter(f"{self._prefix}st", match=pattern, count=PREFIX_SCAN_COUNT):
            ids.append(_text(field))
            if len(ids) >= PREFIX_CANDIDATES:
                break
        if not ids:
            return Found([], None)
        flat = await self._script(_ENTRIES)(keys=self._route, args=[self._prefix, *ids])
        return ordered([e for e in _entries(flat) if query.matches(e)], query)
