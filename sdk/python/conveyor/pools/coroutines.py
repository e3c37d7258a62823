"""Async tasks: how a coroutine task is run on an event loop, and how its soft time limit reaches
it as an exception it can catch.

asyncio can only cancel a task, and a CancelledError cannot be told apart from any other
cancellation. So the coroutine is awaited through `SoftLimited`, which sits between the asyncio
Task and the coroutine: a cancellation carrying SOFT_LIMIT is withdrawn (Task.uncancel) and
SoftTimeLimitExceeded is thrown into the coroutine at the await where it waits instead. Any
other cancellation passes through unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Generator
from typing import Any

from conveyor.context import TaskContext, bind, soft_limit_message
from conveyor.errors import SoftTimeLimitExceeded
from conveyor.execution import Call, Ending, TaskFunction, arguments, ended_by, item_calls, succeeded
from conveyor.v1 import task_pb2

# The message of the cancellation that means "soft time limit" (Task.cancel(msg=SOFT_LIMIT)).
SOFT_LIMIT = "conveyor: soft time limit"


class SoftLimited:
    """Awaits `coroutine`, turning a SOFT_LIMIT cancellation into SoftTimeLimitExceeded inside it."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any], limit: float | None) -> None:
        self._coroutine = coroutine
        self._limit = limit

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self._coroutine.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                waiting_on = inner.send(sent) if thrown is None else inner.throw(thrown)
            except StopIteration as done:
                return done.value
            sent, thrown = None, None
            try:
                sent = yield waiting_on
            except asyncio.CancelledError as cancel:
                thrown = cancel
                task = asyncio.current_task()
                if cancel.args == (SOFT_LIMIT,) and task is not None:
                    task.uncancel()  # handled here: asyncio.timeout() and TaskGroup inside keep counting right
                    thrown = SoftTimeLimitExceeded(soft_limit_message(self._limit))
            except BaseException as error:  # handed to the coroutine as it came
                thrown = error


async def call_async(function: TaskFunction, task: task_pb2.Signature, context: TaskContext) -> Ending:
    """Run an async task. Whatever it raises (BaseException included) is its failure; a
    cancellation by the pool (a cancel, the hard limit, a shutdown) propagates."""
    started_at = time.time()
    bind(context)
    try:
        each = item_calls(task)
        if each is None:
            args, kwargs = arguments(task)
            value = await SoftLimited(function(*args, **kwargs), context.soft_time_limit)
        else:
            value = await SoftLimited(_call_each(function, each), context.soft_time_limit)
    except asyncio.CancelledError as exc:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the pool stopped it and has reported the outcome
        return ended_by(exc, started_at)  # raised by the task's own code
    except BaseException as exc:  # a task's failure, whatever it raised
        return ended_by(exc, started_at)
    return succeeded(value, started_at)


async def _call_each(function: TaskFunction, calls: list[Call]) -> list[Any]:
    """A map's chunk: one await per item, in order (the soft limit covers the whole chunk)."""
    return [await function(*args, **kwargs) for args, kwargs in calls]
