"""Runs one assignment: decodes its args, calls the task (async or in a thread), enforces
the time limit and turns the ending into a TaskOutcome."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.context import TaskContext, bind
from conveyor.errors import Retry, TaskCancelled, TimeLimitExceeded
from conveyor.v1 import result_pb2
from conveyor.v1 import worker_service_pb2 as w
from conveyor.values import from_value, timestamp_now, to_value

TaskFunction = Callable[..., Any]


def _now() -> Timestamp:
    return timestamp_now()


def _error(exc: BaseException, kind: str | None = None) -> result_pb2.TaskError:
    return result_pb2.TaskError(
        type=kind or type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


async def execute(
    function: TaskFunction,
    assignment: w.Assignment,
    context: TaskContext,
    executor: Executor,
) -> w.TaskOutcome:
    task = assignment.task
    outcome = w.TaskOutcome(task_id=task.id, lease_token=assignment.lease_token)
    outcome.started_at.CopyFrom(_now())
    limit = task.time_limit.seconds + task.time_limit.nanos / 1e9 if task.HasField("time_limit") else None
    deadline = asyncio.timeout(None)
    try:
        args = [from_value(v) for v in task.args]
        kwargs = {k: from_value(v) for k, v in task.kwargs.items()}
        deadline = asyncio.timeout(limit or None)
        async with deadline:
            value = await _call(function, args, kwargs, context, executor)
        outcome.result.CopyFrom(to_value(value))
        outcome.outcome = w.OUTCOME_SUCCESS
    except Retry as exc:
        outcome.outcome = w.OUTCOME_RETRY
        outcome.error.CopyFrom(_error(exc, "Retry"))
        outcome.retry_delay.FromNanoseconds(int(max(exc.delay, 0.0) * 1e9))
    except TimeoutError as timeout:
        outcome.outcome = w.OUTCOME_FAILURE
        if deadline.expired():
            context.stop()  # a sync task still running in its thread should stop at its next check
            outcome.error.CopyFrom(_error(TimeLimitExceeded(f"ran longer than its time limit of {limit} s")))
        else:
            outcome.error.CopyFrom(_error(timeout))
    except (asyncio.CancelledError, TaskCancelled):
        if not context.cancelled_by_request:
            raise
        outcome.outcome = w.OUTCOME_CANCELLED
    except Exception as exc:
        outcome.outcome = w.OUTCOME_FAILURE
        outcome.error.CopyFrom(_error(exc))
    outcome.finished_at.CopyFrom(_now())
    return outcome


def cancelled_before_start(assignment: w.Assignment) -> w.TaskOutcome:
    """The outcome of a prefetched task cancelled while it waited for a slot."""
    outcome = w.TaskOutcome(
        task_id=assignment.task.id, lease_token=assignment.lease_token, outcome=w.OUTCOME_CANCELLED
    )
    outcome.started_at.CopyFrom(_now())
    outcome.finished_at.CopyFrom(outcome.started_at)
    return outcome


async def _call(
    function: TaskFunction, args: list[Any], kwargs: dict[str, Any], context: TaskContext, executor: Executor
) -> Any:
    if inspect.iscoroutinefunction(function):
        bind(context)
        return await function(*args, **kwargs)
    snapshot = contextvars.copy_context()
    snapshot.run(bind, context)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(snapshot.run, function, *args, **kwargs))
