"""core/withdrawn.py: how the cancelled tasks still queued are counted per queue (ready or
delayed at a given time, every one of them whatever its id), read back from the backend in
bounded pages with a cursor each engine takes, and taken out of a queue's numbers."""

from __future__ import annotations

from collections.abc import Iterable

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core import withdrawn
from conveyor_server.core.records import TaskStates
from conveyor_server.core.withdrawn import PAGE, Withdrawn

DUE = 1_700_000_000.0


class PagedBackend(MemoryBackend):
    """The memory backend, noting the size of every group read, and refusing a cursor that is not
    text as Redis does (its client cannot send None)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        if not isinstance(after, str):
            raise TypeError(f"a members cursor must be text, not {type(after).__name__}")
        page = await super().members(group, after, limit)
        self.reads.append(len(page))
        return page


def queued(task_id: str, queue: str = "q", eta: float | None = None) -> records_pb2.TaskRecord:
    record = records_pb2.TaskRecord(enqueued=True)
    record.result.task_id, record.result.queue, record.result.state = task_id, queue, TaskStates.TASK_STATE_PENDING
    if eta is not None:
        record.result.signature.eta.FromSeconds(int(eta))
    return record


async def listed(records: Iterable[records_pb2.TaskRecord]) -> PagedBackend:
    backend = PagedBackend()
    await withdrawn.withdraw(backend, records)
    return backend


async def test_a_task_due_at_the_counting_time_counts_as_ready() -> None:
    backend = await listed([queued("t1", eta=DUE)])
    assert await withdrawn.counts(backend, now=DUE) == {"q": Withdrawn(ready=1)}
    assert await withdrawn.counts(backend, now=DUE - 1) == {"q": Withdrawn(delayed=1)}


async def test_each_delayed_task_counts_once() -> None:
    backend = await listed([queued(f"t{i}", eta=DUE) for i in range(3)])
    assert await withdrawn.counts(backend, now=DUE - 60) == {"q": Withdrawn(delayed=3)}


async def test_counts_are_taken_at_the_time_given_not_the_current_time() -> None:
    # Due long ago by the wall clock, but not yet at the time asked about.
    backend = await listed([queued("t1", eta=1_000.0)])
    assert await withdrawn.counts(backend, now=500.0) == {"q": Withdrawn(delayed=1)}


async def test_tasks_whose_ids_sort_before_letters_are_counted() -> None:
    backend = await listed([queued("0001"), queued("A-1"), queued("Z9"), queued("t1")])
    assert await withdrawn.counts(backend, now=DUE) == {"q": Withdrawn(ready=4)}


async def test_a_long_list_is_read_in_pages() -> None:
    backend = await listed([queued(f"t{i:05}") for i in range(PAGE + 234)])
    assert await withdrawn.counts(backend, now=DUE) == {"q": Withdrawn(ready=PAGE + 234)}
    assert backend.reads == [PAGE, 234, 0]


def test_a_queue_whose_every_message_is_withdrawn_shows_none() -> None:
    info = admin_service_pb2.QueueInfo(name="q", ready=2, delayed=3)
    withdrawn.count_out(info, Withdrawn(ready=2, delayed=5))
    assert (info.ready, info.delayed) == (0, 0)
    info = admin_service_pb2.QueueInfo(name="q", ready=5, delayed=1)
    withdrawn.count_out(info, Withdrawn(ready=2))
    assert (info.ready, info.delayed) == (3, 1)
