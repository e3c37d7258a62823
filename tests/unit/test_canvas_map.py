"""map, starmap and chunks (issue 16) on the memory engines: the server expands one Map node
into chunk tasks of bounded size; a worker (here: the SDK's own per-item call logic) runs each
chunk's items; the result is one flat list (map, starmap) or one list per chunk (chunks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import pytest

from conveyor import chain, sig
from conveyor.canvas import Map
from conveyor.client import _task_ids, to_request, with_task_ids
from conveyor.context import TaskContext
from conveyor.execution import MAP_HEADER, call_sync, item_calls
from conveyor.pools.coroutines import call_async
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor.values import from_value, to_jsonable, to_value
from conveyor_server.api.ratelimit import tasks_in
from conveyor_server.app import Core
from conveyor_server.core.canvas.signatures import all_signatures
from conveyor_server.core.connection import settle
from conveyor_server.core.errors import InvalidArgument
from tests.unit.replicas import Replicas, lease_all, outcome, replicas, run_all
from tests.unit.test_durability import QUEUE, submit
from tests.unit.test_task_registry import hello, refusal, strict

__all__ = ["replicas"]  # the fixture used by the tests below


def mapped(canvas: Any) -> task_service_pb2.SubmitRequest:
    """The request the SDK sends for `canvas`, on the test queue."""
    request = with_task_ids(to_request(canvas))
    for signature in all_signatures(request.workflow):
        signature.queue = QUEUE
    return request


def context(task: task_pb2.Signature) -> TaskContext:
    return TaskContext(task.id, task.name, 1, QUEUE, {}, "")


async def run_chunks(
    core: Core, functions: dict[str, Callable[..., Any]], fail: Collection[str] = (),
) -> dict[str, worker_service_pb2.Assignment]:
    """A worker: each task runs as the SDK runs it (a chunk once per item); tasks in `fail` fail."""
    ran: dict[str, worker_service_pb2.Assignment] = {}
    for _ in range(20):
        claim = await lease_all(core)
        if not claim.leases:
            return ran
        reports = []
        for claimed in claim.claimed:
            task = claimed.assignment.task
            ran[task.id] = claimed.assignment
            if task.id in fail:
                error = result_pb2.TaskError(type="Boom", message=task.id)
                reports.append(outcome(claim, task.id, worker_service_pb2.OUTCOME_FAILURE, error=error))
                continue
            ending = call_sync(functions[task.name], task, context(task))
            result = {"result": ending.result} if ending.result is not None else {"error": ending.error}
            reports.append(outcome(claim, task.id, ending.outcome, **result))  # type: ignore[arg-type]
        recorded = await core.connections.recorder.record(reports, "w1")
        await settle(core.broker, claim.leases, recorded.requeue)
    return ran


def double(x: int) -> int:
    return x * 2


def add(x: int, y: int) -> int:
    return x + y


async def whole(replicas: Replicas, workflow_id: str) -> result_pb2.TaskResult:
    return await replicas.a.reader.wait(workflow_id, 0)


async def test_a_map_runs_in_bounded_chunks_and_gives_one_result_per_item(replicas: Replicas) -> None:
    canvas = sig("double").map(range(250), chunk_size=100)
    request = mapped(canvas)
    template = request.workflow.map.task.id
    [response] = await submit(replicas.a, request)
    assert list(response.task_ids) == [f"{template}.c0", f"{template}.c1", f"{template}.c2"]
    assert list(response.task_ids) == list(_task_ids(request.workflow)), "the SDK names the chunks as the server"
    assert response.task_id == "", "the result is a list, read by the workflow id"
    ran = await run_chunks(replicas.a, {"double": double})
    sizes = {task_id: len(a.task.args) for task_id, a in ran.items()}
    assert sizes == {f"{template}.c0": 100, f"{template}.c1": 100, f"{template}.c2": 50}
    assert all(a.task.headers[MAP_HEADER] == "map" for a in ran.values())
    result = await whole(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_SUCCESS and result.name == "map"
    assert from_value(result.result) == [x * 2 for x in range(250)]


async def test_chunks_give_one_list_per_chunk_and_starmap_spreads_each_item(replicas: Replicas) -> None:
    pairs = [(i, i) for i in range(7)]
    [chunked] = await submit(replicas.a, mapped(sig("add").chunks(pairs, 3)))
    [starred] = await submit(replicas.a, mapped(sig("add").starmap(pairs, chunk_size=2)))
    await run_chunks(replicas.a, {"add": add})
    assert from_value((await whole(replicas, chunked.workflow_id)).result) == [[0, 2, 4], [6, 8, 10], [12]]
    assert from_value((await whole(replicas, starred.workflow_id)).result) == [0, 2, 4, 6, 8, 10, 12]


async def test_a_map_in_a_chain_passes_its_list_on_and_ignores_the_previous_result(replicas: Replicas) -> None:
    canvas = chain(sig("add", 1, 1), sig("double").map([1, 2, 3], chunk_size=2), sig("total"))
    [response] = await submit(replicas.a, mapped(canvas))
    ran = await run_chunks(replicas.a, {"add": add, "double": double, "total": sum})
    chunk_args = [[to_jsonable(v) for v in a.task.args] for a in ran.values() if MAP_HEADER in a.task.headers]
    assert sorted(chunk_args) == [[1, 2], [3]], "the first step's result is not prepended to a chunk"
    assert from_value((await whole(replicas, response.workflow_id)).result) == 12


async def test_an_empty_map_gives_an_empty_list_at_once(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, mapped(sig("double").map([])))
    assert list(response.task_ids) == []
    assert from_value((await whole(replicas, response.workflow_id)).result) == []


async def test_a_failed_chunk_fails_the_map_naming_it(replicas: Replicas) -> None:
    request = mapped(chain(sig("double").map(range(6), chunk_size=2), sig("total")))
    [response] = await submit(replicas.a, request)
    bad = f"{request.workflow.chain.steps[0].map.task.id}.c1"
    ran = await run_chunks(replicas.a, {"double": double, "total": sum}, fail={bad})
    result = await whole(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_FAILURE and result.error.type == "GroupMemberFailed"
    assert f"member 1 ({bad}): Boom" in result.error.message
    assert not [t for t, a in ran.items() if a.task.name == "total"], "the step after the map never ran"


async def test_a_starmap_item_that_is_not_a_list_fails_its_chunk_with_a_clear_error() -> None:
    items = [to_value([1, 2]), to_value(3)]
    chunk = task_pb2.Signature(id="c", name="add", args=items, headers={MAP_HEADER: "starmap"})
    ending = call_sync(add, chunk, context(chunk))
    assert ending.outcome == worker_service_pb2.OUTCOME_FAILURE and ending.error is not None
    assert ending.error.type == "TypeError" and "starmap item 1 is int, not a list of args" in ending.error.message
    assert item_calls(task_pb2.Signature(name="add", args=[to_value(1)])) is None, "a plain task is called once"


@pytest.mark.parametrize(("change", "refusal"), [
    (lambda m: m.task.args.append(to_value(1)), r"workflow.map.task: a map's task takes no args"),
    (lambda m: m.task.on_success.add(name="cb"), r"takes no callbacks \(they would run per chunk\)"),
    (lambda m: setattr(m.task, "idempotency_key", "k"), r"takes no idempotency_key or unique_for"),
    (lambda m: m.task.ClearField("name"), r"workflow.map: a map needs a task"),
])
async def test_a_map_that_cannot_run_per_chunk_is_refused(
    replicas: Replicas, change: Callable[[workflow_pb2.Map], object], refusal: str,
) -> None:
    request = mapped(sig("double").map([1, 2]))
    change(request.workflow.map)
    with pytest.raises(InvalidArgument, match=refusal):
        await submit(replicas.a, request)


async def test_a_map_expanding_past_the_task_limit_is_refused_before_its_chunks_are_built(replicas: Replicas) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match=r"workflow.map: expands into 20000 tasks, over the limit of 10000"):
        await submit(replicas.a, mapped(sig("double").map(range(20_000), chunk_size=1)))
    assert time.monotonic() - started < 5.0
    # Chunks and other tasks count together, whichever comes first.
    after = chain(sig("double").map(range(9_000), chunk_size=1), *[sig("double", 1) for _ in range(1_001)])
    with pytest.raises(InvalidArgument, match=r"^workflow: workflow expands into 10001 tasks, over the limit of 10000"):
        await submit(replicas.a, mapped(after))
    before = chain(*[sig("double", 1) for _ in range(1_001)], sig("double").map(range(9_000), chunk_size=1))
    with pytest.raises(InvalidArgument, match=r"expands into 9000 tasks \(10001 with the tasks before it\), over the"):
        await submit(replicas.a, mapped(before))


def test_the_sdk_refuses_a_chunk_size_below_one_and_a_mapped_task_with_args() -> None:
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        sig("double").chunks([(1,)], 0)
    with pytest.raises(ValueError, match="a mapped task takes no args"):
        Map(sig("add", 1), (1, 2))


async def test_a_strict_submit_checks_each_items_call_against_the_call_schema(replicas: Replicas) -> None:
    replicas.a.connections.open(hello())
    starred = strict(sig("add").starmap([(1, 2), (3, "x")]))
    assert await refusal(replicas.a, starred) == (
        "request.workflow.map.items[1].args[1]: 'x' is not of type 'integer' (task 'add')"
    )
    mapped_calls = strict(sig("mul").map([1, 2]))
    assert await refusal(replicas.a, mapped_calls) == (
        "request.workflow.map.items[0].kwargs: 'y' is a required property (task 'mul')"
    )
    assert await submit(replicas.a, strict(sig("add").starmap([(1, 2), (3, 4)])))


def test_a_map_is_charged_one_rate_limit_token_per_chunk_task() -> None:
    assert tasks_in([mapped(sig("double").map(range(250)))]) == 3
    assert tasks_in([mapped(chain(sig("add", 1, 2), sig("add").chunks([(1, 2)] * 10, 5)))]) == 3


async def test_a_hundred_thousand_items_plan_into_a_thousand_bounded_chunk_tasks(replicas: Replicas) -> None:
    request = mapped(sig("double").map(range(100_000)))
    [response] = await submit(replicas.a, request)
    assert len(response.task_ids) == 1_000
    stored = await replicas.a.store.load([response.task_ids[0], response.task_ids[-1]])
    assert [len(loaded.record.result.signature.args) for loaded in stored.values()] == [100, 100]
    last = stored[response.task_ids[-1]].record.result.signature
    assert [to_jsonable(v) for v in last.args] == list(range(99_900, 100_000))


async def test_an_async_task_runs_a_chunk_once_per_item_in_order() -> None:
    seen: list[int] = []

    async def record(x: int, y: int) -> int:
        seen.append(x)
        return x * y

    chunk = task_pb2.Signature(id="c", name="mul", args=[to_value([3, 2]), to_value([1, 5])],
                               headers={MAP_HEADER: "starmap"})
    ending = await call_async(record, chunk, context(chunk))
    assert ending.result is not None and from_value(ending.result) == [6, 5] and seen == [3, 1]


async def test_a_chunk_that_returns_no_list_fails_the_map(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, mapped(sig("double").map([1, 2])))
    await run_all(replicas.a)  # a worker that ignores the map header: each chunk returns its task id
    result = await whole(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_FAILURE and result.error.type == "MapChunkNotList"
    assert result.error.message == f"chunk 0 ({response.task_ids[0]}) returned str, not a list"
