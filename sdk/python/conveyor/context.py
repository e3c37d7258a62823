"""What a running task knows about itself: id, attempt, headers, cancellation, progress."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import TaskCancelled

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("conveyor_task")


@dataclass
class TaskContext:
    task_id: str
    name: str
    attempt: int
    queue: str
    headers: dict[str, str]
    workflow_id: str
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _report: Callable[[Any], None] | None = None
    # True when the server asked to cancel (as opposed to a time limit or a shutdown).
    cancelled_by_request: bool = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stop(self, by_request: bool = False) -> None:
        """Flag the task to stop; sync tasks see it at their next check_cancelled()."""
        self.cancelled_by_request = self.cancelled_by_request or by_request
        self._cancelled.set()

    def check_cancelled(self) -> None:
        """Sync tasks call this at safe points; it raises once the task was cancelled."""
        if self._cancelled.is_set():
            raise TaskCancelled(f"task {self.task_id} was cancelled")

    def progress(self, value: Any) -> None:
        """Report progress (any encodable value); the latest is stored in the task's result."""
        if self._report is not None:
            self._report(value)


def current_task() -> TaskContext:
    """The context of the task running in this thread or coroutine."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() is only available inside a running task") from None


def bind(context: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(context)
