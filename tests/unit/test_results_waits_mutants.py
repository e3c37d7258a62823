"""Reading results, second pass (issue #23): what mutation testing of core/results.py found
unpinned in a workflow's result (its shape, and a wait on it that follows the change feed,
re-reads only what changed and rescans when the feed is quiet) and in the waits and watches of
single tasks (a write seen here needs no read; a notification the feed lost is not lost).

On the shared memory engines of tests/unit/replicas.py. Tasks end by a write of their record
(`TaskStore.update`) rather than through a worker, so that the test alone decides what changes
and when; reads are counted at the reader's store, combines at `results.workflow_outcome`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Sequence

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, workflow_pb2
from conveyor_server.app import Core
from conveyor_server.core import results
from conveyor_server.core.canvas import NodeOutcome
from conveyor_server.core.canvas.reading import workflow_outcome
from conveyor_server.core.records import is_terminal, transition
from conveyor_server.core.store import Loaded
from tests.support.processes import until
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_canvas_primitives import chain_of, group_of, request, step
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_results_mutants import events_until_done, succeed

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
WF = workflow_pb2

SUCCESS = result_pb2.TASK_STATE_SUCCESS
STARTED = result_pb2.TASK_STATE_STARTED
RECEIVED = result_pb2.TASK_STATE_RECEIVED
PENDING = result_pb2.TASK_STATE_PENDING


def recorded_loads(core: Core, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids of every read of records through `core`'s store from now on, in order."""
    loads: list[list[str]] = []
    read = core.store.load

    async def load(task_ids: Sequence[str]) -> dict[str, Loaded]:
        loads.append(list(task_ids))
        return await read(task_ids)

    monkeypatch.setattr(core.store, "load", load)
    return loads


def counted_combines(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per combine of a workflow's records into its outcome (True: it had ended)."""
    combines: list[bool] = []

    def counting(plan: records_pb2.WorkflowPlan, records: dict[str, records_pb2.TaskRecord]) -> NodeOutcome | None:
        outcome = workflow_outcome(plan, records)
        combines.append(outcome is not None)
        return outcome

    monkeypatch.setattr(results, "workflow_outcome", counting)
    return combines


def succeed_at(seconds: int) -> Callable[[str, records_pb2.TaskRecord], bool]:
    """A record mutation: the task ends successfully at `seconds` past the epoch."""

    def ended(_: str, record: records_pb2.TaskRecord) -> bool:
        transition(record, SUCCESS, at=Timestamp(seconds=seconds))
        return True

    return ended


async def end(replicas: Replicas, *task_ids: str) -> None:
    """The tasks end successfully, written by replica a (the waits below read through b)."""
    assert set(await replicas.a.store.update(list(task_ids), succeed)) == set(task_ids)


async def a_group(replicas: Replicas, *task_ids: str) -> str:
    """A group of these tasks, submitted; its workflow id."""
    [response] = await submit(replicas.a, request(group_of(*(step(t) for t in task_ids))))
    return response.workflow_id


async def plan_of(replicas: Replicas, workflow_id: str) -> records_pb2.WorkflowPlan:
    plan = await replicas.b.store.plan(workflow_id)
    assert plan is not None
    return plan


# -- a workflow's result: its shape --------------------------------------------------------------

async def test_a_workflow_result_carries_the_workflow_id_its_queue_its_first_submit_and_its_last_end(
    replicas: Replicas,
) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    await replicas.a.store.update(["b"], succeed_at(2_000))
    await replicas.a.store.update(["a"], succeed_at(1_000))
    submitted = [(await replicas.a.store.get(t)) for t in ("a", "b")]
    result = await replicas.b.reader.get(workflow_id)
    assert (result.task_id, result.workflow_id, result.name, result.queue) == (workflow_id, workflow_id, "group", QUEUE)
    assert result.state == SUCCESS
    earliest = min(r.result.submitted_at.ToNanoseconds() for r in submitted if r is not None)
    assert result.HasField("submitted_at") and result.submitted_at.ToNanoseconds() == earliest
    assert result.finished_at == Timestamp(seconds=2_000)


async def test_a_workflow_result_names_a_queue_only_when_all_its_tasks_share_one(replicas: Replicas) -> None:
    elsewhere = WF.Workflow(task=task_pb2.Signature(name="noop", id="b", queue="other"))
    [response] = await submit(replicas.a, request(group_of(step("a"), elsewhere)))
    assert (await replicas.b.reader.get(response.workflow_id)).queue == ""


async def test_a_workflow_whose_final_task_ignores_its_result_says_so_and_only_then(replicas: Replicas) -> None:
    [ignored] = await submit(replicas.a, request(chain_of(step("a"), step("b", ignore_result=True))))
    [kept] = await submit(replicas.a, request(chain_of(step("c", ignore_result=True), step("d"))))
    await end(replicas, "a", "b", "c", "d")
    ignoring = await replicas.b.reader.get(ignored.workflow_id)
    assert ignoring.state == SUCCESS and ignoring.signature.ignore_result is True
    keeping = await replicas.b.reader.get(kept.workflow_id)
    assert keeping.state == SUCCESS and keeping.signature.ignore_result is False


async def test_a_workflow_reads_as_started_once_any_of_its_tasks_is_past_pending(replicas: Replicas) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    assert (await replicas.b.reader.wait(workflow_id, 0)).state == PENDING
    await replicas.a.store.update(["a"], succeed)
    assert (await replicas.b.reader.wait(workflow_id, 0)).state == STARTED


# -- a wait on a workflow ------------------------------------------------------------------------

async def test_a_result_read_without_time_reads_its_records_once_and_follows_no_feed(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    await submit(replicas.a, lone(task(task_id="t1")))
    plan = await plan_of(replicas, workflow_id)
    loads = recorded_loads(replicas.b, monkeypatch)
    assert (await replicas.b.reader.workflow_result(plan)).state == PENDING
    assert (await replicas.b.reader.wait(workflow_id, 0)).state == PENDING
    assert (await replicas.b.reader.wait("t1", 0)).state == PENDING
    assert loads == [["a", "b"], ["a", "b"], ["t1"]]
    assert replicas.backend.watches == 0


async def test_a_wait_for_a_workflow_that_ended_answers_at_once_with_its_result(replicas: Replicas) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    await end(replicas, "a", "b")
    result = await asyncio.wait_for(replicas.b.reader.wait(workflow_id, 30), 5)
    assert result.state == SUCCESS and result.task_id == workflow_id
    assert replicas.backend.watches == 0


async def test_a_wait_on_a_workflow_that_runs_out_answers_with_its_state_as_it_stands(replicas: Replicas) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    await replicas.a.store.update(["a"], succeed)
    result = await asyncio.wait_for(replicas.b.reader.wait(workflow_id, 0.05), 5)
    assert (result.task_id, result.workflow_id, result.state) == (workflow_id, workflow_id, STARTED)


async def test_a_wait_of_a_second_on_a_workflow_ends_when_the_workflow_ends(replicas: Replicas) -> None:
    workflow_id = await a_group(replicas, "a", "b")
    waiting = asyncio.create_task(replicas.b.reader.wait(workflow_id, 1.0))  # a second is a wait too
    await until(lambda: waiting.done() or replicas.backend.watches == 1, 5.0, "the wait follows the feed")
    await end(replicas, "a", "b")
    assert (await asyncio.wait_for(waiting, 5)).state == SUCCESS


async def test_a_wait_on_a_workflow_rereads_only_running_tasks_that_changed_and_combines_when_one_ended(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(results, "RESCAN_SECONDS", 60.0)  # every read below comes from the feed
    workflow_id = await a_group(replicas, "a", "b", "c")
    await end(replicas, "a")
    loads = recorded_loads(replicas.b, monkeypatch)
    combines = counted_combines(monkeypatch)
    waiting = asyncio.create_task(replicas.b.reader.wait(workflow_id, 30))
    # All its tasks; those still running once subscribed, and again as the feed's first news.
    await until(lambda: len(loads) == 3, 5.0, "the wait read its running tasks after subscribing")
    await end(replicas, "b")
    await until(lambda: len(loads) == 4, 5.0, "the wait read the task that changed")
    await end(replicas, "c")
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == SUCCESS
    assert loads == [["a", "b", "c"], ["b", "c"], ["b", "c"], ["b"], ["c"]]
    assert combines == [False, False, True], "once at first, then once per read in which a task ended"


async def test_a_wait_on_a_workflow_rescans_only_its_running_tasks_while_the_feed_is_quiet(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(results, "RESCAN_SECONDS", 0.01)
    workflow_id = await a_group(replicas, "a", "b")
    loads = recorded_loads(replicas.b, monkeypatch)
    waiting = asyncio.create_task(replicas.b.reader.wait(workflow_id, 30))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the wait follows the feed")
    await end(replicas, "a")
    await until(lambda: loads[-1] == ["b"], 5.0, "a rescan of the one task still running")
    await end(replicas, "b")
    assert (await asyncio.wait_for(waiting, 5)).state == SUCCESS


# -- waits and watches of tasks ------------------------------------------------------------------

async def test_a_wait_answered_by_a_write_here_in_its_first_moment_reads_nothing(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    loads = recorded_loads(replicas.a, monkeypatch)
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 5))
    await asyncio.sleep(0)  # it took the pending record from this replica's own write and waits
    await replicas.a.store.update(["t1"], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == SUCCESS
    assert loads == []
    assert replicas.backend.watches == 0


async def test_a_wait_answered_by_a_write_here_wakes_in_the_next_loop_turn(replicas: Replicas) -> None:
    """Before the code that recorded the result goes on (OutcomeRecorder.record yields one turn
    for this, then acks): the waiting client is answered first."""
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 5))
    await asyncio.sleep(0)
    await replicas.a.store.update(["t1"], succeed)
    await asyncio.sleep(0)
    assert waiting.done() and waiting.result().state == SUCCESS


async def test_a_wait_whose_first_moment_passes_still_takes_a_write_here(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first wait's time runs out (the task runs nowhere here) and the wait follows the
    change feed too; a write here after that still answers it, without the feed."""
    async def feed_that_never_answers(task_id: str) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(replicas.a.reader, "_terminal_result", feed_that_never_answers)
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 5))
    await asyncio.sleep(results.FEED_AFTER_SECONDS * 3)
    assert not waiting.done()
    await replicas.a.store.update(["t1"], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == SUCCESS


async def test_a_wait_answered_through_the_feed_reads_nothing_after_the_read_that_saw_the_end(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.b.reader.wait("t1", 30))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the wait follows the feed")
    read = replicas.b.store.load

    async def load(task_ids: Sequence[str]) -> dict[str, Loaded]:
        found = await read(task_ids)
        if any(is_terminal(loaded.record) for loaded in found.values()):
            replicas.backend.fail_reads = 1_000  # any read after this one fails
        return found

    monkeypatch.setattr(replicas.b.store, "load", load)
    await replicas.a.store.update(["t1"], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == SUCCESS


async def test_a_watch_sees_a_change_its_feed_lost_at_the_next_rescan(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def lost(_: Collection[str]) -> AsyncIterator[set[str]]:
        await asyncio.Event().wait()  # a feed that never tells of a change
        yield set()

    monkeypatch.setattr(results, "RESCAN_SECONDS", 0.01)
    monkeypatch.setattr(replicas.backend, "watch", lost)
    await submit(replicas.a, lone(task(task_id="t1")))
    loads = recorded_loads(replicas.b, monkeypatch)
    watching = asyncio.create_task(events_until_done(replicas, ["t1"]))
    await until(lambda: bool(loads), 5.0, "the watch read the task while it was pending")
    await replicas.a.store.update(["t1"], succeed)
    seen = await asyncio.wait_for(watching, 5)
    assert seen == [("t1", PENDING), ("t1", SUCCESS)]


async def test_a_watch_over_many_tasks_rereads_only_the_tasks_that_changed(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """O(changes), not O(tasks x changes): ending 50 of 500 watched tasks one at a time reads
    each of those again (a few times at most), never the 450 that did not change."""
    monkeypatch.setattr(results, "RESCAN_SECONDS", 60.0)
    ids = [f"t{n:03d}" for n in range(500)]
    await submit(replicas.a, *(lone(task(task_id=t)) for t in ids))
    loads = recorded_loads(replicas.b, monkeypatch)
    seen: list[tuple[str, int]] = []
    told = asyncio.Event()  # set at each event the watch yields

    async def follow() -> None:
        async for event in replicas.b.reader.watch(ids, until_done=False):
            seen.append((event.task_id, event.state))
            told.set()

    async def told_until(condition: Callable[[], object], what: str) -> None:
        """Wait until `condition` holds, checked at each event (polling slept a few ms per change)."""
        try:
            async with asyncio.timeout(5.0):
                while not condition():
                    told.clear()
                    await told.wait()
        except TimeoutError:
            raise AssertionError(f"{what} not met within 5.0 s") from None

    watching = asyncio.create_task(follow())
    try:
        await told_until(lambda: replicas.backend.watches == 1 and len(seen) == len(ids), "the first read")
        for task_id in ids[:50]:
            await replicas.a.store.update([task_id], succeed)
            ended = (task_id, SUCCESS)
            await told_until(lambda: ended in seen, f"{task_id} ended")  # noqa: B023 (awaited here)
    finally:
        watching.cancel()
    reads = [task_id for load in loads for task_id in load]
    assert reads.count(ids[-1]) <= 2, "an unchanged task is read once (and once more after subscribing)"
    assert len(reads) <= 2 * len(ids) + 3 * 50, f"{len(reads)} record reads for 50 changes of 500 tasks"
    assert all([s for t, s in seen if t == task_id] == [PENDING, SUCCESS] for task_id in ids[:50])


async def test_a_watch_until_done_ends_when_its_last_open_task_ends_and_rescans_only_open_ones(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def quiet(_: Collection[str]) -> AsyncIterator[set[str]]:
        await asyncio.Event().wait()  # a feed that never tells of a change: only rescans see them
        yield set()

    monkeypatch.setattr(results, "RESCAN_SECONDS", 0.01)
    monkeypatch.setattr(replicas.backend, "watch", quiet)
    await submit(replicas.a, lone(task(task_id="done")), lone(task(task_id="open")))
    await replicas.a.store.update(["done"], succeed)
    loads = recorded_loads(replicas.b, monkeypatch)
    watching = asyncio.create_task(events_until_done(replicas, ["done", "open"]))
    try:
        await until(lambda: len(loads) >= 3, 5.0, "a few rescans")
        assert loads[0] == ["done", "open"] and all(load == ["open"] for load in loads[1:]), loads[:5]
        await replicas.a.store.update(["open"], succeed)
        seen = await asyncio.wait_for(watching, 5)
    finally:
        watching.cancel()
    assert seen[-1] == ("open", SUCCESS) and ("done", SUCCESS) in seen


async def watched_on_a(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> tuple[asyncio.Task[None], list[list[str]], list[tuple[str, int]]]:
    """Tasks "here" and "there" watched on replica a, once the watch made its first reads:
    the watch, a's record reads and the events seen. Every later read comes from the feed."""
    monkeypatch.setattr(results, "RESCAN_SECONDS", 60.0)
    for task_id in ("here", "there"):
        await submit(replicas.a, lone(task(task_id=task_id)))
    loads = recorded_loads(replicas.a, monkeypatch)
    seen: list[tuple[str, int]] = []

    async def watch() -> None:
        async for event in replicas.a.reader.watch(["here", "there"]):
            seen.append((event.task_id, event.state))

    watching = asyncio.create_task(watch())
    await until(lambda: len(loads) == 2, 5.0, "the watch's first read, and again as the feed's first news")
    return watching, loads, seen


async def test_a_watch_takes_a_task_this_replica_ended_from_the_store_and_never_reads_it_again(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    watching, loads, seen = await watched_on_a(replicas, monkeypatch)
    await replicas.a.store.update(["here"], succeed)  # ended by this replica
    await until(lambda: ("here", SUCCESS) in seen, 5.0, "the watch sent the end it was told of")
    await replicas.b.store.update(["there"], succeed)  # ended by another: only the feed tells
    await asyncio.wait_for(watching, 5)
    assert loads == [["here", "there"], ["here", "there"], ["there"]], "the task ended here was never read again"
    assert [state for task_id, state in seen if task_id == "here"][-1] == SUCCESS
    assert ("there", SUCCESS) in seen


def moved_to(state: result_pb2.TaskState.ValueType) -> Callable[[str, records_pb2.TaskRecord], bool]:
    def mutate(_: str, record: records_pb2.TaskRecord) -> bool:
        transition(record, state)
        return True

    return mutate


async def test_a_watch_takes_this_replicas_writes_from_the_store_and_reads_only_the_changes_of_others(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feed tells the version each write made (the memory engine's, like Redis's): the
    watch holds the version this replica wrote, so it reads none of its own writes again,
    and reads a write by another replica, even one that follows a write of its own."""
    watching, loads, seen = await watched_on_a(replicas, monkeypatch)
    try:
        await replicas.a.store.update(["here"], moved_to(RECEIVED))  # written here
        await until(lambda: ("here", RECEIVED) in seen, 5.0, "the watch sent the write it was told of")
        await replicas.b.store.update(["there"], moved_to(RECEIVED))  # written by another replica
        await until(lambda: ("there", RECEIVED) in seen, 5.0, "the watch read the other replica's write")
        await replicas.b.store.update(["here"], moved_to(STARTED))  # another replica, after a write here
        await until(lambda: ("here", STARTED) in seen, 5.0, "the watch read the write that followed its own")
        await asyncio.sleep(0.05)  # any read still to come
    finally:
        watching.cancel()
    assert loads == [["here", "there"], ["here", "there"], ["there"], ["here"]], f"reads: {loads}"
    assert seen == [("here", PENDING), ("there", PENDING), ("here", RECEIVED), ("there", RECEIVED), ("here", STARTED)]
