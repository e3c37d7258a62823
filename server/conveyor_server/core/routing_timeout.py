"""Routing timeouts (Signature.routing_timeout): a task nobody can run fails instead of waiting.

A task whose name no connected worker registered waits in its queue (core/routing.py). With a
routing_timeout it waits at most that long, counted from when it became ready to run (its
enqueueing, its ETA or its retry time, whichever is latest): when dispatch turns it away past
that, and no live worker of any replica serves its queue with its name, it ends FAILURE with
error type "Unroutable" (a dead letter, its follow-ups as after any failure). A worker that
connects in time takes it as usual, so the timeout bounds the wait; it is not an expiry.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.values import seconds_of

from .records import TaskStates, error, transition
from .repair import eta_of


def ready_at(record: records_pb2.TaskRecord) -> float:
    """Epoch seconds since which the task has been ready to run."""
    ready = max(seconds_of(record.enqueued_at), seconds_of(record.result.submitted_at), eta_of(record))
    if record.result.state == TaskStates.TASK_STATE_RETRY:
        ready = max(ready, seconds_of(record.retry_at))
    return ready


def past_routing_timeout(record: records_pb2.TaskRecord, wall: float) -> bool:
    """Whether the task has waited for a worker longer than its routing_timeout at `wall`."""
    signature = record.result.signature
    if not signature.HasField("routing_timeout"):
        return False
    return wall - ready_at(record) >= seconds_of(signature.routing_timeout)


def mark_unroutable(record: records_pb2.TaskRecord, at: Timestamp | None = None) -> None:
    """End the record FAILURE (`at`, default now) with an "Unroutable" error naming the name,
    queue and timeout."""
    signature = record.result.signature
    cause = error("Unroutable", f"no connected worker registered task {signature.name!r} on queue "
                                f"{signature.queue!r} within its routing_timeout of "
                                f"{seconds_of(signature.routing_timeout):g} s")
    record.attempt_errors.append(cause)
    record.result.error.CopyFrom(cause)
    record.lease_token = ""
    transition(record, TaskStates.TASK_STATE_FAILURE, at=at, error=cause)
