"""Task records: keys, creation and state transitions (pure functions over protobuf)."""

from __future__ import annotations

import hashlib

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2
from conveyor.values import timestamp_now


class TaskStates:
    """TaskState values as plain attributes: the generated enum wrapper resolves each
    attribute through __getattr__, which shows up in profiles of the hot path."""

    TASK_STATE_UNSPECIFIED = result_pb2.TASK_STATE_UNSPECIFIED
    TASK_STATE_PENDING = result_pb2.TASK_STATE_PENDING
    TASK_STATE_RECEIVED = result_pb2.TASK_STATE_RECEIVED
    TASK_STATE_STARTED = result_pb2.TASK_STATE_STARTED
    TASK_STATE_RETRY = result_pb2.TASK_STATE_RETRY
    TASK_STATE_SUCCESS = result_pb2.TASK_STATE_SUCCESS
    TASK_STATE_FAILURE = result_pb2.TASK_STATE_FAILURE
    TASK_STATE_CANCELLED = result_pb2.TASK_STATE_CANCELLED
    TASK_STATE_EXPIRED = result_pb2.TASK_STATE_EXPIRED
    Name = staticmethod(result_pb2.TaskState.Name)


TERMINAL_STATES = frozenset({
    TaskStates.TASK_STATE_SUCCESS, TaskStates.TASK_STATE_FAILURE,
    TaskStates.TASK_STATE_CANCELLED, TaskStates.TASK_STATE_EXPIRED,
})
# Terminal states that count as a failure for on_error callbacks and the task's workflow.
FAILED_STATES = frozenset({TaskStates.TASK_STATE_FAILURE, TaskStates.TASK_STATE_EXPIRED})


def task_key(task_id: str) -> str:
    return f"task:{task_id}"


def plan_key(workflow_id: str) -> str:
    return f"plan:{workflow_id}"


def idempotency_key(key: str) -> str:
    return f"idem:{key}"


def unique_key(signature: task_pb2.Signature) -> str:
    """The key of a unique task: its own unique_key, or a digest of what it runs and where."""
    if signature.unique_key:
        return f"unique:{signature.unique_key}"
    call = task_pb2.Signature(name=signature.name, queue=signature.queue, args=signature.args,
                              kwargs=signature.kwargs)
    return f"unique:{hashlib.sha256(call.SerializeToString(deterministic=True)).hexdigest()}"


DEAD_LETTERS_GROUP = "deadletters"


def now() -> Timestamp:
    return timestamp_now()


def is_terminal(record: records_pb2.TaskRecord) -> bool:
    return record.result.state in TERMINAL_STATES


def new_record(
    signature: task_pb2.Signature,
    *,
    workflow_id: str = "",
    node_id: str = "",
    enqueued: bool = True,
    at: Timestamp | None = None,
) -> records_pb2.TaskRecord:
    stamp = at or now()
    record = records_pb2.TaskRecord(node_id=node_id, enqueued=enqueued)
    if enqueued:
        record.enqueued_at.CopyFrom(stamp)
    result = record.result
    result.task_id = signature.id
    result.name = signature.name
    result.queue = signature.queue
    result.workflow_id = workflow_id
    result.signature.CopyFrom(signature)
    result.submitted_at.CopyFrom(stamp)
    transition(record, TaskStates.TASK_STATE_PENDING, at=stamp)
    return record


def transition(
    record: records_pb2.TaskRecord,
    state: result_pb2.TaskState.ValueType,
    *,
    at: Timestamp | None = None,
    worker_id: str = "",
    error: result_pb2.TaskError | None = None,
) -> None:
    """Move the record to `state` and append the change to its history."""
    stamp = at or now()
    result = record.result
    result.state = state
    entry = result.history.add(state=state, attempt=result.attempts, worker_id=worker_id)
    entry.at.CopyFrom(stamp)
    if error is not None:
        entry.error.CopyFrom(error)
    if state in TERMINAL_STATES:
        result.finished_at.CopyFrom(stamp)


def error(kind: str, message: str, traceback: str = "") -> result_pb2.TaskError:
    return result_pb2.TaskError(type=kind, message=message, traceback=traceback)
