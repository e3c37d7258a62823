"""Cancelled tasks whose message still sits in their queue.

A cancelled queued task keeps its broker message until a dispatcher fetches and drops it (or a
purge drops it), and brokers count that message as ready (or delayed). So the queue listing
does not show cancelled tasks as work, each one is listed here with its queue and due time
when it is cancelled, and counted out of its queue's numbers until its message is dropped.
The list is a backend group, so it expires with the result TTL if a drop is never seen (a
crash between the ack and the removal): the counts are then as the broker has them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2
from conveyor.values import seconds_of

from ..backends.base import Backend
from .records import TaskStates

WITHDRAWN_GROUP = "withdrawn"
# Members read per backend call.
PAGE = 1_000


@dataclass
class Withdrawn:
    """Ready and delayed messages of one queue whose tasks were cancelled."""

    ready: int = 0
    delayed: int = 0


def queued(record: records_pb2.TaskRecord) -> bool:
    """The task waits in its queue: published, and not handed to a worker."""
    return record.enqueued and record.result.state in (TaskStates.TASK_STATE_PENDING, TaskStates.TASK_STATE_RETRY)


def due_at(record: records_pb2.TaskRecord) -> float:
    """Epoch seconds when a queued task's message turns ready (0: it is ready)."""
    if record.result.state == TaskStates.TASK_STATE_RETRY:
        return seconds_of(record.retry_at)
    signature = record.result.signature
    if signature.HasField("countdown"):
        return seconds_of(record.enqueued_at) + seconds_of(signature.countdown)
    return seconds_of(signature.eta) if signature.HasField("eta") else 0.0


async def withdraw(backend: Backend, records: Iterable[records_pb2.TaskRecord]) -> None:
    """List cancelled tasks that were queued (`queued` before they were cancelled)."""
    listed: dict[str, bytes] = {}
    for record in records:
        # The first listing of a task wins, as in the group itself.
        listed.setdefault(record.result.task_id, f"{record.result.queue}\n{due_at(record):.3f}".encode())
    await backend.add_members(WITHDRAWN_GROUP, listed)


async def dropped(backend: Backend, task_ids: Iterable[str]) -> None:
    """Their messages are gone (acked by a dispatcher, dropped by a purge)."""
    await backend.remove_members(WITHDRAWN_GROUP, list(dict.fromkeys(task_ids)))


async def purged(backend: Backend, queue: str) -> None:
    """A purge dropped the queue's ready and delayed messages, those of cancelled tasks too."""
    gone = [task_id async for task_id, listed_queue, _ in _listed(backend) if listed_queue == queue]
    await backend.remove_members(WITHDRAWN_GROUP, gone)


async def counts(backend: Backend, now: float | None = None) -> dict[str, Withdrawn]:
    """Per queue, the messages of cancelled tasks: ready, or delayed while their due time is ahead."""
    at = time.time() if now is None else now
    found: dict[str, Withdrawn] = {}
    async for _, queue, due in _listed(backend):
        entry = found.setdefault(queue, Withdrawn())
        if due > at:
            entry.delayed += 1
        else:
            entry.ready += 1
    return found


async def _listed(backend: Backend) -> AsyncIterator[tuple[str, str, float]]:
    """Every listed task: its id, queue and due time."""
    after = ""
    while page := await backend.members(WITHDRAWN_GROUP, after=after, limit=PAGE):
        after = max(page)
        for task_id, payload in page.items():
            queue, _, due = payload.decode().partition("\n")
            yield task_id, queue, float(due or 0)


def count_out(info: admin_service_pb2.QueueInfo, withdrawn: Withdrawn | None) -> None:
    """Take a queue's cancelled tasks out of its ready and delayed numbers."""
    if withdrawn is not None:
        info.ready = max(info.ready - withdrawn.ready, 0)
        info.delayed = max(info.delayed - withdrawn.delayed, 0)

