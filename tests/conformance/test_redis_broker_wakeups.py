"""A waiting fetch on the Redis broker wakes at once after a publish or nack made by the same
broker, without the pub/sub signal: in a cluster that signal may cross the cluster bus, which
held about 1 in 100 of them for 40 ms (bench/cluster.py: p99 48.6 ms before, 5.6 ms after)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.redis import RedisBroker

LEASE = 30.0
# Longer than the test waits for a wake: a fetch that returns in time was woken, not polling.
POLL_SECONDS = 60
WAIT_SECONDS = 10.0
WOKEN_WITHIN_SECONDS = 2.0


@pytest.fixture(params=["redis_broker_url", "redis_cluster_broker_url"], ids=["redis", "redis_cluster"])
async def deaf_broker(request: pytest.FixtureRequest) -> AsyncIterator[RedisBroker]:
    """A broker that hears no pub/sub signal (its listener stopped) and polls only every minute."""
    url: str = request.getfixturevalue(request.param)
    engine = RedisBroker.from_url(f"{url}{'&' if '?' in url else '?'}poll={POLL_SECONDS}")
    await engine.connect()
    assert engine._listeners
    for listener in engine._listeners:
        listener.cancel()
    await asyncio.gather(*engine._listeners, return_exceptions=True)
    yield engine
    await engine.close()


async def woken_fetch(broker: RedisBroker, queue: str) -> tuple[list[str], float]:
    started = time.monotonic()
    deliveries = await broker.fetch(queue, 10, LEASE, wait_seconds=WAIT_SECONDS)
    return [d.message_id for d in deliveries], time.monotonic() - started


async def test_a_waiting_fetch_wakes_on_its_own_brokers_publish(deaf_broker: RedisBroker) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)  # the fetch found nothing and waits

    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS


async def test_a_waiting_fetch_wakes_on_its_own_brokers_nack(deaf_broker: RedisBroker) -> None:
    queue = f"wake-{uuid.uuid4().hex}"
    await deaf_broker.publish(queue, [OutgoingMessage("m1", b"body")])
    [delivery] = await deaf_broker.fetch(queue, 10, LEASE)
    fetch = asyncio.create_task(woken_fetch(deaf_broker, queue))
    await asyncio.sleep(0.2)

    await deaf_broker.nack([delivery])

    ids, seconds = await fetch
    assert ids == ["m1"]
    assert seconds < WOKEN_WITHIN_SECONDS
