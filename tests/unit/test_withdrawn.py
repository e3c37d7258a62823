"""core/withdrawn.py: cancelled queued tasks are listed, and unlisted, in batched backend writes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core import withdrawn
from conveyor_server.core.records import TaskStates
from conveyor_server.core.withdrawn import WITHDRAWN_GROUP, Withdrawn

# Many more tasks than one backend call takes, so a per-task write would show in the counts.
TASKS = 1_234


class CountingBackend(MemoryBackend):
    """The memory backend, counting group writes by method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        self.calls["add_member"] += 1
        return await super().add_member(group, member, payload, keep)

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        self.calls["add_members"] += 1
        return await super().add_members(group, members, keep)

    async def remove_member(self, group: str, member: str) -> None:
        self.calls["remove_member"] += 1
        await super().remove_member(group, member)

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        self.calls["remove_members"] += 1
        await super().remove_members(group, members)


@pytest.fixture
def backend() -> CountingBackend:
    return CountingBackend()  # the memory engine needs no connect(), and no close() without watches


def queued(task_id: str, queue: str) -> records_pb2.TaskRecord:
    record = records_pb2.TaskRecord(enqueued=True)
    record.result.task_id, record.result.queue, record.result.state = task_id, queue, TaskStates.TASK_STATE_PENDING
    return record


async def test_cancelling_many_queued_tasks_lists_them_in_one_batch(backend: CountingBackend) -> None:
    records = [queued(f"t{i:04}", "q1" if i % 2 else "q2") for i in range(TASKS)]
    # Listed again from another queue (a replayed cancel): the first listing stays.
    await withdrawn.withdraw(backend, [*records, queued("t0000", "q1")])

    assert backend.calls == Counter(add_members=1)
    assert await withdrawn.counts(backend) == {"q1": Withdrawn(ready=TASKS // 2), "q2": Withdrawn(ready=TASKS // 2)}


async def test_dropped_messages_are_unlisted_in_one_batch(backend: CountingBackend) -> None:
    await withdrawn.withdraw(backend, [queued(f"t{i:04}", "q1") for i in range(TASKS)])
    backend.calls.clear()

    await withdrawn.dropped(backend, [f"t{i:04}" for i in range(TASKS - 1)] + ["t0000", "never-listed"])

    assert backend.calls == Counter(remove_members=1)
    assert list(await backend.members(WITHDRAWN_GROUP)) == [f"t{TASKS - 1:04}"]


async def test_a_purge_unlists_its_queue_only_in_one_batch(backend: CountingBackend) -> None:
    await withdrawn.withdraw(backend, [queued(f"t{i:04}", "q1" if i % 2 else "q2") for i in range(TASKS)])
    backend.calls.clear()

    await withdrawn.purged(backend, "q1")

    assert backend.calls == Counter(remove_members=1)
    assert await withdrawn.counts(backend) == {"q2": Withdrawn(ready=TASKS // 2)}
