"""The Python SDK's side of task replacement (conveyor.replace): what a task returns becomes an
OUTCOME_REPLACED report carrying the canvas, in every pool (a child process included), and a
canvas the server would refuse for its depth, or a value that is no canvas, is refused at once."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conveyor import chain, group, replace, sig
from conveyor.context import TaskContext
from conveyor.execution import Ending, to_outcome
from conveyor.pools.base import PoolKind, TaskCall, make_pool
from conveyor.v1 import worker_service_pb2
from conveyor.values import to_value
from tests.e2e import replace_tasks

TASKS = dict(replace_tasks.worker.tasks)


def call(name: str, *args: Any) -> TaskCall:
    assignment = worker_service_pb2.Assignment(attempt=1, lease_token="lease", deliveries=1)
    assignment.task.id, assignment.task.name = f"{name}-{time.monotonic_ns()}", name
    assignment.task.args.extend(to_value(a) for a in args)
    return TaskCall(assignment, TaskContext.of(assignment), TASKS[name], lambda: None)


@pytest.mark.parametrize(("kind", "name"), [
    ("threads", "add_replaced"), ("processes", "add_replaced"), ("async", "add_replaced_async"),
])
async def test_a_task_that_returns_replace_reports_replaced_with_its_canvas(kind: PoolKind, name: str) -> None:
    pool = make_pool(kind, 1, {name: TASKS[name]})
    await pool.start()
    try:
        ticket = call(name, 2, 3)
        ending = await pool.run(ticket)
    finally:
        await pool.close()
    assert isinstance(ending, Ending) and ending.outcome == worker_service_pb2.OUTCOME_REPLACED
    report = to_outcome(ticket.assignment, ending)
    assert report.outcome == worker_service_pb2.OUTCOME_REPLACED and not report.HasField("result")
    replacement = report.replacement.task
    assert replacement.name == "add" and [a.int_value for a in replacement.args] == [2, 3]


def test_replace_takes_every_canvas_and_refuses_what_is_none_or_too_deep() -> None:
    assert replace(chain(sig("a"), sig("b"))).workflow.chain.steps[1].task.name == "b"
    assert len(replace(group(sig("a"), sig("b"))).workflow.group.members) == 2
    with pytest.raises(TypeError, match="not str"):
        replace("add")  # type: ignore[arg-type]
    deep: Any = sig("leaf")
    for _ in range(40):
        deep = group(deep)
    with pytest.raises(ValueError, match="nests more than 32 levels"):
        replace(deep)
