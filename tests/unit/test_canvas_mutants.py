"""Canvas primitives (core/canvas/), details the canvas tests leave open: where a group's refusal
points, the submit-time eta and a first task's own delay, the failed task a map's error callback
is told, and the error a task node with a child (a corrupt plan) raises. Memory engines, two
replicas (tests/unit/replicas.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import sig, tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor.values import to_jsonable
from conveyor_server.config import Limits
from conveyor_server.core.canvas import CorruptPlan, Kind, set_kind
from conveyor_server.core.canvas.base import Drive, Engine
from conveyor_server.core.canvas.task import TASK
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.planner import result_task_id
from conveyor_server.core.validation import check_workflow
from tests.unit.replicas import Replicas, replicas, run_all
from tests.unit.test_canvas_map import mapped
from tests.unit.test_canvas_primitives import chain_of, chord_of, error_given_to, group_of, request, step
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


# -- submit-time checks: where a refusal points, and how deep callbacks and chunks sit ------------

def nested_callback(field: str) -> task_pb2.Signature:
    """A callback with a callback of its own under `field` (on_success or on_error)."""
    callback = task(name="cb")
    getattr(callback, field).append(task(name="inner"))
    return callback


@pytest.mark.parametrize("field", ["on_error", "on_success"])
def test_a_chains_callbacks_sit_one_level_below_the_chain(field: str) -> None:
    limits = Limits(max_workflow_depth=2)
    assert check_workflow(chain_of(step("a"), **{field: [task(name="cb")]}), limits) == 2
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(chain_of(step("a"), **{field: [nested_callback(field)]}), limits)
    assert str(refused.value).startswith(
        f"workflow.chain.{field}[0].{field}[0]: callbacks nest deeper than the limit of 2"
    )


@pytest.mark.parametrize("field", ["on_error", "on_success", "on_member_error"])
def test_a_refused_group_callback_of_any_kind_is_named_by_its_list(field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(group_of(step("a"), **{field: [task(name="cb", task_id="a")]}), Limits())
    assert str(refused.value).startswith(f"workflow.group.{field}[0]: id 'a' is already used by workflow.group[0]")


def test_a_refused_chord_header_callback_is_named_by_its_place_in_the_header() -> None:
    header = WF.Group(members=[step("a")], on_error=[task(name="cb", task_id="a")])
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(WF.Workflow(chord=WF.Chord(header=header, callback=step("b"))), Limits())
    assert str(refused.value).startswith(
        "workflow.chord.header.on_error[0]: id 'a' is already used by workflow.chord.header[0]"
    )


def test_a_maps_task_with_callbacks_is_refused_with_the_way_out() -> None:
    made = mapped(sig("double").map([1, 2])).workflow
    made.map.task.on_success.append(task(name="cb"))
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(made, Limits())
    assert str(refused.value) == (
        "workflow.map.task: a map's task takes no callbacks (they would run per chunk); "
        "link them to a chain around the map"
    )


def test_a_maps_chunk_too_large_is_named_by_its_index() -> None:
    made = mapped(sig("double").chunks(["x", "y" * 400], 1)).workflow
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(made, Limits(max_args_bytes=100))
    assert str(refused.value).startswith("workflow.map.chunk[1]: args and kwargs take ")


def test_a_maps_chunks_sit_one_level_below_the_map() -> None:
    made = mapped(sig("double").map([1, 2])).workflow
    assert check_workflow(made, Limits(max_workflow_depth=2)) == 1
    with pytest.raises(InvalidArgument) as refused:
        check_workflow(made, Limits(max_workflow_depth=1))
    assert str(refused.value).startswith("workflow.map.chunk[0]: callbacks nest deeper than the limit of 1")


def test_a_chain_without_steps_has_no_result_task() -> None:
    plan = records_pb2.WorkflowPlan(workflow_id="wf-1", root_node_id="n0")
    set_kind(plan.nodes.add(node_id="n0"), Kind.CHAIN)  # refused at submit; read back all the same
    assert result_task_id(plan) == ""


# -- running chords ------------------------------------------------------------------------------

async def test_a_chord_after_a_chain_step_gives_its_header_that_steps_result(replicas: Replicas) -> None:
    await submit(replicas.a, request(chain_of(step("a"), chord_of([step("h0"), step("h1")], step("cb")))))
    ran = await run_all(replicas.a)
    assert [to_jsonable(a) for a in ran["h0"].task.args] == ["a"]
    assert [to_jsonable(a) for a in ran["h1"].task.args] == ["a"]
    assert [to_jsonable(a) for a in ran["cb"].task.args] == [["h0", "h1"]]


@pytest.fixture
def recorded_spans(no_tracer: None) -> Iterator[InMemorySpanExporter]:
    """An SDK installed for this test only; its spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


async def test_a_chord_callback_links_to_the_spans_its_members_ended_in(
    replicas: Replicas, recorded_spans: InMemorySpanExporter,
) -> None:
    await submit(replicas.a, request(chord_of([step("h0"), step("h1")], step("cb"))))
    await run_all(replicas.a)
    results = {
        span.attributes["messaging.message.id"]: (span.context.trace_id, span.context.span_id)
        for span in recorded_spans.get_finished_spans()
        if span.name == "result noop" and span.attributes is not None and span.context is not None
    }
    callback = await replicas.a.store.get("cb")
    assert callback is not None
    links = tracing.links_from(callback.result.signature.headers)
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [results["h0"], results["h1"]]


async def test_a_chord_callback_has_no_links_when_tracing_is_off(replicas: Replicas, no_tracer: None) -> None:
    await submit(replicas.a, request(chord_of([step("h0"), step("h1")], step("cb"))))
    ran = await run_all(replicas.a)
    assert [to_jsonable(a) for a in ran["cb"].task.args] == [["h0", "h1"]]
    callback = await replicas.a.store.get("cb")
    assert callback is not None and tracing.LINKS_HEADER not in callback.result.signature.headers
