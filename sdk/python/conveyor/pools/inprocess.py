"""Slots for pools that run tasks inside the worker process (threads, the event loop): a call
waits for a free slot, starts, and ends at its result, a cancel or its hard time limit.

The outcome of a cancel or a hard limit is reported at once, but the slot stays taken until the
code really returns: an async task is cancelled and usually stops at its next await, while a
sync task in a thread cannot be stopped from outside and keeps its slot until it returns (it
sees the stop at its next check_cancelled()).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from conveyor.execution import Ending, cancelled, ended_by, time_limit_exceeded
from conveyor.pools.base import PoolKind, TaskCall
from conveyor.pools.coroutines import SOFT_LIMIT, call_async

log = logging.getLogger("conveyor.worker")


@dataclass(eq=False)
class Job:
    call: TaskCall
    ended: asyncio.Future[Ending | None]
    # The caller's context variables (the execute span): the task runs in a copy of them.
    snapshot: contextvars.Context
    is_async: bool
    started_at: float = 0.0
    work: asyncio.Future[Ending] | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class InProcessPool:
    kind: PoolKind

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._free = concurrency
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._draining = False

    async def run(self, call: TaskCall) -> Ending | None:
        if self._draining:
            return None
        job = Job(call, asyncio.get_running_loop().create_future(), contextvars.copy_context(),
                  inspect.iscoroutinefunction(call.function))
        self._jobs[call.task_id] = job
        try:
            if self._free > 0:
                self._start(job)
            else:
                self._waiting.append(job)
            return await job.ended
        finally:
            if self._jobs.get(call.task_id) is job:
                del self._jobs[call.task_id]

    def _submit(self, job: Job) -> asyncio.Future[Ending]:
        """Start the job's code; the future resolves when it returns."""
        raise NotImplementedError

    def _start(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        self._free -= 1
        job.call.on_start()
        job.started_at = time.time()
        if job.is_async:
            job.work = loop.create_task(
                call_async(job.call.function, job.call.assignment.task, job.call.context), context=job.snapshot
            )
        else:
            job.work = self._submit(job)
        job.work.add_done_callback(functools.partial(self._returned, job))
        context = job.call.context
        soft, hard = context.soft_time_limit, context.time_limit
        if soft and (not hard or soft < hard):
            job.timers.append(loop.call_later(soft, self._soft_limit, job))
        if hard:
            job.timers.append(loop.call_later(hard, self._hard_limit, job, hard))

    def _returned(self, job: Job, work: asyncio.Future[Ending]) -> None:
        """The code returned: its slot is free again."""
        self._free += 1
        for timer in job.timers:
            timer.cancel()
        if not job.ended.done():
            if work.cancelled():
                job.ended.set_result(cancelled(job.started_at))
            elif (error := work.exception()) is not None:
                job.ended.set_result(ended_by(error, job.started_at))
            else:
                job.ended.set_result(work.result())
        while self._free > 0 and self._waiting and not self._draining:
            waiting = self._waiting.popleft()
            if not waiting.ended.done():
                self._start(waiting)

    def _soft_limit(self, job: Job) -> None:
        if job.ended.done() or job.work is None:
            return
        if job.is_async:
            job.work.cancel(SOFT_LIMIT)
        else:
            job.call.context.soft_limit_passed()

    def _hard_limit(self, job: Job, limit: float) -> None:
        if job.ended.done() or job.work is None:
            return
        job.call.context.stop()
        job.ended.set_result(time_limit_exceeded(limit, job.started_at))
        if job.is_async:
            job.work.cancel()
        else:
            log.warning("task %s[%s] passed its time limit of %g s; its thread cannot be stopped from outside "
                        "and holds a slot until it returns (the processes pool stops such tasks)",
                        job.call.context.name, job.call.task_id, limit)

    def cancel(self, task_id: str) -> None:
        job = self._jobs.get(task_id)
        if job is None or job.ended.done():
            return
        job.call.context.stop(by_request=True)
        if job.work is None:  # still waiting for a slot: it never starts
            job.ended.set_result(cancelled())
            return
        job.ended.set_result(cancelled(job.started_at))
        if job.is_async:
            job.work.cancel()

    def drain(self) -> None:
        self._draining = True
        for job in self._waiting:
            if not job.ended.done():
                job.ended.set_result(None)
        self._waiting.clear()

    async def close(self) -> None:
        self.drain()
        for job in list(self._jobs.values()):
            job.call.context.stop()
            if job.work is not None and job.is_async:
                job.work.cancel()
