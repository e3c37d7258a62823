"""The one walk over a submission's signatures (core/canvas/signatures.placed_signatures), which
strict submits, JSON checks, the submit rate limit and task counts all use: it finds every
signature of every canvas message, names where each sits and says which receive a previous
result."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from google.protobuf.message import Message

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.core.canvas.signatures import placed_signatures

W = workflow_pb2
# The messages a canvas is made of: every field of one of these types may hold signatures.
CANVAS = {m.DESCRIPTOR.full_name for m in (task_pb2.Signature, W.Workflow, W.Chain, W.Group, W.Chord, W.Map)}
KINDS = [field.name for field in W.Workflow.DESCRIPTOR.oneofs_by_name["kind"].fields]


def sig(name: str, **kwargs: object) -> task_pb2.Signature:
    return task_pb2.Signature(name=name, **kwargs)  # type: ignore[arg-type]


def node(name: str, **kwargs: object) -> W.Workflow:
    return W.Workflow(task=sig(name, **kwargs))


def filled(message: Message, depth: int, names: Iterator[int]) -> None:
    """Set every canvas field of `message`, found through its descriptor (not through the walk's
    list of them): one item per list, one workflow of each kind per list of workflows."""
    if isinstance(message, task_pb2.Signature):
        message.name = f"s{next(names)}"
    if depth == 0:
        return
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None or field.message_type.full_name not in CANVAS:
            continue
        if field.message_type.full_name == W.Workflow.DESCRIPTOR.full_name:
            kinds = KINDS if field.is_repeated else [KINDS[next(names) % len(KINDS)]]
            for kind in kinds:
                child = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                getattr(child, kind).SetInParent()
                filled(getattr(child, kind), depth - 1, names)
        else:
            child = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
            child.SetInParent()
            filled(child, depth - 1, names)


def every_signature(message: Message) -> list[str]:
    """The names of every Signature in `message`, found by reading every field of it."""
    found = [message.name] if isinstance(message, task_pb2.Signature) else []
    for field, value in message.ListFields():
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for child in value if field.is_repeated else (value,):
                found.extend(every_signature(child))
    return found


def test_the_walk_finds_the_signatures_of_every_field_of_every_canvas_message() -> None:
    # Fails when a message gains a callback list (or any signature field) that the walk misses.
    names = itertools.count()
    for kind in KINDS:
        workflow = W.Workflow()
        getattr(workflow, kind).SetInParent()
        filled(getattr(workflow, kind), 4, names)
        request = task_service_pb2.SubmitRequest(workflow=workflow)
        walked = list(placed_signatures(request, "request"))
        # Unnamed: the task of a map left empty at the deepest level, which the walk reads as set.
        assert sorted(p.signature.name for p in walked if p.signature.name) == sorted(
            name for name in every_signature(workflow) if name), kind
        assert len({p.where for p in walked}) == len(walked), "each signature has its own place"


def test_every_callback_list_is_named_and_receives_the_result_or_the_error() -> None:
    group = W.Group(members=[node("m")], on_error=[sig("once")], on_success=[sig("ok", on_error=[sig("ok-failed")])],
                    on_member_error=[sig("each", immutable=True)])
    chord = W.Chord(header=group, callback=node("sum"))
    map_ = W.Map(task=sig("double"), items=[task_pb2.Value(int_value=1)])
    chain = W.Chain(steps=[W.Workflow(chord=chord), W.Workflow(map=map_)], on_error=[sig("failed")],
                    on_success=[sig("done")])
    request = task_service_pb2.SubmitRequest(workflow=W.Workflow(chain=chain))
    walked = list(placed_signatures(request, "request"))
    assert [(p.signature.name, p.where, p.leading) for p in walked] == [
        ("m", "request.workflow.chain[0].chord.header[0]", False),
        ("once", "request.workflow.chain[0].chord.header.on_error[0]", True),
        ("ok", "request.workflow.chain[0].chord.header.on_success[0]", True),
        ("ok-failed", "request.workflow.chain[0].chord.header.on_success[0].on_error[0]", True),
        ("each", "request.workflow.chain[0].chord.header.on_member_error[0]", False),  # immutable
        ("sum", "request.workflow.chain[0].chord.callback", True),
        ("double", "request.workflow.chain[1].map.task", False),  # its chunks are immutable
        ("failed", "request.workflow.chain.on_error[0]", True),
        ("done", "request.workflow.chain.on_success[0]", True),
    ]
    assert [p.map is not None for p in walked] == [False] * 6 + [True, False, False]


def test_a_lone_task_an_empty_request_and_an_empty_node_hold_what_they_show() -> None:
    lone = task_service_pb2.SubmitRequest(task=sig("a", on_success=[sig("b")]))
    assert [(p.where, p.leading) for p in placed_signatures(lone, "request")] == [
        ("request.task", False), ("request.task.on_success[0]", True)]
    assert list(placed_signatures(task_service_pb2.SubmitRequest())) == []
    assert [p.where for p in placed_signatures(W.Workflow(group=W.Group(members=[W.Workflow(), node("x")])), "w")] == [
        "w.group[1]"]
