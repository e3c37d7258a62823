"""Which queues are active, and deleting an empty queue.

A deleted queue leaves the broker's list (and its pause goes), until a task is submitted to it
again. Only an empty queue is deleted: a queue holding tasks is refused, or with `force` has
its ready and delayed tasks purged first (they end CANCELLED, so nothing waits on them);
leased tasks are never dropped, so a queue with tasks in flight is refused even then."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from conveyor.v1 import admin_service_pb2

from ..brokers.base import Broker
from .errors import FailedPrecondition, NotFound
from .pauses import QueuePauses, check_queue

Purge = Callable[[str], Awaitable[int]]


def active_queue(info: admin_service_pb2.QueueInfo, served: set[str]) -> bool:
    """Holds tasks (ready, delayed, in flight or unroutable), is paused, or a live worker serves it."""
    return bool(info.ready or info.delayed or info.in_flight or info.unroutable or info.paused
                or info.name in served)


async def delete_queue(broker: Broker, pauses: QueuePauses, purge: Purge, queue: str, force: bool) -> int:
    """Delete `queue` when it is empty (after purging it, with `force`); returns how many tasks
    were purged. Raises QueueDeletionUnsupported (before any purge) on an engine that cannot."""
    check_queue(queue)
    paused = queue in await pauses.refresh()
    if queue not in await broker.queues() and not paused:
        raise NotFound(f"no queue named {queue!r}", reason="QUEUE_NOT_FOUND", metadata={"queue": queue})
    purged = 0
    deleted = await broker.delete_queue(queue)
    if not deleted and force:
        purged = await purge(queue)
        deleted = await broker.delete_queue(queue)
    if not deleted:
        stats = await broker.stats(queue)
        if force or not (stats.ready or stats.delayed):
            raise FailedPrecondition(
                f"queue {queue!r} has {stats.in_flight} tasks in flight (leased to workers): not deleted; "
                "try again once they end"
            )
        raise FailedPrecondition(
            f"queue {queue!r} is not empty ({stats.ready} ready, {stats.delayed} delayed, {stats.in_flight} in "
            "flight): not deleted; force purges its ready and delayed tasks first"
        )
    if paused:
        await pauses.resume(queue)
    return purged
