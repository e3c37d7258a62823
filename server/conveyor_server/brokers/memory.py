"""In-process broker for tests and single-process use; nothing survives a restart."""

from __future__ import annotations

import heapq
import itertools
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from ._wakeups import Wakeups, fetch_waiting
from .base import Delivery, OutgoingMessage, QueueStats


@dataclass(order=True, slots=True)
class _Ready:
    sort_key: tuple[int, int]
    message_id: str = field(compare=False)
    body: bytes = field(compare=False)
    priority: int = field(compare=False)
    delivery_count: int = field(compare=False)


@dataclass(slots=True)
class _Queue:
    ready: list[_Ready] = field(default_factory=list)
    # (due time, seq, entry)
    delayed: list[tuple[float, int, _Ready]] = field(default_factory=list)
    leased: dict[str, tuple[_Ready, float]] = field(default_factory=dict)


class MemoryBroker:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        # What delays and leases are measured on (a test passes a clock it moves).
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._arrivals = Wakeups()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """`memory://`: queues in this process only, so the URL has nothing more to say."""
        return cls()

    def portable_receipts(self) -> bool:
        """Receipts are keys of the one in-process engine, valid for any caller sharing it."""
        return True

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def _entry(self, message_id: str, body: bytes, priority: int, delivery_count: int) -> _Ready:
        # Higher priority first, then publish order.
        return _Ready((-priority, next(self._seq)), message_id, body, priority, delivery_count)

    def _put(self, name: str, queue: _Queue, entry: _Ready, delay: float) -> None:
        if delay > 0:
            heapq.heappush(queue.delayed, (self._clock() + delay, entry.sort_key[1], entry))
        else:
            heapq.heappush(queue.ready, entry)
        # Wake waiting fetches: a new delayed entry may be due before the time they wait for.
        self._arrivals.wake(name)

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        target = self._queue(queue)
        for message in messages:
            self._put(queue, target, self._entry(message.message_id, message.body, message.priority, 1), message.delay)

    def _promote_due(self, queue: _Queue, now: float) -> None:
        while queue.delayed and queue.delayed[0][0] <= now:
            _, _, entry = heapq.heappop(queue.delayed)
            heapq.heappush(queue.ready, entry)

    def _take(self, name: str, queue: _Queue, max_messages: int, lease_seconds: float) -> list[Delivery]:
        now = self._clock()
        self._promote_due(queue, now)
        taken: list[Delivery] = []
        while queue.ready and len(taken) < max_messages:
            entry = heapq.heappop(queue.ready)
            receipt = uuid.uuid4().hex
            queue.leased[receipt] = (entry, now + lease_seconds)
            taken.append(Delivery(entry.message_id, entry.body, name, receipt, entry.delivery_count))
        return taken

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        target = self._queue(queue)

        async def attempt() -> tuple[list[Delivery], float]:
            taken = self._take(queue, target, max_messages, lease_seconds)
            # Look again when the next delayed message is due.
            due = max(target.delayed[0][0] - self._clock(), 0.001) if target.delayed else math.inf
            return taken, due

        return await fetch_waiting(attempt, lambda: self._arrivals.signal(queue), wait_seconds)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._queue(delivery.queue).leased.pop(delivery.receipt, None)

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        for delivery in deliveries:
            queue = self._queue(delivery.queue)
            leased = queue.leased.pop(delivery.receipt, None)
            if leased is not None:
                entry = leased[0]
                self._put(delivery.queue, queue, self._entry(entry.message_id, entry.body, entry.priority,
                                                             entry.delivery_count + 1), delay)

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        deadline = self._clock() + lease_seconds
        for delivery in deliveries:
            queue = self._queue(delivery.queue)
            leased = queue.leased.get(delivery.receipt)
            if leased is not None:
                queue.leased[delivery.receipt] = (leased[0], deadline)

    async def recover_expired(self) -> int:
        now = self._clock()
        recovered = 0
        for name, queue in self._queues.items():
            expired = [receipt for receipt, (_, deadline) in queue.leased.items() if deadline <= now]
            for receipt in expired:
                entry, _ = queue.leased.pop(receipt)
                self._put(name, queue, self._entry(entry.message_id, entry.body, entry.priority,
                                                   entry.delivery_count + 1), 0.0)
                recovered += 1
        return recovered

    async def stats(self, queue: str) -> QueueStats:
        target = self._queue(queue)
        self._promote_due(target, self._clock())
        return QueueStats(ready=len(target.ready), delayed=len(target.delayed), in_flight=len(target.leased))

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        target = self._queue(queue)
        held = {entry.message_id for entry in target.ready}
        held.update(entry.message_id for _, _, entry in target.delayed)
        held.update(entry.message_id for entry, _ in target.leased.values())
        return held.intersection(message_ids)

    async def queues(self) -> list[str]:
        return sorted(self._queues)

    async def delete_queue(self, queue: str) -> bool:
        target = self._queues.get(queue)
        if target is not None and (target.ready or target.delayed or target.leased):
            return False
        self._queues.pop(queue, None)
        return True

    async def purge(self, queue: str) -> list[str]:
        target = self._queue(queue)
        purged = [entry.message_id for entry in sorted(target.ready)]
        purged += [entry.message_id for _, _, entry in sorted(target.delayed)]
        target.ready.clear()
        target.delayed.clear()
        return purged
