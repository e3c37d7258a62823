"""The Redis broker works on whole batches: a publish, fetch or ack of many messages costs the
Redis commands of one (issue #21: commands per task), with LMPOP (Redis >= 7) or without it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from conveyor_server.brokers.base import Delivery, OutgoingMessage, QueueStats
from conveyor_server.brokers.redis import RedisBroker

LEASE = 30.0


@pytest.fixture(params=[True, False], ids=["lmpop", "lpop"])
async def broker(request: pytest.FixtureRequest, redis_broker_url: str) -> AsyncIterator[RedisBroker]:
    """The Redis broker popping with LMPOP, and as on Redis 6.2, list by list."""
    engine = RedisBroker.from_url(redis_broker_url)
    await engine.connect()
    engine._lmpop = request.param
    yield engine
    await engine.close()


@pytest.fixture
def queue() -> str:
    return f"batches-{uuid.uuid4().hex}"


async def test_priorities_come_highest_first_and_fifo_within_one(broker: RedisBroker, queue: str) -> None:
    priorities = [0, 5, 9, 1, 5, 0, 9, 3]
    await broker.publish(queue, [OutgoingMessage(f"m{n}", b"x", priority=p) for n, p in enumerate(priorities)])

    first = await broker.fetch(queue, 3, LEASE)
    rest = await broker.fetch(queue, 10, LEASE)

    assert [d.message_id for d in first] == ["m2", "m6", "m1"]
    assert [d.message_id for d in rest] == ["m4", "m7", "m3", "m0", "m5"]
    await broker.ack([*first, *rest])
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_a_batch_keeps_each_body_and_counts_each_delivery(broker: RedisBroker, queue: str) -> None:
    published = [OutgoingMessage(f"m{n}", f"body-{n}".encode(), priority=n % 3) for n in range(300)]
    await broker.publish(queue, published)

    first = await broker.fetch(queue, 300, 0.2)
    assert {d.message_id: d.body for d in first} == {m.message_id: m.body for m in published}
    assert {d.delivery_count for d in first} == {1}
    await asyncio.sleep(0.3)
    assert await broker.recover_expired() >= 300
    again = await broker.fetch(queue, 300, LEASE)
    assert sorted(d.message_id for d in again) == sorted(m.message_id for m in published)
    assert {d.delivery_count for d in again} == {2}

    # Only the current deliveries count: the stale receipts of the first lease delete nothing.
    await broker.ack(first)
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=300)
    await broker.ack([*again, *again[:10]])  # an ack repeated in one batch deletes once
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_a_batch_mixes_ready_and_delayed_messages(broker: RedisBroker, queue: str) -> None:
    await broker.publish(queue, [
        OutgoingMessage("later", b"1", delay=0.3),
        OutgoingMessage("now", b"2", priority=4),
        OutgoingMessage("now-too", b"3"),
    ])
    assert await broker.stats(queue) == QueueStats(ready=2, delayed=1, in_flight=0)
    assert [d.message_id for d in await broker.fetch(queue, 10, LEASE)] == ["now", "now-too"]
    [later] = await broker.fetch(queue, 10, LEASE, wait_seconds=3)
    assert later.message_id == "later"


async def _commands_on(url: str, queue: str, action: Callable[[], Awaitable[None]]) -> list[str]:
    """The commands (script calls and the commands inside them) that touched `queue`'s keys
    while `action` ran, read with MONITOR on the shared Redis and kept by the queue's hash tag."""
    client = aioredis.Redis.from_url(urlunsplit(urlsplit(url)._replace(query="")))
    marker = f"end-{uuid.uuid4().hex}"
    seen: list[str] = []
    try:
        async with client.monitor() as monitor:
            async def read() -> None:
                async for info in monitor.listen():
                    command = info["command"]
                    if marker in command:
                        return
                    if f"{{{queue}}}" in command:
                        seen.append(command.split(" ", 1)[0].upper())

            reader = asyncio.create_task(read())
            await action()
            await client.echo(marker)
            await asyncio.wait_for(reader, 10)
    finally:
        await client.aclose()
    return seen


async def test_a_batch_costs_the_commands_of_one_message(
    broker: RedisBroker, redis_broker_url: str, queue: str
) -> None:
    async def round_trip(count: int) -> None:
        await broker.publish(queue, [OutgoingMessage(f"m{n}", b"x") for n in range(count)])
        fetched: list[Delivery] = await broker.fetch(queue, count, LEASE)
        assert len(fetched) == count
        await broker.ack(fetched)

    one = await _commands_on(redis_broker_url, queue, lambda: round_trip(1))
    many = await _commands_on(redis_broker_url, queue, lambda: round_trip(500))

    assert "EVALSHA" in one
    assert sorted(many) == sorted(one), f"one message: {sorted(one)}; 500 messages: {sorted(many)}"
    if broker._lmpop:
        assert "LPOP" not in one
    else:
        assert "LMPOP" not in one
