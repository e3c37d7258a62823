"""How one run of a task ended (an Ending, which crosses process boundaries), and how a sync task
function is called so that nothing it raises, BaseException included, escapes as anything but
a failed Ending."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.context import TaskContext, bind
from conveyor.errors import Reject, Retry, TimeLimitExceeded, WorkerLost
from conveyor.replacement import Replacement
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2, workflow_pb2
from conveyor.values import from_value, set_seconds, to_value

TaskFunction = Callable[..., Any]


@dataclass(slots=True)
class Ending:
    """The end of one run: the outcome, when it started and ended (seconds since the epoch),
    and the result or the error."""

    outcome: int
    started_at: float
    finished_at: float
    result: task_pb2.Value | None = None
    error: result_pb2.TaskError | None = None
    retry_delay: float = 0.0
    # OUTCOME_REPLACED: the canvas that runs in the task's place (conveyor.replace).
    replacement: workflow_pb2.Workflow | None = None

    @property
    def runtime(self) -> float:
        return max(self.finished_at - self.started_at, 0.0)


def task_error(exc: BaseException, kind: str | None = None) -> result_pb2.TaskError:
    return result_pb2.TaskError(
        type=kind or type(exc).__name__, message=str(exc), traceback="".join(traceback.format_exception(exc)),
    )


def succeeded(value: Any, started_at: float) -> Ending:
    if isinstance(value, Replacement):  # the task returned replace(canvas)
        return Ending(worker_service_pb2.OUTCOME_REPLACED, started_at, time.time(), replacement=value.workflow)
    try:
        result = to_value(value)
    except Exception as exc:  # an unencodable result fails the task, with the reason
        return ended_by(exc, started_at)
    return Ending(worker_service_pb2.OUTCOME_SUCCESS, started_at, time.time(), result=result)


def ended_by(exc: BaseException, started_at: float) -> Ending:
    """The Ending of a task that raised `exc`: a retry or reject it asked for, else a failure."""
    if isinstance(exc, Retry):
        return Ending(worker_service_pb2.OUTCOME_RETRY, started_at, time.time(), error=task_error(exc, "Retry"),
                      retry_delay=max(exc.delay, 0.0))
    if isinstance(exc, Reject):
        outcome = worker_service_pb2.OUTCOME_REQUEUED if exc.requeue else worker_service_pb2.OUTCOME_REJECTED
        return Ending(outcome, started_at, time.time(), error=task_error(exc, "Rejected"))
    return Ending(worker_service_pb2.OUTCOME_FAILURE, started_at, time.time(), error=task_error(exc))


def _stopped_error(exc: BaseException) -> result_pb2.TaskError:
    """The error of a task stopped from outside: no traceback, it raised nothing."""
    return result_pb2.TaskError(type=type(exc).__name__, message=str(exc))


def time_limit_exceeded(limit: float, started_at: float) -> Ending:
    error = _stopped_error(TimeLimitExceeded(f"ran longer than its time limit of {limit:g} s"))
    return Ending(worker_service_pb2.OUTCOME_FAILURE, started_at, time.time(), error=error)


def cancelled(started_at: float | None = None) -> Ending:
    now = time.time()
    return Ending(worker_service_pb2.OUTCOME_CANCELLED, now if started_at is None else started_at, now)


def worker_lost(detail: str, started_at: float) -> Ending:
    return Ending(worker_service_pb2.OUTCOME_FAILURE, started_at, time.time(), error=_stopped_error(WorkerLost(detail)))


def to_outcome(assignment: worker_service_pb2.Assignment, ending: Ending) -> worker_service_pb2.TaskOutcome:
    outcome = worker_service_pb2.TaskOutcome(
        task_id=assignment.task.id, lease_token=assignment.lease_token, outcome=ending.outcome  # type: ignore[arg-type]
    )
    set_seconds(outcome.started_at, ending.started_at)
    set_seconds(outcome.finished_at, ending.finished_at)
    if ending.result is not None:
        outcome.result.CopyFrom(ending.result)
    if ending.error is not None:
        outcome.error.CopyFrom(ending.error)
    if ending.outcome == worker_service_pb2.OUTCOME_RETRY:
        set_seconds(outcome.retry_delay, ending.retry_delay)
    if ending.replacement is not None:
        outcome.replacement.CopyFrom(ending.replacement)
    return outcome


def arguments(task: task_pb2.Signature) -> tuple[list[Any], dict[str, Any]]:
    return [from_value(v) for v in task.args], {k: from_value(v) for k, v in task.kwargs.items()}


# A chunk task of a map (docs/canvas.md): "map" (each arg is one call's arg) or "starmap" (each
# arg is one call's list of args). The task is called once per item; its result is the list.
MAP_HEADER = "conveyor-map"

Call = tuple[list[Any], dict[str, Any]]


def item_calls(task: task_pb2.Signature) -> list[Call] | None:
    """The calls of a chunk task, one per item, in order; None for a plain task."""
    mode = task.headers.get(MAP_HEADER)
    if mode is None:
        return None
    items, kwargs = arguments(task)
    if mode == "starmap":
        for index, item in enumerate(items):
            if not isinstance(item, list):
                raise TypeError(f"starmap item {index} is {type(item).__name__}, not a list of args")
        return [(item, kwargs) for item in items]
    return [([item], kwargs) for item in items]


def call_sync(
    function: TaskFunction, task: task_pb2.Signature, context: TaskContext,
    passthrough: tuple[type[BaseException], ...] = (),
) -> Ending:
    """Run a sync task here (a pool thread or a child process). SystemExit, KeyboardInterrupt and
    any other BaseException end the task, never the worker; `passthrough` is what the caller
    uses to stop a task and must see."""
    started_at = time.time()
    bind(context)
    try:
        each = item_calls(task)
        if each is None:
            args, kwargs = arguments(task)
            value = function(*args, **kwargs)
        else:
            value = [function(*args, **kwargs) for args, kwargs in each]
    except passthrough:
        raise
    except BaseException as exc:  # a task's failure, whatever it raised
        return ended_by(exc, started_at)
    return succeeded(value, started_at)
