"""The Redis task index's retention, key by key: what it forgets (expired entries, the oldest
past its bound, dropped ids) leaves no member behind in any of its sets and hashes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor_server.backends._common import split_prefix
from conveyor_server.backends.redis_task_index import RedisTaskIndex
from conveyor_server.backends.task_index import IndexEntry
from conveyor_server.core.records import TaskStates

STARTED, SUCCESS, FAILURE, CANCELLED = (
    TaskStates.TASK_STATE_STARTED, TaskStates.TASK_STATE_SUCCESS, TaskStates.TASK_STATE_FAILURE,
    TaskStates.TASK_STATE_CANCELLED,
)
BASE_US = 1_700_000_000_000_000


@pytest.fixture
async def redis_client(redis_backend_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client of the test Redis DB and a key prefix of this test's own (deleted after it)."""
    url, session = split_prefix(redis_backend_url)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    prefix = f"{session}_{uuid.uuid4().hex[:6]}"
    yield client, prefix
    async for key in client.scan_iter(match=f"{prefix}:*", count=1_000):
        await client.delete(key)
    await client.aclose()


def spread(count: int, tag: str, states: tuple[int, ...]) -> list[IndexEntry]:
    """Entries over three queues, four names and the given states, a second apart."""
    return [IndexEntry(f"{tag}-{i:03d}", states[i % len(states)], f"q{i % 3}", f"n{i % 4}", BASE_US + i * 1_000_000)
            for i in range(count)]


async def members(client: aioredis.Redis, prefix: str) -> dict[str, set[str]]:
    """Every key of the index under `prefix`, with its members (sorted sets) or fields (hashes)."""
    found: dict[str, set[str]] = {}
    async for key in client.scan_iter(match=f"{prefix}:ti:*", count=1_000):
        zset = await client.type(key) == "zset"
        values: list[Any] = await (client.zrange(key, 0, -1) if zset else client.hkeys(key))
        found[key.removeprefix(f"{prefix}:ti:")] = {str(v) for v in values}
    return found


def layout(entries: list[IndexEntry], expiring: bool) -> dict[str, set[str]]:
    """The keys and members the index holds for exactly these entries."""
    keys: dict[str, set[str]] = {}
    for e in entries:
        for key in ("e", "st", "all", f"s:{e.state}", f"q:{e.queue}", f"n:{e.name}"):
            keys.setdefault(key, set()).add(e.task_id)
        if expiring and e.state in (SUCCESS, FAILURE, CANCELLED):
            keys.setdefault("x", set()).add(e.task_id)
    return keys


async def test_expired_entries_leave_nothing_behind(redis_client: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis_client
    index = RedisTaskIndex(lambda: client, prefix, ttl_seconds=0.3)
    ended = spread(40, "ended", (SUCCESS, FAILURE, CANCELLED))
    live = spread(5, "live", (STARTED,))
    await index.write(ended + live)
    assert await members(client, prefix) == layout(ended + live, expiring=True)
    await asyncio.sleep(0.5)  # past the TTL: checking that the entries are gone (no condition to wait on)
    later = spread(1, "later", (STARTED,))
    await index.write(later)  # each write forgets what expired
    assert await members(client, prefix) == layout(live + later, expiring=True)


async def test_past_its_bound_the_oldest_entries_are_forgotten(redis_client: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis_client
    index = RedisTaskIndex(lambda: client, prefix, ttl_seconds=60, max_entries=10)
    written = spread(25, "t", (STARTED, SUCCESS, FAILURE))
    await index.write(written)
    assert await members(client, prefix) == layout(written[-10:], expiring=True)


async def test_dropped_ids_leave_nothing_behind(redis_client: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis_client
    index = RedisTaskIndex(lambda: client, prefix, ttl_seconds=60)
    written = spread(12, "t", (STARTED, SUCCESS))
    await index.write(written)
    await index.drop([e.task_id for e in written[:9]] + ["never-written"])
    assert await members(client, prefix) == layout(written[9:], expiring=True)
