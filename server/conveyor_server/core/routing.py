"""Routing by task name: a task goes only to a worker that registered its name.

Workers list their task names in Hello (a worker that lists none takes any task, as a raw
protocol client may). A message fetched for a worker that cannot run it goes back to its queue:
at once when another worker of this replica can run it (its fetch is waiting and takes it), or
after a delay that grows with its bounces when none can, so that workers of other replicas get
their turn and nobody spins on it. Such a task is never failed: it waits, and is counted as
*unroutable* while no worker here can run it (shown by `conveyor queues` and in metrics).
Machinery's workers requeue an unregistered task the same way; here the server does it, for
every language's workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# The delay before a task nobody here can run is offered again: doubled per bounce, capped.
BOUNCE_FIRST_SECONDS = 0.05
BOUNCE_MAX_SECONDS = 2.0
# A task counts as unroutable for this long after it was last turned away.
UNROUTABLE_MEMORY_SECONDS = 2 * BOUNCE_MAX_SECONDS + 1.0


def bounce_delay(delivery_count: int) -> float:
    """How long a task that no worker here can run waits before it is offered again."""
    doublings = min(max(delivery_count - 1, 0), 16)
    return min(BOUNCE_FIRST_SECONDS * float(2**doublings), BOUNCE_MAX_SECONDS)


class Unroutable:
    """Tasks this replica turned away because none of its workers registered their names."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # queue -> task id -> when it was last turned away
        self._seen: dict[str, dict[str, float]] = {}

    def turned_away(self, queue: str, task_id: str) -> None:
        self._seen.setdefault(queue, {})[task_id] = self._clock()

    def routed(self, queue: str, task_id: str) -> None:
        seen = self._seen.get(queue)
        if seen is not None:
            seen.pop(task_id, None)

    def count(self, queue: str) -> int:
        """Tasks of `queue` waiting for a worker that can run them, as this replica saw lately."""
        seen = self._seen.get(queue)
        if not seen:
            return 0
        horizon = self._clock() - UNROUTABLE_MEMORY_SECONDS
        for task_id in [t for t, at in seen.items() if at < horizon]:
            del seen[task_id]
        return len(seen)
