"""The Redis engines' connection pool (conveyor_server/redis_quick_pool.py) against a real Redis:
idle connections are taken and given back without redis-py's condition, and still every caller
gets a connection when there are more callers than connections, a caller that cannot get one in
time is told so, and a connection Redis closed is replaced before use."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor_server.redis_pool import open_redis
from conveyor_server.redis_quick_pool import QuickBlockingPool
from tests.fixtures.broker_services import ensure_redis

HOLD_SECONDS = 0.05


def quick_client(max_connections: int, timeout: float) -> aioredis.Redis:
    pool = QuickBlockingPool.from_url(ensure_redis(), max_connections=max_connections, timeout=timeout)
    return aioredis.Redis.from_pool(pool)


@pytest.fixture
def key() -> str:
    return f"quick-pool:{uuid.uuid4().hex}"  # never written: BLPOP on it holds its connection for the timeout


@pytest.fixture
async def slow_path_entries(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[float]]:
    """When callers went into redis-py's own get_connection (the condition)."""
    entries: list[float] = []
    original = aioredis.BlockingConnectionPool.get_connection

    async def counted(self: aioredis.BlockingConnectionPool, *args: object, **kwargs: object) -> object:
        entries.append(time.monotonic())
        return await original(self, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aioredis.BlockingConnectionPool, "get_connection", counted)
    yield entries


async def test_the_engines_open_their_client_on_the_quick_pool() -> None:
    client = open_redis(ensure_redis())
    try:
        assert isinstance(client.connection_pool, QuickBlockingPool)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_commands_in_turn_take_the_idle_connection_without_the_condition(
    slow_path_entries: list[float],
) -> None:
    client = quick_client(max_connections=4, timeout=5)
    try:
        await client.ping()  # the first connection is made on redis-py's path
        made = len(slow_path_entries)
        for _ in range(50):
            assert await client.ping()
        assert len(slow_path_entries) == made, "an idle connection was there each time"
        assert len(client.connection_pool._available_connections) == 1
    finally:
        await client.aclose()


async def test_more_callers_than_connections_are_each_served_in_turn(key: str, slow_path_entries: list[float]) -> None:
    """Twenty callers on two connections, each holding one for 50 ms: eighteen wait on redis-py's
    condition and are woken as connections come back. A release that skipped the notification
    while they waited would leave them until their 3 s timeout, and they would fail."""
    client = quick_client(max_connections=2, timeout=3)
    try:
        started = time.monotonic()
        answers = await asyncio.gather(*(client.blpop([key], timeout=HOLD_SECONDS) for _ in range(20)))
        took = time.monotonic() - started
        assert answers == [None] * 20
        assert took < 2.5, f"waiters were not woken when connections came back ({took:.2f} s)"
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) == 2
        assert len(slow_path_entries) >= 18
        # Nobody waits now: back on the fast path.
        entered = len(slow_path_entries)
        assert await client.ping()
        assert len(slow_path_entries) == entered
    finally:
        await client.aclose()


async def test_a_caller_that_cannot_get_a_connection_in_time_is_told_so(key: str) -> None:
    client = quick_client(max_connections=1, timeout=0.2)
    try:
        async def hold() -> object:
            return await client.blpop([key], timeout=1)

        holding = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        assert await holding is None
        assert await client.ping(), "the connection came back to the pool"
    finally:
        await client.aclose()


async def after_redis_closed_the_idle_connection(pool_class: type[aioredis.BlockingConnectionPool]) -> list[str]:
    """What two pings return after Redis closed the pool's idle connection, and whether the second went over
    a new connection to Redis."""
    client = aioredis.Redis.from_pool(pool_class.from_url(ensure_redis(), max_connections=4, timeout=5))
    admin = aioredis.Redis.from_url(ensure_redis())
    seen: list[str] = []
    try:
        client_id = await client.client_id()
        assert await admin.client_kill_filter(_id=str(client_id)) == 1
        await asyncio.sleep(0.05)  # the close reaches the idle connection
        for _ in range(2):
            try:
                seen.append(f"ping {await client.ping()}")
            except RedisConnectionError as exc:
                seen.append(f"ConnectionError: {exc}")
        seen.append(f"new connection {await client.client_id() != client_id}")
        return seen
    finally:
        await client.aclose()
        await admin.aclose()


async def test_a_connection_redis_closed_fails_and_is_replaced_as_on_redis_pys_pool() -> None:
    """redis-py's asyncio pool lets the first command on a connection Redis closed fail (the engines retry
    through outages) and reconnects on the next; the quick pool does the same."""
    quick = await after_redis_closed_the_idle_connection(QuickBlockingPool)
    assert quick == await after_redis_closed_the_idle_connection(aioredis.BlockingConnectionPool)
    assert quick[1:] == ["ping True", "new connection True"], quick
