"""The Broker protocol: what the server needs from a queue engine.

Every engine (memory, sqlite, redis, amqp, sqs) implements this protocol and passes
tests/conformance/test_broker.py. Messages are opaque bytes to the broker; the server
encodes a conveyor.internal.v1.TaskMessage into them.

Semantics every engine must keep:
- publish() is durable when it returns (for durable engines).
- fetch() hands each ready message to at most one caller while its lease is live. Leased
  messages whose lease expires come back to the queue (via the engine's own mechanism or
  recover_expired()) with delivery_count + 1.
- Higher priority (0..9) is fetched first among ready messages; equal priorities in
  publish order as far as the engine allows (FIFO is best effort except on sqlite/memory).
- A message published with delay d is not fetched before d seconds have passed.
- ack() removes a leased message for good; nack() puts it back (after an optional delay).
  Acking or nacking a delivery whose lease was lost is a no-op, never an error.
- purge() drops ready and delayed messages (never leased ones) and returns the message ids
  of what it dropped, so the server can end those tasks instead of leaving them PENDING.
- delete_queue() forgets an empty queue (it leaves queues() until a publish creates it again)
  and refuses, changing nothing, while the queue holds any message: ready, delayed or leased.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, Self, runtime_checkable


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to publish. `message_id` is the task id (used for logs and dedup hints)."""

    message_id: str
    body: bytes
    delay: float = 0.0
    priority: int = 0
    # FIFO message group, honoured by engines that have them (SQS FIFO); others ignore it.
    group: str = ""


@dataclass(slots=True)
class Delivery:
    """A leased message. `receipt` is the engine's handle for ack/nack/extend."""

    message_id: str
    body: bytes
    queue: str
    receipt: str
    delivery_count: int = 1
    # Engine-private state (e.g. an aio-pika message object); never interpreted by the core.
    handle: object = field(default=None, repr=False, compare=False)


class QueueDeletionUnsupported(Exception):
    """The engine cannot delete queues (delete_queue); the message says why."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int
    delayed: int
    in_flight: int


@runtime_checkable
class Broker(Protocol):
    """Async queue engine."""

    def portable_receipts(self) -> bool:
        """Whether a delivery's receipt (with its queue, id and count) is all any replica needs
        to extend, ack or nack it: true where receipts are plain keys into the shared engine
        (Redis, SQLite, the in-process memory engine). Then a replica can take over a lease
        another one handed out (core/takeover.py). Not AMQP (a delivery belongs to its channel)
        nor SQS (this engine keeps each message's newest receipt handle in the process that
        received it)."""
        ...

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build (not connect) the engine from its URL (`engines.open_broker` picks the class by the
        URL's scheme). Options in the query string are the engine's own; its docstring lists them."""
        ...

    async def connect(self) -> None:
        """Open connections and create what the engine needs (tables, scripts)."""

    async def close(self) -> None:
        """Release connections. Leased messages stay leased until their lease expires."""

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Publish a batch to `queue` (created on first use)."""

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        """Lease up to `max_messages` ready messages; wait up to `wait_seconds` for the first."""

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove leased messages for good."""

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Return leased messages to their queue, ready again after `delay` seconds."""

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        """Extend leases to `lease_seconds` from now."""

    async def recover_expired(self) -> int:
        """Return messages whose lease expired to their queues; returns how many.

        Engines whose server does this by itself (SQS visibility, AMQP connection loss)
        may return 0. The server calls it periodically; it must be safe to call from many
        replicas at once.
        """

    async def stats(self, queue: str) -> QueueStats:
        """Counts for one queue."""

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        """Of these message ids, those `queue` holds (ready, delayed or leased); None when the
        engine cannot look messages up by id (AMQP, SQS), so the caller judges from counts."""

    async def queues(self) -> list[str]:
        """Names of the queues this engine knows of."""

    async def delete_queue(self, queue: str) -> bool:
        """Forget `queue` when it holds no message (ready, delayed or leased); returns whether
        it did. False changes nothing. A queue the engine does not know is forgotten already
        (True). Raises QueueDeletionUnsupported on an engine that cannot delete queues."""

    async def purge(self, queue: str) -> list[str]:
        """Drop every ready and delayed message of `queue`; returns their message ids.

        The ids are the `OutgoingMessage.message_id`s (task ids) the messages were published
        with, so the caller can end their records; leased messages are kept and not listed.
        An id is read from where the engine keeps it beside the body, never by decoding a
        body. An engine that drops messages it cannot read (AMQP delay queues, SQS delayed
        messages) lists those this process published; its module docstring says so.
        """
