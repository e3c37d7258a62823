"""The Broker conformance suite: every engine in BROKER_ENGINES must pass all of it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiormq
import pytest
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor_server.brokers import amqp as amqp_module
from conveyor_server.brokers import sqs as sqs_module
from conveyor_server.brokers.amqp import (
    RECONNECT_FIRST_SECONDS,
    RECONNECT_MAX_SECONDS,
    REFUSED_RETRY_SECONDS,
    AmqpBroker,
    quantize_delay_ms,
    reconnect_delay,
)
from conveyor_server.brokers.base import Broker, Delivery, OutgoingMessage, QueueDeletionUnsupported, QueueStats
from conveyor_server.brokers.redis import (
    SIGNAL_READ_SECONDS,
    SOCKET_CONNECT_TIMEOUT_SECONDS,
    SOCKET_TIMEOUT_SECONDS,
    RedisBroker,
    check_version,
)
from conveyor_server.brokers.sqs import SqsBroker
from conveyor_server.engine_errors import is_transient
from conveyor_server.engines import open_broker
from tests.fixtures.broker_services import drop_redis_prefix
from tests.fixtures.rabbitmq_node import RabbitNode
from tests.support.proxy import TcpProxy

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


async def test_a_portable_receipt_serves_another_replica(shared_broker_url: str, queue: str) -> None:
    """Where receipts are portable, another instance of the engine (another replica) extends and acks a
    delivery from its queue, id, receipt and count alone, as core/takeover.py rebuilds it from a task's record."""
    first, other = open_broker(shared_broker_url), open_broker(shared_broker_url)
    if not first.portable_receipts():
        pytest.skip(f"{type(first).__name__} keeps its receipts with the process that received them")
    await first.connect()
    await other.connect()
    try:
        await first.publish(queue, messages(1))
        [delivery] = await first.fetch(queue, 10, 0.5, wait_seconds=2)
        rebuilt = Delivery(delivery.message_id, b"", delivery.queue, delivery.receipt, delivery.delivery_count)

        await other.extend([rebuilt], LEASE)
        await asyncio.sleep(0.8)
        await first.recover_expired()
        await other.recover_expired()
        assert await first.fetch(queue, 10, LEASE) == [], "the other instance's extension kept the lease"

        await other.ack([rebuilt])
        assert await first.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    finally:
        await first.close()
        await other.close()


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
    # The delays run from when the engine took the messages, before the publish returns (RabbitMQ
    # confirms after it queued them): measured from the return, "short" once came 0.246 s after.
    publishing_at = time.monotonic()
    await broker.publish(queue, published)
    assert await broker.fetch(queue, 10, LEASE) == []

    first = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert ids(first) == ["short"]
    assert time.monotonic() - publishing_at >= 0.25
    second = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    assert ids(second) == ["long"]
    assert time.monotonic() - publishing_at >= 1.15



async def test_a_delayed_message_is_not_held_back_by_later_ones_of_higher_priority(broker: Broker, queue: str) -> None:
    """Issue #21: RabbitMQ expires messages only at a queue's head, and a priority queue's head is
    its highest priority, so delay queues declared as priority queues held a priority-0 message
    behind priority-9 ones published a second after it, until those were due too."""
    await broker.publish(queue, [OutgoingMessage("low", b"0", priority=0, delay=2.0)])
    published_at = time.monotonic()
    await asyncio.sleep(1.0)
    await broker.publish(queue, [OutgoingMessage(f"high-{n}", b"9", priority=9, delay=2.0) for n in range(5)])

    first = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
    arrived = time.monotonic() - published_at
    assert ids(first) == ["low"], f"first came {ids(first)} after {arrived:.2f} s"
    assert arrived < 2.8, f"the priority-0 message came {arrived:.2f} s after it was published, due at 2 s"
    await broker.ack(first)
    rest: list[Delivery] = []
    while len(rest) < 5:
        batch = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
        assert batch, f"only {len(rest)} of the 5 priority-9 messages came"
        # Acked as a consumer would: a FIFO queue hands out no more of a message group while
        # some of it is leased, and the five may reach their band in more than one forward.
        await broker.ack(batch)
        rest += batch
    assert sorted(ids(rest)) == [f"high-{n}" for n in range(5)]

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


async def test_holding_names_the_ready_delayed_and_leased_messages_or_none_where_the_engine_cannot_tell(
    broker: Broker, broker_url: str, queue: str
) -> None:
    await broker.publish(queue, messages(2, "ready"))
    await broker.publish(queue, messages(1, "later", delay=60))
    [leased] = await broker.fetch(queue, 1, LEASE, wait_seconds=2)
    asked = ["ready0", "ready1", "later0", "gone"]
    held = await broker.holding(queue, asked)
    if broker_url.startswith(("amqp", "sqs")):
        assert held is None  # the repair of lost messages then judges from counts
        await broker.ack([leased])
    else:
        assert held == {"ready0", "ready1", "later0"}
        await broker.ack([leased])
        assert await broker.holding(queue, asked) == {"ready0", "ready1", "later0"} - {leased.message_id}
        assert await broker.holding(queue, []) == set()
    await broker.purge(queue)


async def test_only_an_empty_queue_is_deleted(broker: Broker, broker_url: str, queue: str) -> None:
    if broker_url.startswith("sqs"):
        with pytest.raises(QueueDeletionUnsupported, match="does not delete queues"):
            await broker.delete_queue(queue)
        return
    await broker.publish(queue, messages(1, "ready"))
    await broker.publish(queue, messages(1, "later", delay=60))
    [leased] = await broker.fetch(queue, 1, LEASE, wait_seconds=2)
    assert not await broker.delete_queue(queue), "ready and delayed messages"
    await broker.purge(queue)
    assert not await broker.delete_queue(queue), "a leased message"
    assert queue in await broker.queues()
    await broker.ack([leased])
    assert await broker.delete_queue(queue)
    assert queue not in await broker.queues()
    assert await broker.delete_queue(queue), "an unknown queue is deleted already"
    await broker.publish(queue, messages(1, "again"))
    assert queue in await broker.queues(), "a publish creates it again"
    assert ids(await broker.fetch(queue, 1, LEASE, wait_seconds=2)) == ["again0"]


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
        assert set(one) | set(two) == {f"m{i}" for i in range(200)}
        if may_deliver_twice(shared_broker_url):
            # SQS standard queues deliver at least once: now and then a message reaches two
            # receivers (moto without its receive lock too). The server drops the second copy
            # (tests/chaos/test_duplicate_delivery.py); here it only must not be lost.
            print(f"delivered twice: {len(one) + len(two) - 200}")
        else:
            assert len(one) + len(two) == 200
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


def may_deliver_twice(broker_url: str) -> bool:
    """SQS standard queues promise at-least-once delivery, not exactly once."""
    return broker_url.startswith("sqs:") and "fifo=1" not in broker_url


# -- SQS FIFO (fifo=1): order within a message group ------------------------------------------

@pytest.mark.xfail(reason="SQS fifo=1: a publish of more than 10 messages sends its batches in parallel, so a "
                          "group's order across batches is lost (seen: a0-a3, then a7 before a4)", strict=False)
async def test_sqs_fifo_keeps_the_order_of_each_message_group(sqs_fifo_broker_url: str, queue: str) -> None:
    broker = open_broker(sqs_fifo_broker_url)
    await broker.connect()
    try:
        published = [OutgoingMessage(f"{group}{i}", f"{group}{i}".encode(), group=group)
                     for i in range(12) for group in ("a", "b", "c")]
        await broker.publish(queue, published)
        taken: list[Delivery] = []
        while len(taken) < len(published):
            batch = await broker.fetch(queue, 4, LEASE, wait_seconds=2)
            assert batch, f"only {len(taken)} of {len(published)} messages came back"
            taken += batch
            await broker.ack(batch)
        for group in ("a", "b", "c"):
            assert [d.message_id for d in taken if d.message_id.startswith(group)] == [
                f"{group}{i}" for i in range(12)], f"group {group} out of order"
        assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    finally:
        await broker.close()


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
        options = broker._redis.connection_pool.connection_kwargs  # type: ignore[union-attr]  # not a cluster
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


# -- AMQP only: outages, cancelled calls, quorum queues ---------------------------------------

def _amqp_url(url: str, address: str | None = None, **options: str) -> str:
    """`url` pointed at `address` (host:port) and with `options` set in its query."""
    parts = urlsplit(url)
    if address is not None:
        parts = parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@{address}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in options] + list(options.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _drop_amqp_names(url: str, queues: Sequence[str], exchanges: Sequence[str] = ()) -> None:
    connection = await aiormq.connect(url.split("?", maxsplit=1)[0])
    try:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def _fails_fast(call: asyncio.Future[object] | Awaitable[object], seconds: float = 1.0) -> BaseException:
    """The transient error `call` raised, within `seconds`."""
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        await asyncio.wait_for(call, seconds)
    assert is_transient(raised.value), repr(raised.value)
    assert time.monotonic() - started < seconds
    return raised.value


async def _until_published(broker: Broker, queue: str, message: OutgoingMessage, seconds: float) -> float:
    """Publishes as soon as the broker takes it; returns how long that took."""
    started = time.monotonic()
    while True:
        try:
            await broker.publish(queue, [message])
            return time.monotonic() - started
        except Exception as exc:
            assert is_transient(exc), repr(exc)
            assert time.monotonic() - started < seconds, f"still failing after {seconds} s: {exc!r}"
            await asyncio.sleep(0.02)


def test_amqp_reconnect_waits_grow_from_100_ms_with_jitter_up_to_a_cap() -> None:
    lowest = [reconnect_delay(n, refused=False, draw=lambda: 0.0) for n in range(12)]
    highest = [reconnect_delay(n, refused=False, draw=lambda: 1.0) for n in range(12)]
    assert highest[0] == pytest.approx(RECONNECT_FIRST_SECONDS)
    assert lowest[0] == pytest.approx(RECONNECT_FIRST_SECONDS / 2)
    assert highest[:5] == pytest.approx([RECONNECT_FIRST_SECONDS * 2**n for n in range(5)])
    assert max(highest) == pytest.approx(RECONNECT_MAX_SECONDS)
    assert (lowest[-1], highest[-1]) == pytest.approx((RECONNECT_MAX_SECONDS / 2, RECONNECT_MAX_SECONDS))
    # Nothing listening on the port: polled at a short interval, which costs RabbitMQ nothing.
    assert reconnect_delay(30, refused=True) <= REFUSED_RETRY_SECONDS


async def test_amqp_calls_fail_fast_while_rabbitmq_is_unreachable_and_resume_after(
    amqp_broker_url: str, queue: str
) -> None:
    with TcpProxy("127.0.0.1", urlsplit(amqp_broker_url).port or 5672) as proxy:
        broker = AmqpBroker.from_url(_amqp_url(amqp_broker_url, proxy.address))
        await broker.connect()
        try:
            await broker.publish(queue, messages(2))
            [held] = await broker.fetch(queue, 1, LEASE, wait_seconds=2)
            waiting = asyncio.ensure_future(broker.fetch(f"{queue}-idle", 10, LEASE, wait_seconds=10))
            await asyncio.sleep(0.3)

            proxy.cut()
            await _fails_fast(waiting)
            await _fails_fast(broker.publish(queue, messages(1, "during")))
            await _fails_fast(broker.fetch(queue, 10, LEASE, wait_seconds=5))
            await _fails_fast(broker.stats(queue))
            await _fails_fast(broker.purge(queue))
            # The held delivery's channel died with the connection: it is lost, and settling it is a no-op.
            await broker.ack([held])
            await broker.nack([held], delay=1)
            await broker.extend([held], LEASE)
            assert await broker.recover_expired() == 0

            await asyncio.sleep(1.0)
            proxy.restore()
            await _until_published(broker, queue, OutgoingMessage("after", b"x"), RECONNECT_MAX_SECONDS + 3)
            fetched = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
            counts = {d.message_id: d.delivery_count for d in fetched}
            # The held one comes back as a redelivery; the other was never delivered.
            assert counts == {"after": 1, "m0": 1, "m1": 1, held.message_id: 2}
            await broker.ack(fetched)
            assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
        finally:
            await broker.close()


async def test_amqp_a_publish_rabbitmq_never_confirms_fails_instead_of_hanging(
    amqp_broker_url: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_module, "PUBLISH_STALL_SECONDS", 0.5)
    with TcpProxy("127.0.0.1", urlsplit(amqp_broker_url).port or 5672) as proxy:
        broker = AmqpBroker.from_url(_amqp_url(amqp_broker_url, proxy.address))
        await broker.connect()
        try:
            await broker.publish(queue, messages(1, "before"))
            proxy.delay(3.0)  # a link that stalls: nothing is confirmed for 3 s
            started = time.monotonic()
            with pytest.raises(TimeoutError) as raised:
                await broker.publish(queue, messages(1, "stalled"))
            assert is_transient(raised.value) and time.monotonic() - started < 2.5
            proxy.delay(0)
            await asyncio.sleep(3.5)  # the stalled frames arrive late: the connection is still fine
            await broker.publish(queue, messages(1, "after"))
            fetched = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
            # At least once: the stalled publish did reach RabbitMQ, late.
            assert sorted(ids(fetched)) == ["after0", "before0", "stalled0"]
            await broker.ack(fetched)
        finally:
            await broker.close()


@pytest.mark.slow
async def test_amqp_a_restarted_node_is_back_in_use_within_a_second_of_answering(
    rabbitmq_node: RabbitNode, queue: str
) -> None:
    broker = AmqpBroker.from_url(_amqp_url(rabbitmq_node.url, prefix="restart"))
    await broker.connect()
    try:
        await broker.publish(queue, [OutgoingMessage("kept", b"persistent")])
        await asyncio.to_thread(rabbitmq_node.stop)
        await _fails_fast(broker.publish(queue, messages(1)))
        await asyncio.to_thread(rabbitmq_node.start)  # returns once the node answers AMQP

        took = await _until_published(broker, queue, OutgoingMessage("after", b"x"), 5.0)
        print(f"\npublishing again {took:.2f} s after the node answered")
        assert took < 1.0
        fetched = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        assert sorted(d.message_id for d in fetched) == ["after", "kept"]  # durable queue, persistent message
        await broker.ack(fetched)
    finally:
        await broker.close()


async def test_amqp_a_cancelled_fetch_closes_no_channel_and_hands_its_messages_back(
    amqp_broker_url: str, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = AmqpBroker.from_url(amqp_broker_url)
    await broker.connect()
    try:
        await broker.publish(queue, messages(50))
        [held] = await broker.fetch(queue, 1, LEASE, wait_seconds=2)
        channels = dict(broker._channels)
        returned: list[Delivery] = []
        for attempt in range(150):
            # Cancelled at every stage: while declaring, starting the consumer, collecting, cancelling it.
            fetching = asyncio.ensure_future(broker.fetch(queue, 5, LEASE, wait_seconds=1.0))
            for _ in range(attempt % 9):
                await asyncio.sleep(0)
            if attempt % 10 == 9:
                await asyncio.sleep(0.002 * (attempt % 4))
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                returned += await fetching  # it may have finished first
        await asyncio.sleep(0.3)

        assert all(broker._channels[role] is channel and not channel.is_closed for role, channel in channels.items())
        assert not [r for r in caplog.records if "Closing channel" in r.getMessage()]
        await broker.ack([held, *returned])  # still live: its channel never closed
        rest: list[Delivery] = []
        while batch := await broker.fetch(queue, 100, LEASE, wait_seconds=0.5):
            rest += batch
        assert len(rest) + len(returned) == 49
        await broker.ack(rest)
        assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    finally:
        await broker.close()


@dataclass
class _QuorumRun:
    url: str
    prefix: str
    queues: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)


@pytest.fixture
async def quorum(amqp_broker_url: str) -> AsyncIterator[_QuorumRun]:
    """The session's RabbitMQ with `queue_type=quorum` and a prefix of this test's own (under the
    session's, so the session teardown would drop it too); what it names is deleted after the test."""
    session_prefix = dict(parse_qsl(urlsplit(amqp_broker_url).query))["prefix"]
    prefix = f"{session_prefix}.qq{uuid.uuid4().hex[:6]}"
    run = _QuorumRun(_amqp_url(amqp_broker_url, prefix=prefix, queue_type="quorum"), prefix)
    yield run
    delayed = [f"{prefix}.delay-fifo.{quantize_delay_ms(d)}" for d in run.delays]
    await _drop_amqp_names(amqp_broker_url, [f"{prefix}.q.{q}" for q in run.queues] + delayed, delayed)


async def test_amqp_quorum_queues_on_request_without_priorities(quorum: _QuorumRun, queue: str) -> None:
    quorum.queues.append(queue)
    quorum.delays += [0.3, 0.5]
    broker = AmqpBroker.from_url(quorum.url)
    await broker.connect()
    try:
        published = [OutgoingMessage(f"p{p}", b"x", priority=p) for p in (0, 9, 5)]
        await broker.publish(queue, [*published, OutgoingMessage("later", b"y", delay=0.3)])
        first = await broker.fetch(queue, 10, LEASE, wait_seconds=2)
        # Quorum queues take no x-max-priority: priorities are not promised (FIFO before RabbitMQ 4.0).
        assert sorted(ids(first)) == ["p0", "p5", "p9"]
        [later] = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
        assert later.message_id == "later"

        await broker.nack([later], delay=0.5)
        [again] = await broker.fetch(queue, 10, LEASE, wait_seconds=5)
        assert (again.message_id, again.delivery_count) == ("later", 2)
        await broker.ack([*first, again])
        assert await broker.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    finally:
        await broker.close()

    # It is a quorum queue: declaring it as a classic one is refused...
    connection = await aiormq.connect(_amqp_url(quorum.url).split("?", maxsplit=1)[0])
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match=r"x-queue-type|x-max-priority"):
            await channel.queue_declare(f"{quorum.prefix}.q.{queue}", durable=True, arguments={"x-max-priority": 10})
    finally:
        await connection.close()
    # ...and a classic broker on the same prefix says what to do, with an error that is not transient.
    classic = AmqpBroker.from_url(_amqp_url(quorum.url, queue_type="classic"))
    await classic.connect()
    try:
        with pytest.raises(RuntimeError, match="another prefix") as raised:
            await classic.fetch(queue, 1, LEASE)
        assert not is_transient(raised.value)
    finally:
        await classic.close()


def test_amqp_an_unknown_queue_type_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_type"):
        AmqpBroker.from_url("amqp://guest:guest@127.0.0.1:5672/?queue_type=stream")


# -- SQS only: queues that vanish, an endpoint out of reach, late answers, a racing nack ----

@pytest.fixture
async def sqs(sqs_broker_url: str) -> AsyncIterator[SqsBroker]:
    broker = SqsBroker.from_url(sqs_broker_url)
    await broker.connect()
    yield broker
    await broker.close()


async def _lose_sqs_queues(broker: SqsBroker, queue: str) -> None:
    """Deletes the SQS queues behind `queue`, as a deleted queue, a region failover or a moto
    restart loses them (with what they held)."""
    urls = broker._urls[queue]
    for url in [urls.delay, *urls.bands]:
        await broker._sqs.delete_queue(QueueUrl=url)


async def test_sqs_creates_its_queues_again_when_they_are_gone(sqs: SqsBroker, queue: str) -> None:
    await sqs.publish(queue, messages(3, "old"))
    [held] = await sqs.fetch(queue, 1, LEASE, wait_seconds=2)
    await _lose_sqs_queues(sqs, queue)

    assert await sqs.fetch(queue, 10, LEASE) == []  # the queues are back, empty: what they held is lost
    await sqs.publish(queue, messages(2, "new"))
    fetched = await sqs.fetch(queue, 10, LEASE, wait_seconds=2)
    assert sorted(ids(fetched)) == ["new0", "new1"]
    # The delivery from the lost queue: every call with it is a no-op, none raises.
    await sqs.extend([held], LEASE)
    await sqs.ack([held, *fetched])
    assert await sqs.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)

    await _lose_sqs_queues(sqs, queue)
    await sqs.publish(queue, messages(1, "again", delay=0.5))  # the delay queue comes back too
    [later] = await sqs.fetch(queue, 10, LEASE, wait_seconds=5)
    assert later.message_id == "again0"


async def test_sqs_a_waiting_fetch_survives_the_loss_of_its_queues(
    sqs: SqsBroker, sqs_broker_url: str, queue: str
) -> None:
    assert await sqs.fetch(queue, 10, LEASE) == []
    await _lose_sqs_queues(sqs, queue)
    waiting = asyncio.create_task(sqs.fetch(queue, 10, LEASE, wait_seconds=10))
    await asyncio.sleep(1.5)  # its long polls meet the missing queues
    other = SqsBroker.from_url(sqs_broker_url)
    await other.connect()
    try:
        await other.publish(queue, messages(1))
    finally:
        await other.close()
    assert ids(await asyncio.wait_for(waiting, 10)) == ["m0"]


async def test_sqs_a_band_whose_receive_fails_does_not_strand_what_the_others_took(
    sqs: SqsBroker, queue: str
) -> None:
    await sqs.publish(queue, [OutgoingMessage("high", b"x", priority=9)])
    urls = sqs._urls[queue]
    lowest = urls.bands[-1]
    # A band URL the broker does not own: its receive fails (QueueDoesNotExist, not re-created).
    urls.bands[-1] = lowest.rsplit("/", 1)[0] + "/not-a-conveyor-queue"
    try:
        fetched = await sqs.fetch(queue, 10, LEASE)
    finally:
        urls.bands[-1] = lowest
    # Before: the failure was raised and "high" stayed invisible, leased to nobody, for LEASE.
    assert ids(fetched) == ["high"]
    await sqs.ack(fetched)


async def test_sqs_a_slow_look_at_the_delay_queue_does_not_hold_up_ready_messages(
    sqs: SqsBroker, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await sqs.fetch(queue, 10, LEASE) == []  # the queues exist

    async def slow_forward(queue: str, urls: object) -> None:
        await asyncio.sleep(10)  # a delay-queue receive stuck on an endpoint coming back

    monkeypatch.setattr(sqs, "_forward_due", slow_forward)
    sqs._forwarded_at.clear()
    await sqs.publish(queue, messages(1))
    started = time.monotonic()
    fetched = await asyncio.wait_for(sqs.fetch(queue, 10, LEASE, wait_seconds=5), 15)
    assert ids(fetched) == ["m0"]
    assert time.monotonic() - started < 5  # not after the delay queue's 10 s
    await sqs.ack(fetched)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_sqs_calls_fail_fast_while_the_endpoint_is_unreachable(queue: str) -> None:
    broker = SqsBroker.from_url(f"sqs://?endpoint=http://127.0.0.1:{_closed_port()}&prefix=unreachable")
    await broker.connect()
    try:
        for call in (broker.publish(queue, messages(1)), broker.fetch(queue, 10, LEASE, wait_seconds=5)):
            started = time.monotonic()
            with pytest.raises(Exception) as raised:
                await asyncio.wait_for(call, 10)
            assert is_transient(raised.value), repr(raised.value)
            assert time.monotonic() - started < 3  # one retry after at most a second's backoff
    finally:
        await broker.close()


async def test_sqs_an_endpoint_that_never_answers_fails_the_call(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqs_module, "READ_TIMEOUT", 0.5)
    # A listening socket nobody reads: TCP connects, then no reply ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        broker = SqsBroker.from_url(f"sqs://?endpoint=http://127.0.0.1:{silent.getsockname()[1]}&prefix=silent")
        await broker.connect()
        try:
            started = time.monotonic()
            with pytest.raises(Exception) as raised:
                await asyncio.wait_for(broker.publish(queue, messages(1)), 20)
            assert is_transient(raised.value), repr(raised.value)
            assert time.monotonic() - started < 5
        finally:
            await broker.close()


async def test_sqs_a_message_received_after_its_lease_passed_is_renewed_before_it_is_handed_out(
    sqs: SqsBroker, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow SQS: the answer to the receive comes after the 1 s lease has run out by the
    # broker's clock. Handed out like that, the delivery could not be acked (a stale lease),
    # and SQS would hand it out again while its task runs.
    await sqs.publish(queue, messages(1))
    request = sqs._request

    async def late(method: str, poll: bool, params: dict[str, object]) -> object:
        reply = await request(method, poll, params)
        if method == "receive_message" and reply.get("Messages"):
            await asyncio.sleep(1.2)
        return reply

    monkeypatch.setattr(sqs, "_request", late)
    [delivery] = await sqs.fetch(queue, 10, 1.0, wait_seconds=2)
    monkeypatch.setattr(sqs, "_request", request)

    await sqs.ack([delivery])  # not a no-op: its lease was renewed
    await asyncio.sleep(1.5)
    assert await sqs.fetch(queue, 10, LEASE, wait_seconds=1) == []
    assert await sqs.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)


async def test_sqs_a_nacked_message_goes_to_a_receive_that_races_the_nack(
    sqs: SqsBroker, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's stream dropped: its tasks are nacked while other fetches receive. SQS made the
    # message visible, its answer to the nack is still on the way, and a receive gets the
    # message: that is a redelivery to hand out, not a second copy of a lease held here (which
    # would leave the message invisible, and its task waiting, for a whole lease).
    await sqs.publish(queue, messages(1))
    [delivery] = await sqs.fetch(queue, 10, LEASE, wait_seconds=2)
    request = sqs._request

    async def slow_answer(method: str, poll: bool, params: dict[str, object]) -> object:
        reply = await request(method, poll, params)
        if method == "change_message_visibility_batch":
            await asyncio.sleep(1.5)
        return reply

    monkeypatch.setattr(sqs, "_request", slow_answer)
    nacking = asyncio.create_task(sqs.nack([delivery]))
    await asyncio.sleep(0.5)
    [again] = await sqs.fetch(queue, 10, LEASE, wait_seconds=0.5)
    assert not nacking.done(), "the receive was meant to race the nack"
    await nacking
    assert (again.message_id, again.delivery_count) == (delivery.message_id, 2)


async def test_sqs_ack_does_not_wait_for_sqs_and_stats_see_it_done(
    sqs: SqsBroker, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqs.publish(queue, messages(20))
    fetched = await sqs.fetch(queue, 20, LEASE, wait_seconds=2)
    request = sqs._request

    async def slow_delete(method: str, poll: bool, params: dict[str, object]) -> object:
        if method == "delete_message_batch":
            await asyncio.sleep(1.0)
        return await request(method, poll, params)

    monkeypatch.setattr(sqs, "_request", slow_delete)
    started = time.monotonic()
    await sqs.ack(fetched)
    assert time.monotonic() - started < 0.5
    await sqs.ack(fetched)  # the leases are given up: again is a no-op
    assert await sqs.stats(queue) == QueueStats(ready=0, delayed=0, in_flight=0)
    assert time.monotonic() - started >= 1.0


async def test_sqs_delayed_messages_a_failed_forward_did_not_move_are_visible_again_at_once(
    sqs: SqsBroker, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder receives due delay-queue messages for FORWARD_VISIBILITY (60 s); when sending them on
    fails, they must not stay invisible that long."""
    assert await sqs.fetch(queue, 10, LEASE) == []  # the queues exist
    await sqs.publish(queue, [OutgoingMessage(message_id="d0", body=b"x", delay=1.0)])
    await asyncio.sleep(1.2)  # due
    send = sqs._send
    failures = 0

    async def refused(*args: object) -> None:
        nonlocal failures
        failures += 1
        raise ConnectionError("the band queue refused the send (injected)")

    monkeypatch.setattr(sqs, "_send", refused)
    sqs._forwarded_at.clear()
    await sqs._forward_due_quietly(queue, await sqs._queue_urls(queue))
    assert failures == 1, "the due message was received and its forward failed"
    monkeypatch.setattr(sqs, "_send", send)
    started = time.monotonic()
    fetched = await asyncio.wait_for(sqs.fetch(queue, 10, LEASE, wait_seconds=10), 20)
    assert ids(fetched) == ["d0"]
    assert time.monotonic() - started < 5, "not after the forwarder's visibility"
    await sqs.ack(fetched)
