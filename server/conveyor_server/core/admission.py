"""Admission control: a queue past its configured depth or age refuses new tasks for a while.

A producer that outruns its workers fills the broker without bound; a `max_depth` (ready tasks)
or a `max_age_seconds` (how long the oldest ready task has waited) on a queue turns that into
back-pressure instead: past it, submit answers RESOURCE_EXHAUSTED with a RetryInfo hint, and the
SDKs back off and retry within the caller's deadline. Depth is the broker's count of ready tasks,
age comes from the task index (core/queue_ages.py); each is read at most every
STATS_MAX_AGE_SECONDS per queue, by one call however many submits wait for it, so a submit costs
no engine round trip on the hot path. A burst may overshoot a limit by what arrives within that
window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from ..brokers.base import Broker
from ..config import ConfigError, QueueLimit
from .clock import SYSTEM_CLOCK, Clock
from .errors import ResourceExhausted
from .queue_ages import QueueAges
from .task_index import TaskIndexer

STATS_MAX_AGE_SECONDS = 0.5
# What a refused producer is told to wait: about the time a queue needs to drain a little.
RETRY_AFTER_SECONDS = 1.0

T = TypeVar("T")


class Recent(Generic[T]):
    """A value per queue, read again once older than `max_age` seconds; submits that find it old
    at the same time share one read."""

    def __init__(self, max_age: float, clock: Callable[[], float]) -> None:
        self._max_age = max_age
        self._clock = clock
        self._values: dict[str, tuple[float, T]] = {}
        self._reading: dict[str, asyncio.Future[T]] = {}

    async def get(self, queue: str, read: Callable[[], Awaitable[T]]) -> T:
        cached = self._values.get(queue)
        if cached is not None and self._clock() - cached[0] < self._max_age:
            return cached[1]
        reading = self._reading.get(queue)
        if reading is None:
            reading = self._reading[queue] = asyncio.ensure_future(self._read(queue, read))
            reading.add_done_callback(_retrieved)
        # Shielded: a caller that gives up does not cancel the read the others wait for.
        return await asyncio.shield(reading)

    async def _read(self, queue: str, read: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await read()
            self._values[queue] = (self._clock(), value)
            return value
        finally:
            del self._reading[queue]


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Marks a failed read as seen: its error reaches the callers still waiting, if any."""
    if not future.cancelled():
        future.exception()


class Admission:
    def __init__(
        self, broker: Broker, limits: Mapping[str, QueueLimit], ages: QueueAges | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.limits = {q: limit for q, limit in limits.items() if limit.max_depth > 0 or limit.max_age_seconds > 0}
        if ages is None and any(limit.max_age_seconds > 0 for limit in self.limits.values()):
            raise ValueError("a max_age_seconds limit needs the task index (QueueAges)")
        self.ages = ages
        self._depths: Recent[int] = Recent(STATS_MAX_AGE_SECONDS, clock)
        self._waited: Recent[float | None] = Recent(STATS_MAX_AGE_SECONDS, clock)

    async def admit(self, queues: Iterable[str]) -> None:
        """Refuse (ResourceExhausted with a retry hint) when one of `queues` is over its limit."""
        if not self.limits:
            return
        for queue in sorted(set(queues)):
            limit = self.limits.get(queue)
            if limit is None:
                continue
            if limit.max_depth > 0:
                await self._check_depth(queue, limit.max_depth)
            if limit.max_age_seconds > 0:
                await self._check_age(queue, limit.max_age_seconds)

    async def _check_depth(self, queue: str, max_depth: int) -> None:
        async def ready() -> int:
            return (await self.broker.stats(queue)).ready

        depth = await self._depths.get(queue, ready)
        if depth >= max_depth:
            raise ResourceExhausted(
                f"queue {queue!r} holds {depth} ready tasks, at its max_depth of {max_depth}; "
                f"retry in {RETRY_AFTER_SECONDS:g} s",
                retry_after_seconds=RETRY_AFTER_SECONDS,
                reason="QUEUE_FULL", metadata={"queue": queue, "max_depth": str(max_depth)},
            )

    async def _check_age(self, queue: str, max_age: float) -> None:
        ages = self.ages
        assert ages is not None  # checked in __init__

        async def waited() -> float | None:
            return await ages.waited_past(queue, max_age)

        age = await self._waited.get(queue, waited)
        if age is not None:
            raise ResourceExhausted(
                f"queue {queue!r} has a task ready for {age:.1f} s, past its max_age_seconds of {max_age:g}; "
                f"retry in {RETRY_AFTER_SECONDS:g} s",
                retry_after_seconds=RETRY_AFTER_SECONDS,
                reason="QUEUE_BEHIND", metadata={"queue": queue, "max_age_seconds": f"{max_age:g}"},
            )


def admission_for(
    broker: Broker, limits: Mapping[str, QueueLimit], indexer: TaskIndexer, clock: Clock = SYSTEM_CLOCK
) -> Admission:
    """The server's admission control; ConfigError when an age limit is set and the backend
    keeps no task index to measure ages with."""
    aged = sorted(queue for queue, limit in limits.items() if limit.max_age_seconds > 0)
    if aged and not indexer.enabled:
        raise ConfigError(f"queue_limits: max_age_seconds (on {', '.join(aged)}) is measured with the task index, "
                          f"but {indexer.unsupported}")
    ages = QueueAges(indexer, clock=clock.wall) if indexer.enabled else None
    return Admission(broker, limits, ages, clock=clock.monotonic)
