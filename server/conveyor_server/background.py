"""Stopping background tasks for certain.

One `task.cancel()` is not always enough on Python 3.11: `asyncio.wait_for`, which pymongo, aio-pika
and others put around socket reads, returns the inner result and drops the cancellation when that
result lands in the same loop turn as the cancel (CPython gh-86296, fixed in 3.12). A loop that
goes on after the dropped cancel never ends, and whoever awaits it waits forever: a watch feed held
`Backend.close()`, and so server shutdown, for good under CPU load. So a task is cancelled again
until it is seen to end.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

# How long a cancelled task may take to end before it is cancelled again: long enough for the
# cleanup a library runs on cancellation (closing a cursor), short enough not to hold a shutdown.
RECANCEL_SECONDS = 1.0

_STOPPING: set[asyncio.Task[None]] = set()


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` and return once every one has ended; what they ended with is dropped."""
    pending = {task for task in tasks if task is not None}
    ended = set(pending)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
    for task in ended:
        _retrieve(task)


def stop_in_background(task: asyncio.Task[Any]) -> None:
    """stop_tasks(task) without waiting for it (for a caller that must answer now)."""
    task.cancel()  # at once, so the task does not get one more turn before the stopper starts
    stopper = asyncio.create_task(stop_tasks(task), name=f"stop {task.get_name()}")
    _STOPPING.add(stopper)
    stopper.add_done_callback(_STOPPING.discard)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the outcome seen, so asyncio does not report it as never retrieved."""
    if task.cancelled():
        return
    if (error := task.exception()) is not None:
        log.debug("background task %s had ended with %r", task.get_name(), error)


def still_stopping() -> int:
    """How many tasks stop_in_background() has not seen end yet."""
    return len(_STOPPING)
