"""Reading results of ids that do not exist (core/results.py): each read answers NotFound with
the reason and metadata a client's rich error carries, and a wait without time does not wait."""

from __future__ import annotations

import pytest

from conveyor.v1 import result_pb2
from conveyor_server.core.errors import CoreError, InvalidArgument, NotFound
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def details(raised: CoreError) -> tuple[str, str, dict[str, str]]:
    return str(raised), raised.reason, raised.metadata


async def test_an_unknown_task_or_workflow_is_not_found_with_its_reason(replicas: Replicas) -> None:
    reader = replicas.a.reader
    with pytest.raises(NotFound) as task_read:
        await reader.get("ghost")
    assert details(task_read.value) == (
        "no task with id 'ghost' (unknown, or its result expired)", "TASK_NOT_FOUND", {"task_id": "ghost"})
    with pytest.raises(NotFound) as tree:
        await reader.workflow("wf-ghost")
    assert details(tree.value) == (
        "no workflow with id 'wf-ghost'", "WORKFLOW_NOT_FOUND", {"workflow_id": "wf-ghost"})
    with pytest.raises(NotFound) as resolving:
        await reader.resolve_ids([], "wf-ghost")
    assert details(resolving.value) == (
        "no workflow with id 'wf-ghost'", "WORKFLOW_NOT_FOUND", {"workflow_id": "wf-ghost"})


async def test_a_watch_of_an_unknown_id_names_the_first_missing_one(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="known")))
    with pytest.raises(NotFound) as raised:
        async for _ in replicas.b.reader.watch(["known", "lost-1", "lost-2"]):
            pass
    assert details(raised.value) == (
        "no task with id 'lost-1' (unknown, or its result expired)", "TASK_NOT_FOUND", {"task_id": "lost-1"})


async def test_a_watch_names_its_tasks_or_workflow(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match=r"^name the task_ids or the workflow_id to watch$"):
        await replicas.a.reader.resolve_ids([], "")
    [response] = await submit(replicas.a, chain(task(task_id="s1"), task(task_id="s2")))
    assert await replicas.a.reader.resolve_ids(["s2", "extra", "s2"], response.workflow_id) == ["s2", "extra", "s1"]


async def test_a_workflow_result_without_time_answers_at_once(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="w1"), task(task_id="w2")))
    plan = await replicas.a.store.plan(response.workflow_id)
    assert plan is not None
    result = await replicas.b.reader.workflow_result(plan)
    assert result.task_id == response.workflow_id and result.state == result_pb2.TASK_STATE_PENDING
