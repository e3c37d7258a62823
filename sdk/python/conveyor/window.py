"""The worker's window (tasks assigned to it and not yet reported) when its prefetch is left to
the worker: deep while it gets through its tasks quickly, four tasks per slot when it does not.

Each Results message costs the server a record write, a broker ack and a refill of the window,
whatever the number of results it carries; with four tasks per slot a one-slot worker of quick
tasks sent them two at a time and spent most of its time waiting for the refill (1,145 tasks/s,
738 µs of server CPU per task; 3,933 and 189 with 64 per slot). A deep window is what makes a
prefetch unfair: tasks held behind busy slots that another worker could run now. So the window
is sized by time, as TCP sizes its window by the bandwidth-delay product: by Little's law, a
worker that ends `rate` tasks a second and holds `concurrency + rate * WAIT_BUDGET_SECONDS`
makes each prefetched task wait about WAIT_BUDGET_SECONDS for a slot. The rate is measured
over short periods, and while the window is deep the worker checks every CHECK_SECONDS: a task
running LONG_TASK_SECONDS, or no task at all for IDLE_SECONDS, brings it back to the floor (so
a burst of long tasks never finds it deep).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

# The window never goes under this many tasks per slot (Celery's default prefetch multiplier),
# nor over MAX_PREFETCH per slot and MAX_WINDOW in all (memory: each task's arguments are held).
FLOOR_PREFETCH = 4
MAX_PREFETCH = 64
MAX_WINDOW = 1024
# How long a prefetched task may expect to wait for its slot. (20 ms kept two one-slot workers
# near a window of 25, at 2,500 tasks/s where 64 each gave 4,000: the rate that sizes the window
# is itself held back by a shallow one.)
WAIT_BUDGET_SECONDS = 0.05
# A task running this long (more than scheduling jitter: a quick task in a busy worker's thread
# pool was seen to "run" 25 ms) holds its slot long enough to count as a long task.
LONG_TASK_SECONDS = 0.1
# The completion rate is measured over periods of at least this long.
RATE_PERIOD_SECONDS = 0.05
# While the window is deep, the worker checks this often that it should stay so.
CHECK_SECONDS = 0.05
# A worker holding no task this long after its last one ended is idle. (Between a results
# message and the refill it answers, a one-slot worker holds nothing for a moment.)
IDLE_SECONDS = 0.05
# The window changes (a Credit message) only when the target is this far from it, or at a bound.
RESIZE_RATIO = 1.25


class AdaptiveWindow:
    """The window of a worker with `concurrency` slots, from the rate at which its tasks end."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.floor = concurrency * FLOOR_PREFETCH
        self.ceiling = max(self.floor, min(concurrency * MAX_PREFETCH, MAX_WINDOW))
        self.size = self.floor
        self._period_start: float | None = None
        self._ended_in_period = 0
        self._last_end = 0.0

    @property
    def deep(self) -> bool:
        return self.size > self.floor

    def ended(self, now: float, running_since: float | None) -> int | None:
        """A task ended at `now` (a monotonic clock) while the oldest task still running began at
        `running_since` (None: none runs); returns the new window when it changes."""
        self._last_end = now
        if self._runs_long(now, running_since):
            return self._reset(now)
        if self._period_start is None:  # this end starts the first period
            self._period_start = now
            return None
        self._ended_in_period += 1
        elapsed = now - self._period_start
        if elapsed < RATE_PERIOD_SECONDS:
            return None
        rate = self._ended_in_period / elapsed
        self._period_start, self._ended_in_period = now, 0
        target = self.concurrency + math.ceil(round(rate * WAIT_BUDGET_SECONDS, 6))
        return self._resize(min(max(target, self.floor), self.ceiling))

    def check(self, now: float, running_since: float | None, holding: bool) -> int | None:
        """Called every CHECK_SECONDS while the window is deep: a task running LONG_TASK_SECONDS,
        or no task held (`holding`) for IDLE_SECONDS, brings it back to the floor."""
        idle = not holding and now - self._last_end >= IDLE_SECONDS
        return self._reset(now) if idle or self._runs_long(now, running_since) else None

    @staticmethod
    def _runs_long(now: float, running_since: float | None) -> bool:
        return running_since is not None and now - running_since >= LONG_TASK_SECONDS

    def _reset(self, now: float) -> int | None:
        """Back to the floor; the rate is measured afresh from `now`."""
        self._period_start, self._ended_in_period = now, 0
        return self._resize(self.floor)

    def _resize(self, target: int) -> int | None:
        at_bound = target in (self.floor, self.ceiling)
        if target == self.size or not (at_bound or target >= self.size * RESIZE_RATIO
                                       or target * RESIZE_RATIO <= self.size):
            return None
        self.size = target
        return target


class LiveWindow:
    """An AdaptiveWindow on a running worker's event loop: told when tasks begin, leave their
    slot and end, it checks every CHECK_SECONDS while deep and calls `resized` with each new
    size (the worker then sends a Credit). `holding()` says whether the worker holds any task."""

    def __init__(self, sizing: AdaptiveWindow, resized: Callable[[int], None], holding: Callable[[], bool]) -> None:
        self.sizing = sizing
        self._resized = resized
        self._holding = holding
        # When each running task began (loop time), oldest first: dicts keep insertion order.
        self._began: dict[str, float] = {}
        self._check: asyncio.TimerHandle | None = None

    def began(self, task_id: str) -> None:
        self._began[task_id] = asyncio.get_running_loop().time()

    def left(self, task_id: str) -> None:
        """The task no longer runs (it ended, or never started)."""
        self._began.pop(task_id, None)

    def ended(self) -> None:
        """An attempt ended with an outcome: it counts toward the rate."""
        self._apply(self.sizing.ended(asyncio.get_running_loop().time(), self._running_since()))

    def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None

    def _running_since(self) -> float | None:
        return next(iter(self._began.values()), None)

    def _checked(self) -> None:
        self._check = None
        now = asyncio.get_running_loop().time()
        self._apply(self.sizing.check(now, self._running_since(), holding=self._holding()))

    def _apply(self, size: int | None) -> None:
        if size is not None:
            self._resized(size)
        if self.sizing.deep and self._check is None:
            self._check = asyncio.get_running_loop().call_later(CHECK_SECONDS, self._checked)
