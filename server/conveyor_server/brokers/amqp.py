"""RabbitMQ broker (aiormq, the protocol layer of aio-pika): durable queues, persistent
messages, publisher confirms, manual ack.

Names (prefix defaults to "conveyor"):
- `<prefix>.q.<queue>`: the queue itself, durable; classic with `x-max-priority` 10, or
  quorum (see "Quorum queues").
- `<prefix>.delay-fifo.<ms>`: one fanout exchange + TTL queue per delay value. Messages keep the
  target queue's name as routing key, so when the TTL ends RabbitMQ dead-letters them through
  the default exchange straight into their queue. One queue per value because RabbitMQ only
  expires a queue's head: a single queue would hold a 1 s delay behind a 1 h one. For the same
  reason delay queues are plain FIFO queues, never priority queues: a priority queue's head is
  its highest priority, so a priority-0 message would wait there behind priority-9 ones
  published after it (their priority still orders them once they reach their task queue).
  The name changed when the priority argument was dropped (`<prefix>.delay.<ms>` before), since
  a queue's arguments cannot change. Delays are rounded *up* to 3 significant digits (so a few
  hundred queues cover any spread of retry jitter, never early); idle delay queues expire by
  themselves (`x-expires`).

Leases: RabbitMQ keeps an unacked message until its channel closes, so a crashed server's
messages come back on their own. The lease deadline is kept here: recover_expired()
republishes a copy of each expired delivery (with delivery count + 1) and acks the original.
A delivery whose channel closed is lost: RabbitMQ has already put it back, so ack, nack and
extend on it are no-ops and no helper ever raises for it.

Publishing waits for RabbitMQ's confirm of every message (the publisher channel is in
confirm mode, messages are persistent and mandatory): publish() returning means RabbitMQ
has them. A message RabbitMQ nacks fails the call with a transient error, and so does a
publisher channel that confirms nothing for PUBLISH_STALL_SECONDS (a blocked connection, a
stalled link); a slow confirm under load is waited for.

Connection loss: one connection, three channels (publisher, consumer, declarer: a declare
RabbitMQ refuses closes only the declarer). When the connection drops, every lease on it is
lost and a background task reconnects with jittered exponential backoff: the first attempt
after ~0.1 s, doubling up to RECONNECT_MAX_SECONDS (each wait drawn between half and all of
its ceiling). An attempt refused at TCP level (nothing listens: the node is restarting)
costs RabbitMQ nothing, so those are retried at most REFUSED_RETRY_SECONDS apart and the
broker is back within a fraction of a second of its port. A new connection re-declares the
queues this process used, then resumes; delay queues are declared again on first use.
Meanwhile every call fails at once with ConnectionError (naming the last failure), which
engine_errors.is_transient() recognises, so clients see UNAVAILABLE. The connection's
heartbeat defaults to HEARTBEAT_SECONDS (`?heartbeat=N` overrides it), so a silent link is
found dead within a few heartbeats, and every request has a time limit (RPC_TIMEOUT_SECONDS;
publishing: PUBLISH_STALL_SECONDS without progress).
A request whose caller is cancelled runs to its end in the background: aiormq closes a
channel whose request is cancelled midway, which would end the other fetches and every
lease on that channel.

Quorum queues (`?queue_type=quorum`): task and delay queues are declared with
`x-queue-type: quorum` (replicated, at-least-once dead-lettering from the delay queues). What
the option gives up, by RabbitMQ's rules:
- Priorities: quorum queues refuse `x-max-priority`. Before RabbitMQ 4.0 they ignore message
  priority (FIFO); from 4.0 they know two levels, 0-4 normal and 5-9 high, high served about
  twice as often as normal rather than strictly first.
- Returns count: a message put back by RabbitMQ (a fetch given up, a lost connection) adds to
  the queue's delivery count; on RabbitMQ 4.0+ quorum queues drop a message after 20 such
  returns by default (raise `delivery-limit` by policy). Copies made by nack() and
  recover_expired() start from zero.
- A queue keeps the type it was created with: switching an existing prefix fails with
  PRECONDITION_FAILED. Use a new prefix (and drain the old queues) to switch.

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
- A publish that failed (a lost connection, a stalled link) may still have reached RabbitMQ:
  publishing again makes a second copy, which dispatch drops (at-least-once delivery).
- RabbitMQ's `consumer_timeout` (default 30 min) closes a channel holding a delivery unacked
  longer than that, whatever our lease says: set it above the longest task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed, DeliveryError
from pamqp.commands import Basic

from ..background import stop_tasks
from ..engine_errors import is_transient
from ..engine_urls import DEFAULT_PREFIX, EngineUrl
from ._delayed import PublishedDelays
from .base import Delivery, OutgoingMessage, QueueStats

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PRIORITY = 10
QUEUE_TYPES = ("classic", "quorum")
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

# Reconnecting: the first wait, its cap, and the cap while nothing listens on the port.
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
REFUSED_RETRY_SECONDS = 0.25
# One attempt (TCP, TLS, AMQP handshake, opening the channels) may take this long.
CONNECT_TIMEOUT_SECONDS = 5.0
# A declare, qos, consume, cancel or channel open.
RPC_TIMEOUT_SECONDS = 10.0
# Publishing fails when the publisher channel confirms nothing for this long.
PUBLISH_STALL_SECONDS = 10.0
# Unless the URL says otherwise: aiormq declares a peer dead after ~3 silent heartbeats.
HEARTBEAT_SECONDS = 10

PUBLISHER, CONSUMER, DECLARER = "publisher", "consumer", "declarer"

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


def reconnect_delay(failures: int, refused: bool, draw: Callable[[], float] = random.random) -> float:
    """Seconds before the next connection attempt after `failures` failed ones in a row:
    between half and all of min(cap, first * 2**failures); the cap is short when the last
    attempt was refused at TCP level."""
    cap = REFUSED_RETRY_SECONDS if refused else RECONNECT_MAX_SECONDS
    ceiling = min(cap, RECONNECT_FIRST_SECONDS * 2.0 ** min(failures, 32))
    return ceiling / 2 + draw() * ceiling / 2


def _refused(exc: BaseException) -> bool:
    """Whether a connection attempt failed because nothing listened on the port."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _QuietConnectionLoss(logging.Filter):
    """aiormq logs each failed connection attempt (at ERROR) and each lost connection (with a
    traceback); this broker logs one line for each loss and a summary of its attempts instead."""

    DROPPED = ("error when creating transport", "Cancelling cause reader exited abnormally")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.DROPPED)


logging.getLogger("aiormq.connection").addFilter(_QuietConnectionLoss())


@dataclass(slots=True)
class _Lease:
    queue: str
    channel: AbstractChannel
    message: DeliveredMessage
    deadline: float
    delivery_count: int

    @property
    def lost(self) -> bool:
        """The channel closed, so RabbitMQ already requeued the message. Never raises."""
        return bool(self.channel.is_closed)

    @property
    def tag(self) -> int:
        return int(self.message.delivery_tag or 0)


@dataclass(slots=True)
class _Copy:
    """What to publish: a new message, or a copy of a leased one."""

    message_id: str
    body: bytes
    priority: int
    deliveries: int
    due_ms: int | None = None


class _Unroutable(Exception):
    """RabbitMQ returned a mandatory message: its queue (or delay queue) does not exist."""


def _properties(message: DeliveredMessage) -> Basic.Properties:
    return message.header.properties


def _headers(message: DeliveredMessage) -> dict[str, Any]:
    return dict(_properties(message).headers or {})


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
            if self.channel.is_closed:
                return  # the caller finds the channel closed and fails
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
    tag = message.delivery_tag
    if tag is not None and not channel.is_closed:
        with contextlib.suppress(Exception):  # channel gone: RabbitMQ requeued it already
            await asyncio.wait_for(channel.basic_reject(tag, requeue=True), RPC_TIMEOUT_SECONDS)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a background request's failure as seen (its caller may have left)."""
    if not future.cancelled():
        future.exception()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AmqpBroker:
    def __init__(
        self, url: str, prefix: str = DEFAULT_PREFIX, linger: float = LINGER_SECONDS, queue_type: str = "classic"
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {', '.join(QUEUE_TYPES)}, not {queue_type!r}")
        self._url = url
        parts = urlsplit(url)
        # For messages: never the URL itself, which may hold a password.
        self._where = f"{parts.hostname or 'localhost'}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
        self._prefix = prefix
        self._linger = linger
        self._queue_type = queue_type
        self._connection: AbstractConnection | None = None
        self._channels: dict[str, AbstractChannel] = {}
        self._channel_lock = asyncio.Lock()
        self._opened = False  # connect() succeeded and close() was not called since
        self._reconnector: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._last_error: BaseException | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._confirmed_at = 0.0  # loop time a publish last ended
        # basic.qos applies to the next basic.consume on the channel: keep the pair together.
        self._consume_lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._delay_declared: dict[int, float] = {}
        self._leases: dict[str, _Lease] = {}
        # queue -> (wall-clock due ms, message id) of delayed publishes made here (stats, purge).
        self._delayed = PublishedDelays()
        self._purged_at: dict[str, int] = {}
        self._known: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """`amqp://user:pass@host:port/vhost?prefix=NAME&linger_ms=3&queue_type=classic|quorum`;
        other options (heartbeat, TLS files, ...) go to aiormq."""
        options = EngineUrl(url)
        heartbeat = [] if "heartbeat" in options.given() else [("heartbeat", str(HEARTBEAT_SECONDS))]
        return cls(options.without({"prefix", "linger_ms", "queue_type"}, heartbeat),
                   prefix=options.prefix, linger=options.number("linger_ms", LINGER_SECONDS * 1000) / 1000,
                   queue_type=options.text("queue_type", "classic"))

    def portable_receipts(self) -> bool:
        """A delivery tag belongs to the channel that received it."""
        return False

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Opens the connection; fails (without retrying) when RabbitMQ cannot be reached."""
        await self._open()
        self._opened = True

    async def close(self) -> None:
        # Closing the connection hands unacked messages back to RabbitMQ.
        self._opened = False
        reconnector, self._reconnector = self._reconnector, None
        await stop_tasks(reconnector)
        connection, self._connection = self._connection, None
        self._channels.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), RPC_TIMEOUT_SECONDS)
        await stop_tasks(*self._background)
        self._leases.clear()
        self._declared.clear()
        self._delay_declared.clear()

    async def _open(self) -> None:
        """One connection attempt: connect, open the channels, re-declare the known queues."""
        context = aiormq.connect(self._url)
        try:
            connection: AbstractConnection = await asyncio.wait_for(context, CONNECT_TIMEOUT_SECONDS)
            channels: dict[str, AbstractChannel] = {}
            for role in (PUBLISHER, CONSUMER, DECLARER):
                channels[role] = await asyncio.wait_for(
                    connection.channel(publisher_confirms=role == PUBLISHER), CONNECT_TIMEOUT_SECONDS
                )
            declared = await self._redeclare(channels[DECLARER])
            if channels[DECLARER].is_closed:  # a refused declare closed it
                channels[DECLARER] = await asyncio.wait_for(
                    connection.channel(publisher_confirms=False), CONNECT_TIMEOUT_SECONDS
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.connection.close(), RPC_TIMEOUT_SECONDS)
            raise
        self._connection, self._channels = connection, channels
        self._declared = declared
        self._delay_declared.clear()
        connection.closing.add_done_callback(lambda _: self._on_closed(connection))

    async def _redeclare(self, declarer: AbstractChannel) -> set[str]:
        """Declares the queues this process used again (a new node may not have them);
        returns those declared. A refusal stops it: the rest are declared on first use."""
        declared: set[str] = set()
        for queue in sorted(self._known):
            name = self._name(queue)
            try:
                await asyncio.wait_for(
                    declarer.queue_declare(name, durable=True, arguments=self._queue_arguments()),
                    RPC_TIMEOUT_SECONDS,
                )
            except Exception as exc:
                if declarer.is_closed and not is_transient(exc):
                    log.warning("re-declaring queue %s failed (%s: %s); it is declared on next use",
                                name, type(exc).__name__, exc)
                    break
                raise
            declared.add(queue)
        return declared

    def _on_closed(self, connection: AbstractConnection) -> None:
        """The connection closed: its leases are lost; reconnect unless close() was called."""
        if connection is not self._connection or not self._opened:
            return
        reason: BaseException | None = None
        closing = connection.closing  # done by now: the closing future itself
        if closing.done() and not closing.cancelled():
            reason = closing.exception()
        self._connection = None
        self._channels = {}
        self._leases.clear()  # RabbitMQ requeued every message this connection held
        self._down_since = time.monotonic()
        self._last_error = reason or ConnectionError("the connection closed")
        log.warning("lost the connection to RabbitMQ at %s (%s); reconnecting", self._where, self._describe_error())
        self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        failures, refused = 0, False
        while self._opened:
            await asyncio.sleep(reconnect_delay(failures, refused))
            try:
                await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                refused = _refused(exc)
                self._last_error = exc
                if failures == 1 or failures % 20 == 0:
                    log.warning("reconnecting to RabbitMQ at %s: attempt %d failed (%s)",
                                self._where, failures, self._describe_error())
                continue
            log.warning("reconnected to RabbitMQ at %s after %.1f s (%d failed attempts)",
                        self._where, time.monotonic() - self._down_since, failures)
            return

    def _describe_error(self) -> str:
        error = self._last_error
        if error is None:
            return "no error"
        text = " ".join(str(error).split()) or repr(error)
        return f"{type(error).__name__}: {text}"

    def _live(self) -> AbstractConnection:
        """The open connection; fails at once while there is none."""
        connection = self._connection
        if connection is not None and not connection.is_closed:
            return connection
        if not self._opened:
            raise RuntimeError("AmqpBroker is not connected; call connect() first")
        if connection is not None:  # closed, and its callback has not run yet
            self._on_closed(connection)
        down = time.monotonic() - self._down_since
        raise ConnectionError(
            f"RabbitMQ at {self._where} is unreachable for {down:.1f} s ({self._describe_error()}); reconnecting"
        )

    async def _channel(self, role: str) -> AbstractChannel:
        """The channel for `role`, opened again if RabbitMQ closed it (the connection lives on)."""
        connection = self._live()
        channel = self._channels.get(role)
        if channel is not None and not channel.is_closed:
            return channel
        async with self._channel_lock:
            connection = self._live()
            channel = self._channels.get(role)
            if channel is None or channel.is_closed:
                channel = await self._rpc(connection.channel(publisher_confirms=role == PUBLISHER),
                                          f"opening the {role} channel")
                self._channels[role] = channel
        return channel

    async def _rpc(self, call: Awaitable[T], what: str, seconds: float = RPC_TIMEOUT_SECONDS) -> T:
        """Awaits one request to RabbitMQ, which runs to its end even if the caller is
        cancelled or stops waiting (see the module docstring). A request ended by a lost
        connection raises ConnectionError, never CancelledError; a slow one TimeoutError."""
        connection = self._connection
        task = asyncio.ensure_future(call)
        task.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(task), seconds)
        except asyncio.CancelledError:
            if task.cancelled() and not _cancelling():
                raise ConnectionError(f"RabbitMQ at {self._where}: the channel closed during {what}") from None
            raise
        except TimeoutError as exc:
            raise TimeoutError(f"RabbitMQ at {self._where} did not answer {what} within {seconds:g} s") from exc
        except Exception as exc:
            if not is_transient(exc) and (connection is None or connection.is_closed):
                raise ConnectionError(f"RabbitMQ at {self._where}: the connection closed during {what}") from exc
            raise

    def _spawn(self, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_retrieve)
        return task

    # -- naming and declarations -------------------------------------------------------------

    def _name(self, queue: str) -> str:
        return f"{self._prefix}.q.{queue}"

    def _queue_arguments(self) -> dict[str, Any]:
        if self._queue_type == "quorum":
            return {"x-queue-type": "quorum"}
        return {"x-max-priority": MAX_PRIORITY}

    def _delay_arguments(self, delay_ms: int) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-expires": delay_ms + DELAY_IDLE_MS,
        }
        if self._queue_type == "quorum":
            # at-least-once dead-lettering needs reject-publish overflow; no length limit is set.
            arguments |= {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                          "x-overflow": "reject-publish"}
        return arguments

    async def _declare_queue(self, name: str, arguments: dict[str, Any]) -> int:
        """Declares one durable queue on the declarer channel; returns its ready count."""
        declarer = await self._channel(DECLARER)
        try:
            declared = await self._rpc(
                declarer.queue_declare(name, durable=True, arguments=arguments), f"declaring queue {name}"
            )
        except ChannelPreconditionFailed as exc:
            raise RuntimeError(
                f"RabbitMQ refused queue {name} with arguments {arguments}: {exc}. A queue keeps the type and "
                "arguments it was created with; use another prefix to change queue_type"
            ) from exc
        return int(declared.message_count or 0)

    async def _declare(self, queue: str, *, force: bool = False) -> int:
        """Declares the queue (idempotent); returns its ready count when `force` re-declared it."""
        self._known.add(queue)
        if queue in self._declared and not force:
            return 0
        ready = await self._declare_queue(self._name(queue), self._queue_arguments())
        self._declared.add(queue)
        return ready

    async def _delay_exchange(self, delay_ms: int) -> str:
        name = f"{self._prefix}.delay-fifo.{delay_ms}"
        now = asyncio.get_running_loop().time()
        declared = self._delay_declared.get(delay_ms)
        # Redeclaring resets the idle timer of x-expires, so the queue outlives its messages.
        if declared is not None and now - declared < REDECLARE_SECONDS:
            return name
        declarer = await self._channel(DECLARER)
        await self._rpc(declarer.exchange_declare(name, exchange_type="fanout", durable=True),
                        f"declaring exchange {name}")
        await self._declare_queue(name, self._delay_arguments(delay_ms))
        await self._rpc(declarer.queue_bind(name, name, routing_key=""), f"binding queue {name}")
        self._delay_declared[delay_ms] = now
        return name

    # -- publishing --------------------------------------------------------------------------

    async def _send(self, queue: str, copies: Sequence[_Copy]) -> None:
        """Publishes copies (due now or later) and waits for every broker confirm."""
        await self._declare(queue)
        target = self._name(queue)
        now_ms = _now_ms()
        sends: list[tuple[str, bytes, Basic.Properties]] = []
        for copy in copies:
            headers: dict[str, Any] = {H_DELIVERIES: copy.deliveries, H_ENQUEUED: now_ms}
            exchange = ""
            if copy.due_ms is not None and copy.due_ms > now_ms:
                headers[H_DUE] = copy.due_ms
                exchange = await self._delay_exchange(quantize_delay_ms((copy.due_ms - now_ms) / 1000))
                self._delayed.track(queue, copy.message_id, copy.due_ms)
            properties = Basic.Properties(
                headers=headers, message_id=copy.message_id, priority=min(max(copy.priority, 0), 9),
                delivery_mode=2,  # persistent
            )
            sends.append((exchange, copy.body, properties))
        publisher = await self._channel(PUBLISHER)
        for start in range(0, len(sends), PUBLISH_CONCURRENCY):
            # Each publish is a task of its own: a caller that is cancelled or gives up leaves
            # them to finish. The routing key is always the target queue: delay queues
            # dead-letter by it.
            publishes = [
                asyncio.ensure_future(publisher.basic_publish(
                    body, exchange=exchange, routing_key=target, properties=properties, mandatory=True
                ))
                for exchange, body, properties in sends[start:start + PUBLISH_CONCURRENCY]
            ]
            for publishing in publishes:
                publishing.add_done_callback(self._confirmed)
            self._check_confirms(target, await self._confirms(publishes, target))

    def _confirmed(self, publishing: asyncio.Future[Any]) -> None:
        """A publish ended (confirmed or not): the publisher channel is making progress."""
        _retrieve(publishing)
        self._confirmed_at = asyncio.get_running_loop().time()

    async def _confirms(self, publishes: Sequence[asyncio.Future[Any]], target: str) -> list[object]:
        """The outcome of each publish, once all have one. Under load a confirm may take long,
        so the limit is on progress: TimeoutError when the publisher channel has ended no
        publish for PUBLISH_STALL_SECONDS (a blocked connection, a stalled link)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        waiting: set[asyncio.Future[Any]] = set(publishes)
        while waiting:
            _, waiting = await asyncio.wait(waiting, timeout=PUBLISH_STALL_SECONDS)
            if waiting and loop.time() - max(began, self._confirmed_at) >= PUBLISH_STALL_SECONDS:
                raise TimeoutError(
                    f"RabbitMQ at {self._where} confirmed nothing for {PUBLISH_STALL_SECONDS:g} s; "
                    f"{len(waiting)} of {len(publishes)} messages for {target} unconfirmed"
                )
        return [
            asyncio.CancelledError() if publishing.cancelled() else publishing.exception() or publishing.result()
            for publishing in publishes
        ]

    def _check_confirms(self, target: str, results: Sequence[object]) -> None:
        """Raises unless RabbitMQ acked every message."""
        returned = 0
        for result in results:
            if isinstance(result, Basic.Ack):
                continue
            if isinstance(result, DeliveredMessage):
                returned += 1
            elif isinstance(result, DeliveryError):
                raise ConnectionError(f"RabbitMQ nacked a message for {target}: it could not take it now") from result
            elif isinstance(result, asyncio.CancelledError):
                raise ConnectionError(f"RabbitMQ at {self._where}: the channel closed while publishing") from result
            elif isinstance(result, BaseException):
                raise result
            else:
                raise ConnectionError(f"RabbitMQ did not confirm a message for {target} ({result!r})")
        if returned:
            raise _Unroutable(f"RabbitMQ returned {returned} messages for {target} as unroutable")

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
        except (_Unroutable, ChannelNotFoundEntity):
            # The queue, a delay queue or its exchange was deleted behind our back (or this is
            # a new node). Declare again and retry once; a duplicate is fine (at-least-once).
            self._declared.discard(queue)
            self._delay_declared.clear()
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
        channel, received = await self._receive(queue, max_messages, min(ready, max_messages), wait_seconds)
        # Leasing may publish (a long delay's next hop): it finishes even if the caller leaves,
        # and then hands back what nobody will get.
        leasing = self._spawn(self._lease(queue, channel, received, lease_seconds))
        try:
            return await asyncio.shield(leasing)
        except asyncio.CancelledError:
            leasing.add_done_callback(self._abandon)
            raise

    def _abandon(self, leasing: asyncio.Task[list[Delivery]]) -> None:
        """Returns the deliveries of a fetch whose caller was cancelled to their queue."""
        if not leasing.cancelled() and leasing.exception() is None:
            self._spawn(self._reject_all(self._take(leasing.result())))

    async def _receive(
        self, queue: str, max_messages: int, expected: int, wait_seconds: float
    ) -> tuple[AbstractChannel, list[DeliveredMessage]]:
        """Consumes with prefetch = max_messages, so RabbitMQ sends no more than we take.

        The consumer is started and cancelled by requests that run to their end whatever
        happens to the caller; a fetch cancelled or failed midway hands back what it got."""
        channel = await self._channel(CONSUMER)
        inbox = _Inbox(channel)
        tag = f"conveyor.{uuid.uuid4().hex}"
        started = asyncio.ensure_future(self._start_consumer(channel, queue, max_messages, inbox, tag))
        stopped: asyncio.Future[None] | None = None
        closing = channel.closing  # an observer: cancelled below, so it does not pile up
        closing.add_done_callback(lambda _: inbox.arrived.set())
        try:
            await self._rpc(started, f"consuming from {self._name(queue)}")
            await inbox.collect(max_messages, expected, wait_seconds, self._linger)
            stopped = asyncio.ensure_future(self._stop_consumer(channel, started, tag))
            await self._rpc(stopped, f"cancelling the consumer on {self._name(queue)}")
        except BaseException:
            inbox.closed = True  # a straggler goes back to the queue at once
            if stopped is None:
                stopped = self._spawn(self._stop_consumer(channel, started, tag))
            self._spawn(self._give_back_after(stopped, inbox))
            raise
        finally:
            closing.cancel()
        inbox.closed = True  # a straggler now goes back to the queue, not into a lost list
        if channel.is_closed:
            raise ConnectionError(f"RabbitMQ at {self._where}: the consumer channel closed during a fetch")
        return channel, inbox.received

    async def _start_consumer(
        self, channel: AbstractChannel, queue: str, prefetch: int, inbox: _Inbox, tag: str
    ) -> None:
        async with self._consume_lock:
            await channel.basic_qos(prefetch_count=prefetch)
            await channel.basic_consume(self._name(queue), inbox.on_message, no_ack=False, consumer_tag=tag)

    @staticmethod
    async def _stop_consumer(channel: AbstractChannel, started: asyncio.Future[None], tag: str) -> None:
        with contextlib.suppress(BaseException):
            await started
        if started.cancelled() or started.exception() is not None or channel.is_closed:
            return  # no consumer, or RabbitMQ dropped it with its channel
        await channel.basic_cancel(tag)
        # Deliveries read before cancel-ok have their callback tasks scheduled first.
        await asyncio.sleep(0)

    @staticmethod
    async def _give_back_after(stopped: asyncio.Future[None], inbox: _Inbox) -> None:
        with contextlib.suppress(BaseException):
            await stopped
        await inbox.give_back()

    async def _lease(
        self, queue: str, channel: AbstractChannel, received: list[DeliveredMessage], lease_seconds: float
    ) -> list[Delivery]:
        deadline = asyncio.get_running_loop().time() + lease_seconds
        now_ms = _now_ms()
        deliveries: list[Delivery] = []
        early: list[tuple[_Lease, _Copy]] = []
        for message in received:
            headers = _headers(message)
            properties = _properties(message)
            due = _int(headers.get(H_DUE))
            previous = _int(headers.get(H_DELIVERIES)) or 0
            message_id = properties.message_id or ""
            purged_at = self._purged_at.get(queue, -1)
            lease = _Lease(queue, channel, message, deadline, previous + 1 + (1 if message.redelivered else 0))
            if due is not None and (_int(headers.get(H_ENQUEUED)) or 0) < purged_at < due:
                # Was still delayed when the queue was purged here: drop it.
                await self._ack_all([lease])
                continue
            if due is not None and due > now_ms:
                # A long delay's intermediate hop (or clock skew): send it round again.
                early.append((lease, _Copy(message_id, message.body, properties.priority or 0, previous, due)))
                continue
            receipt = uuid.uuid4().hex
            self._leases[receipt] = lease
            deliveries.append(Delivery(message_id, message.body, queue, receipt, lease.delivery_count,
                                       handle=message))
        if early:
            await self._send(queue, [copy for _, copy in early])
            await self._ack_all([lease for lease, _ in early])
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

    @staticmethod
    async def _ack_all(leases: Sequence[_Lease]) -> None:
        """Acks on their channels; a lease whose channel died is skipped (RabbitMQ has its
        message back). Bounded in time: an ack that cannot be written leaves the message to
        come back when the channel closes, which at-least-once delivery allows."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RPC_TIMEOUT_SECONDS):
                for lease in leases:
                    if not lease.lost:
                        with contextlib.suppress(Exception):
                            await lease.channel.basic_ack(lease.tag)

    @staticmethod
    async def _reject_all(leases: Sequence[_Lease]) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RPC_TIMEOUT_SECONDS):
                for lease in leases:
                    await _reject(lease.channel, lease.message)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        leases = self._take(deliveries)
        if leases:
            # Finishes even if the caller is cancelled: a taken lease left unacked would hold
            # its message until the channel closes.
            await asyncio.shield(self._spawn(self._ack_all(leases)))

    async def _requeue(self, leases: Sequence[_Lease], delay: float) -> None:
        """Publishes a copy of each lease (count + 1) and acks the original once confirmed."""
        due_ms = _now_ms() + max(1, round(delay * 1000)) if delay > 0 else None
        by_queue: dict[str, list[_Lease]] = {}
        for lease in leases:
            by_queue.setdefault(lease.queue, []).append(lease)
        for queue, group in by_queue.items():
            copies = [
                _Copy(_properties(lease.message).message_id or "", lease.message.body,
                      _properties(lease.message).priority or 0, lease.delivery_count, due_ms)
                for lease in group
            ]
            try:
                await self._send(queue, copies)
            except Exception:
                live = [lease for lease in group if not lease.lost]
                if not live:
                    continue  # their channel died too: RabbitMQ has the originals back
                # Could not republish: let RabbitMQ requeue the originals instead.
                await self._reject_all(live)
                raise
            await self._ack_all(group)

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        leases = self._take(deliveries)
        if leases:
            # Finishes even if the caller is cancelled (see ack()).
            await asyncio.shield(self._spawn(self._requeue(leases, delay)))

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
        if live:
            await asyncio.shield(self._spawn(self._requeue(live, 0.0)))
        return len(live)

    # -- inspection --------------------------------------------------------------------------

    async def stats(self, queue: str) -> QueueStats:
        ready = await self._declare(queue, force=True)
        in_flight = sum(1 for lease in self._leases.values() if lease.queue == queue and not lease.lost)
        return QueueStats(ready=ready, delayed=len(self._delayed.not_due(queue)), in_flight=in_flight)

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        return None  # RabbitMQ cannot look a queued message up by id

    async def queues(self) -> list[str]:
        return sorted(self._known)

    async def delete_queue(self, queue: str) -> bool:
        """Forgets the name in this process (queues() lists the queues this process used); the
        RabbitMQ queue, empty, stays: consumers of other processes may still hold it."""
        stats = await self.stats(queue)
        if stats.ready + stats.delayed + stats.in_flight:
            return False
        self._known.discard(queue)
        return True

    async def purge(self, queue: str) -> list[str]:
        # The purge time first: a delayed message still delayed now is dropped when it arrives.
        self._purged_at[queue] = _now_ms()
        delayed = self._delayed.take(queue)
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
            channel, received = await self._receive(queue, want, want, 0.0)
            if not received:
                break  # other consumers took the rest
            leases = [_Lease(queue, channel, message, 0.0, 0) for message in received]
            taken += [message_id for message in received if (message_id := _properties(message).message_id)]
            # Channel gone: RabbitMQ keeps them; a later purge gets them.
            await self._ack_all(leases)
            left -= len(received)
        return taken


def _int(value: object) -> int | None:
    """A header value as int (AMQP tables may carry it as another numeric type)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return int(value)
    return None
