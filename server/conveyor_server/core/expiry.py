"""Task expiry (Signature.expires_at): a task not started by its expiry is never run.

Dispatch is where it is checked (core/dispatch.py): an expired task's message is not sent to a
worker; its record ends EXPIRED and its follow-ups (on_error callbacks, its workflow) run as
after a failure. A retry whose next attempt is due after the expiry ends EXPIRED as soon as it
comes up, instead of waiting for a run that will never happen.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor.values import seconds_of

from .records import TaskStates, error, transition


def expiry_of(signature: task_pb2.Signature) -> float | None:
    """The expiry in epoch seconds, None when the task has none."""
    return seconds_of(signature.expires_at) if signature.HasField("expires_at") else None


def is_expired(signature: task_pb2.Signature, record: records_pb2.TaskRecord, wall: float) -> bool:
    """Whether the task must not run (again): its expiry has passed at `wall` (epoch seconds),
    or it waits for a retry due at or after its expiry."""
    expires = expiry_of(signature)
    if expires is None:
        return False
    if wall >= expires:
        return True
    return record.result.state == TaskStates.TASK_STATE_RETRY and seconds_of(record.retry_at) >= expires


def mark_expired(record: records_pb2.TaskRecord, at: Timestamp | None = None) -> None:
    """End the record EXPIRED (`at`, default now), with an "Expired" error naming the expiry; its
    lease ends too."""
    expires = record.result.signature.expires_at.ToJsonString()
    retrying = record.result.state == TaskStates.TASK_STATE_RETRY
    what = f"its retry (attempt {record.result.attempts + 1}) was due after" if retrying else "it was not started by"
    cause = error("Expired", f"task {record.result.task_id} expired: {what} its expiry {expires}")
    record.result.error.CopyFrom(cause)
    record.lease_token = ""
    transition(record, TaskStates.TASK_STATE_EXPIRED, at=at, error=cause)
