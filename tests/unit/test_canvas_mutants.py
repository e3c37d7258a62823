"""Canvas primitives (core/canvas/), details the canvas tests leave open: where a group's refusal
points, the submit-time eta and a first task's own delay, the failed task a map's error callback
is told, and the error a task node with a child (a corrupt plan) raises. Memory engines, two
replicas (tests/unit/replicas.py)."""

from __future__ import annotations

import time
from typing import cast

import pytest

from conveyor import sig
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.core.canvas import CorruptPlan, Kind, set_kind
from conveyor_server.core.canvas.base import Drive, Engine
from conveyor_server.core.canvas.task import TASK
from conveyor_server.core.errors import InvalidArgument
from tests.unit.replicas import Replicas, replicas, run_all
from tests.unit.test_canvas_map import mapped
from tests.unit.test_canvas_primitives import chain_of, error_given_to, group_of, request, step
from tests.unit.test_durability import submit, task

__all__ = ["replicas"]  # the fixture used by the tests below
WF = workflow_pb2


async def test_a_refused_group_callback_is_named_by_its_place_in_the_group(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await submit(replicas.a, request(group_of(step("a"), on_error=[task(name="cb", task_id="a")])))
    assert str(refused.value).startswith("workflow.group.on_error[0]: id 'a' is already used by workflow.group[0]")


async def test_a_submit_eta_delays_the_first_tasks_only(replicas: Replicas) -> None:
    made = request(chain_of(step("a"), step("b")))
    eta = int(time.time()) + 3_600
    made.options.eta.FromSeconds(eta)
    await submit(replicas.a, made)
    first, second = await replicas.a.store.get("a"), await replicas.a.store.get("b")
    assert first is not None and first.result.signature.eta.seconds == eta
    assert second is not None and not second.result.signature.HasField("eta")


async def test_a_first_task_with_its_own_delay_keeps_it_under_a_submit_delay(replicas: Replicas) -> None:
    own_eta = task_pb2.Signature()
    own_eta.eta.FromSeconds(eta := int(time.time()) + 3_600)
    made = request(group_of(step("counted", countdown={"seconds": 5}), step("dated", eta=own_eta.eta), step("plain")))
    made.options.countdown.FromSeconds(60)
    await submit(replicas.a, made)
    counted, dated, plain = [await replicas.a.store.get(t) for t in ("counted", "dated", "plain")]
    assert counted is not None and dated is not None and plain is not None
    assert counted.result.signature.countdown.seconds == 5 and not counted.result.signature.HasField("eta")
    assert dated.result.signature.eta.seconds == eta and not dated.result.signature.HasField("countdown")
    assert plain.result.signature.countdown.seconds == 60


async def test_an_error_callback_of_a_map_whose_chunk_returned_no_list_is_told_that_chunk(replicas: Replicas) -> None:
    inner = mapped(sig("double").map([1, 2])).workflow
    made = task_service_pb2.SubmitRequest(workflow=chain_of(inner, on_error=[task(name="alert")]))
    [response] = await submit(replicas.a, made)
    [chunk] = response.task_ids
    await run_all(replicas.a)  # a worker that ignores the map header: the chunk returns its task id
    [alert] = [t for t in replicas.broker.published if t.endswith(".n0.err0")]
    told = await error_given_to(replicas, alert)
    assert (told["task_id"], told["type"]) == (chunk, "MapChunkNotList")


async def test_a_task_node_told_of_a_child_raises_a_corrupt_plan_naming_them() -> None:
    plan = records_pb2.WorkflowPlan(workflow_id="wf-1")
    node = plan.nodes.add(node_id="n0", task_id="t")
    set_kind(node, Kind.TASK)
    child = plan.nodes.add(node_id="n1", parent_id="n0", task_id="u")
    set_kind(child, Kind.TASK)
    drive = Drive(plan, {n.node_id: n for n in plan.nodes}, repair=False)
    with pytest.raises(CorruptPlan, match=r"^task node n0 of workflow wf-1 has a child n1$"):
        # A task node has no children: the engine is never reached.
        await TASK.child_done(cast(Engine, None), drive, node, child, records_pb2.NodeOutcome(ok=True))
