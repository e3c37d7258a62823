"""core/routing_timeout.py: a task failed Unroutable at a given time ends, and records its end,
at that time (the dispatch that turned it away), not whenever the record is written."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor_server.core.routing_timeout import mark_unroutable


def test_an_unroutable_task_ends_at_the_time_given() -> None:
    record = records_pb2.TaskRecord()
    record.result.state = result_pb2.TASK_STATE_PENDING
    record.result.signature.name, record.result.signature.queue = "node.mul", "q"
    record.result.signature.routing_timeout.FromSeconds(2)
    at = Timestamp(seconds=1_700_000_000, nanos=250_000_000)
    mark_unroutable(record, at=at)
    assert record.result.finished_at == at
    assert record.result.history[-1].at == at
