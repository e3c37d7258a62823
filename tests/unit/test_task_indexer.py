"""The task indexer's batching (core/task_index.py): which noted entries a flush takes, and a
flusher that waits for held entries instead of spinning on them.

The indexer times how long it has held an entry on its clock: tests set it by hand (ManualClock),
or, under @pytest.mark.looptime, give it the loop's (loop_clock()) so that its hold time passes
with the loop's fake time, and wait for writes on the loop's time (written()).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor.values import micros_of
from conveyor_server.backends.memory_task_index import MemoryTaskIndex
from conveyor_server.backends.task_index import IndexEntry
from conveyor_server.core import task_index
from conveyor_server.core.clock import SYSTEM_CLOCK, Clock
from conveyor_server.core.records import TaskStates, new_record, transition
from conveyor_server.core.task_index import TaskIndexer
from conveyor_server.engines import open_backend
from tests.support.loop_time import loop_clock
from tests.support.processes import until
from tests.unit.clocks import ManualClock


class CountingIndex(MemoryTaskIndex):
    """The memory index, recording each entry written and the loop time of each write tried;
    it refuses the first `failures` writes, as an engine that is away does."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(60)
        self.failures = failures
        self.written: list[tuple[str, int]] = []
        self.tried_at: list[float] = []
        self.tried = asyncio.Event()  # set at each write tried (see written())

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        self.tried_at.append(asyncio.get_running_loop().time())
        self.tried.set()
        if len(self.tried_at) <= self.failures:
            raise ConnectionError("engine away")
        self.written.extend((e.task_id, e.state) for e in entries)
        await super().write(entries)


def pending(task_id: str) -> records_pb2.TaskRecord:
    return new_record(task_pb2.Signature(id=task_id, name="add", queue="q"))


def moved(record: records_pb2.TaskRecord, state: int) -> records_pb2.TaskRecord:
    transition(record, state)  # type: ignore[arg-type]
    return record


def indexer(failures: int = 0, clock: Clock = SYSTEM_CLOCK) -> tuple[TaskIndexer, CountingIndex]:
    index = CountingIndex(failures)
    return TaskIndexer(open_backend("memory://"), index, clock=clock), index


async def written(index: CountingIndex, condition: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    """Wait (on the loop's clock: no real time under looptime) until `condition` holds, checked
    after each write the index is asked for; AssertionError naming `what` after `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while not condition():
                index.tried.clear()
                await index.tried.wait()
    except TimeoutError:
        raise AssertionError(f"{what} not met within {seconds} s of loop time") from None


async def test_a_flush_takes_ended_entries_and_live_ones_held_long_enough() -> None:
    manual = ManualClock()
    subject, _ = indexer(clock=manual.clock)
    held_long, quick, young = pending("held-long"), pending("quick"), pending("young")
    subject.note(held_long)
    manual.advance(0.5)
    subject.note(quick)
    manual.advance(0.4)
    subject.note(young)
    manual.advance(0.3)  # held-long was first noted 1.2 s ago, quick 0.7 s, young 0.3 s
    subject.note(moved(held_long, TaskStates.TASK_STATE_STARTED))  # keeps its place: noted first long ago
    subject.note(moved(quick, TaskStates.TASK_STATE_SUCCESS))
    due = subject._take_due(everything=False)
    assert {task_id: noted[0] for task_id, noted in due.items()} == {
        "held-long": TaskStates.TASK_STATE_STARTED, "quick": TaskStates.TASK_STATE_SUCCESS,
    }
    assert subject._take_due(everything=False) == {}
    assert list(subject._take_due(everything=True)) == ["young"]
    await subject.close()


async def test_a_live_entry_that_ends_is_due_at_once_and_written_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_index, "HOLD_LIVE_SECONDS", 60.0)
    subject, index = indexer()
    record = pending("t")
    subject.note(record)
    assert subject._take_due(everything=False) == {}
    subject.note(moved(record, TaskStates.TASK_STATE_FAILURE))
    assert await subject.flush(everything=False) == 1
    assert index.written == [("t", TaskStates.TASK_STATE_FAILURE)]
    await subject.close()
    assert index.written == [("t", TaskStates.TASK_STATE_FAILURE)]


@pytest.mark.looptime
async def test_many_held_entries_leave_the_event_loop_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """More live entries than FLUSH_AT_ENTRIES, none due yet: the flusher waits for them (it
    used to call flush back to back, holding the loop until the first came due).

    The test's sleeps take no real time (looptime), while the indexer holds its entries on the
    real clock: a flusher that spins holds the loop for the real hold time, which is measured."""
    monkeypatch.setattr(task_index, "HOLD_LIVE_SECONDS", 3.0)
    subject, index = indexer()
    for i in range(task_index.FLUSH_AT_ENTRIES + 10):
        subject.note(pending(f"t{i}"))
    started = time.monotonic()
    for _ in range(5):
        await asyncio.sleep(0.01)
    assert time.monotonic() - started < 1.0
    assert index.written == []
    await subject.close()
    assert len(index.written) == task_index.FLUSH_AT_ENTRIES + 10


async def test_a_failed_write_keeps_the_entries_and_a_newer_note_wins() -> None:
    second = pending("b")

    class Failing(CountingIndex):
        async def write(self, entries: Sequence[IndexEntry]) -> None:
            subject.note(moved(second, TaskStates.TASK_STATE_STARTED))  # noted while the write is under way
            raise ConnectionError("away")

    subject = TaskIndexer(open_backend("memory://"), Failing())
    subject.note(moved(pending("a"), TaskStates.TASK_STATE_SUCCESS))
    subject.note(second)
    with pytest.raises(ConnectionError):
        await subject.flush()
    assert {t: n[0] for t, n in subject._ended.items()} == {"a": TaskStates.TASK_STATE_SUCCESS}
    assert {t: n[0] for t, n in subject._live.items()} == {"b": TaskStates.TASK_STATE_STARTED}
    subject.index = None  # nothing to write at close
    await subject.close()


class EntryIndex(MemoryTaskIndex):
    """The memory index, keeping each entry written whole."""

    def __init__(self) -> None:
        super().__init__(60)
        self.entries: list[IndexEntry] = []

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        self.entries.extend(entries)
        await super().write(entries)


async def test_a_state_change_keeps_the_queue_name_and_submission_time_first_noted() -> None:
    index = EntryIndex()
    subject = TaskIndexer(open_backend("memory://"), index)
    record = new_record(task_pb2.Signature(id="t", name="resize", queue="images"))
    subject.note(record)
    subject.note(moved(record, TaskStates.TASK_STATE_STARTED))
    subject.note(moved(record, TaskStates.TASK_STATE_SUCCESS))
    await subject.flush()
    assert index.entries == [IndexEntry("t", TaskStates.TASK_STATE_SUCCESS, "images", "resize",
                                        micros_of(record.result.submitted_at))]
    await subject.close()


async def test_past_max_pending_new_tasks_are_left_out_and_counted_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(task_index, "MAX_PENDING", 2)
    subject, index = indexer()
    live, ended = pending("live"), moved(pending("ended"), TaskStates.TASK_STATE_SUCCESS)
    subject.note(live)
    subject.note(ended)  # one live and one ended: the cap counts both
    subject.note(pending("late-1"))
    subject.note(pending("late-2"))
    subject.note(moved(live, TaskStates.TASK_STATE_STARTED))  # a task already noted is still followed
    with caplog.at_level(logging.WARNING, logger=task_index.__name__):
        await subject.flush()
    assert sorted(index.written) == [("ended", TaskStates.TASK_STATE_SUCCESS), ("live", TaskStates.TASK_STATE_STARTED)]
    assert "away?): 2 updates left out" in caplog.text
    await subject.close()


async def test_a_note_starts_the_background_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_index, "FLUSH_SECONDS", 0.01)
    subject, index = indexer()
    subject.note(moved(pending("t"), TaskStates.TASK_STATE_SUCCESS))
    await until(lambda: index.written == [("t", TaskStates.TASK_STATE_SUCCESS)], 5.0, "written in the background")
    await subject.close()


@pytest.mark.looptime
async def test_a_failed_background_flush_retries_backing_off_to_its_cap_then_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    subject, index = indexer(failures=4, clock=loop_clock())
    with caplog.at_level(logging.WARNING, logger=task_index.__name__):
        subject.note(moved(pending("t"), TaskStates.TASK_STATE_SUCCESS))
        await written(index, lambda: index.written, "written after the engine came back")
    gaps = [round(later - earlier, 2) for earlier, later in zip(index.tried_at, index.tried_at[1:], strict=False)]
    assert gaps == [0.5, 1.0, 2.0, 2.0]  # FLUSH_SECONDS doubled after each failure, up to RETRY_MAX_SECONDS
    assert index.written == [("t", TaskStates.TASK_STATE_SUCCESS)]
    assert "retrying in 0.5 s" in caplog.text and "retrying in 2.0 s" in caplog.text
    await subject.close()


@pytest.mark.looptime
async def test_once_many_ended_entries_wait_the_background_flush_does_not_wait_a_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(task_index, "FLUSH_AT_ENTRIES", 3)
    subject, index = indexer()
    started = asyncio.get_running_loop().time()
    for n in range(3):
        subject.note(moved(pending(f"t-{n}"), TaskStates.TASK_STATE_SUCCESS))
    await until(lambda: len(index.written) == 3, 30.0, "the three written")
    assert index.tried_at == [started]  # one write, before FLUSH_SECONDS passed
    await subject.close()


@pytest.mark.looptime
async def test_the_background_flush_writes_ended_entries_and_leaves_live_ones_until_held_long_enough() -> None:
    subject, index = indexer(clock=loop_clock())
    subject.note(pending("live"))
    subject.note(moved(pending("done"), TaskStates.TASK_STATE_SUCCESS))
    await written(index, lambda: index.written, "the ended entry written")
    assert index.written == [("done", TaskStates.TASK_STATE_SUCCESS)]
    await written(index, lambda: len(index.written) == 2, "the live entry written once held long enough")
    assert index.written[1] == ("live", TaskStates.TASK_STATE_PENDING)
    assert index.tried_at[1] - index.tried_at[0] >= task_index.HOLD_LIVE_SECONDS - task_index.FLUSH_SECONDS
    await subject.close()


@pytest.mark.looptime
async def test_after_a_failed_write_the_background_flush_goes_on_for_entries_still_held() -> None:
    subject, index = indexer(failures=1, clock=loop_clock())
    subject.note(moved(pending("done"), TaskStates.TASK_STATE_SUCCESS))
    subject.note(pending("live"))
    await written(index, lambda: ("live", TaskStates.TASK_STATE_PENDING) in index.written, "the live entry written")
    await subject.close()


async def test_an_ended_task_that_lives_again_is_filed_as_live_only() -> None:
    subject, index = indexer()
    record = moved(pending("t"), TaskStates.TASK_STATE_FAILURE)
    subject.note(record)
    subject.note(moved(record, TaskStates.TASK_STATE_PENDING))  # retried from the dashboard
    assert await subject.flush(everything=False) == 0  # live and young: nothing is due
    assert index.written == []
    await subject.close()
    assert index.written == [("t", TaskStates.TASK_STATE_PENDING)]


async def test_a_live_entry_is_due_once_held_exactly_the_hold_time() -> None:
    manual = ManualClock()
    subject, _ = indexer(clock=manual.clock)
    subject.note(pending("t"))
    manual.advance(task_index.HOLD_LIVE_SECONDS)
    assert list(subject._take_due(everything=False)) == ["t"]
    await subject.close()


async def test_flush_counts_what_it_wrote_and_tells_its_listeners() -> None:
    subject, _ = indexer()
    told: list[int] = []
    subject.on_flush.append(told.append)
    assert await subject.flush() == 0  # nothing noted
    subject.note(pending("a"))
    subject.note(moved(pending("b"), TaskStates.TASK_STATE_SUCCESS))
    assert await subject.flush() == 2
    assert told == [2]
    disabled = TaskIndexer(open_backend("memory://"), None)
    disabled.note(pending("c"))
    assert await disabled.flush() == 0
    await subject.close()


async def test_each_warning_counts_only_the_updates_left_out_since_the_last_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(task_index, "MAX_PENDING", 1)
    subject, _ = indexer()
    with caplog.at_level(logging.WARNING, logger=task_index.__name__):
        subject.note(pending("kept-1"))
        subject.note(pending("left-out-1"))
        subject.note(pending("left-out-2"))
        await subject.flush()
        subject.note(pending("kept-2"))
        subject.note(pending("left-out-3"))
        await subject.flush()
        subject.note(pending("kept-3"))
        await subject.flush()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(": ")[-1] for w in warnings] == ["2 updates left out", "1 updates left out"]
    await subject.close()


async def test_close_leaves_no_flusher_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_index, "FLUSH_SECONDS", 60.0)
    subject, index = indexer()
    subject.note(pending("t"))
    await asyncio.sleep(0)  # the flusher is asleep
    await subject.close()
    assert index.written == [("t", TaskStates.TASK_STATE_PENDING)]
    flushers = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").endswith("_flush_soon")]
    assert flushers == []
