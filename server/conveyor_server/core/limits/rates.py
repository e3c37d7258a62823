"""Rate limits at dispatch: a task whose name has a limit runs only with a token from its
bucket, taken in the backend so that every replica draws on the same bucket.

Tasks of one bucket in one claim cost one `take_tokens` call; tasks whose name has no limit
cost nothing. A task without a token goes back to its queue, delayed until its turn: the
bucket says when the next token comes, and this replica hands out later turns one token
interval apart (a cursor per bucket), so a backlog comes back spread at the limit's rate
instead of all at once. Turns are rounded up to the time the bucket takes to refill (at most
TURN_WINDOW_SECONDS): the tasks of one window come back together, as many as the bucket then
holds, and go back to the broker in one call. A turn is at most MAX_DEFER_SECONDS away; a task
past that comes back within it and is spread again.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from conveyor.v1 import task_pb2

from ...backends.base import Backend
from .spec import RateLimit

# The longest a task over its limit waits before it is offered again: also how long a raised
# or deleted limit may take to reach tasks already waiting.
MAX_DEFER_SECONDS = 300.0
# The shortest wait, and the step of the waits of slow limits.
DEFER_STEP_SECONDS = 0.025
# The longest window that turns are rounded up to: the latency a limited task may gain for it.
TURN_WINDOW_SECONDS = 1.0
# Cursors of buckets this replica no longer defers to are dropped past this many.
MAX_CURSORS = 10_000


def bucket_of(limit: RateLimit, signature: task_pb2.Signature) -> str:
    """The backend bucket a task draws from: its name's, or its (name, rate_limit_key)'s."""
    # The name's length first: no name and key can make another pair's bucket.
    base = f"rate:{len(limit.name)}:{limit.name}"
    return f"{base}:key:{signature.rate_limit_key}" if limit.per_key else base


def step_up(seconds: float, step: float = DEFER_STEP_SECONDS) -> float:
    return math.ceil(seconds / step - 1e-9) * step


def turn_window(limit: RateLimit) -> float:
    """What turns are rounded up to: the time a bucket takes to refill, within bounds."""
    return min(max(limit.burst / limit.per_second, DEFER_STEP_SECONDS), TURN_WINDOW_SECONDS)


@dataclass(slots=True)
class RateDecision:
    """Indexes (into the tasks given) that may run now, and the delays of the others."""

    admitted: list[int] = field(default_factory=list)
    deferred: dict[int, float] = field(default_factory=dict)


class RateLimiter:
    def __init__(self, backend: Backend, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self._clock = clock
        # bucket -> the earliest time (clock) at which this replica has no task waiting for it
        self._cursors: dict[str, float] = {}

    async def decide(self, signatures: Sequence[task_pb2.Signature], limits: Mapping[str, RateLimit]) -> RateDecision:
        decision = RateDecision()
        by_bucket: dict[str, tuple[RateLimit, list[int]]] = {}
        for index, signature in enumerate(signatures):
            limit = limits.get(signature.name)
            if limit is None:
                decision.admitted.append(index)
            else:
                by_bucket.setdefault(bucket_of(limit, signature), (limit, []))[1].append(index)
        for bucket, (limit, indexes) in by_bucket.items():
            granted, wait = await self.backend.take_tokens(bucket, limit.per_second, limit.burst, len(indexes))
            decision.admitted.extend(indexes[:granted])
            waiting = indexes[granted:]
            decision.deferred.update(zip(waiting, self._turns(bucket, limit, wait, len(waiting)), strict=True))
        return decision

    def _turns(self, bucket: str, limit: RateLimit, wait: float, count: int) -> list[float]:
        """Delays for `count` tasks of `bucket` that got no token: one token interval apart,
        after the tasks this replica deferred before."""
        now = self._clock()
        cursor = min(max(self._cursors.get(bucket, 0.0), now + wait), now + MAX_DEFER_SECONDS)
        interval, window = 1.0 / limit.per_second, turn_window(limit)
        delays = []
        for _ in range(count):
            if cursor - now >= MAX_DEFER_SECONDS:
                # Too far out to keep a turn: back within the cap, spread over its second half.
                delays.append(step_up(random.uniform(MAX_DEFER_SECONDS / 2, MAX_DEFER_SECONDS)))
                continue
            delays.append(step_up(max(cursor - now, DEFER_STEP_SECONDS), window))
            cursor += interval
        self._cursors[bucket] = cursor
        if len(self._cursors) > MAX_CURSORS:
            for name in [name for name, at in self._cursors.items() if at <= now]:
                del self._cursors[name]
        return delays
