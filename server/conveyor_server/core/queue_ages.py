"""How long tasks have waited in a queue, ready to run: what admission's `max_age_seconds` asks.

The brokers cannot say: they keep no time a message turned ready, and RabbitMQ and SQS cannot be
read without taking the messages. The backend's task index can (core/task_index.py): it lists a
queue's waiting tasks (PENDING and RETRY) oldest first by submission, shared by every replica,
and their records say when each turned ready (`ready_at`). A task turns ready no earlier than
it was submitted, so one that waited longer than a limit was submitted before `now - limit`: the
search looks only there, oldest first, and stops at the first record over the limit.

Approximations: the index shows a task about a second and a half after it is written (a limit
of a few seconds or more is what this is for); records that wait but are not ready (a delay not
yet due, a workflow step whose turn has not come) are skipped, and after MAX_PAGES pages of
only those the queue counts as within its limit. Tasks held back by a pause, a rate limit or the
lack of a worker for their name wait, and count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from conveyor.internal.v1 import records_pb2
from conveyor.values import seconds_of

from ..backends.task_index import TaskQuery
from .records import TaskStates
from .task_index import TaskIndexer
from .withdrawn import due_at, queued

WAITING_STATES = frozenset({TaskStates.TASK_STATE_PENDING, TaskStates.TASK_STATE_RETRY})
PAGE = 50
# Pages read before giving up on finding a ready task among delayed ones (the queue is admitted).
MAX_PAGES = 3


def ready_at(record: records_pb2.TaskRecord) -> float:
    """Epoch seconds when a queued task turned ready (or will): published, and its delay due."""
    published = record.enqueued_at if record.HasField("enqueued_at") else record.result.submitted_at
    return max(seconds_of(published), due_at(record))


class QueueAges:
    def __init__(self, indexer: TaskIndexer, clock: Callable[[], float] = time.time) -> None:
        self.indexer = indexer
        self._clock = clock

    async def waited_past(self, queue: str, limit_seconds: float) -> float | None:
        """Seconds the first task of `queue` found ready for longer than `limit_seconds` has
        waited (the oldest by submission), or None when there is none."""
        now = self._clock()
        query = TaskQuery(states=WAITING_STATES, queue=queue, until_us=int((now - limit_seconds) * 1e6),
                          limit=PAGE, oldest_first=True)
        token = ""
        for _ in range(MAX_PAGES):
            page = await self.indexer.find(query, token)
            for record in page.records:
                if queued(record) and now - ready_at(record) > limit_seconds:
                    return now - ready_at(record)
            token = page.next_page_token
            if not token:
                return None
        return None
