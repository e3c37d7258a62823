"""Canvas semantics on the memory engines (issue 16): one exhaustive workflow model, callbacks on
canvases, the whole result of any workflow, canvas-wide submit options, and the bugs found by
running Celery's canvas tests (each test below failed before its fix).

Two replicas share one broker and one backend (tests/unit/replicas.py); `run_all` plays a worker
that returns each task's id as its result and fails those named in `fail` (error type "Boom").
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pytest

from conveyor import chain, group, sig
from conveyor.canvas import Chain, Group
from conveyor.client import to_request
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, task_service_pb2, workflow_pb2
from conveyor.values import from_value, to_jsonable
from conveyor_server.backends.base import Update
from conveyor_server.core.canvas import Kind, primitive, tree, workflow_kind
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.records import plan_key
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_all, run_ready, short_lived
from tests.unit.test_durability import submit, task

__all__ = ["quick_repairs", "replicas", "short_lived"]  # fixtures used by the tests below
WF = workflow_pb2


def step(task_id: str, **fields: object) -> WF.Workflow:
    return WF.Workflow(task=task(task_id=task_id, **fields))  # type: ignore[arg-type]


def request(node: WF.Workflow, **options: Any) -> task_service_pb2.SubmitRequest:
    made = task_service_pb2.SubmitRequest(workflow=node)
    if options:
        made.options.CopyFrom(task_service_pb2.CanvasOptions(**options))
    return made


def chain_of(*steps: WF.Workflow, **callbacks: Sequence[task_pb2.Signature]) -> WF.Workflow:
    return WF.Workflow(chain=WF.Chain(steps=steps, **callbacks))


def group_of(*members: WF.Workflow, **callbacks: Sequence[task_pb2.Signature]) -> WF.Workflow:
    return WF.Workflow(group=WF.Group(members=members, **callbacks))


def chord_of(members: Sequence[WF.Workflow], callback: WF.Workflow) -> WF.Workflow:
    return WF.Workflow(chord=WF.Chord(header=WF.Group(members=members), callback=callback))


def int_value(number: int) -> task_pb2.Value:
    return task_pb2.Value(int_value=number)


async def error_given_to(replicas: Replicas, callback_id: str) -> dict[str, Any]:
    """The JSON error an error callback was submitted with."""
    record = await replicas.a.store.get(callback_id)
    assert record is not None, f"error callback {callback_id} was never submitted"
    error: dict[str, Any] = json.loads(record.result.signature.args[0].json_value)
    return error


async def whole_result(replicas: Replicas, workflow_id: str, wait: float = 0.0) -> result_pb2.TaskResult:
    return await replicas.a.reader.wait(workflow_id, wait)


# -- one exhaustive workflow model --------------------------------------------------------------

def test_every_kind_has_its_primitive_and_its_workflow_oneof() -> None:
    assert {k.label for k in Kind} == {"task", "chain", "group", "chord", "map"}
    for kind in Kind:
        assert primitive(kind) is not None
        assert workflow_kind(WF.Workflow(**{kind.label: {}})) is kind  # type: ignore[arg-type]
    assert workflow_kind(WF.Workflow()) is None


def test_a_plan_node_written_before_kinds_were_an_enum_is_the_same_bytes() -> None:
    # The old PlanNode had `string kind = 2`; its successor `legacy_kind` keeps that field.
    assert records_pb2.PlanNode(legacy_kind="chain").SerializeToString() == b"\x12\x05chain"


async def test_a_plan_stored_before_kinds_were_an_enum_still_runs(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    [response] = await submit(replicas.a, request(chain_of(step("a"), chord_of([step("m0"), step("m1")], step("cb")))))
    key = plan_key(response.workflow_id)
    stored = (await replicas.backend.get([key]))[key]
    old = records_pb2.WorkflowPlan.FromString(stored.data)
    for node in old.nodes:
        node.ClearField("kind")  # as an older release wrote it: only the name
    rewrite = Update(key, stored.version, old.SerializeToString(), True)
    assert await replicas.backend.compare_and_set([rewrite]) == [True]
    # Replica b has never seen the plan: it reads the old form from the backend (and the node
    # index that replica a built in this same process is forgotten).
    monkeypatch.setattr(tree, "_indexes", OrderedDict())
    ran = await run_all(replicas.b)
    assert [to_jsonable(a) for a in ran["cb"].task.args] == [["m0", "m1"]]
    assert from_value((await replicas.b.reader.wait(response.workflow_id, 0)).result) == "cb"
    view = await replicas.b.reader.workflow(response.workflow_id)
    assert [view.root.kind, *(child.kind for child in view.root.children)] == ["chain", "task", "chord"]


# -- bugs: each failed before its fix -------------------------------------------------------------

async def test_an_error_callback_is_told_the_failed_tasks_id_not_its_own(replicas: Replicas) -> None:
    await submit(replicas.a, task_service_pb2.SubmitRequest(task=task(task_id="t", on_error=[task(name="alert")])))
    await submit(replicas.a, request(chain_of(step("a"), step("b"), step("c"), on_error=[task(name="alert")])))
    await run_all(replicas.a, fail={"t", "b"})
    lone = await error_given_to(replicas, "t.err0")
    assert lone["task_id"] == "t" and lone["type"] == "Boom"
    [chain_alert] = [r for r in replicas.broker.published if r.endswith(".n0.err0")]
    assert (await error_given_to(replicas, chain_alert))["task_id"] == "b"


async def test_a_group_calls_a_member_error_callback_once_per_failed_member(replicas: Replicas) -> None:
    members = [step(f"g{i}") for i in range(5)]
    [response] = await submit(replicas.a, request(group_of(
        *members, on_member_error=[task(name="each")], on_error=[task(name="once")],
    )))
    await run_all(replicas.a, fail={"g1", "g3"})
    wf = response.workflow_id
    each = {i: await error_given_to(replicas, f"{wf}.n0.m{i}.err0") for i in (1, 3)}
    assert {i: e["task_id"] for i, e in each.items()} == {1: "g1", 3: "g3"}
    assert all(e["type"] == "Boom" for e in each.values())
    assert not [t for t in replicas.broker.published if ".m0." in t or ".m2." in t or ".m4." in t]
    once = [t for t in replicas.broker.published if t.startswith(f"{wf}.n0.err")]
    assert once == [f"{wf}.n0.err0"], "the group's own error callback runs once"
    assert (await error_given_to(replicas, once[0]))["task_id"] == "g1"


async def test_a_group_as_a_chords_callback_calls_its_member_error_callback_per_failed_member(
    replicas: Replicas,
) -> None:
    body = group_of(step("b0"), step("b1"), step("b2"), on_member_error=[task(name="each")])
    [response] = await submit(replicas.a, request(chord_of([step("h0")], body)))
    await run_all(replicas.a, fail={"b0", "b2"})
    called = sorted(t for t in replicas.broker.published if ".err" in t)
    assert called == [f"{response.workflow_id}.n3.m0.err0", f"{response.workflow_id}.n3.m2.err0"]


async def test_a_workflow_that_uses_one_task_id_twice_is_refused(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match=r"workflow.chain\[2\]: id 'a' is already used by workflow.chain\[0\]"):
        await submit(replicas.a, request(chain_of(step("a"), step("b"), step("a"))))
    assert await replicas.a.store.get("a") is None, "nothing was stored"


async def test_a_callback_given_its_parents_id_is_refused(replicas: Replicas) -> None:
    lone = task(task_id="t", on_success=[task(name="cb", task_id="t")])
    with pytest.raises(InvalidArgument, match=r"task.on_success\[0\]: id 't' is already used by request.task"):
        await submit(replicas.a, task_service_pb2.SubmitRequest(task=lone))
    nested = step("a", on_error=[task(name="cb", task_id="b")])
    with pytest.raises(InvalidArgument, match=r"id 'b' is already used"):
        await submit(replicas.a, request(chain_of(nested, step("b"))))


async def test_an_empty_group_can_be_watched_and_read_by_its_workflow_id(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, request(group_of()))
    assert list(response.task_ids) == [] and response.task_id == ""
    ids = await replicas.a.reader.resolve_ids([], response.workflow_id)
    assert ids == [] and [e async for e in replicas.a.reader.watch(ids)] == []
    result = await whole_result(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_SUCCESS and from_value(result.result) == []
    assert result.task_id == response.workflow_id and result.name == "group"


async def test_callbacks_count_toward_the_depth_limit(replicas: Replicas) -> None:
    deep = task(task_id="t")
    innermost = deep
    for _ in range(60):
        innermost.on_success.add(name="cb")
        innermost = innermost.on_success[0]
    with pytest.raises(InvalidArgument, match=r"deeper than the limit of 32 \(max_workflow_depth"):
        await submit(replicas.a, task_service_pb2.SubmitRequest(task=deep))
    with pytest.raises(InvalidArgument, match=r"deeper than the limit of 32 \(max_workflow_depth"):
        await submit(replicas.a, request(chain_of(WF.Workflow(task=deep), step("b"))))


async def test_callbacks_count_toward_the_size_limit(replicas: Replicas) -> None:
    many = task(task_id="t", on_success=[task_pb2.Signature(name="cb") for _ in range(50_000)])
    with pytest.raises(InvalidArgument, match=r"50001 tasks, over the limit of 10000 \(max_workflow_tasks"):
        await submit(replicas.a, task_service_pb2.SubmitRequest(task=many))
    with pytest.raises(InvalidArgument, match=r"50002 tasks, over the limit of 10000 \(max_workflow_tasks"):
        await submit(replicas.a, request(chain_of(WF.Workflow(task=many), step("b"))))
    canvas_callbacks = group_of(step("g"), on_success=[task_pb2.Signature(name="cb") for _ in range(10_000)])
    with pytest.raises(InvalidArgument, match=r"10001 tasks, over the limit"):
        await submit(replicas.a, request(canvas_callbacks))


@pytest.mark.parametrize("levels", [150, 500])
def test_the_sdk_refuses_a_too_deep_canvas_itself(levels: int) -> None:
    nested: Any = sig("leaf")
    for _ in range(levels):
        nested = Group((nested,))
    with pytest.raises(ValueError, match="nests more than 32 levels deep"):
        to_request(nested)
    callbacks = sig("leaf")
    for _ in range(levels):
        callbacks = sig("t").link(callbacks)
    with pytest.raises(ValueError, match="nests more than 32 levels deep"):
        to_request(callbacks)
    steps: Any = sig("leaf")
    for _ in range(levels):
        steps = Chain((steps, sig("next")))
    with pytest.raises(ValueError, match="nests more than 32 levels deep"):
        to_request(steps)


def test_the_sdk_lets_the_deepest_canvas_the_server_takes_through() -> None:
    nested: Any = sig("leaf")
    for _ in range(31):
        nested = Group((nested,))
    assert to_request(nested).workflow.WhichOneof("kind") == "group"


# -- the whole result of any workflow --------------------------------------------------------------

async def test_a_workflow_id_reads_the_whole_value_of_its_canvas(replicas: Replicas) -> None:
    [nested] = await submit(replicas.a, request(group_of(step("g0"), group_of(step("g1"), step("g2")))))
    [tail] = await submit(replicas.a, request(chain_of(step("a"), group_of(step("b"), step("c")))))
    [plain] = await submit(replicas.a, request(chain_of(step("x"), step("y"))))
    await run_all(replicas.a)
    assert from_value((await whole_result(replicas, nested.workflow_id)).result) == ["g0", ["g1", "g2"]]
    assert from_value((await whole_result(replicas, tail.workflow_id)).result) == ["b", "c"]
    assert from_value((await whole_result(replicas, plain.workflow_id)).result) == "y"


async def test_a_failed_chain_reads_as_the_error_of_the_step_that_failed(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, request(chain_of(step("a"), step("b"), step("c"))))
    await run_all(replicas.a, fail={"b"})
    result = await whole_result(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_FAILURE
    assert (result.error.type, result.error.message) == ("Boom", "b")
    last = await replicas.a.reader.get(response.task_id)
    assert last.state == result_pb2.TASK_STATE_CANCELLED, "the last step itself never ran"


async def test_a_cancelled_workflow_reads_as_cancelled(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, request(group_of(step("g0"), step("g1"))))
    await replicas.a.canceller.cancel(response.workflow_id)
    result = await whole_result(replicas, response.workflow_id)
    assert result.state == result_pb2.TASK_STATE_CANCELLED and result.error.type == "GroupMemberFailed"


async def test_a_wait_on_a_workflow_id_returns_once_its_canvas_ends(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, request(chain_of(step("a"), group_of(step("b"), step("c")))))
    assert (await whole_result(replicas, response.workflow_id)).state == result_pb2.TASK_STATE_PENDING
    waiting = asyncio.create_task(whole_result(replicas, response.workflow_id, wait=30))
    await run_ready(replicas.a)
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the group after the first step has not run yet"
    await run_all(replicas.a)
    async with asyncio.timeout(10):
        result = await waiting
    assert result.state == result_pb2.TASK_STATE_SUCCESS and from_value(result.result) == ["b", "c"]


# -- success callbacks on canvases -----------------------------------------------------------------

async def test_chains_and_groups_run_success_callbacks_with_their_result(replicas: Replicas) -> None:
    [chained] = await submit(replicas.a, request(chain_of(step("a"), step("b"), on_success=[task(name="after")])))
    [grouped] = await submit(replicas.a, request(group_of(step("g0"), step("g1"), on_success=[task(name="after")])))
    [failed] = await submit(replicas.a, request(group_of(step("f0"), step("f1"), on_success=[task(name="after")])))
    ran = await run_all(replicas.a, fail={"f1"})
    assert [to_jsonable(a) for a in ran[f"{chained.workflow_id}.n0.ok0"].task.args] == ["b"]
    assert [to_jsonable(a) for a in ran[f"{grouped.workflow_id}.n0.ok0"].task.args] == [["g0", "g1"]]
    assert not [t for t in ran if t.startswith(failed.workflow_id)], "a failed group runs no success callback"


def test_the_sdk_builds_canvas_callbacks_celerys_way() -> None:
    flow = chain(sig("a"), sig("b")).link(sig("ok")).link_error(sig("err")).to_workflow()
    assert [s.name for s in flow.chain.on_success] == ["ok"] and [s.name for s in flow.chain.on_error] == ["err"]
    members = group(sig("a"), sig("b")).link(sig("ok")).link_error(sig("once")).link_error(sig("each"), per_member=True)
    built = members.to_proto()
    assert [s.name for s in built.on_success] == ["ok"]
    assert [s.name for s in built.on_error] == ["once"] and [s.name for s in built.on_member_error] == ["each"]
    assert len(chain(chain(sig("a")).link(sig("ok")), sig("b")).steps) == 2, "a chain with callbacks is not flattened"


# -- canvas-wide options at submit ----------------------------------------------------------------

async def test_submit_options_give_args_to_the_first_tasks_and_defaults_to_all(replicas: Replicas) -> None:
    unqueued = task_pb2.Signature(name="noop", id="b")
    await submit(replicas.a, request(
        chain_of(step("a", args=[int_value(1)], kwargs={"k": int_value(0)}), WF.Workflow(task=unqueued)),
        args=[int_value(9)], kwargs={"k": int_value(5), "extra": int_value(6)}, queue="default", priority=4,
    ))
    await submit(replicas.a, request(
        group_of(step("g0"), step("g1", immutable=True), chord_of([step("h0")], step("cb"))), args=[int_value(9)],
    ))
    ran = await run_all(replicas.a)
    assert [to_jsonable(a) for a in ran["a"].task.args] == [9, 1]
    assert {k: to_jsonable(v) for k, v in ran["a"].task.kwargs.items()} == {"k": 5, "extra": 6}
    assert [to_jsonable(a) for a in ran["b"].task.args] == ["a"], "later steps get only the previous result"
    assert ran["b"].task.queue == "default" and ran["b"].task.priority == 4
    assert [to_jsonable(a) for a in ran["g0"].task.args] == [9]
    assert [to_jsonable(a) for a in ran["g1"].task.args] == [], "an immutable task keeps its own args"
    assert [to_jsonable(a) for a in ran["h0"].task.args] == [9]
    assert [to_jsonable(a) for a in ran["cb"].task.args] == [["h0"]]


async def test_a_submit_countdown_delays_the_start_of_the_whole_canvas(replicas: Replicas) -> None:
    countdown = task_service_pb2.CanvasOptions()
    countdown.countdown.FromSeconds(60)
    made = request(chain_of(step("a"), step("b")))
    made.options.CopyFrom(countdown)
    await submit(replicas.a, made)
    assert await run_ready(replicas.a) == {}, "nothing is due yet"
    first, second = await replicas.a.store.get("a"), await replicas.a.store.get("b")
    assert first is not None and first.result.signature.countdown.seconds == 60
    assert second is not None and not second.result.signature.HasField("countdown"), "later steps are not delayed again"
    both = request(step("x"))
    both.options.countdown.FromSeconds(1)
    both.options.eta.FromSeconds(2_000_000_000)
    with pytest.raises(InvalidArgument, match="set eta or countdown, not both"):
        await submit(replicas.a, both)


async def test_submit_options_apply_to_a_lone_task(replicas: Replicas) -> None:
    lone = task_service_pb2.SubmitRequest(task=task(task_id="t", args=[int_value(1)]))
    lone.options.args.append(int_value(0))
    await submit(replicas.a, lone)
    ran = await run_all(replicas.a)
    assert [to_jsonable(a) for a in ran["t"].task.args] == [0, 1]


async def test_submit_options_on_a_malformed_workflow_get_its_usual_refusal(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match="a chain needs at least one step"):
        await submit(replicas.a, request(chain_of(), args=[int_value(1)], queue="default"))
    with pytest.raises(InvalidArgument, match="empty workflow node"):
        await submit(replicas.a, request(group_of(WF.Workflow()), args=[int_value(1)]))
