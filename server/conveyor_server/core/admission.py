"""Admission control: a queue past its configured depth refuses new tasks for a while.

A producer that outruns its workers fills the broker without bound; a `max_depth` on a queue
turns that into back-pressure instead: past it, submit answers RESOURCE_EXHAUSTED with a
RetryInfo hint, and the SDKs back off and retry within the caller's deadline. Depth is the
broker's count of ready tasks, read at most every STATS_MAX_AGE_SECONDS per queue, so a submit
costs no broker round trip on the hot path; a burst may overshoot the limit by what arrives
within that window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from ..brokers.base import Broker
from ..config import QueueLimit
from .errors import ResourceExhausted

STATS_MAX_AGE_SECONDS = 0.5
# What a refused producer is told to wait: about the time a queue needs to drain a little.
RETRY_AFTER_SECONDS = 1.0


class Admission:
    def __init__(
        self, broker: Broker, limits: Mapping[str, QueueLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.broker = broker
        self.limits = {queue: limit for queue, limit in limits.items() if limit.max_depth > 0}
        self._clock = clock
        self._depth: dict[str, tuple[float, int]] = {}

    async def admit(self, queues: Iterable[str]) -> None:
        """Refuse (ResourceExhausted with a retry hint) when one of `queues` is over its limit."""
        if not self.limits:
            return
        for queue in sorted(set(queues)):
            limit = self.limits.get(queue)
            if limit is None:
                continue
            depth = await self._ready(queue)
            if depth >= limit.max_depth:
                raise ResourceExhausted(
                    f"queue {queue!r} holds {depth} ready tasks, at its max_depth of {limit.max_depth}; "
                    f"retry in {RETRY_AFTER_SECONDS:g} s",
                    retry_after_seconds=RETRY_AFTER_SECONDS,
                    reason="QUEUE_FULL", metadata={"queue": queue, "max_depth": str(limit.max_depth)},
                )

    async def _ready(self, queue: str) -> int:
        now = self._clock()
        cached = self._depth.get(queue)
        if cached is not None and now - cached[0] < STATS_MAX_AGE_SECONDS:
            return cached[1]
        ready = (await self.broker.stats(queue)).ready
        self._depth[queue] = (now, ready)
        return ready
