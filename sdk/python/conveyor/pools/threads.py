"""The threads pool (the default): sync tasks run on `concurrency` threads, async tasks on the
worker's event loop, at most `concurrency` tasks at once in all.

Suits I/O-bound tasks. A thread cannot be stopped from outside: past its hard time limit, or
when cancelled, a sync task is reported at once (TimeLimitExceeded, CANCELLED) and its slot is
freed only when its code returns. Tasks that call `current_task().check_cancelled()` at safe
points stop there, and see SoftTimeLimitExceeded there once the soft limit has passed. Use the
processes pool for tasks that must be stopped however they are written.
"""

from __future__ import annotations

import asyncio
import functools

from conveyor.execution import Ending, call_sync
from conveyor.pools.base import PoolKind
from conveyor.pools.inprocess import InProcessPool, Job
from conveyor.pools.slot_threads import SlotThreads


class ThreadPool(InProcessPool):
    kind: PoolKind = "threads"

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self._threads: SlotThreads[Ending] | None = None

    def describe(self) -> str:
        return f"threads ({self.concurrency} threads; async tasks on the event loop)"

    async def start(self) -> None:
        self._threads = SlotThreads(self.concurrency, "conveyor-task")

    def _submit(self, job: Job) -> asyncio.Future[Ending]:
        assert self._threads is not None, "start() the pool first"
        call = job.call
        return self._threads.submit(
            functools.partial(job.snapshot.run, call_sync, call.function, call.assignment.task, call.context)
        )

    async def close(self) -> None:
        await super().close()
        if self._threads is not None:
            # Threads still running are abandoned: a task past the drain was handed back.
            self._threads.close()
            self._threads = None
