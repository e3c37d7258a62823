"""Exceptions raised by the SDK."""

from __future__ import annotations


class ConveyorError(Exception):
    """Base class of every Conveyor SDK error."""


class UnencodableValue(ConveyorError, TypeError):
    """A Python value has no wire form (see conveyor.values)."""


class TaskFailed(ConveyorError):
    """A task ended in FAILURE or CANCELLED; raised by AsyncResult-style helpers."""

    def __init__(self, task_id: str, state: str, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"task {task_id} ended {state}: {error_type}: {message}")
        self.task_id = task_id
        self.state = state
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class Retry(ConveyorError):
    """Raise inside a task to run it again after `delay` seconds (bounded by max attempts)."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {delay} s")
        self.delay = delay
        self.reason = reason


class TaskCancelled(ConveyorError):
    """Raised inside a sync task (via Context.check_cancelled) once the task was cancelled."""


class TimeLimitExceeded(ConveyorError):
    """The task ran past its time limit."""
