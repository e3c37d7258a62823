"""Which task calls a submit holds, where each sits and whether it receives a previous result
(core/task_schemas.calls_of): what a strict submit checks against the registered schemas."""

from __future__ import annotations

import json

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.core.task_schemas import calls_of

W = workflow_pb2


def sig(name: str, **kwargs: object) -> task_pb2.Signature:
    return task_pb2.Signature(name=name, **kwargs)  # type: ignore[arg-type]


def node(name: str, **kwargs: object) -> W.Workflow:
    return W.Workflow(task=sig(name, **kwargs))


def walk(request: task_service_pb2.SubmitRequest) -> list[tuple[str, str, bool]]:
    return [(call.signature.name, call.where, call.leading) for call in calls_of(request, "request")]


def test_a_lone_task_and_its_links() -> None:
    lone = sig("a", on_success=[sig("ok", on_error=[sig("ok-err")])], on_error=[sig("err")])
    assert walk(task_service_pb2.SubmitRequest(task=lone)) == [
        ("a", "request.task", False),
        ("ok", "request.task.on_success[0]", True),
        ("ok-err", "request.task.on_success[0].on_error[0]", True),
        ("err", "request.task.on_error[0]", True),
    ]


def test_a_chain_passes_results_on_except_to_its_first_step_and_immutable_steps() -> None:
    chain = W.Chain(steps=[node("a"), node("b"), node("c", immutable=True)], on_error=[sig("failed")])
    assert walk(task_service_pb2.SubmitRequest(workflow=W.Workflow(chain=chain))) == [
        ("a", "request.workflow.chain[0]", False),
        ("b", "request.workflow.chain[1]", True),
        ("c", "request.workflow.chain[2]", False),
        ("failed", "request.workflow.chain.on_error[0]", True),
    ]


def test_a_group_inside_a_chain_gets_the_result_in_every_member() -> None:
    group = W.Group(members=[node("m0"), node("m1")], on_error=[sig("group-failed")])
    chain = W.Chain(steps=[node("first"), W.Workflow(group=group)])
    assert walk(task_service_pb2.SubmitRequest(workflow=W.Workflow(chain=chain))) == [
        ("first", "request.workflow.chain[0]", False),
        ("m0", "request.workflow.chain[1].group[0]", True),
        ("m1", "request.workflow.chain[1].group[1]", True),
        ("group-failed", "request.workflow.chain[1].group.on_error[0]", True),
    ]
    alone = task_service_pb2.SubmitRequest(workflow=W.Workflow(group=group))
    assert [leading for _, _, leading in walk(alone)] == [False, False, True]


def test_a_chord_gives_its_callback_the_header_results() -> None:
    chord = W.Chord(header=W.Group(members=[node("h0"), node("h1")]), callback=node("sum"))
    assert walk(task_service_pb2.SubmitRequest(workflow=W.Workflow(chord=chord))) == [
        ("h0", "request.workflow.chord.header[0]", False),
        ("h1", "request.workflow.chord.header[1]", False),
        ("sum", "request.workflow.chord.callback", True),
    ]


def test_a_map_makes_one_call_per_item_and_a_starmap_spreads_list_items() -> None:
    items = [task_pb2.Value(json_value=json.dumps([1, 2])), task_pb2.Value(int_value=3),
             task_pb2.Value(json_value="not json")]
    kwargs = {"scale": task_pb2.Value(int_value=10)}
    plain = W.Map(task=sig("f", kwargs=kwargs), items=items)
    calls = list(calls_of(task_service_pb2.SubmitRequest(workflow=W.Workflow(map=plain)), "request"))
    assert [(c.where, c.leading, len(c.signature.args)) for c in calls] == [
        ("request.workflow.map.items[0]", False, 1), ("request.workflow.map.items[1]", False, 1),
        ("request.workflow.map.items[2]", False, 1)]
    assert all(c.signature.name == "f" and c.signature.kwargs["scale"].int_value == 10 for c in calls)

    star = W.Map(task=sig("f", kwargs=kwargs), items=items, star=True)
    spread = list(calls_of(task_service_pb2.SubmitRequest(workflow=W.Workflow(map=star)), "request"))
    assert [[a.WhichOneof("kind") for a in c.signature.args] for c in spread] == [
        ["int_value", "int_value"], ["int_value"], ["json_value"]]  # a list spreads; other items stand as they are
    assert [a.int_value for a in spread[0].signature.args] == [1, 2]
