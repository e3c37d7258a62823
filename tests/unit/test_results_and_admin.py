"""Reading results (get, wait, watch, workflow trees) and the operator's views and actions
(queues, pause, purge, workers, dead letters, replay) on the memory engines."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import result_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor.v1.task_pb2 import Signature
from conveyor_server.core import admin, results
from conveyor_server.core.errors import FailedPrecondition, InvalidArgument, NotFound
from conveyor_server.core.outbox import OUTBOX_GROUP
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from conveyor_server.core.results import MAX_WATCHED_TASKS, _aggregate
from conveyor_server.core.withdrawn import WITHDRAWN_GROUP
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas, run_all, run_ready, sent
from tests.unit.test_durability import QUEUE, Outage, chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
WF = workflow_pb2


# -- get, wait, watch ------------------------------------------------------------------------------


async def test_an_unknown_task_is_not_found_never_pending(replicas: Replicas) -> None:
    with pytest.raises(NotFound, match="no task with id 'nope'"):
        await replicas.a.reader.get("nope")
    with pytest.raises(NotFound):
        await replicas.a.reader.wait("nope", 0)


async def test_a_wait_without_time_answers_with_the_state_as_it_stands(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    result = await replicas.b.reader.wait("t1", 0)
    assert result.task_id == "t1" and result.state == result_pb2.TASK_STATE_PENDING


async def test_a_wait_ends_as_soon_as_the_task_ends_here(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 30))
    await asyncio.sleep(0)
    await run_ready(replicas.a, results={})
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == result_pb2.TASK_STATE_SUCCESS and result.result.string_value == "t1"


async def test_a_wait_ends_when_another_replica_ends_the_task(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.b.reader.wait("t1", 30))
    await asyncio.sleep(0.05)  # past the moment it waits for a write of its own replica
    await run_ready(replicas.a)
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_wait_that_runs_out_answers_with_the_current_state(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    result = await replicas.a.reader.wait("t1", 0.05)
    assert result.state == result_pb2.TASK_STATE_PENDING


async def test_a_wait_for_an_ended_task_answers_at_once(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await run_ready(replicas.a)
    assert (await replicas.a.reader.wait("t1", 30)).state == result_pb2.TASK_STATE_SUCCESS
    assert (await replicas.b.reader.wait("t1", 30)).state == result_pb2.TASK_STATE_SUCCESS


async def test_a_watch_replays_the_history_then_ends_with_the_task(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    await run_ready(replicas.a)
    events: list[tuple[str, str]] = []

    async def follow() -> None:
        ids = await replicas.b.reader.resolve_ids([], response.workflow_id)
        assert ids == ["a", "b"]
        async for event in replicas.b.reader.watch(ids):
            assert event.workflow_id == response.workflow_id and event.at.seconds > 0
            events.append((event.task_id, result_pb2.TaskState.Name(event.state)))

    watching = asyncio.create_task(follow())
    await asyncio.sleep(0)
    await run_all(replicas.a)
    await asyncio.wait_for(watching, 5)
    assert [e for e in events if e[0] == "a"] == [
        ("a", "TASK_STATE_PENDING"), ("a", "TASK_STATE_RECEIVED"), ("a", "TASK_STATE_SUCCESS"),
    ]
    assert events[-1] == ("b", "TASK_STATE_SUCCESS")
    assert events.count(("b", "TASK_STATE_RECEIVED")) == 1, "each change once"


async def test_a_watch_of_an_unknown_task_is_not_found(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    with pytest.raises(NotFound, match="'t2'"):
        async for _ in replicas.a.reader.watch(["t1", "t2"]):
            pass


async def test_watched_ids_are_checked(replicas: Replicas) -> None:
    reader = replicas.a.reader
    with pytest.raises(InvalidArgument, match="name the task_ids"):
        await reader.resolve_ids([], "")
    with pytest.raises(NotFound, match="no workflow"):
        await reader.resolve_ids([], "wf-nope")
    with pytest.raises(InvalidArgument, match=f"at most {MAX_WATCHED_TASKS}"):
        await reader.resolve_ids([f"t{i}" for i in range(MAX_WATCHED_TASKS + 1)], "")
    assert await reader.resolve_ids(["x", "y", "x"], "") == ["x", "y"]
    assert len(await reader.resolve_ids([f"t{i}" for i in range(MAX_WATCHED_TASKS)], "")) == MAX_WATCHED_TASKS


async def test_a_workflow_tree_shows_each_node_with_its_state(replicas: Replicas) -> None:
    group = WF.Workflow(group=WF.Group(members=[WF.Workflow(task=task(task_id="g0")),
                                                WF.Workflow(task=task(task_id="g1"))]))
    workflow = WF.Workflow(chain=WF.Chain(steps=[WF.Workflow(task=task(task_id="a")), group]))
    [response] = await submit(replicas.a, task_service_pb2.SubmitRequest(workflow=workflow))
    await run_ready(replicas.a)
    tree = await replicas.b.reader.workflow(response.workflow_id)
    assert tree.workflow_id == response.workflow_id and tree.result_task_id == ""
    root = tree.root
    assert root.kind == "chain" and root.state == result_pb2.TASK_STATE_STARTED
    step, members = root.children
    assert step.kind == "task" and step.task.task_id == "a" and step.state == result_pb2.TASK_STATE_SUCCESS
    assert members.kind == "group" and members.state == result_pb2.TASK_STATE_PENDING
    assert [m.task.task_id for m in members.children] == ["g0", "g1"]
    with pytest.raises(NotFound):
        await replicas.a.reader.workflow("wf-nope")


def test_a_canvas_nodes_state_is_the_worst_or_the_common_state_of_its_children() -> None:
    assert _aggregate([]) == result_pb2.TASK_STATE_SUCCESS
    assert (
        _aggregate([result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED])
        == result_pb2.TASK_STATE_FAILURE
    )
    assert (
        _aggregate([result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_CANCELLED]) == result_pb2.TASK_STATE_CANCELLED
    )
    assert _aggregate([result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_SUCCESS]) == result_pb2.TASK_STATE_SUCCESS
    assert _aggregate([result_pb2.TASK_STATE_PENDING, result_pb2.TASK_STATE_PENDING]) == result_pb2.TASK_STATE_PENDING
    assert _aggregate([result_pb2.TASK_STATE_PENDING, result_pb2.TASK_STATE_SUCCESS]) == result_pb2.TASK_STATE_STARTED
    assert _aggregate([result_pb2.TASK_STATE_RECEIVED]) == result_pb2.TASK_STATE_STARTED


# -- operators ---------------------------------------------------------------------------------------


async def test_queues_lists_known_and_paused_queues_with_their_depths(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), lone(task(task_id="t2")))
    await replicas.a.admin.pause("empty")
    infos = {q.name: q for q in await replicas.b.admin.queues()}
    assert sorted(infos) == ["default", "empty"]
    assert infos["default"].ready == 2 and not infos["default"].paused
    assert infos["empty"].paused and infos["empty"].ready == 0
    await replicas.a.admin.resume("empty")
    assert [q.name for q in await replicas.a.admin.queues()] == ["default"]


async def test_a_paused_queue_hands_out_nothing_until_resumed(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await replicas.a.admin.pause(QUEUE)
    assert await replicas.a.connections.pauses.is_paused(QUEUE)
    await replicas.a.admin.resume(QUEUE)
    assert not await replicas.a.connections.pauses.is_paused(QUEUE)
    with pytest.raises(InvalidArgument):
        await replicas.a.admin.pause("bad queue")


async def test_a_purge_ends_the_dropped_tasks_and_moves_their_workflows_on(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), chain(task(task_id="a"), task(task_id="b")))
    assert await replicas.b.admin.purge(QUEUE) == 2
    for task_id in ("t1", "a", "b"):
        record = await replicas.a.store.get(task_id)
        assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED, task_id
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.error.type == "Purged"
    assert "'default'" in record.result.error.message
    assert (await replicas.broker.stats(QUEUE)).ready == 0
    with pytest.raises(InvalidArgument):
        await replicas.a.admin.purge("bad queue")


async def test_workers_lists_the_connected_sessions(replicas: Replicas) -> None:
    session = replicas.a.connections.open(
        worker_service_pb2.Hello(worker_id="w1", language="go", hostname="h1", queues=["q"], max_in_flight=3)
    )
    sent(session)
    replicas.a.admin.server_id = "srv-a"
    [info] = replicas.a.admin.workers()
    assert (info.worker_id, info.language, list(info.queues), info.max_in_flight, info.in_flight) == (
        "w1", "go", ["q"], 3, 0)
    assert info.server_id == "srv-a" and info.hostname == "h1" and info.connected_at.seconds > 0
    assert replicas.b.admin.workers() == []


async def test_dead_letters_are_the_tasks_that_failed_for_good_oldest_first(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="d1")))
    await run_ready(replicas.a, fail={"d1"})
    await submit(replicas.a, lone(task(task_id="d2")), lone(task(task_id="ok")))
    await run_all(replicas.a, fail={"d2"})
    await replicas.b.store.backend.add_member(DEAD_LETTERS_GROUP, "a-expired", b"default")
    letters = await replicas.b.admin.dead_letters("", 0)
    assert [r.task_id for r in letters] == ["d1", "d2"]
    assert "a-expired" not in await replicas.backend.members(DEAD_LETTERS_GROUP), "its record expired: dropped"
    assert [r.task_id for r in await replicas.a.admin.dead_letters("default", 1)] == ["d1"]
    assert await replicas.a.admin.dead_letters("other", 10) == []
    assert (await replicas.a.admin.inspect("d1")).error.type == "Boom"


async def test_a_replayed_dead_letter_runs_again_as_a_new_task(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="d1", idempotency_key="once")))
    await run_ready(replicas.a, fail={"d1"})
    [new_id] = await replicas.b.admin.replay([], "")
    assert new_id != "d1"
    assert await replicas.a.admin.dead_letters("", 0) == []
    record = await replicas.a.store.get(new_id)
    assert record is not None and record.result.name == "noop" and record.result.state == result_pb2.TASK_STATE_PENDING
    assert not record.result.signature.idempotency_key
    assert (await run_ready(replicas.a)).keys() == {new_id}
    assert await replicas.b.admin.replay(["d1"], "") == [new_id], "a second replay finds the first one's task"
    with pytest.raises(NotFound, match="no task with id 'unknown'"):
        await replicas.a.admin.replay(["unknown"], "")


async def test_a_purge_ends_its_tasks_in_batches_and_stops_running_ones(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin, "PURGE_END_BATCH", 1)
    await submit(replicas.a, *(lone(task(task_id=f"p{i}")) for i in range(3)))
    assert await replicas.a.admin.purge(QUEUE) == 3
    for i in range(3):
        record = await replicas.a.store.get(f"p{i}")
        assert record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
        assert record.result.history[-1].error.type == "Purged"


async def test_ending_purged_tasks_stops_those_running_and_leaves_ended_ones(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="running")), lone(task(task_id="done")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    claim = await lease_all(replicas.a)
    await session.settle(0, claim.leases)
    sent(session)
    [done] = [lease for lease in claim.leases if lease.task_id == "done"]
    await replicas.a.connections.recorder.record(
        [
            worker_service_pb2.TaskOutcome(
                task_id="done", lease_token=done.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
            )
        ],
        "w1",
    )
    ended = await replicas.a.canceller.end_purged(["running", "done", "gone"], QUEUE)
    assert ended == ["running"]
    assert [m.cancel.task_ids for m in sent(session) if m.WhichOneof("message") == "cancel"] == [["running"]]
    await replicas.a.outbox.drain()
    assert not await replicas.backend.members(OUTBOX_GROUP), "the promise of follow-ups is let go"


async def test_workers_count_what_each_one_holds(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), lone(task(task_id="t2")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    await session.settle(0, (await lease_all(replicas.a)).leases)
    [info] = replicas.a.admin.workers()
    assert info.in_flight == 2


async def test_dead_letters_are_read_from_the_first_whatever_their_ids(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="0-first")), lone(task(task_id="z-last")))
    await run_ready(replicas.a, fail={"0-first", "z-last"})
    assert sorted(r.task_id for r in await replicas.a.admin.dead_letters("", 0)) == ["0-first", "z-last"]


async def test_a_replay_of_named_dead_letters_refuses_any_other_id_and_replays_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="d1")), lone(task(task_id="d2")), lone(task(task_id="ok")))
    await run_ready(replicas.a, fail={"d1", "d2"})
    with pytest.raises(NotFound, match="'unknown'"):
        await replicas.a.admin.replay(["d2", "unknown"], "")
    with pytest.raises(FailedPrecondition, match="'ok' is SUCCESS, not a dead letter"):
        await replicas.a.admin.replay(["d2", "ok"], "")
    assert [r.task_id for r in await replicas.a.admin.dead_letters("", 0)] == ["d1", "d2"], "nothing replayed"
    replayed = await replicas.a.admin.replay(["d2", "d2"], "")
    assert len(replayed) == 1 and len(replayed[0]) == 36, "one fresh id"
    assert [r.task_id for r in await replicas.a.admin.dead_letters("", 0)] == ["d1"]


async def test_a_deleted_dead_letter_leaves_the_list_and_is_not_replayed(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="d1")), lone(task(task_id="ok")))
    await run_ready(replicas.a, fail={"d1"})
    await replicas.b.admin.delete_dead_letter("d1")
    assert await replicas.a.admin.dead_letters("", 0) == []
    with pytest.raises(FailedPrecondition, match="'d1' is not a dead letter"):
        await replicas.a.admin.delete_dead_letter("d1")
    with pytest.raises(FailedPrecondition, match="deleted from the list"):
        await replicas.a.admin.replay(["d1"], "")
    with pytest.raises(FailedPrecondition, match="'ok' is SUCCESS"):
        await replicas.a.admin.delete_dead_letter("ok")
    with pytest.raises(NotFound):
        await replicas.a.admin.delete_dead_letter("unknown")


async def test_a_dead_letter_is_found_on_the_list_among_ids_that_sort_close_to_it(replicas: Replicas) -> None:
    backend = replicas.backend
    for member in ("d", "d0", "d1-", "d10", "d2", "e"):
        await backend.add_member(DEAD_LETTERS_GROUP, member, b"default")
    dead = replicas.a.admin.dead
    assert [await dead.listed(m) for m in ("d1", "d10", "d", "e", "d1-", "c", "f")] == [
        False, True, True, True, True, False, False]


async def test_only_active_queues_are_listed_when_asked(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), lone(Signature(name="noop", id="idle", queue="idle")),
                 lone(Signature(name="noop", id="served", queue="served")))
    await run_all(replicas.a)  # empties QUEUE; idle and served are not fetched by this worker
    await replicas.a.admin.purge("idle")
    await replicas.a.admin.purge("served")
    await replicas.a.admin.pause("paused")
    replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w9", queues=["served"], max_in_flight=1))
    everything = [q.name for q in await replicas.a.admin.queues()]
    assert {QUEUE, "idle", "served", "paused"} <= set(everything)
    assert [q.name for q in await replicas.a.admin.queues(active_only=True)] == ["paused", "served"]


async def test_a_cancelled_queued_task_is_not_counted_as_ready_or_delayed(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="kept")), lone(task(task_id="gone")),
                 lone(task(task_id="later", countdown=Duration(seconds=600))))
    await replicas.a.canceller.cancel("gone")
    await replicas.b.canceller.cancel("later")
    (info,) = [q for q in await replicas.b.admin.queues() if q.name == QUEUE]
    assert (info.ready, info.delayed) == (1, 0)
    assert (await run_ready(replicas.a)).keys() == {"kept"}, "the cancelled message is dropped, not run"
    assert list(await replicas.backend.members(WITHDRAWN_GROUP)) == ["later"], "dropped: no longer counted out"
    await replicas.a.admin.purge(QUEUE)
    assert await replicas.backend.members(WITHDRAWN_GROUP) == {}, "purged: its message is gone too"


async def test_a_queue_is_deleted_only_when_empty_or_purged_first(replicas: Replicas) -> None:
    await submit(replicas.a, lone(Signature(name="noop", id="q1", queue="full")))
    with pytest.raises(FailedPrecondition, match=r"queue 'full' is not empty \(1 ready, 0 delayed, 0 in flight\)"):
        await replicas.a.admin.delete_queue("full", force=False)
    assert await replicas.b.admin.delete_queue("full", force=True) == 1
    assert "full" not in [q.name for q in await replicas.a.admin.queues()]
    record = await replicas.a.store.get("q1")
    assert (
        record is not None and record.result.state == result_pb2.TASK_STATE_CANCELLED
    ), "purged, so nothing waits on it"
    with pytest.raises(NotFound, match="no queue named 'full'"):
        await replicas.a.admin.delete_queue("full", force=False)
    await replicas.a.admin.pause("held")
    assert await replicas.a.admin.delete_queue("held", force=False) == 0
    assert await replicas.a.admin.pauses.refresh() == set(), "a deleted queue's pause goes with it"


async def test_a_result_recorded_here_answers_a_wait_without_the_change_feed(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 1.0)
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 0.5))
    await asyncio.sleep(0)
    await run_ready(replicas.a)
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == result_pb2.TASK_STATE_SUCCESS and result.result.string_value == "t1"
    assert replicas.backend.watches == 0


async def test_a_wait_answers_from_this_replicas_last_write_and_a_zero_wait_reads(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await run_ready(replicas.a)
    replicas.backend.fail_reads = 1  # any read now fails
    assert (await replicas.a.reader.wait("t1", 30)).state == result_pb2.TASK_STATE_SUCCESS, "no read needed"
    with pytest.raises(Outage):
        await replicas.a.reader.wait("t1", 0)
