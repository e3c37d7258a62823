"""Task expiry: the edges mutation testing found unpinned (what the "Expired" error says, and
that the EXPIRED history entry carries it). On records built in memory."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import result_pb2, task_pb2
from conveyor_server.core.expiry import mark_expired
from conveyor_server.core.records import new_record

EXPIRES = Timestamp(seconds=1_700_000_000)  # 2023-11-14T22:13:20Z
AT = Timestamp(seconds=1_700_000_100)


def test_an_expired_task_says_when_it_expired_and_its_history_entry_carries_the_error() -> None:
    record = new_record(task_pb2.Signature(name="n", id="t1", queue="q", expires_at=EXPIRES), at=Timestamp(seconds=1))
    mark_expired(record, AT)
    expected = result_pb2.TaskError(
        type="Expired", message="task t1 expired: it was not started by its expiry 2023-11-14T22:13:20Z"
    )
    assert record.result.state == result_pb2.TASK_STATE_EXPIRED
    assert record.result.error == expected
    last = record.result.history[-1]
    assert (last.state, last.at, last.error) == (result_pb2.TASK_STATE_EXPIRED, AT, expected)
