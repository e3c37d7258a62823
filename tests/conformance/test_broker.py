"""The Broker conformance suite: every engine in BROKER_ENGINES must pass all of it."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor_server.brokers.base import Broker, Delivery, OutgoingMessage, QueueStats
from conveyor_server.brokers.redis import (
    SIGNAL_READ_SECONDS,
    SOCKET_CONNECT_TIMEOUT_SECONDS,
    SOCKET_TIMEOUT_SECONDS,
    RedisBroker,
    check_version,
)
from conveyor_server.engines import open_broker
from tests.fixtures.broker_services import drop_redis_prefix

LEASE = 30.0


def messages(count: int, prefix: str = "m", delay: float = 0.0) -> list[OutgoingMessage]:
    return [OutgoingMessage(f"{prefix}{i}", f"body-{prefix}{i}".encode(), delay) for i in range(count)]


def ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [d.message_id for d in deliveries]


async def test_publish_fetch_ack(broker: Broker, queue: str) -> None:
    await broker.publish(queue, [OutgoingMessage("t1", b"\x00payload\xff", priority=3)])

    [delivery] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
    assert (delivery.message_id, delivery.body, delivery.queue) == ("t1", b"\x00payload\xff", queue)
    assert delivery.delivery_count == 1
    assert await broker.fetch(queue, 10, LEASE) == []

    await broker.ack([delivery])
    assert await broker.fetch(queue, 10, LEASE) == []
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    assert queue in await broker.queues()


async def test_nack_returns_message(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(1))
    [first] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)

    await broker.nack([first])
    [second] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
    assert second.message_id == first.message_id
    assert second.body == first.body
    assert second.delivery_count == 2


async def test_nack_with_delay(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(1))
    [first] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)

    nacked_at = time.monotonic()
    await broker.nack([first], delay=0.5)
    assert await broker.fetch(queue, 10, LEASE) == []
    [again] = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert time.monotonic() - nacked_at >= 0.45
    assert again.message_id == first.message_id
    assert again.delivery_count == 2


async def test_lease_expiry_brings_message_back(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(1))
    [first] = await broker.fetch(queue, 10, 0.5, wait_seconds=2)
    assert await broker.fetch(queue, 10, LEASE) == []

    await asyncio.sleep(0.7)
    # The count is engine-wide (and 0 where the server recovers leases itself): not asserted.
    await broker.recover_expired()
    [again] = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert again.message_id == first.message_id
    assert again.delivery_count == 2


async def test_extend_keeps_lease(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(1))
    [delivery] = await broker.fetch(queue, 10, 0.5, wait_seconds=2)

    await broker.extend([delivery], LEASE)
    await asyncio.sleep(0.8)
    await broker.recover_expired()
    assert await broker.fetch(queue, 10, LEASE) == []

    await broker.ack([delivery])
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_stale_receipt_is_a_noop(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(1))
    [stale] = await broker.fetch(queue, 10, 0.3, wait_seconds=2)
    await asyncio.sleep(0.5)
    await broker.recover_expired()
    [live] = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert live.receipt != stale.receipt

    # Every operation on the lost lease is a no-op, and none of them raises.
    await broker.ack([stale])
    await broker.nack([stale])
    await broker.extend([stale], LEASE)
    assert await broker.fetch(queue, 10, LEASE) == []
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=1)

    await broker.ack([live])
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


SQS_BAND = {p: 0 if p <= 2 else 1 if p <= 6 else 2 for p in range(10)}


async def test_priority_order(broker: Broker, broker_url: str, queue: str) -> None:
    published = [
        OutgoingMessage(f"p{priority}-{n}", b"x", priority=priority)
        for n, priority in enumerate([0, 5, 9, 1, 5, 0, 9])
    ]
    await broker.publish(queue, published)

    fetched: list[Delivery] = []
    while len(fetched) < len(published):
        batch = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        assert batch, f"only {len(fetched)} of {len(published)} messages came back"
        fetched += batch
    priorities = [int(d.message_id[1]) for d in fetched]
    if broker_url.startswith("sqs:") and "bands=10" not in broker_url:
        # SQS has no priorities: its broker keeps three band queues (0-2, 3-6, 7-9) by default,
        # so order is promised between bands, not within one.
        priorities = [SQS_BAND[p] for p in priorities]
    assert priorities == sorted(priorities, reverse=True)
    if broker_url.startswith(("memory:", "sqlite:")):  # the engines that promise FIFO
        assert ids(fetched) == ["p9-2", "p9-6", "p5-1", "p5-4", "p1-3", "p0-0", "p0-5"]


async def test_shorter_delay_first(broker: Broker, queue: str) -> None:
    # Whole seconds apart, so engines with one-second delay granularity still order them.
    published = [OutgoingMessage("long", b"1", delay=1.2), OutgoingMessage("short", b"2", delay=0.3)]
    await broker.publish(queue, published)
    published_at = time.monotonic()
    assert await broker.fetch(queue, 10, LEASE) == []

    first = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert ids(first) == ["short"]
    assert time.monotonic() - published_at >= 0.25
    second = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert ids(second) == ["long"]
    assert time.monotonic() - published_at >= 1.15


async def test_batches(broker: Broker, queue: str) -> None:
    published = messages(250)
    await broker.publish(queue, published)

    batches = [await broker.fetch(queue, 100, LEASE, wait_seconds=2) for _ in range(3)]
    assert [len(batch) for batch in batches] == [100, 100, 50]
    fetched = [d for batch in batches for d in batch]
    assert sorted(ids(fetched)) == sorted(m.message_id for m in published)
    assert {d.message_id: d.body for d in fetched} == {m.message_id: m.body for m in published}

    await broker.ack(fetched)
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_fetch_wait(broker: Broker, queue: str) -> None:
    started = time.monotonic()
    assert await broker.fetch(queue, 10, LEASE, wait_seconds=0.3) == []
    assert time.monotonic() - started >= 0.25

    waiting = asyncio.create_task(broker.fetch(queue, 10, LEASE, wait_seconds=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await broker.publish(queue, messages(1))
    published_at = time.monotonic()
    assert ids(await waiting) == ["m0"]
    assert time.monotonic() - published_at < 1.0


async def test_purge_and_stats(broker: Broker, queue: str) -> None:
    await broker.publish(queue, messages(3, "ready"))
    await broker.publish(queue, messages(2, "later", delay=60))
    [leased] = await broker.fetch(queue, 1, LEASE, wait_seconds=2)
    assert await broker.stats(queue) == QueueStats(ready=2, delayed=2, in_flight=1)

    purged = await broker.purge(queue)
    # The ids of what was dropped (the leased message is kept, and not listed).
    assert len(purged) == 4
    assert set(purged) == {"ready0", "ready1", "ready2", "later0", "later1"} - {leased.message_id}
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=1)
    await broker.ack([leased])
    assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_two_consumers_never_share_a_lease(shared_broker_url: str, queue: str) -> None:
    first, second = open_broker(shared_broker_url), open_broker(shared_broker_url)
    await first.connect()
    await second.connect()
    try:
        await first.publish(queue, messages(200))

        async def consume(broker: Broker) -> list[str]:
            taken: list[str] = []
            while batch := await broker.fetch(queue, 7, LEASE, wait_seconds=0.5):
                taken += ids(batch)
            return taken

        one, two = await asyncio.gather(consume(first), consume(second))
        assert len(one) + len(two) == 200
        assert set(one) | set(two) == {f"m{i}" for i in range(200)}
    finally:
        await first.close()
        await second.close()


async def test_message_survives_reopen(shared_broker_url: str, queue: str) -> None:
    before = open_broker(shared_broker_url)
    await before.connect()
    try:
        await before.publish(queue, [OutgoingMessage("durable", b"still here")])
    finally:
        await before.close()

    after = open_broker(shared_broker_url)
    await after.connect()
    try:
        [delivery] = await after.fetch(queue, 10, LEASE, wait_seconds=2)
        assert (delivery.message_id, delivery.body) == ("durable", b"still here")
        await after.ack([delivery])
    finally:
        await after.close()


async def test_empty_batches_are_noops(broker: Broker, queue: str) -> None:
    await broker.publish(queue, [])
    await broker.ack([])
    await broker.nack([])
    await broker.extend([], LEASE)
    assert await broker.fetch(queue, 10, LEASE) == []


# -- Redis only: the queue registry, the version check, timeouts ------------------------------

@pytest.fixture
async def redis_parts(redis_broker_url: str) -> AsyncIterator[tuple[str, str]]:
    """(broker URL, prefix): a prefix of this test's own under the session's, dropped after it,
    so deleting its registry key disturbs no other test."""
    parts = urlsplit(redis_broker_url)
    session_prefix = dict(parse_qsl(parts.query))["prefix"]
    prefix = f"{session_prefix}:own{uuid.uuid4().hex[:8]}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"] + [("prefix", prefix)])
    yield urlunsplit(parts._replace(query=query)), prefix
    drop_redis_prefix(urlunsplit(parts._replace(query="")), prefix)


async def _drop_registry(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(urlunsplit(urlsplit(url)._replace(query="")))
    try:
        assert await client.delete(f"{prefix}:queues") == 1
    finally:
        await client.aclose()


async def test_redis_recovers_a_lease_fetched_after_the_registry_was_lost(
    redis_parts: tuple[str, str], queue: str
) -> None:
    url, prefix = redis_parts
    broker = RedisBroker.from_url(url)
    await broker.connect()
    try:
        await broker.recover_expired()  # the first call of a process also scans; this test is about fetch
        await broker.publish(queue, messages(1))
        await _drop_registry(url, prefix)

        [first] = await broker.fetch(queue, 10, 0.3, wait_seconds=2)
        await asyncio.sleep(0.5)
        assert await broker.recover_expired() == 1
        [again] = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        assert (again.message_id, again.delivery_count) == (first.message_id, 2)
    finally:
        await broker.close()


async def test_redis_publish_registers_its_queue_again(redis_parts: tuple[str, str], queue: str) -> None:
    url, prefix = redis_parts
    broker = RedisBroker.from_url(url)
    await broker.connect()
    try:
        await broker.publish(queue, messages(1))
        await _drop_registry(url, prefix)
        assert queue not in await broker.queues()
        await broker.publish(queue, messages(1, "n"))
        assert queue in await broker.queues()
    finally:
        await broker.close()


async def test_redis_a_new_process_recovers_leases_of_an_unregistered_queue(
    redis_parts: tuple[str, str], queue: str
) -> None:
    url, prefix = redis_parts
    crashed = RedisBroker.from_url(url)
    await crashed.connect()
    try:
        await crashed.publish(queue, messages(1))
        [lost] = await crashed.fetch(queue, 10, 0.3, wait_seconds=2)
    finally:
        await crashed.close()
    await _drop_registry(url, prefix)
    await asyncio.sleep(0.5)

    restarted = RedisBroker.from_url(url)
    await restarted.connect()
    try:
        assert await restarted.recover_expired() == 1  # found by its lease key
        assert queue in await restarted.queues()
        [again] = await restarted.fetch(queue, 10, LEASE, wait_seconds=2)
        assert (again.message_id, again.delivery_count) == (lost.message_id, 2)
    finally:
        await restarted.close()


def test_redis_versions_before_6_2_are_refused() -> None:
    for version in ("7.0.15", "6.2.0", "6.2", "8", "7.2.4-rc1"):
        check_version(version)
    for version in ("6.0.16", "5.0.14", ""):
        with pytest.raises(RuntimeError, match=rf"needs Redis >= 6\.2 .*runs Redis .*{re.escape(version)}"):
            check_version(version)


async def test_redis_connections_have_socket_timeouts(redis_parts: tuple[str, str]) -> None:
    url, _ = redis_parts
    broker = RedisBroker.from_url(url)
    await broker.connect()
    try:
        options = broker._redis.connection_pool.connection_kwargs
        assert options["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
        assert options["socket_connect_timeout"] == SOCKET_CONNECT_TIMEOUT_SECONDS
        # The longest read this broker makes waits less than the socket timeout allows.
        assert SIGNAL_READ_SECONDS < SOCKET_TIMEOUT_SECONDS
    finally:
        await broker.close()


async def test_redis_a_peer_that_never_answers_fails_the_call() -> None:
    # A listening socket nobody reads: TCP connects, then no reply ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        broker = RedisBroker.from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.2")
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(broker.connect(), 30)
        assert time.monotonic() - started < 20  # redis-py's own retries, then the error


def test_redis_busy_loading_is_a_connection_error() -> None:
    # Redis answers LOADING while it replays its AOF after a restart; redis-py raises
    # BusyLoadingError, which callers must treat as the connection error it is.
    assert issubclass(BusyLoadingError, RedisConnectionError)
