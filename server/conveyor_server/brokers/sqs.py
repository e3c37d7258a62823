"""Amazon SQS broker (aioboto3): lease = visibility timeout, batched send/receive/delete.

URL: `sqs://?endpoint=http://127.0.0.1:PORT&region=us-east-1&prefix=NAME&fifo=1&bands=3`, or
`sqs://host:port/` for a plain-HTTP endpoint; `sqs://KEY:SECRET@...` gives credentials. With
an endpoint and no credentials, fixed dummy ones are used (moto, ElasticMQ and friends);
without an endpoint, boto's usual credential chain and AWS itself.

SQS queues behind one conveyor queue `q` (names `<prefix>-<q>-<suffix>`):
- Priority bands. SQS has no priorities, so there is one SQS queue per band and fetch drains
  higher bands first: `bands=3` (default: 7-9, 3-6, 0-2), `bands=10` (exact, but every empty
  fetch costs ten receives) or `bands=1` (no priority). Order inside a band is SQS's: best
  effort, or per message group with `fifo=1` (FIFO queues, `.fifo` suffix).
- A delay queue (`-d`, always a standard queue). Delayed messages wait there with
  DelaySeconds (whole seconds, rounded up, at most 900; longer delays hop again) and carry
  their due time and priority; fetch and recover_expired() forward due ones to their band.
  Keeping them apart lets FIFO queues have per-message delays, lets purge() drop delayed
  messages without touching leased ones, and makes stats() exact up to SQS's approximation.

Lease: the visibility timeout, rounded up to whole seconds. SQS returns an expired message
by itself, so recover_expired() only forwards due delayed messages and returns 0. A lease
runs from just before the request that took or renewed it (this process's clock), and a
delivery whose lease has passed by that clock is not acked/nacked/extended, since SQS (and
moto) may honour an old receipt handle. So fetch never hands out a message whose lease is
mostly gone (an SQS that answered late, a message a long poll kept): it renews that lease
first, and leaves out one SQS will not renew (SQS brings it back by itself). nack() without
a delay gives the lease up before it makes the message visible, so a receive racing it takes
the message at once. ack() gives the lease up at once and deletes in the background (stats(),
purge() and close() wait for those deletes), so reporting results never waits for SQS.
delivery_count = ApproximateReceiveCount plus the deliveries of earlier copies (carried in an
attribute by nack-with-delay copies).

Outages. Calls have connect and read timeouts, so an unreachable endpoint fails them within
seconds with botocore's connection errors (transient: engine_errors.py). Receives are not
retried by botocore: the fetch and poll loops retry them with a jittered backoff capped at half
a second, which bounds how long after the endpoint's return work flows again; other calls get
one retry. A receive that fails beside others that took messages does not drop those. A call
that meets a queue that does not exist (any more: deleted, a region failover, a restarted moto)
creates the conveyor queue's SQS queues again, as they were created, and is retried once; the
messages that were in them are gone (the server's repair publishes their tasks again).

purge() receives and deletes the visible messages of every band and of the delay queue,
reading each one's id attribute, then purges the delay queue (PurgeQueue) for the messages
still delayed, which SQS lets nobody read: the ids it returns for those are the ones this
process sent (kept here with their due time); delayed messages sent by other replicas are
dropped unlisted, and one a forwarder is moving at that moment may survive the purge.

A fetch receives from every band at once (keeping for the next fetch what lower bands gave
beyond its need) and looks at the delay queue meanwhile. While a fetch waits it long-polls
every band and the delay queue at once; what a poll gets after its fetch returned is kept for
the next fetch (or reappears when its visibility ends).
Bodies travel base64-encoded; the task id and the rest travel as message attributes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar
from urllib.parse import unquote

import aioboto3

from ..background import stop_tasks
from ..backoff import Backoff
from ..engine_errors import is_transient
from ..engine_urls import DEFAULT_PREFIX, EngineUrl
from ._delayed import PublishedDelays
from ._wakeups import Wakeups, fetch_waiting
from .base import Delivery, OutgoingMessage, QueueDeletionUnsupported, QueueStats

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# Lowest priority of each band, highest band first.
BAND_LAYOUTS: dict[int, tuple[int, ...]] = {1: (0,), 3: (7, 3, 0), 10: (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)}
MAX_BATCH = 10  # SQS batch and receive limit
MAX_DELAY = 900  # DelaySeconds cap
MAX_VISIBILITY = 43_200
MAX_WAIT = 20  # long-polling cap
MAX_BATCH_BYTES = 250_000  # under SendMessageBatch's 256 KiB total
NAME_LIMIT = 80
CONCURRENCY = 32  # parallel short calls
POOL = 64  # HTTP connections for short calls
POLL_POOL = 128  # HTTP connections for long polls (each holds one for up to MAX_WAIT)
# Timeouts and retries: an unreachable endpoint fails a short call within a few seconds
# (refused at once: about one second, the retry's backoff), never hangs it.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 10.0  # short calls; long polls wait up to MAX_WAIT on top
# botocore "standard" retries, counted with the first try (total_max_attempts; its max_attempts
# would count retries only): short calls get one retry, after up to a second; receives none, as
# the fetch and poll loops retry them sooner (see _request).
ATTEMPTS = 2
RECEIVE_ATTEMPTS = 1
# Handed-out leases keep at least this share of their length; shorter ones are renewed first.
LEASE_FLOOR = 0.5
# A failed long poll is tried again after a jittered backoff from the first delay up to the cap:
# the cap bounds how long after the endpoint's return a poll waits to ask again.
POLL_RETRY_FIRST, POLL_RETRY_MAX = 0.05, 0.5
LATE_LOG_SECONDS = 30.0  # at most one "SQS answered late" warning per this long
FORWARD_VISIBILITY = 60  # seconds a forwarder owns a delay-queue message
FORWARD_INTERVAL = 0.1  # a busy fetcher looks at the delay queue at most this often
FORWARD_LIMIT = 100  # delay-queue messages forwarded per look
PURGE_RECEIVERS = 4  # parallel receive-and-delete loops per SQS queue while purging
# Error codes of a queue that does not exist (SQS's JSON and query protocols).
QUEUE_GONE = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})
A_ID, A_DELIVERIES = "conveyor-id", "conveyor-deliveries"
A_DUE, A_PRIORITY, A_GROUP = "conveyor-due", "conveyor-priority", "conveyor-group"
TAG_QUEUE = "conveyor-queue"

_T = TypeVar("_T")
_VALID_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_HASHED = re.compile(r"-x[0-9a-f]{12}$")  # ends a name that stands for another (see _sqs_name)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seconds(value: float, cap: int) -> int:
    """Whole seconds, rounded up so a lease or delay is never shorter than asked."""
    return min(max(0, math.ceil(value - 1e-9)), cap)


def _chunks(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _attribute(message: dict[str, Any], name: str, default: str = "") -> str:
    return str(message.get("MessageAttributes", {}).get(name, {}).get("StringValue", default))


def _alive(handle: _Handle, now: float) -> bool:
    """Whether this process still holds the lease of `handle` (by its own clock)."""
    return not handle.settled and handle.deadline > now


async def _received(*receives: Awaitable[tuple[list[_Handle], int]]) -> list[tuple[list[_Handle], int]]:
    """Receives run together. One that failed counts as empty unless all failed: the messages
    the others took are invisible now, and dropping them with the error would strand them for
    their visibility timeout (seen when the endpoint came back and one band's call had not)."""
    results = await asyncio.gather(*receives, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures and (len(failures) == len(results) or not isinstance(failures[0], Exception)):
        raise failures[0]
    return [([], 0) if isinstance(r, BaseException) else r for r in results]


def _connected(client: Any) -> Any:
    if client is None:
        raise RuntimeError("SqsBroker is not connected; call connect() first")
    return client


def _queue_gone(exc: Exception) -> bool:
    """Whether `exc` is SQS saying the queue of the call does not exist."""
    response: Any = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) in QUEUE_GONE


@dataclass(slots=True)
class _Handle:
    """Engine state of one received message: where it lives and until when this process owns it."""

    url: str
    receipt: str
    band: int
    deadline: float  # loop time
    message: dict[str, Any] = field(default_factory=dict, repr=False)
    settled: bool = False  # acked or given back: its lease is over for good


@dataclass(slots=True)
class _Outgoing:
    """A message to send, before encoding."""

    message_id: str
    body: bytes
    priority: int
    group: str
    deliveries: int = 0
    due_ms: int | None = None  # set: goes through the delay queue

    @classmethod
    def of(cls, handle: _Handle, **changes: Any) -> _Outgoing:
        """A copy of a received message."""
        message = handle.message
        copy = cls(
            message_id=_attribute(message, A_ID),
            body=base64.b64decode(message["Body"]),
            priority=int(_attribute(message, A_PRIORITY, "0")),
            group=_attribute(message, A_GROUP) or message.get("Attributes", {}).get("MessageGroupId", ""),
            deliveries=int(_attribute(message, A_DELIVERIES, "0")),
            due_ms=int(_attribute(message, A_DUE)) if _attribute(message, A_DUE) else None,
        )
        for name, value in changes.items():
            setattr(copy, name, value)
        return copy


@dataclass(frozen=True, slots=True)
class _Urls:
    queue: str
    bands: list[str]
    delay: str
    created_at: float = 0.0  # loop time

    def url(self, role: int) -> str:
        """The URL of band `role`, or of the delay queue for -1."""
        return self.delay if role < 0 else self.bands[role]


class SqsBroker:
    def __init__(
        self,
        endpoint: str | None = None,
        region: str = DEFAULT_REGION,
        prefix: str = DEFAULT_PREFIX,
        fifo: bool = False,
        credentials: tuple[str, str] | None = None,
        bands: int = 3,
    ) -> None:
        if bands not in BAND_LAYOUTS:
            raise ValueError(f"bands must be one of {sorted(BAND_LAYOUTS)}, not {bands}")
        self._endpoint = endpoint
        self._region = region
        self._prefix = prefix
        self._fifo = fifo
        self._credentials = credentials
        self._bands = BAND_LAYOUTS[bands]
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._poller: Any = None  # a client of its own for long polls (a longer read timeout)
        self._receiver: Any = None  # and one for short receives (not retried by botocore)
        self._urls: dict[str, _Urls] = {}
        self._creating: dict[str, asyncio.Lock] = {}
        # SQS queue URL -> (conveyor queue, band or -1 for the delay queue), to create again.
        self._owners: dict[str, tuple[str, int]] = {}
        self._late_logged_at = -math.inf
        # Deletes of acked messages still running (see ack()).
        self._deleting: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._receiving = asyncio.Semaphore(CONCURRENCY)  # short receives, beside the other calls
        # Messages a long poll received after its fetch returned: queue -> handles.
        self._buffer: dict[str, list[_Handle]] = {}
        self._polls: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._forwarding: dict[str, asyncio.Task[None]] = {}  # queue -> its look at the delay queue
        # (queue, band) -> the pause before its next long poll after one failed: short at first,
        # so a poll answers again soon after the endpoint returns.
        self._poll_failures: dict[tuple[str, int], Backoff] = {}
        self._arrived = Wakeups()
        self._forwarded_at: dict[str, float] = {}
        # SQS MessageId -> handle, for messages received here whose lease may be live.
        self._held: dict[str, _Handle] = {}
        self._held_prune_at = 1024
        # queue -> (wall-clock due ms, message id) of what this process sent to the delay queue:
        # purge() cannot read delayed messages, so this is how it names the ones it drops.
        self._delayed = PublishedDelays()

    @classmethod
    def from_url(cls, url: str) -> Self:
        options = EngineUrl(url)
        parts = options.parts
        endpoint: str | None = options.text("endpoint", "") or None
        if endpoint is None and parts.hostname:
            endpoint = f"http://{parts.hostname}:{parts.port or 80}"
        credentials = None
        if parts.username:
            credentials = (unquote(parts.username), unquote(parts.password or ""))
        elif endpoint is not None:
            credentials = ("testing", "testing")
        return cls(
            endpoint=endpoint,
            region=options.text("region", DEFAULT_REGION),
            prefix=options.prefix,
            fifo=options.flag("fifo", False),
            credentials=credentials,
            bands=options.integer("bands", 3),
        )

    def portable_receipts(self) -> bool:
        """The newest receipt handle of each message lives in the process that received it."""
        return False

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(self._new_client(READ_TIMEOUT, POOL, ATTEMPTS))
        self._poller = await self._stack.enter_async_context(
            self._new_client(MAX_WAIT + READ_TIMEOUT, POLL_POOL, RECEIVE_ATTEMPTS))
        self._receiver = await self._stack.enter_async_context(
            self._new_client(READ_TIMEOUT, CONCURRENCY, RECEIVE_ATTEMPTS))

    def _new_client(self, read_timeout: float, pool: int, attempts: int) -> Any:
        extra: dict[str, Any] = {}
        if self._credentials is not None:
            extra = {"aws_access_key_id": self._credentials[0], "aws_secret_access_key": self._credentials[1]}
        # botocore ships no type information; importing it this way keeps mypy strict quiet.
        config_class = importlib.import_module("botocore.config").Config
        config = config_class(
            max_pool_connections=pool, connect_timeout=CONNECT_TIMEOUT, read_timeout=read_timeout,
            retries={"total_max_attempts": attempts, "mode": "standard"},
        )
        return aioboto3.Session().client(
            "sqs", endpoint_url=self._endpoint, region_name=self._region, config=config, **extra
        )

    async def close(self) -> None:
        await self._acked()
        await stop_tasks(*self._polls.values(), *self._forwarding.values())
        self._polls.clear()
        self._forwarding.clear()
        self._buffer.clear()
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = self._poller = self._receiver = None

    @property
    def _sqs(self) -> Any:
        return _connected(self._client)

    async def _call(self, method: str, *, poll: bool = False, **params: Any) -> Any:
        """One SQS call (`poll`: a long poll, outside the concurrency limits, whose slots it
        would hold for seconds while idle). When the queue of the call does not exist, its
        conveyor queue's SQS queues are created again and the call is retried once."""
        started = asyncio.get_running_loop().time()
        try:
            return await self._request(method, poll, params)
        except Exception as exc:
            if "QueueUrl" not in params or not _queue_gone(exc):
                raise
            url = await self._recreate(str(params["QueueUrl"]), started, exc)
        return await self._request(method, poll, {**params, "QueueUrl": url})

    async def _request(self, method: str, poll: bool, params: dict[str, Any]) -> Any:
        if method != "receive_message":
            async with self._limit:
                return await getattr(self._sqs, method)(**params)
        # Receives go to clients that do not retry: a retry would wait out botocore's delay
        # (up to a second) after the endpoint is back, and hold up the other bands' messages
        # in a drain until then; the fetch and poll loops retry sooner. Short ones have slots
        # of their own: behind a backlog of sends (republished after an outage) they would
        # wait for those before any work could flow again.
        if poll:
            return await _connected(self._poller).receive_message(**params)
        async with self._receiving:
            return await _connected(self._receiver).receive_message(**params)

    async def _recreate(self, url: str, since: float, exc: Exception) -> str:
        """The URL standing for `url` once its conveyor queue's SQS queues exist again: created
        here, unless another call did that after `since` (the failed call's start)."""
        owner = self._owners.get(url)
        if owner is None:  # not one of ours (a listing's): nothing to create
            raise exc
        queue, role = owner
        urls = await self._create_queues(queue, since)
        return urls.url(role)

    # -- naming ------------------------------------------------------------------------------

    def _band(self, priority: int) -> int:
        return next((index for index, low in enumerate(self._bands) if priority >= low), len(self._bands) - 1)

    def _sqs_name(self, queue: str, suffix: str) -> str:
        base = f"{self._prefix}-{queue}"
        if not _VALID_NAME.match(base) or len(base) + len(suffix) > NAME_LIMIT or _HASHED.search(base):
            # Unrepresentable: a readable stem plus a hash; the real name is kept in a tag.
            digest = hashlib.sha1(queue.encode()).hexdigest()[:12]
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", base)[: NAME_LIMIT - len(suffix) - 14]
            base = f"{stem}-x{digest}"
        return base + suffix

    def _band_suffix(self, band: int) -> str:
        return f"-p{self._bands[band]}" + (".fifo" if self._fifo else "")

    async def _create(self, name: str, queue: str, fifo: bool) -> str:
        reply = await self._call(
            "create_queue", QueueName=name, Attributes={"FifoQueue": "true"} if fifo else {},
            tags={TAG_QUEUE: queue},
        )
        return str(reply["QueueUrl"])

    async def _queue_urls(self, queue: str) -> _Urls:
        urls = self._urls.get(queue)
        if urls is not None:
            return urls
        return await self._create_queues(queue)

    async def _create_queues(self, queue: str, lost_since: float | None = None) -> _Urls:
        """Creates the band queues and the delay queue of `queue` (CreateQueue is idempotent).
        With `lost_since`, they were found missing by a call that started then: created again
        unless that was done after it."""
        # One creation per queue at a time: concurrent fetches of a new queue would each
        # create the same four SQS queues.
        async with self._creating.setdefault(queue, asyncio.Lock()):
            urls = self._urls.get(queue)
            if urls is not None and (lost_since is None or urls.created_at > lost_since):
                return urls
            if urls is not None:
                log.warning("the SQS queues of %s are gone (deleted, or lost by the endpoint); creating them "
                            "again: the messages they held are lost", queue)
            created = await asyncio.gather(
                self._create(self._sqs_name(queue, "-d"), queue, fifo=False),
                *(self._create(self._sqs_name(queue, self._band_suffix(band)), queue, fifo=self._fifo)
                  for band in range(len(self._bands))),
            )
            # Stamped once they exist: a call that started while they were being created and
            # met a missing queue finds them made, rather than creating them once more.
            created_at = asyncio.get_running_loop().time()
            urls = self._urls[queue] = _Urls(queue, bands=list(created[1:]), delay=created[0], created_at=created_at)
            self._owners[urls.delay] = (queue, -1)
            self._owners.update((url, (queue, band)) for band, url in enumerate(urls.bands))
            return urls

    # -- sending -----------------------------------------------------------------------------

    def _entry(self, index: int, message: _Outgoing, now_ms: int) -> dict[str, Any]:
        attributes: dict[str, Any] = {}

        def put(name: str, value: object, kind: str = "String") -> None:
            attributes[name] = {"DataType": kind, "StringValue": str(value)}

        if message.message_id:
            put(A_ID, message.message_id)
        if message.deliveries:
            put(A_DELIVERIES, message.deliveries, "Number")
        entry: dict[str, Any] = {"Id": f"m{index}", "MessageBody": base64.b64encode(message.body).decode()}
        if message.due_ms is not None:
            put(A_DUE, message.due_ms, "Number")
            put(A_PRIORITY, message.priority, "Number")
            if message.group:
                put(A_GROUP, message.group)
            entry["DelaySeconds"] = _seconds((message.due_ms - now_ms) / 1000, MAX_DELAY)
        elif self._fifo:
            entry["MessageGroupId"] = message.group or "default"
            entry["MessageDeduplicationId"] = f"{message.message_id}-{uuid.uuid4().hex}"[-128:]
        if attributes:
            entry["MessageAttributes"] = attributes
        return entry

    @staticmethod
    def _batches(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Groups entries by 10 and under the batch byte limit."""
        batches: list[list[dict[str, Any]]] = []
        size = 0
        for entry in entries:
            entry_size = len(entry["MessageBody"]) + 512  # attributes, generously
            if not batches or len(batches[-1]) >= MAX_BATCH or size + entry_size > MAX_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(entry)
            size += entry_size
        return batches

    async def _send(self, urls: _Urls, messages: Sequence[_Outgoing]) -> None:
        """Sends each message to its band, or to the delay queue while it is not due."""
        now_ms = _now_ms()
        by_url: dict[str, list[dict[str, Any]]] = {}
        for message in messages:
            if message.due_ms is not None and message.due_ms <= now_ms:
                message.due_ms = None
            if message.due_ms is not None:
                self._delayed.track(urls.queue, message.message_id, message.due_ms)
            url = urls.delay if message.due_ms is not None else urls.bands[self._band(message.priority)]
            by_url.setdefault(url, []).append(self._entry(len(by_url.get(url, [])), message, now_ms))
        await asyncio.gather(*(
            self._send_batch(url, batch) for url, entries in by_url.items() for batch in self._batches(entries)
        ))

    async def _send_batch(self, url: str, entries: list[dict[str, Any]]) -> None:
        for _ in range(3):
            reply = await self._call("send_message_batch", QueueUrl=url, Entries=entries)
            failed = reply.get("Failed", [])
            if not failed:
                return
            if any(item.get("SenderFault") for item in failed):
                raise RuntimeError(f"SQS refused messages: {failed}")
            retry = {item["Id"] for item in failed}
            entries = [entry for entry in entries if entry["Id"] in retry]
        raise RuntimeError(f"SQS kept failing to store {len(entries)} messages")

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        urls = await self._queue_urls(queue)
        now_ms = _now_ms()  # after the queues exist, so creating them eats none of the delay
        await self._send(urls, [
            _Outgoing(message.message_id, message.body, message.priority, message.group,
                      due_ms=now_ms + math.ceil(message.delay * 1000) if message.delay > 0 else None)
            for message in messages
        ])

    # -- receiving ---------------------------------------------------------------------------

    async def _receive(
        self, url: str, band: int, count: int, visibility: float, wait: int = 0
    ) -> tuple[list[_Handle], int]:
        """One ReceiveMessage; returns the messages not already held here, and how many came."""
        deadline = asyncio.get_running_loop().time() + visibility
        params = {
            "QueueUrl": url, "MaxNumberOfMessages": min(count, MAX_BATCH), "WaitTimeSeconds": wait,
            "VisibilityTimeout": _seconds(visibility, MAX_VISIBILITY), "MessageAttributeNames": ["All"],
            "MessageSystemAttributeNames": ["ApproximateReceiveCount", "MessageGroupId"],
        }
        reply = await self._call("receive_message", poll=wait > 0, **params)
        items = reply.get("Messages", [])
        return self._hold([_Handle(url, item["ReceiptHandle"], band, deadline, item) for item in items]), len(items)

    def _hold(self, handles: list[_Handle]) -> list[_Handle]:
        """Registers received messages; drops one this process already holds a live lease on.

        SQS standard queues deliver at least once, and concurrent receives (moto especially)
        can hand the same message out twice. The newest receipt handle is the one SQS honours.
        """
        now = asyncio.get_running_loop().time()
        if len(self._held) > self._held_prune_at:
            self._held = {key: held for key, held in self._held.items() if _alive(held, now)}
            self._held_prune_at = max(1024, 2 * len(self._held))
        fresh = []
        for handle in handles:
            key = str(handle.message.get("MessageId", handle.receipt))
            held = self._held.get(key)
            if held is not None and _alive(held, now):
                held.receipt = handle.receipt
                continue
            self._held[key] = handle
            fresh.append(handle)
        return fresh

    async def _drain(self, urls: _Urls, want: int, lease_seconds: float) -> list[_Handle]:
        """Short-polls the bands for up to `want` messages: one receive of every band at once
        (an empty band costs a request, not a round trip), then wider rounds on the bands that
        came back full, highest first. Returns them highest band first; lower bands may give
        more than `want` (the caller keeps those for the next fetch)."""
        first = await _received(*(
            self._receive(url, band, want, lease_seconds) for band, url in enumerate(urls.bands)
        ))
        taken = [handle for handles, _ in first for handle in handles]
        for band, url in enumerate(urls.bands):
            if first[band][1] < min(want, MAX_BATCH):
                continue  # that band had no more (or failed)
            parallel = 2
            while len(taken) < want:
                # Widen only while every receive comes back full.
                counts = [len(chunk) for chunk in _chunks(range(want - len(taken)), MAX_BATCH)][:parallel]
                rounds = await _received(*(self._receive(url, band, count, lease_seconds) for count in counts))
                taken += [handle for handles, _ in rounds for handle in handles]
                if sum(came for _, came in rounds) < sum(counts):
                    break
                parallel *= 2
        return sorted(taken, key=lambda handle: handle.band)

    async def _forward(self, queue: str, urls: _Urls, handles: list[_Handle]) -> None:
        """Moves delay-queue messages on: due ones to their band, others round the delay queue."""
        if not handles:
            return
        try:
            await self._send(urls, [_Outgoing.of(handle) for handle in handles])
        except Exception:
            await self._give_back_unforwarded(handles)
            raise
        await self._delete(handles)
        self._arrived.wake(queue)

    async def _give_back_unforwarded(self, handles: Sequence[_Handle]) -> None:
        """Delay-queue messages a failed send did not move on: visible again now, for the next look,
        rather than after the forwarder's FORWARD_VISIBILITY. Best effort: an endpoint that refused
        the send may refuse this too, and then they come back after that visibility."""
        self._settle(handles)  # a receive of them again is not a second copy of a held lease
        with contextlib.suppress(Exception):
            await self._change_visibility(handles, 0)

    async def _forward_due(self, queue: str, urls: _Urls) -> None:
        """Short-polls the delay queue for due messages (at most every FORWARD_INTERVAL)."""
        now = asyncio.get_running_loop().time()
        if now - self._forwarded_at.get(queue, -math.inf) < FORWARD_INTERVAL:
            return
        self._forwarded_at[queue] = now
        moved = 0
        while moved < FORWARD_LIMIT:
            handles, came = await self._receive(urls.delay, -1, MAX_BATCH, FORWARD_VISIBILITY)
            await self._forward(queue, urls, handles)
            moved += came
            if came < MAX_BATCH:
                return

    # -- fetching ----------------------------------------------------------------------------

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []
        urls = await self._queue_urls(queue)

        async def attempt() -> tuple[list[Delivery], float]:
            handles = self._take_buffered(queue, max_messages)
            # While every band is long-polled, anything new reaches the buffer by itself;
            # short polls on top would only multiply requests (one per waiting fetch).
            if len(handles) < max_messages and not self._polling(queue):
                handles = sorted(handles + await self._drain_and_forward(queue, urls, max_messages - len(handles),
                                                                         lease_seconds), key=lambda h: h.band)
                if len(handles) > max_messages:
                    self._buffer.setdefault(queue, []).extend(handles[max_messages:])
                    handles = handles[:max_messages]
            handles = await self._with_lease(handles, lease_seconds)
            # No looking again before a wake-up: the long polls started below bring what comes.
            return [self._delivery(queue, handle) for handle in handles], math.inf

        return await fetch_waiting(
            attempt, lambda: self._arrived.signal(queue), wait_seconds,
            before_wait=lambda remaining: self._start_polls(queue, urls, lease_seconds, remaining),
        )

    async def _drain_and_forward(self, queue: str, urls: _Urls, want: int, lease_seconds: float) -> list[_Handle]:
        """_drain, while the delay queue is looked at for due messages in the background: a
        slow or failed look there must not hold up the ready messages the drain took (what it
        forwards wakes the waiting fetches)."""
        running = self._forwarding.get(queue)
        if running is None or running.done():
            self._forwarding[queue] = asyncio.create_task(self._forward_due_quietly(queue, urls))
        return await self._drain(urls, want, lease_seconds)

    async def _forward_due_quietly(self, queue: str, urls: _Urls) -> None:
        """_forward_due; a failure only delays the due messages: recover_expired() and the next
        fetch look again."""
        try:
            await self._forward_due(queue, urls)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("forwarding due delayed messages of %s failed (%s: %s); will retry",
                        queue, type(exc).__name__, exc)

    async def _with_lease(self, handles: list[_Handle], lease_seconds: float) -> list[_Handle]:
        """The handles to hand out, each with at least LEASE_FLOOR of the lease left (and not
        much more than asked): the others are renewed first, once. A delivery handed out with
        its lease over by this process's clock could not be acked, extended or nacked (see
        _live): SQS would hand it out again while it runs. One SQS does not renew (it was
        received again elsewhere) stays out: SQS brings it back."""
        if not handles:
            return []
        now = asyncio.get_running_loop().time()
        short = [h for h in handles if not LEASE_FLOOR * lease_seconds <= h.deadline - now <= 2 * lease_seconds]
        if not short:
            return handles
        ended = sum(1 for h in short if h.deadline <= now)
        if ended and now - self._late_logged_at > LATE_LOG_SECONDS:
            self._late_logged_at = now
            log.warning("SQS answered after the %.1f s lease of %d messages had passed; renewing them before "
                        "handing them out (a slow endpoint, or leases too short for it)", lease_seconds, ended)
        kept = {id(h) for h in handles} - {id(h) for h in short}
        kept |= {id(h) for h in await self._set_visibility(short, lease_seconds)}
        now = asyncio.get_running_loop().time()
        return [h for h in handles if id(h) in kept and _alive(h, now)]

    @staticmethod
    def _delivery(queue: str, handle: _Handle) -> Delivery:
        message = handle.message
        count = int(_attribute(message, A_DELIVERIES, "0"))
        count += int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        body = base64.b64decode(message["Body"])
        return Delivery(_attribute(message, A_ID), body, queue, handle.receipt, count, handle)

    def _polling(self, queue: str) -> bool:
        """Whether a long poll is running on every band and on the delay queue."""
        return all(
            (task := self._polls.get((queue, band))) is not None and not task.done()
            for band in range(-1, len(self._bands))
        )

    def _start_polls(self, queue: str, urls: _Urls, lease_seconds: float, remaining: float) -> None:
        """Long-polls every band and the delay queue that has no poll running."""
        wait = min(MAX_WAIT, max(1, math.ceil(remaining)))
        targets = [*enumerate(urls.bands), (-1, urls.delay)]
        for band, url in targets:
            task = self._polls.get((queue, band))
            if task is None or task.done():
                poll = self._poll(queue, urls, url, band, lease_seconds, wait)
                self._polls[(queue, band)] = asyncio.create_task(poll)

    async def _poll(self, queue: str, urls: _Urls, url: str, band: int, lease_seconds: float, wait: int) -> None:
        try:
            visibility = FORWARD_VISIBILITY if band < 0 else lease_seconds
            handles, _ = await self._receive(url, band, MAX_BATCH, visibility, wait)
            if band < 0:
                await self._forward(queue, urls, handles)
            elif handles:
                self._buffer.setdefault(queue, []).extend(handles)
            self._poll_failures.pop((queue, band), None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the waiting fetch polls again on its next round
            # An endpoint out of reach fails every poll: the fetch that waits reports that.
            log.log(logging.DEBUG if is_transient(exc) else logging.WARNING,
                    "SQS long poll of %s failed (%s: %s)", url, type(exc).__name__, exc)
            failures = self._poll_failures.setdefault((queue, band), Backoff(POLL_RETRY_FIRST, POLL_RETRY_MAX))
            await asyncio.sleep(failures.next())
        # Wake waiting fetches even when empty: they look again and restart the polls.
        self._arrived.wake(queue)

    def _take_buffered(self, queue: str, max_messages: int) -> list[_Handle]:
        """Takes polled messages whose lease still runs, high band first (fetch renews those
        whose lease is short)."""
        now = asyncio.get_running_loop().time()
        buffered = sorted((h for h in self._buffer.pop(queue, []) if _alive(h, now)), key=lambda h: h.band)
        taken, rest = buffered[:max_messages], buffered[max_messages:]
        if rest:
            self._buffer[queue] = rest
        return taken

    # -- settling ----------------------------------------------------------------------------

    @staticmethod
    def _by_url(handles: Sequence[_Handle]) -> dict[str, list[_Handle]]:
        groups: dict[str, list[_Handle]] = {}
        for handle in handles:
            groups.setdefault(handle.url, []).append(handle)
        return groups

    async def _set_visibility(self, handles: Sequence[_Handle], seconds: float) -> list[_Handle]:
        """Renews leases to `seconds` from now; returns the handles SQS accepted (deadline
        renewed, unless settled meanwhile: an ack or nack that raced this call wins)."""
        deadline = asyncio.get_running_loop().time() + seconds
        accepted = await self._change_visibility(handles, seconds)
        for handle in accepted:
            if not handle.settled:
                handle.deadline = deadline
        return [handle for handle in accepted if not handle.settled]

    async def _change_visibility(self, handles: Sequence[_Handle], seconds: float) -> list[_Handle]:
        """ChangeMessageVisibilityBatch; returns the handles SQS accepted."""
        visibility = _seconds(seconds, MAX_VISIBILITY)
        chunks = [(url, chunk) for url, group in self._by_url(handles).items() for chunk in _chunks(group, MAX_BATCH)]
        replies = await asyncio.gather(*(
            self._call(
                "change_message_visibility_batch", QueueUrl=url,
                Entries=[{"Id": f"m{i}", "ReceiptHandle": h.receipt, "VisibilityTimeout": visibility}
                         for i, h in enumerate(chunk)],
            )
            for url, chunk in chunks
        ))
        return [
            chunk[int(item["Id"][1:])]
            for (_, chunk), reply in zip(chunks, replies, strict=True) for item in reply.get("Successful", [])
        ]

    @staticmethod
    def _settle(handles: Sequence[_Handle]) -> None:
        """These leases are over for good: later calls with their deliveries are no-ops."""
        for handle in handles:
            handle.settled = True
            handle.deadline = 0.0

    async def _delete(self, handles: Sequence[_Handle]) -> None:
        self._settle(handles)
        await asyncio.gather(*(
            self._call(
                "delete_message_batch", QueueUrl=url,
                Entries=[{"Id": f"m{i}", "ReceiptHandle": h.receipt} for i, h in enumerate(chunk)],
            )
            for url, group in self._by_url(handles).items() for chunk in _chunks(group, MAX_BATCH)
        ))

    def _live(self, deliveries: Sequence[Delivery]) -> list[tuple[Delivery, _Handle]]:
        """Deliveries whose lease this process still holds; stale ones are ignored."""
        now = asyncio.get_running_loop().time()
        return [
            (delivery, delivery.handle) for delivery in deliveries
            if isinstance(delivery.handle, _Handle) and _alive(delivery.handle, now)
        ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Gives the leases up at once and deletes the messages in the background: the caller
        (a worker's results report) does not wait for SQS. stats(), purge() and close() wait
        for those deletes. One that fails leaves its message to come back when its lease ends;
        its task has ended by then, so the server drops it and acks it again."""
        handles = [handle for _, handle in self._live(deliveries)]
        if not handles:
            return
        self._settle(handles)
        task = asyncio.create_task(self._delete_acked(handles))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def _delete_acked(self, handles: list[_Handle]) -> None:
        try:
            await self._delete(handles)
        except Exception as exc:
            log.warning("deleting %d acked SQS messages failed (%s: %s); they come back when their lease ends "
                        "and are dropped then", len(handles), type(exc).__name__, exc)

    async def _acked(self) -> None:
        """Waits for the deletes of the messages acked so far."""
        if self._deleting:
            await asyncio.gather(*list(self._deleting), return_exceptions=True)

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        live = self._live(deliveries)
        if not live:
            return
        if delay <= 0:
            # Given up before the message is visible again: a receive racing this call (a
            # waiting fetch, another worker's) may get it back at once, and must not take it
            # for a second copy of a lease still held here (see _hold).
            handles = [handle for _, handle in live]
            self._settle(handles)
            await self._change_visibility(handles, 0)
            return
        # A copy through the delay queue, carrying the deliveries so far; then the original goes.
        due_ms = _now_ms() + math.ceil(delay * 1000)
        by_queue: dict[str, list[tuple[Delivery, _Handle]]] = {}
        for delivery, handle in live:
            by_queue.setdefault(delivery.queue, []).append((delivery, handle))
        for queue, group in by_queue.items():
            copies = [
                _Outgoing.of(handle, deliveries=delivery.delivery_count, due_ms=due_ms,
                             priority=self._bands[handle.band])
                for delivery, handle in group
            ]
            await self._send(await self._queue_urls(queue), copies)
            await self._delete([handle for _, handle in group])

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        live = [handle for _, handle in self._live(deliveries)]
        if live:
            await self._set_visibility(live, lease_seconds)

    async def recover_expired(self) -> int:
        # SQS itself makes a message visible again when its visibility timeout ends; what is
        # left to do here is moving due delayed messages of the queues used here (an endpoint
        # out of reach: the next call tries again).
        for queue, urls in list(self._urls.items()):
            try:
                await self._forward_due(queue, urls)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("forwarding due delayed messages of %s failed (%s: %s); will retry",
                            queue, type(exc).__name__, exc)
                return 0
        return 0

    # -- inspection --------------------------------------------------------------------------

    async def _counts(self, url: str) -> tuple[int, int, int]:
        """(visible, delayed, in flight) of one SQS queue."""
        reply = await self._call(
            "get_queue_attributes", QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        attributes = reply.get("Attributes", {})
        return (
            int(attributes.get("ApproximateNumberOfMessages", 0)),
            int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
            int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        )

    async def delete_queue(self, queue: str) -> bool:
        raise QueueDeletionUnsupported(
            "the SQS broker does not delete queues: SQS refuses to create a queue again for 60 s after "
            f"deleting it, which would refuse submissions; delete the SQS queues of {queue!r} by hand"
        )

    async def stats(self, queue: str) -> QueueStats:
        await self._acked()
        urls = await self._queue_urls(queue)
        delay, *bands = await asyncio.gather(self._counts(urls.delay), *(self._counts(url) for url in urls.bands))
        buffered = len(self._buffer.get(queue, []))
        # Due delayed messages not forwarded yet are ready; polled-but-not-handed-out ones
        # are invisible to SQS yet ready here.
        ready = sum(visible for visible, _, _ in bands) + delay[0] + buffered
        in_flight = sum(invisible for _, _, invisible in bands) - buffered
        return QueueStats(ready=ready, delayed=delay[1] + delay[2], in_flight=max(in_flight, 0))

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        return None  # SQS cannot look a queued message up by id

    async def queues(self) -> list[str]:
        names: set[str] = set()
        head = f"{self._prefix}-"
        paginator = self._sqs.get_paginator("list_queues")
        async for page in paginator.paginate(QueueNamePrefix=head):
            for url in page.get("QueueUrls", []):
                sqs_name = str(url).rsplit("/", 1)[-1]
                if not sqs_name.endswith("-d"):
                    continue
                candidate = sqs_name[len(head):-2]
                if not _HASHED.search(candidate):
                    names.add(candidate)
                else:
                    tags = (await self._call("list_queue_tags", QueueUrl=url)).get("Tags", {})
                    if TAG_QUEUE in tags:
                        names.add(str(tags[TAG_QUEUE]))
        return sorted(names)

    async def _purge_queue(self, url: str) -> None:
        try:
            await self._call("purge_queue", QueueUrl=url)
        except self._sqs.exceptions.PurgeQueueInProgress:
            # SQS allows one purge a minute per queue; the running one does the job.
            log.warning("SQS purge of %s already in progress", url)

    async def _take_visible(self, url: str) -> list[str]:
        """Receives and deletes visible messages of one SQS queue until none is left; returns
        their ids. Leased (invisible) ones stay. PurgeQueue would be faster but names nothing.
        An empty short poll is confirmed by a 1 s long poll: a short poll of SQS samples only
        some of its servers, so it can come back empty while messages remain."""
        ids: list[str] = []
        wait = 0
        while True:
            handles, came = await self._receive(url, 0, MAX_BATCH, FORWARD_VISIBILITY, wait)
            await self._delete(handles)
            ids += [_attribute(handle.message, A_ID) for handle in handles]
            if came:
                wait = 0
            elif wait:
                return ids
            else:
                wait = 1

    async def _take_all_visible(self, url: str) -> list[str]:
        taken = await asyncio.gather(*(self._take_visible(url) for _ in range(PURGE_RECEIVERS)))
        return [message_id for ids in taken for message_id in ids]

    async def purge(self, queue: str) -> list[str]:
        await self._acked()
        urls = await self._queue_urls(queue)
        # Sent from here and not due: invisible in the delay queue, dropped by its PurgeQueue.
        delayed = self._delayed.take(queue)
        buffered = self._buffer.pop(queue, [])
        await self._delete(buffered)
        taken = await asyncio.gather(*(self._take_all_visible(url) for url in [urls.delay, *urls.bands]))
        await self._purge_queue(urls.delay)
        ids = [_attribute(handle.message, A_ID) for handle in buffered]
        ids += [message_id for batch in taken for message_id in batch] + delayed
        return list(dict.fromkeys(message_id for message_id in ids if message_id))
