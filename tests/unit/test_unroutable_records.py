"""A task past its routing_timeout, at the record level (core/routing_timeout.py): when it became
ready to run, and what failing it Unroutable leaves in the record."""

from __future__ import annotations

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor_server.core.routing_timeout import mark_unroutable, ready_at


def test_a_task_not_yet_enqueued_is_ready_from_its_submission() -> None:
    record = records_pb2.TaskRecord()
    record.result.submitted_at.FromSeconds(100)
    assert ready_at(record) == 100
    record.enqueued_at.FromSeconds(90)  # a clock behind the submitting replica's
    assert ready_at(record) == 100, "the latest of the times counts"


def test_an_unroutable_task_ends_failed_without_its_lease_and_its_history_names_the_error() -> None:
    record = records_pb2.TaskRecord(lease_token="lease-1")
    record.result.state = result_pb2.TASK_STATE_PENDING
    record.result.signature.name = "node.mul"
    record.result.signature.queue = "q"
    record.result.signature.routing_timeout.FromSeconds(2)
    mark_unroutable(record)
    assert record.result.state == result_pb2.TASK_STATE_FAILURE
    assert record.lease_token == "", "no worker holds it"
    assert record.result.HasField("finished_at")
    (cause,) = record.attempt_errors
    assert (cause.type, record.result.error) == ("Unroutable", cause)
    assert "routing_timeout of 2 s" in cause.message
    last = record.result.history[-1]
    assert (last.state, last.error) == (result_pb2.TASK_STATE_FAILURE, cause)
