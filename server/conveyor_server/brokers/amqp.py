"""RabbitMQ broker (aio-pika): durable priority queues, persistent messages, manual ack.

Names (prefix defaults to "conveyor"):
- `<prefix>.q.<queue>`: the queue itself, durable, `x-max-priority` 10.
- `<prefix>.delay.<ms>`: one fanout exchange + TTL queue per delay value. Messages keep the
  target queue's name as routing key, so when the TTL ends RabbitMQ dead-letters them through
  the default exchange straight into their queue. One queue per value because RabbitMQ only
  expires a queue's head: a single queue would hold a 1 s delay behind a 1 h one. Delays are
  rounded *up* to 3 significant digits (so a few hundred queues cover any spread of retry
  jitter, never early); idle delay queues expire by themselves (`x-expires`).

Leases: RabbitMQ keeps an unacked message until its channel closes, so a crashed server's
messages come back on their own. The lease deadline is kept here: recover_expired()
republishes a copy of each expired delivery (with delivery count + 1) and acks the original.

Approximations, inherent to AMQP 0-9-1:
- stats(): `ready` is RabbitMQ's count of ready messages; `in_flight` and `delayed` count
  only this process's leases and delayed publishes (delay queues are shared by all queues).
- queues() lists queues this process has used; AMQP cannot list queues.
- purge() takes and acks the ready messages (reading each one's AMQP message_id, so it can
  return the ids) and, through a purge time kept in this process, drops delayed ones that
  were still delayed at the purge when they reach this process later; other replicas still
  deliver those. The ids it returns for delayed messages are those this process published
  (delay queues cannot be read); delayed messages of other replicas are dropped unlisted.
- delivery_count is exact across nack/recovery (a header); a broker redelivery after a
  connection loss adds 1 however many times it happened.
- RabbitMQ's `consumer_timeout` (default 30 min) closes a channel holding a delivery unacked
  longer than that, whatever our lease says: set it above the longest task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.message import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage

from .base import Delivery, OutgoingMessage, QueueStats

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "conveyor"
MAX_PRIORITY = 10
# How long a fetch keeps collecting after the last arrival: RabbitMQ pushes what is ready
# right after consume-ok, so a short quiet gap means the burst is over.
LINGER_SECONDS = 0.003
# How long a fetch waits for a message it knows was ready (another consumer may have it).
STALL_SECONDS = 0.2
# Per-consumer prefetch is a 16-bit field.
MAX_PREFETCH = 65535
# Delay queues expire when idle this long beyond their TTL; redeclared well within it.
DELAY_IDLE_MS = 600_000
REDECLARE_SECONDS = 60.0
# Longest single TTL hop; longer delays hop again (the due time travels in a header).
MAX_TTL_MS = 2**31 - 1 - DELAY_IDLE_MS
PUBLISH_CONCURRENCY = 1000

H_DELIVERIES = "x-conveyor-deliveries"  # deliveries before this copy was published
H_DUE = "x-conveyor-due"  # wall-clock due time, ms
H_ENQUEUED = "x-conveyor-enqueued"  # wall-clock publish time, ms


def _now_ms() -> int:
    return int(time.time() * 1000)


def quantize_delay_ms(delay: float) -> int:
    """Rounds a delay up to 3 significant digits of milliseconds (1234 -> 1240)."""
    ms = max(1, math.ceil(delay * 1000))
    step = int(10 ** max(0, len(str(ms)) - 3))
    return min(math.ceil(ms / step) * step, MAX_TTL_MS)


@dataclass(slots=True)
class _Lease:
    queue: str
    message: AbstractIncomingMessage
    deadline: float
    delivery_count: int

    @property
    def lost(self) -> bool:
        """The channel closed, so RabbitMQ already requeued the message."""
        return bool(self.message.channel.is_closed)


@dataclass(slots=True)
class _Copy:
    """What to publish: a new message, or a copy of a leased one."""

    message_id: str
    body: bytes
    priority: int
    deliveries: int
    due_ms: int | None = None


class _Inbox:
    """Deliveries of one short-lived consumer."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.received: list[DeliveredMessage] = []
        self.arrived = asyncio.Event()
        self.closed = False

    async def on_message(self, message: DeliveredMessage) -> None:
        if self.closed:
            # Arrived after the fetch gave up: straight back to the queue.
            await _reject(self.channel, message)
            return
        self.received.append(message)
        self.arrived.set()

    async def collect(self, max_messages: int, expected: int, wait_seconds: float, linger: float) -> None:
        """Waits up to `wait_seconds` for the first message, then for the `expected` ones
        (ready when the fetch began; another consumer may take some, hence a stall limit),
        then until a `linger` gap."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_seconds, 0.0)
        while len(self.received) < max_messages:
            self.arrived.clear()
            if not self.received:
                timeout = max(deadline - loop.time(), STALL_SECONDS if expected else linger)
            elif len(self.received) < expected:
                timeout = STALL_SECONDS
            else:
                timeout = linger
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except TimeoutError:
                return

    async def give_back(self) -> None:
        self.closed = True
        received, self.received = self.received, []
        for message in received:
            await _reject(self.channel, message)


async def _reject(channel: AbstractChannel, message: DeliveredMessage) -> None:
    tag = getattr(message.delivery, "delivery_tag", None)
    if tag is not None:
        with contextlib.suppress(Exception):
            await channel.basic_reject(tag, requeue=True)


class AmqpBroker:
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, linger: float = LINGER_SECONDS) -> None:
        self._url = url
        self._prefix = prefix
        self._linger = linger
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._consumer: AbstractRobustChannel | None = None
        # basic.qos applies to the next basic.consume on the channel: keep the pair together.
        self._consume_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._delay_declared: dict[int, tuple[float, AbstractExchange]] = {}
        self._leases: dict[str, _Lease] = {}
        # queue -> (wall-clock due ms, message id) of delayed publishes made here (stats, purge).
        self._delayed: dict[str, list[tuple[int, str]]] = {}
        self._delayed_prune_at: dict[str, int] = {}
        self._purged_at: dict[str, int] = {}
        self._known: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """`amqp://user:pass@host:port/vhost?prefix=NAME&linger_ms=3`; other options go to aio-pika."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = dict(query)
        rest = [(key, value) for key, value in query if key not in {"prefix", "linger_ms"}]
        linger = float(options.get("linger_ms", LINGER_SECONDS * 1000)) / 1000
        return cls(urlunsplit(parts._replace(query=urlencode(rest))),
                   prefix=options.get("prefix") or DEFAULT_PREFIX, linger=linger)

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url)
        publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        consumer = await self._connection.channel(publisher_confirms=False)
        assert isinstance(publisher, AbstractRobustChannel)
        assert isinstance(consumer, AbstractRobustChannel)
        self._publisher, self._consumer = publisher, consumer

    async def close(self) -> None:
        # Closing the connection hands unacked messages back to RabbitMQ.
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._publisher = self._consumer = None
        self._leases.clear()
        self._declared.clear()
        self._delay_declared.clear()

    def _channels(self) -> tuple[AbstractRobustChannel, AbstractRobustChannel]:
        if self._publisher is None or self._consumer is None:
            raise RuntimeError("AmqpBroker is not connected; call connect() first")
        return self._publisher, self._consumer

    # -- naming and declarations -------------------------------------------------------------

    def _name(self, queue: str) -> str:
        return f"{self._prefix}.q.{queue}"

    async def _declare(self, queue: str, *, force: bool = False) -> int:
        """Declares the queue (idempotent); returns its ready count when `force` re-declared it."""
        self._known.add(queue)
        if queue in self._declared and not force:
            return 0
        publisher, _ = self._channels()
        declared = await publisher.declare_queue(
            self._name(queue), durable=True, arguments={"x-max-priority": MAX_PRIORITY}, robust=False
        )
        self._declared.add(queue)
        return int(declared.declaration_result.message_count or 0)

    async def _delay_exchange(self, delay_ms: int) -> AbstractExchange:
        now = asyncio.get_running_loop().time()
        cached = self._delay_declared.get(delay_ms)
        # Redeclaring resets the idle timer of x-expires, so the queue outlives its messages.
        if cached is not None and now - cached[0] < REDECLARE_SECONDS:
            return cached[1]
        publisher, _ = self._channels()
        name = f"{self._prefix}.delay.{delay_ms}"
        exchange = await publisher.declare_exchange(
            name, aio_pika.ExchangeType.FANOUT, durable=True, robust=False
        )
        holding = await publisher.declare_queue(
            name, durable=True, robust=False,
            arguments={
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": "",
                "x-expires": delay_ms + DELAY_IDLE_MS,
                "x-max-priority": MAX_PRIORITY,
            },
        )
        await holding.bind(exchange, robust=False)
        self._delay_declared[delay_ms] = (now, exchange)
        return exchange

    # -- publishing --------------------------------------------------------------------------

    async def _send(self, queue: str, copies: Sequence[_Copy]) -> None:
        """Publishes copies (due now or later) and waits for every broker confirm."""
        await self._declare(queue)
        publisher, _ = self._channels()
        target = self._name(queue)
        now_ms = _now_ms()
        sends: list[tuple[AbstractExchange, aio_pika.Message]] = []
        for copy in copies:
            headers: dict[str, Any] = {H_DELIVERIES: copy.deliveries, H_ENQUEUED: now_ms}
            exchange = publisher.default_exchange
            if copy.due_ms is not None and copy.due_ms > now_ms:
                headers[H_DUE] = copy.due_ms
                exchange = await self._delay_exchange(quantize_delay_ms((copy.due_ms - now_ms) / 1000))
                self._track_delayed(queue, copy.message_id, copy.due_ms)
            message = aio_pika.Message(
                copy.body,
                headers=headers,
                message_id=copy.message_id,
                priority=min(max(copy.priority, 0), 9),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            # The routing key is always the target queue: delay queues dead-letter by it.
            sends.append((exchange, message))
        for start in range(0, len(sends), PUBLISH_CONCURRENCY):
            await asyncio.gather(*(
                exchange.publish(message, routing_key=target, mandatory=True)
                for exchange, message in sends[start:start + PUBLISH_CONCURRENCY]
            ))

    def _track_delayed(self, queue: str, message_id: str, due_ms: int) -> None:
        pending = self._delayed.setdefault(queue, [])
        if len(pending) >= self._delayed_prune_at.get(queue, 1024):
            now_ms = _now_ms()
            pending[:] = [item for item in pending if item[0] > now_ms]
            self._delayed_prune_at[queue] = max(1024, 2 * len(pending))
        pending.append((due_ms, message_id))

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        await self._declare(queue)
        now_ms = _now_ms()  # after declaring, so the declaration eats none of the delay
        copies = [
            _Copy(message.message_id, message.body, message.priority, 0,
                  now_ms + max(1, round(message.delay * 1000)) if message.delay > 0 else None)
            for message in messages
        ]
        try:
            await self._send(queue, copies)
        except aio_pika.exceptions.DeliveryError:
            # Unroutable: the queue was deleted behind our back. Declare again and retry once.
            self._declared.discard(queue)
            await self._send(queue, copies)

    # -- fetching ----------------------------------------------------------------------------

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []
        max_messages = min(max_messages, MAX_PREFETCH)
        # Knowing how many are ready lets the fetch wait for all of them, not guess a gap.
        ready = await self._declare(queue, force=True)
        received = await self._receive(queue, max_messages, min(ready, max_messages), wait_seconds)
        return await self._lease(queue, received, lease_seconds)

    async def _receive(
        self, queue: str, max_messages: int, expected: int, wait_seconds: float
    ) -> list[DeliveredMessage]:
        """Consumes with prefetch = max_messages, so RabbitMQ sends no more than we take."""
        _, consumer = self._channels()
        channel = await consumer.get_underlay_channel()
        inbox = _Inbox(channel)
        async with self._consume_lock:
            await channel.basic_qos(prefetch_count=max_messages)
            consume_ok = await channel.basic_consume(self._name(queue), inbox.on_message, no_ack=False)
        tag = consume_ok.consumer_tag
        assert tag is not None
        try:
            await inbox.collect(max_messages, expected, wait_seconds, self._linger)
            await asyncio.shield(channel.basic_cancel(tag))
            # Deliveries read before cancel-ok have their callback tasks scheduled first.
            await asyncio.sleep(0)
        except BaseException:
            # Cancelled or channel gone: hand back everything this call will never return.
            await inbox.give_back()
            raise
        inbox.closed = True  # a straggler now goes back to the queue, not into a lost list
        return inbox.received

    async def _lease(
        self, queue: str, received: list[DeliveredMessage], lease_seconds: float
    ) -> list[Delivery]:
        deadline = asyncio.get_running_loop().time() + lease_seconds
        now_ms = _now_ms()
        deliveries: list[Delivery] = []
        early: list[tuple[IncomingMessage, _Copy]] = []
        for raw in received:
            message = IncomingMessage(raw, no_ack=False)
            headers = message.headers or {}
            due = _int(headers.get(H_DUE))
            purged_at = self._purged_at.get(queue, -1)
            if due is not None and (_int(headers.get(H_ENQUEUED)) or 0) < purged_at < due:
                # Was still delayed when the queue was purged here: drop it.
                with contextlib.suppress(Exception):
                    await message.ack()
                continue
            previous = _int(headers.get(H_DELIVERIES)) or 0
            message_id = message.message_id or ""
            if due is not None and due > now_ms:
                # A long delay's intermediate hop (or clock skew): send it round again.
                early.append((message, _Copy(message_id, message.body, message.priority or 0, previous, due)))
                continue
            count = previous + 1 + (1 if message.redelivered else 0)
            receipt = uuid.uuid4().hex
            self._leases[receipt] = _Lease(queue, message, deadline, count)
            deliveries.append(Delivery(message_id, message.body, queue, receipt, count, handle=message))
        if early:
            await self._send(queue, [copy for _, copy in early])
            for message, _ in early:
                with contextlib.suppress(Exception):
                    await message.ack()
        return deliveries

    # -- settling ----------------------------------------------------------------------------

    def _take(self, deliveries: Sequence[Delivery]) -> list[_Lease]:
        """Removes and returns the live leases among `deliveries` (stale ones are ignored)."""
        taken = []
        for delivery in deliveries:
            lease = self._leases.pop(delivery.receipt, None)
            if lease is not None and not lease.lost:
                taken.append(lease)
        return taken

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for lease in self._take(deliveries):
            with contextlib.suppress(Exception):  # channel gone: RabbitMQ redelivers; nothing to do
                await lease.message.ack()

    async def _requeue(self, leases: Sequence[_Lease], delay: float) -> None:
        """Publishes a copy of each lease (count + 1) and acks the original once confirmed."""
        due_ms = _now_ms() + max(1, round(delay * 1000)) if delay > 0 else None
        by_queue: dict[str, list[_Lease]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue, []).append(lease)
        for queue, group in by_queue.items():
            copies = [
                _Copy(lease.message.message_id or "", lease.message.body, lease.message.priority or 0,
                      lease.delivery_count, due_ms)
                for lease in group
            ]
            try:
                await self._send(queue, copies)
            except BaseException:
                # Could not republish: let RabbitMQ requeue the originals instead.
                for lease in group:
                    with contextlib.suppress(Exception):
                        await lease.message.reject(requeue=True)
                raise
            for lease in group:
                with contextlib.suppress(Exception):
                    await lease.message.ack()

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        await self._requeue(self._take(deliveries), delay)

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + lease_seconds
        for delivery in deliveries:
            lease = self._leases.get(delivery.receipt)
            if lease is not None:
                lease.deadline = deadline

    async def recover_expired(self) -> int:
        now = asyncio.get_running_loop().time()
        expired = [receipt for receipt, lease in self._leases.items() if lease.deadline <= now]
        leases = [self._leases.pop(receipt) for receipt in expired]
        live = [lease for lease in leases if not lease.lost]
        await self._requeue(live, 0.0)
        return len(live)

    # -- inspection --------------------------------------------------------------------------

    def _pending_delayed(self, queue: str) -> list[str]:
        """Ids of the delayed publishes made here that are not due yet."""
        now_ms = _now_ms()
        return [message_id for due_ms, message_id in self._delayed.get(queue, []) if due_ms > now_ms]

    async def stats(self, queue: str) -> QueueStats:
        ready = await self._declare(queue, force=True)
        in_flight = sum(1 for lease in self._leases.values() if lease.queue == queue and not lease.lost)
        return QueueStats(ready=ready, delayed=len(self._pending_delayed(queue)), in_flight=in_flight)

    async def queues(self) -> list[str]:
        return sorted(self._known)

    async def purge(self, queue: str) -> list[str]:
        # The purge time first: a delayed message still delayed now is dropped when it arrives.
        self._purged_at[queue] = _now_ms()
        delayed = self._pending_delayed(queue)
        self._delayed.pop(queue, None)
        ready = await self._take_ready(queue)
        return list(dict.fromkeys(ready + [message_id for message_id in delayed if message_id]))

    async def _take_ready(self, queue: str) -> list[str]:
        """Consumes and acks the messages ready when it starts; returns their message ids.

        queue.purge() would only count them. Messages published meanwhile may be taken too;
        the loop stops after as many as were ready, so steady publishing cannot keep it going.
        """
        left = await self._declare(queue, force=True)
        taken: list[str] = []
        while left > 0:
            want = min(left, MAX_PREFETCH)
            received = await self._receive(queue, want, want, 0.0)
            if not received:
                break  # other consumers took the rest
            for raw in received:
                message = IncomingMessage(raw, no_ack=False)
                if message.message_id:
                    taken.append(message.message_id)
                with contextlib.suppress(Exception):  # channel gone: RabbitMQ keeps it; a later purge gets it
                    await message.ack()
            left -= len(received)
        return taken


def _int(value: object) -> int | None:
    """A header value as int (AMQP tables may carry it as another numeric type)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return int(value)
    return None
