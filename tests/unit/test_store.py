"""TaskStore: updates start from this process's own last writes, stay correct when another
replica wrote since, and tell local listeners about writes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2
from conveyor_server.backends.base import Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core.records import new_record
from conveyor_server.core.store import TaskStore


class CountingBackend(MemoryBackend):
    """A memory backend that counts record reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        self.reads += 1
        return await super().get(keys)


@pytest.fixture
async def backend() -> AsyncIterator[CountingBackend]:
    engine = CountingBackend()
    await engine.connect()
    yield engine
    await engine.close()


def _record(task_id: str) -> records_pb2.TaskRecord:
    return new_record(task_pb2.Signature(id=task_id, name="noop", queue="default"))


def _set_state(state: result_pb2.TaskState.ValueType) -> Callable[[str, records_pb2.TaskRecord], bool]:
    def mutate(task_id: str, record: records_pb2.TaskRecord) -> bool:
        if record.result.state == state:
            return False
        record.result.state = state
        return True

    return mutate


async def test_an_update_of_a_record_written_here_reads_nothing(backend: CountingBackend) -> None:
    store = TaskStore(backend)
    await store.create([_record("a")])
    written = await store.update_loaded(["a"], _set_state(result_pb2.TASK_STATE_RECEIVED))
    assert written["a"].version == 2
    assert backend.reads == 0
    stored = await store.get("a")
    assert stored is not None
    assert stored.result.state == result_pb2.TASK_STATE_RECEIVED


async def test_a_stale_copy_costs_a_reread_not_a_lost_write(backend: CountingBackend) -> None:
    here, there = TaskStore(backend), TaskStore(backend)
    await here.create([_record("a")])
    await there.update(["a"], _set_state(result_pb2.TASK_STATE_STARTED))  # another replica moves it on

    def finish(task_id: str, record: records_pb2.TaskRecord) -> bool:
        # Only a started task may finish: decided from the record, so the stale copy loses.
        if record.result.state != result_pb2.TASK_STATE_STARTED:
            return False
        record.result.state = result_pb2.TASK_STATE_SUCCESS
        return True

    written = await here.update(["a"], finish)
    assert (
        written["a"].result.state == result_pb2.TASK_STATE_SUCCESS
    ), "the declined stale copy was re-asked on a fresh read"
    stored = await there.load(["a"])
    assert stored["a"].version == 3
    assert stored["a"].record.result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_lost_compare_and_set_rereads_and_applies(backend: CountingBackend) -> None:
    here, there = TaskStore(backend), TaskStore(backend)
    await here.create([_record("a")])
    await there.update(["a"], _set_state(result_pb2.TASK_STATE_RECEIVED))
    written = await here.update_loaded(["a"], _set_state(result_pb2.TASK_STATE_CANCELLED))
    assert written["a"].version == 3
    assert backend.reads == 2, "the store that wrote last read nothing; the stale one read once, after losing"


async def test_listeners_hear_this_process_writes_while_registered(backend: CountingBackend) -> None:
    store = TaskStore(backend)
    heard: list[tuple[result_pb2.TaskState.ValueType, int]] = []
    with store.on_write("a", lambda written: heard.append((written.record.result.state, written.version))):
        await store.create([_record("a")])
        await store.update(["a"], _set_state(result_pb2.TASK_STATE_SUCCESS))
        await store.update(["b"], _set_state(result_pb2.TASK_STATE_SUCCESS))  # no such record, nobody told
    await store.update(["a"], _set_state(result_pb2.TASK_STATE_FAILURE))
    assert heard == [(result_pb2.TASK_STATE_PENDING, 1), (result_pb2.TASK_STATE_SUCCESS, 2)]


async def test_only_the_latest_writes_are_remembered(backend: CountingBackend) -> None:
    store = TaskStore(backend, recent_records=2)
    await store.create([_record("a"), _record("b"), _record("c")])
    assert [store.remembers(t) for t in "abc"] == [False, True, True]
    remembered = store.remembered(["b", "c"])
    remembered["b"].record.result.state = result_pb2.TASK_STATE_FAILURE
    assert store.remembered(["b"])["b"].record.result.state == result_pb2.TASK_STATE_PENDING, "callers get copies"
