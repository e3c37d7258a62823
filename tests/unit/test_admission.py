"""Admission control's age limit (core/admission.py, core/queue_ages.py) on the memory engines:
which waiting tasks count as ready and for how long, the refusal's reason and retry hint, the
short cache that keeps engine reads off the submit path, and the check at startup that the
backend can measure ages (the settings are tested with max_depth's in
tests/e2e/test_admission_and_scopes.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import ConfigError, QueueLimit
from conveyor_server.core.admission import STATS_MAX_AGE_SECONDS, Admission, Recent, admission_for
from conveyor_server.core.errors import ResourceExhausted
from conveyor_server.core.queue_ages import MAX_PAGES, PAGE, QueueAges, ready_at
from conveyor_server.core.records import TaskStates, new_record, transition
from conveyor_server.core.store import TaskStore
from conveyor_server.core.task_index import TaskIndexer

SUBMITTED = 1_700_000_000.0


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


@dataclass
class Index:
    store: TaskStore
    indexer: TaskIndexer
    queue: str

    async def add(self, *records: records_pb2.TaskRecord) -> None:
        await self.store.create(records)
        await self.indexer.flush()

    async def move(self, task_id: str, state: result_pb2.TaskState.ValueType) -> None:
        def change(_: str, record: records_pb2.TaskRecord) -> bool:
            transition(record, state)
            return True

        await self.store.update([task_id], change)
        await self.indexer.flush()


@pytest.fixture
async def index() -> AsyncIterator[Index]:
    backend = MemoryBackend()
    await backend.connect()
    indexer = TaskIndexer.for_backend(backend)
    yield Index(TaskStore(backend, write_hook=indexer.note), indexer, f"q-{uuid.uuid4().hex[:8]}")
    await indexer.close()
    await backend.close()


def waiting(queue: str, task_id: str, at: float = SUBMITTED, enqueued: bool = True,
            **signature: object) -> records_pb2.TaskRecord:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return new_record(task_pb2.Signature(id=task_id, name="add", queue=queue, **signature),  # type: ignore[arg-type]
                      at=stamp, enqueued=enqueued)


async def test_a_task_ready_longer_than_the_limit_is_found_with_its_age(index: Index) -> None:
    await index.add(waiting(index.queue, "old"), waiting(index.queue, "young", at=SUBMITTED + 50))
    ages = QueueAges(index.indexer, Clock(SUBMITTED + 60))
    assert await ages.waited_past(index.queue, 30) == pytest.approx(60)
    assert await ages.waited_past(index.queue, 61) is None
    assert await ages.waited_past("another-queue", 1) is None


async def test_tasks_that_are_not_ready_or_not_waiting_do_not_count(index: Index) -> None:
    queue = index.queue
    await index.add(
        waiting(queue, "delayed", countdown={"seconds": 100}),  # ready at SUBMITTED + 100
        waiting(queue, "future-eta", eta={"seconds": int(SUBMITTED) + 100}),
        waiting(queue, "later-step", enqueued=False),  # a workflow step whose turn has not come
        waiting(queue, "running"),
    )
    await index.move("running", TaskStates.TASK_STATE_STARTED)
    ages = QueueAges(index.indexer, Clock(SUBMITTED + 60))
    assert await ages.waited_past(queue, 10) is None
    # Once the delays are due, those tasks wait like any other, counted from when they turned ready.
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 130)).waited_past(queue, 10) == pytest.approx(30)


async def test_a_retry_counts_from_when_it_was_due(index: Index) -> None:
    record = waiting(index.queue, "retried")
    transition(record, TaskStates.TASK_STATE_RETRY)
    record.retry_at.FromSeconds(int(SUBMITTED) + 40)
    await index.add(record)
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 45)).waited_past(index.queue, 10) is None
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 60)).waited_past(index.queue, 10) == pytest.approx(20)


async def test_a_ready_task_behind_pages_of_delayed_ones_is_found_within_the_page_budget(index: Index) -> None:
    queue = index.queue
    delayed = [waiting(queue, f"d{i:04d}", at=SUBMITTED + i / 1000, countdown={"seconds": 999})
               for i in range(PAGE * MAX_PAGES - 1)]
    await index.add(*delayed, waiting(queue, "ready", at=SUBMITTED + 1))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 60)).waited_past(queue, 10) == pytest.approx(59)


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    engine = MemoryBroker()
    await engine.connect()
    yield engine
    await engine.close()


async def test_a_queue_past_its_max_age_refuses_with_a_retry_hint_until_the_task_is_taken(
    index: Index, broker: MemoryBroker,
) -> None:
    wall, monotonic = Clock(SUBMITTED + 20), Clock(0.0)
    admission = Admission(broker, {index.queue: QueueLimit(max_age_seconds=15)},
                          QueueAges(index.indexer, wall), clock=monotonic)
    await index.add(waiting(index.queue, "old"))
    with pytest.raises(ResourceExhausted) as refused:
        await admission.admit([index.queue, "unlimited"])
    assert f"queue {index.queue!r} has a task ready for 20.0 s, past its max_age_seconds of 15" in str(refused.value)
    assert refused.value.retry_after_seconds == 1.0
    assert refused.value.reason == "QUEUE_BEHIND"
    assert refused.value.metadata == {"queue": index.queue, "max_age_seconds": "15"}
    await admission.admit(["unlimited"])

    await index.move("old", TaskStates.TASK_STATE_RECEIVED)
    with pytest.raises(ResourceExhausted):  # the age read a moment ago still holds
        await admission.admit([index.queue])
    monotonic.at += STATS_MAX_AGE_SECONDS
    await admission.admit([index.queue])


async def test_concurrent_readers_share_one_read_and_the_value_is_read_again_once_old() -> None:
    clock, reads = Clock(0.0), []
    release = asyncio.Event()

    async def read() -> int:
        reads.append(clock.at)
        await release.wait()
        return len(reads)

    recent: Recent[int] = Recent(0.5, clock)
    waiting_readers = [asyncio.create_task(recent.get("q", read)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting_readers) == [1] * 10
    clock.at = 0.4
    assert await recent.get("q", read) == 1
    clock.at = 0.5
    assert await recent.get("q", read) == 2
    assert reads == [0.0, 0.5]


async def test_a_failed_read_reaches_its_callers_and_is_tried_again_by_the_next() -> None:
    recent: Recent[int] = Recent(0.5, Clock(0.0))

    async def broken() -> int:
        raise ConnectionError("backend away")

    async def fine() -> int:
        return 7

    with pytest.raises(ConnectionError):
        await recent.get("q", broken)
    assert await recent.get("q", fine) == 7


def test_an_age_limit_without_a_task_index_stops_the_server_at_startup() -> None:
    backend = MemoryBackend()
    off = TaskIndexer.for_backend(backend, enabled=False)
    with pytest.raises(ConfigError, match=r"max_age_seconds \(on emails\) is measured with the task index"):
        admission_for(MemoryBroker(), {"emails": QueueLimit(max_age_seconds=60)}, off)
    admission_for(MemoryBroker(), {"emails": QueueLimit(max_depth=10)}, off)  # depth needs no index


async def test_a_queue_at_its_max_depth_refuses_with_its_reason_until_it_drains(broker: MemoryBroker) -> None:
    monotonic = Clock(1_000.0)  # far from 0: a cached value's age is now minus when it was read
    admission = Admission(broker, {"emails": QueueLimit(max_depth=3)}, clock=monotonic)
    await broker.publish("emails", [OutgoingMessage(f"m{n}", b"x") for n in range(2)])
    await broker.publish("other", [OutgoingMessage(f"o{n}", b"x") for n in range(5)])
    await admission.admit(["emails", "other"])  # two ready of three; "other" has no limit

    await broker.publish("emails", [OutgoingMessage("m2", b"x")])
    await admission.admit(["emails"])  # the depth read a moment ago still holds
    monotonic.at += STATS_MAX_AGE_SECONDS
    with pytest.raises(ResourceExhausted) as refused:
        await admission.admit(["emails"])  # exactly at the limit
    assert str(refused.value) == "queue 'emails' holds 3 ready tasks, at its max_depth of 3; retry in 1 s"
    assert refused.value.retry_after_seconds == 1.0
    assert (refused.value.reason, refused.value.metadata) == ("QUEUE_FULL", {"queue": "emails", "max_depth": "3"})

    await broker.ack(await broker.fetch("emails", 1, 30.0))
    monotonic.at += STATS_MAX_AGE_SECONDS - 0.01
    with pytest.raises(ResourceExhausted):
        await admission.admit(["emails"])
    monotonic.at += 0.02
    await admission.admit(["emails"])


def test_queues_without_a_limit_are_not_watched() -> None:
    admission = Admission(MemoryBroker(), {"a": QueueLimit(), "b": QueueLimit(max_depth=1)})
    assert list(admission.limits) == ["b"]
    with pytest.raises(ValueError, match="a max_age_seconds limit needs the task index"):
        Admission(MemoryBroker(), {"c": QueueLimit(max_age_seconds=5)})


async def test_a_task_that_waited_exactly_the_limit_is_not_past_it(index: Index) -> None:
    await index.add(waiting(index.queue, "on-the-edge"))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 30)).waited_past(index.queue, 30) is None
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 30.5)).waited_past(index.queue, 30) == pytest.approx(30.5)


async def test_the_oldest_waiting_task_is_the_one_reported(index: Index) -> None:
    await index.add(*(waiting(index.queue, f"t{n}", at=SUBMITTED + n) for n in range(5)))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 100)).waited_past(index.queue, 10) == pytest.approx(100)


def test_a_task_turns_ready_when_published_and_its_delay_is_due() -> None:
    published_late = waiting("q", "late", at=SUBMITTED)
    published_late.enqueued_at.FromNanoseconds(int((SUBMITTED + 7) * 1e9))
    assert ready_at(published_late) == pytest.approx(SUBMITTED + 7, abs=1e-3)
    never_published = waiting("q", "plain", at=SUBMITTED)
    never_published.ClearField("enqueued_at")
    assert ready_at(never_published) == pytest.approx(SUBMITTED, abs=1e-3)  # the submission time stands in
