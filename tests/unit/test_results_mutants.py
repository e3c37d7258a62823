"""Reading results: the edges mutation testing found unpinned (a wait answered from this
replica's own write without reading, watches that follow the change feed, rescan, and outlive
a vanished task, nothing left behind by a wait that ran out, workflow trees).

On the shared memory engines of tests/unit/replicas.py; reads are made to fail (FlakyBackend)
to show that an answer needed none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_service_pb2, workflow_pb2
from conveyor_server import background
from conveyor_server.core import results
from conveyor_server.core.records import transition
from tests.support.processes import until
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_ready
from tests.unit.test_durability import chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
WF = workflow_pb2


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports as unhandled during the test (it should be nothing)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    loop.set_exception_handler(previous)


def succeed(_: str, record: records_pb2.TaskRecord) -> bool:
    transition(record, result_pb2.TASK_STATE_SUCCESS)
    return True


# -- wait ----------------------------------------------------------------------------------------

async def test_a_short_wait_for_a_result_recorded_here_needs_no_read(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await run_ready(replicas.a)
    replicas.backend.fail_reads = 1_000
    assert (await replicas.a.reader.wait("t1", 0.5)).state == result_pb2.TASK_STATE_SUCCESS


async def test_a_result_recorded_here_while_a_wait_begins_is_answered_without_a_read(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 5))
    await asyncio.sleep(0)  # it read the record (pending) and waits for a write here
    await replicas.a.store.update(["t1"], succeed)
    replicas.backend.fail_reads = 1_000  # before the wait runs again
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_result_recorded_here_while_the_wait_follows_the_feed_is_answered_without_a_read(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 0.0)  # straight to following the feed too
    await submit(replicas.a, lone(task(task_id="t1")))
    waiting = asyncio.create_task(replicas.a.reader.wait("t1", 5))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the wait follows the change feed")
    await replicas.a.store.update(["t1"], succeed)
    replicas.backend.fail_reads = 1_000
    result = await asyncio.wait_for(waiting, 5)
    assert result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_wait_that_ran_out_leaves_nothing_behind(replicas: Replicas, loop_errors: list[dict[str, Any]]) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    assert (await replicas.a.reader.wait("t1", 0.05)).state == result_pb2.TASK_STATE_PENDING
    await until(lambda: not background.still_stopping(), 5.0, "the abandoned feed subscription ended")
    assert loop_errors == []


# -- watch ---------------------------------------------------------------------------------------

async def events_until_done(replicas: Replicas, ids: list[str], until_done: bool = True) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    async for event in replicas.b.reader.watch(ids, until_done):
        seen.append((event.task_id, event.state))
        if event.task_id == ids[-1] and event.state == result_pb2.TASK_STATE_SUCCESS:
            break
    return seen


async def test_a_watch_hears_of_a_change_through_the_feed_not_the_rescan(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "RESCAN_SECONDS", 60.0)
    await submit(replicas.a, lone(task(task_id="t1")))
    watching = asyncio.create_task(events_until_done(replicas, ["t1"]))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the watch follows the feed")
    await run_ready(replicas.a)
    seen = await asyncio.wait_for(watching, 5)
    assert seen[-1] == ("t1", result_pb2.TASK_STATE_SUCCESS)


async def test_a_watch_rescans_when_nothing_changes(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "RESCAN_SECONDS", 0.01)
    await submit(replicas.a, lone(task(task_id="t1")))
    watching = asyncio.create_task(events_until_done(replicas, ["t1"]))
    await asyncio.sleep(0.05)  # several rescans without a change
    assert not watching.done()
    await run_ready(replicas.a)
    assert (await asyncio.wait_for(watching, 5))[-1] == ("t1", result_pb2.TASK_STATE_SUCCESS)


async def test_a_task_that_vanishes_mid_watch_does_not_end_the_watch_of_the_others(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="a")), lone(task(task_id="b")))
    watching = asyncio.create_task(events_until_done(replicas, ["a", "b"], until_done=False))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the watch follows the feed")
    replicas.backend.hide.add("task:a")  # its result expired
    await replicas.a.store.update(["b"], succeed)
    seen = await asyncio.wait_for(watching, 5)
    assert seen == [
        ("a", result_pb2.TASK_STATE_PENDING),
        ("b", result_pb2.TASK_STATE_PENDING),
        ("b", result_pb2.TASK_STATE_SUCCESS),
    ]


# -- workflow trees ------------------------------------------------------------------------------

async def test_a_workflow_tree_names_its_nodes_and_the_task_whose_result_is_the_workflows(
    replicas: Replicas,
) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="a"), task(task_id="b")))
    tree: task_service_pb2.GetWorkflowResponse = await replicas.b.reader.workflow(response.workflow_id)
    assert tree.result_task_id == "b"
    assert tree.root.node_id == "n0"
    assert [(c.node_id, c.task.task_id) for c in tree.root.children] == [("n1", "a"), ("n2", "b")]


async def test_a_task_that_vanishes_as_it_changes_does_not_end_the_watch_of_the_others(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="a")), lone(task(task_id="b")))
    watching = asyncio.create_task(events_until_done(replicas, ["a", "b"], until_done=False))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the watch follows the feed")

    def succeed_and_vanish_a(task_id: str, record: records_pb2.TaskRecord) -> bool:
        if task_id == "a":
            replicas.backend.hide.add("task:a")  # written (the feed names it), then its result expired
        return succeed(task_id, record)

    await replicas.a.store.update(["a", "b"], succeed_and_vanish_a)  # one change naming both
    seen = await asyncio.wait_for(watching, 5)
    assert seen == [
        ("a", result_pb2.TASK_STATE_PENDING),
        ("b", result_pb2.TASK_STATE_PENDING),
        ("b", result_pb2.TASK_STATE_SUCCESS),
    ]


async def test_changes_read_together_come_in_the_order_the_watch_named_the_tasks(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="a")), lone(task(task_id="b")))
    watching = asyncio.create_task(events_until_done(replicas, ["b", "a"]))
    await until(lambda: replicas.backend.watches == 1, 5.0, "the watch follows the feed")
    await replicas.a.store.update(["a", "b"], succeed)  # one change naming both
    seen = await asyncio.wait_for(watching, 5)
    assert seen == [
        ("b", result_pb2.TASK_STATE_PENDING),
        ("a", result_pb2.TASK_STATE_PENDING),
        ("b", result_pb2.TASK_STATE_SUCCESS),
        ("a", result_pb2.TASK_STATE_SUCCESS),
    ]
