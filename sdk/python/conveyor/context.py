"""What a running task knows about itself: ids, attempt, limits, headers, cancellation, progress."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.errors import SoftTimeLimitExceeded, TaskCancelled
from conveyor.v1 import worker_service_pb2
from conveyor.values import seconds_of

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("conveyor_task")


@dataclass
class TaskContext:
    task_id: str
    name: str
    attempt: int
    queue: str
    headers: dict[str, str]
    # The workflow the task belongs to (its root); empty for a task submitted on its own.
    workflow_id: str
    # The task that submitted this one from inside its run; empty otherwise.
    parent_id: str = ""
    # Deliveries of this attempt to a worker, this one included (0 from a server that does not count them).
    deliveries: int = 0
    priority: int = 0
    # Seconds, counted from the moment the task started running; None when unlimited.
    time_limit: float | None = None
    soft_time_limit: float | None = None
    # Set from the event loop, read by the task's thread: a flag, not a threading.Event, as no
    # one waits on it (an Event's lock and condition cost every task 2 µs to make).
    _stopping: bool = False
    _report: Callable[[Any], None] | None = None
    # True when the server asked to cancel (as opposed to a time limit or a shutdown).
    cancelled_by_request: bool = False
    # The soft limit passed and check_cancelled() has not raised it yet (thread pool).
    _soft_limit_due: bool = False

    @classmethod
    def of(cls, assignment: worker_service_pb2.Assignment) -> TaskContext:
        task = assignment.task
        return cls(
            task_id=task.id, name=task.name, attempt=assignment.attempt, queue=task.queue,
            headers=dict(task.headers), workflow_id=assignment.workflow_id, parent_id=task.parent_id,
            deliveries=assignment.deliveries, priority=task.priority,
            time_limit=seconds_of(task.time_limit) or None, soft_time_limit=seconds_of(task.soft_time_limit) or None,
        )

    @property
    def cancelled(self) -> bool:
        return self._stopping

    def stop(self, by_request: bool = False) -> None:
        """Flag the task to stop; sync tasks see it at their next check_cancelled()."""
        self.cancelled_by_request = self.cancelled_by_request or by_request
        self._stopping = True

    def soft_limit_passed(self) -> None:
        """The soft limit passed: the next check_cancelled() raises SoftTimeLimitExceeded (once)."""
        self._soft_limit_due = True

    def check_cancelled(self) -> None:
        """Sync tasks call this at safe points. It raises TaskCancelled once the task was cancelled
        or passed its hard time limit, and SoftTimeLimitExceeded (once) after the soft limit."""
        if self._stopping:
            raise TaskCancelled(f"task {self.task_id} was cancelled")
        if self._soft_limit_due:
            self._soft_limit_due = False
            raise SoftTimeLimitExceeded(soft_limit_message(self.soft_time_limit))

    def progress(self, value: Any) -> None:
        """Report progress (any encodable value); the latest is stored in the task's result."""
        if self._report is not None:
            self._report(value)


def soft_limit_message(limit: float | None) -> str:
    return f"ran past its soft time limit of {limit:g} s" if limit else "ran past its soft time limit"


def current_task() -> TaskContext:
    """The context of the task running in this thread or coroutine."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() is only available inside a running task") from None


def running_task_id() -> str:
    """The id of the task running here, or "" outside a task (the parent of what it submits)."""
    context = _current.get(None)
    return context.task_id if context is not None else ""


def bind(context: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(context)
