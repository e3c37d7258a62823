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
by itself, so recover_expired() only forwards due delayed messages and returns 0. A delivery
whose lease has passed by this process's clock is not acked/nacked/extended, since SQS (and
moto) may honour an old receipt handle. delivery_count = ApproximateReceiveCount plus the
deliveries of earlier copies (carried in an attribute by nack-with-delay copies).

purge() receives and deletes the visible messages of every band and of the delay queue,
reading each one's id attribute, then purges the delay queue (PurgeQueue) for the messages
still delayed, which SQS lets nobody read: the ids it returns for those are the ones this
process sent (kept here with their due time); delayed messages sent by other replicas are
dropped unlisted, and one a forwarder is moving at that moment may survive the purge.

While a fetch waits it long-polls every band and the delay queue at once; what a poll gets
after its fetch returned is kept for the next fetch (or reappears when its visibility ends).
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import aioboto3

from ._wakeups import Wakeups
from .base import Delivery, OutgoingMessage, QueueStats

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "conveyor"
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
POOL = 128  # HTTP connections: short calls plus long polls
FORWARD_VISIBILITY = 60  # seconds a forwarder owns a delay-queue message
FORWARD_INTERVAL = 0.1  # a busy fetcher looks at the delay queue at most this often
FORWARD_LIMIT = 100  # delay-queue messages forwarded per look
PURGE_RECEIVERS = 4  # parallel receive-and-delete loops per SQS queue while purging
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


@dataclass(slots=True)
class _Handle:
    """Engine state of one received message: where it lives and until when this process owns it."""

    url: str
    receipt: str
    band: int
    deadline: float  # loop time
    message: dict[str, Any] = field(default_factory=dict, repr=False)


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
        self._urls: dict[str, _Urls] = {}
        self._creating: dict[str, asyncio.Lock] = {}
        self._limit = asyncio.Semaphore(CONCURRENCY)
        # Messages a long poll received after its fetch returned: queue -> handles.
        self._buffer: dict[str, list[_Handle]] = {}
        self._polls: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._arrived = Wakeups()
        self._forwarded_at: dict[str, float] = {}
        # SQS MessageId -> handle, for messages received here whose lease may be live.
        self._held: dict[str, _Handle] = {}
        self._held_prune_at = 1024
        # queue -> (wall-clock due ms, message id) of what this process sent to the delay queue:
        # purge() cannot read delayed messages, so this is how it names the ones it drops.
        self._delayed: dict[str, list[tuple[int, str]]] = {}
        self._delayed_prune_at: dict[str, int] = {}

    @classmethod
    def from_url(cls, url: str) -> Self:
        parts = urlsplit(url)
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        endpoint = options.get("endpoint")
        if endpoint is None and parts.hostname:
            endpoint = f"http://{parts.hostname}:{parts.port or 80}"
        credentials = None
        if parts.username:
            credentials = (unquote(parts.username), unquote(parts.password or ""))
        elif endpoint is not None:
            credentials = ("testing", "testing")
        return cls(
            endpoint=endpoint,
            region=options.get("region", DEFAULT_REGION),
            prefix=options.get("prefix") or DEFAULT_PREFIX,
            fifo=options.get("fifo", "0").lower() in {"1", "true", "yes"},
            credentials=credentials,
            bands=int(options.get("bands", "3")),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        extra: dict[str, Any] = {}
        if self._credentials is not None:
            extra = {"aws_access_key_id": self._credentials[0], "aws_secret_access_key": self._credentials[1]}
        # botocore ships no type information; importing it this way keeps mypy strict quiet.
        config_class = importlib.import_module("botocore.config").Config
        # Long polls hold a pooled connection each for up to 20 s: leave room for them.
        config = config_class(max_pool_connections=POOL, retries={"max_attempts": 5, "mode": "standard"})
        self._client = await self._stack.enter_async_context(
            aioboto3.Session().client(
                "sqs", endpoint_url=self._endpoint, region_name=self._region, config=config, **extra
            )
        )

    async def close(self) -> None:
        for task in self._polls.values():
            task.cancel()
        for task in list(self._polls.values()):
            with contextlib.suppress(BaseException):
                await task
        self._polls.clear()
        self._buffer.clear()
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = None

    @property
    def _sqs(self) -> Any:
        if self._client is None:
            raise RuntimeError("SqsBroker is not connected; call connect() first")
        return self._client

    async def _call(self, method: str, **params: Any) -> Any:
        async with self._limit:
            return await getattr(self._sqs, method)(**params)

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
        # One creation per queue at a time: concurrent fetches of a new queue would each
        # create the same four SQS queues.
        async with self._creating.setdefault(queue, asyncio.Lock()):
            urls = self._urls.get(queue)
            if urls is not None:
                return urls
            created = await asyncio.gather(
                self._create(self._sqs_name(queue, "-d"), queue, fifo=False),
                *(self._create(self._sqs_name(queue, self._band_suffix(band)), queue, fifo=self._fifo)
                  for band in range(len(self._bands))),
            )
            urls = self._urls[queue] = _Urls(queue, bands=list(created[1:]), delay=created[0])
            self._creating.pop(queue, None)
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
                self._track_delayed(urls.queue, message.message_id, message.due_ms)
            url = urls.delay if message.due_ms is not None else urls.bands[self._band(message.priority)]
            by_url.setdefault(url, []).append(self._entry(len(by_url.get(url, [])), message, now_ms))
        await asyncio.gather(*(
            self._send_batch(url, batch) for url, entries in by_url.items() for batch in self._batches(entries)
        ))

    def _track_delayed(self, queue: str, message_id: str, due_ms: int) -> None:
        pending = self._delayed.setdefault(queue, [])
        if len(pending) >= self._delayed_prune_at.get(queue, 1024):
            now_ms = _now_ms()
            pending[:] = [item for item in pending if item[0] > now_ms]
            self._delayed_prune_at[queue] = max(1024, 2 * len(pending))
        pending.append((due_ms, message_id))

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
        # Long polls skip the semaphore: they would hold its slots for seconds while idle.
        reply = await (self._sqs.receive_message(**params) if wait else self._call("receive_message", **params))
        items = reply.get("Messages", [])
        return self._hold([_Handle(url, item["ReceiptHandle"], band, deadline, item) for item in items]), len(items)

    def _hold(self, handles: list[_Handle]) -> list[_Handle]:
        """Registers received messages; drops one this process already holds a live lease on.

        SQS standard queues deliver at least once, and concurrent receives (moto especially)
        can hand the same message out twice. The newest receipt handle is the one SQS honours.
        """
        now = asyncio.get_running_loop().time()
        if len(self._held) > self._held_prune_at:
            self._held = {key: held for key, held in self._held.items() if held.deadline > now}
            self._held_prune_at = max(1024, 2 * len(self._held))
        fresh = []
        for handle in handles:
            key = str(handle.message.get("MessageId", handle.receipt))
            held = self._held.get(key)
            if held is not None and held.deadline > now:
                held.receipt = handle.receipt
                continue
            self._held[key] = handle
            fresh.append(handle)
        return fresh

    async def _drain(self, urls: _Urls, want: int, lease_seconds: float) -> list[_Handle]:
        """Short-polls the bands, highest first, for up to `want` messages."""
        taken: list[_Handle] = []
        for band, url in enumerate(urls.bands):
            parallel = 1
            while len(taken) < want:
                # Start with one receive; widen only while every receive comes back full.
                counts = [len(chunk) for chunk in _chunks(range(want - len(taken)), MAX_BATCH)][:parallel]
                rounds = await asyncio.gather(*(self._receive(url, band, count, lease_seconds) for count in counts))
                taken += [handle for handles, _ in rounds for handle in handles]
                if sum(came for _, came in rounds) < sum(counts):
                    break
                parallel *= 2
        return taken

    async def _forward(self, queue: str, urls: _Urls, handles: list[_Handle]) -> None:
        """Moves delay-queue messages on: due ones to their band, others round the delay queue."""
        if not handles:
            return
        await self._send(urls, [_Outgoing.of(handle) for handle in handles])
        await self._delete(handles)
        self._arrived.wake(queue)

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_seconds, 0.0)
        urls = await self._queue_urls(queue)
        while True:
            arrived = self._arrived.signal(queue)  # taken before looking, so no arrival is missed
            handles = await self._take_buffered(queue, max_messages, lease_seconds)
            # While every band is long-polled, anything new reaches the buffer by itself;
            # short polls on top would only multiply requests (one per waiting fetch).
            if len(handles) < max_messages and not self._polling(queue):
                await self._forward_due(queue, urls)
                handles += await self._drain(urls, max_messages - len(handles), lease_seconds)
            if handles:
                return [self._delivery(queue, handle) for handle in handles]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            self._start_polls(queue, urls, lease_seconds, remaining)
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                return []

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
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the waiting fetch polls again on its next round
            log.warning("SQS long poll of %s failed: %s", url, exc)
            await asyncio.sleep(0.5)
        # Wake waiting fetches even when empty: they look again and restart the polls.
        self._arrived.wake(queue)

    async def _take_buffered(self, queue: str, max_messages: int, lease_seconds: float) -> list[_Handle]:
        """Hands out polled messages (high band first), renewing their lease from now."""
        now = asyncio.get_running_loop().time()
        buffered = sorted((h for h in self._buffer.pop(queue, []) if h.deadline > now), key=lambda h: h.band)
        taken, rest = buffered[:max_messages], buffered[max_messages:]
        if rest:
            self._buffer[queue] = rest
        if not taken:
            return []
        return await self._set_visibility(taken, lease_seconds)

    # -- settling ----------------------------------------------------------------------------

    @staticmethod
    def _by_url(handles: Sequence[_Handle]) -> dict[str, list[_Handle]]:
        groups: dict[str, list[_Handle]] = {}
        for handle in handles:
            groups.setdefault(handle.url, []).append(handle)
        return groups

    async def _set_visibility(self, handles: Sequence[_Handle], seconds: float) -> list[_Handle]:
        """ChangeMessageVisibilityBatch; returns the handles SQS accepted (deadline renewed)."""
        deadline = asyncio.get_running_loop().time() + seconds
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
        accepted = []
        for (_, chunk), reply in zip(chunks, replies, strict=True):
            for item in reply.get("Successful", []):
                handle = chunk[int(item["Id"][1:])]
                handle.deadline = deadline
                accepted.append(handle)
        return accepted

    async def _delete(self, handles: Sequence[_Handle]) -> None:
        for handle in handles:
            handle.deadline = 0.0  # settled: later calls with this delivery are no-ops
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
            if isinstance(delivery.handle, _Handle) and delivery.handle.deadline > now
        ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._delete([handle for _, handle in self._live(deliveries)])

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        live = self._live(deliveries)
        if not live:
            return
        if delay <= 0:
            handles = [handle for _, handle in live]
            await self._set_visibility(handles, 0)
            for handle in handles:
                handle.deadline = 0.0
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
        # left to do here is moving due delayed messages of the queues used here.
        for queue, urls in list(self._urls.items()):
            await self._forward_due(queue, urls)
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

    async def stats(self, queue: str) -> QueueStats:
        urls = await self._queue_urls(queue)
        delay, *bands = await asyncio.gather(self._counts(urls.delay), *(self._counts(url) for url in urls.bands))
        buffered = len(self._buffer.get(queue, []))
        # Due delayed messages not forwarded yet are ready; polled-but-not-handed-out ones
        # are invisible to SQS yet ready here.
        ready = sum(visible for visible, _, _ in bands) + delay[0] + buffered
        in_flight = sum(invisible for _, _, invisible in bands) - buffered
        return QueueStats(ready=ready, delayed=delay[1] + delay[2], in_flight=max(in_flight, 0))

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
        urls = await self._queue_urls(queue)
        now_ms = _now_ms()
        # Sent from here and not due: invisible in the delay queue, dropped by its PurgeQueue.
        delayed = [message_id for due_ms, message_id in self._delayed.pop(queue, []) if due_ms > now_ms]
        buffered = self._buffer.pop(queue, [])
        await self._delete(buffered)
        taken = await asyncio.gather(*(self._take_all_visible(url) for url in [urls.delay, *urls.bands]))
        await self._purge_queue(urls.delay)
        ids = [_attribute(handle.message, A_ID) for handle in buffered]
        ids += [message_id for batch in taken for message_id in batch] + delayed
        return list(dict.fromkeys(message_id for message_id in ids if message_id))
