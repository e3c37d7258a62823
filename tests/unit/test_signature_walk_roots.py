"""Where the signature walk (core/canvas/signatures.py) starts: the message given is placed where
it stands (at "" unless named), and what it holds first receives no previous result."""

from __future__ import annotations

from conveyor.v1 import task_pb2, task_service_pb2, workflow_pb2
from conveyor_server.core.canvas.signatures import placed_signatures


def test_a_workflow_that_is_one_task_is_placed_at_the_root_without_a_previous_result() -> None:
    workflow = workflow_pb2.Workflow(task=task_pb2.Signature(name="a", on_error=[task_pb2.Signature(name="b")]))
    assert [(p.signature.name, p.where, p.leading) for p in placed_signatures(workflow, "w")] == [
        ("a", "w", False), ("b", "w.on_error[0]", True)]
    request = task_service_pb2.SubmitRequest(workflow=workflow)
    assert [(p.where, p.leading) for p in placed_signatures(request, "request")] == [
        ("request.workflow", False), ("request.workflow.on_error[0]", True)]


def test_the_members_of_a_group_given_as_the_root_receive_no_previous_result() -> None:
    members = [workflow_pb2.Workflow(task=task_pb2.Signature(name=name)) for name in ("a", "b")]
    walked = placed_signatures(workflow_pb2.Workflow(group=workflow_pb2.Group(members=members)), "w")
    assert [(p.where, p.leading) for p in walked] == [("w.group[0]", False), ("w.group[1]", False)]


def test_without_a_root_name_places_start_at_the_message() -> None:
    request = task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="a"))
    assert [p.where for p in placed_signatures(request)] == [".task"]


def test_a_signature_given_as_the_root_is_placed_where_named_without_a_previous_result() -> None:
    signature = task_pb2.Signature(name="a", on_success=[task_pb2.Signature(name="b")])
    assert [(p.signature.name, p.where, p.leading) for p in placed_signatures(signature, "s")] == [
        ("a", "s", False), ("b", "s.on_success[0]", True)]
