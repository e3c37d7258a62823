"""The tasks of Celery's canvas integration tests (celery/t/integration/tasks.py), for
tests/e2e/test_celery_canvas.py; run by `conveyor worker tests.e2e.canvas_tasks`.

Callbacks that tests count append a line to the file named by CONVEYOR_TEST_LOG (as Celery's
redis_echo and redis_count write to Redis): appends of short lines are atomic, so worker threads
and processes can share it.
"""

from __future__ import annotations

import os
from typing import Any

from conveyor import Worker

worker = Worker(concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "8")))


class ExpectedException(Exception):
    """What `fail` raises (Celery's ExpectedException)."""


def _log(line: str) -> None:
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


@worker.task("add")
def add(x: Any, y: Any) -> Any:
    return x + y


@worker.task("identity")
def identity(value: Any) -> Any:
    return value


@worker.task("tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@worker.task("add_to_all")
def add_to_all(values: list[Any], extra: Any) -> list[Any]:
    return [value + extra for value in values]


@worker.task("fail")
def fail(*args: Any) -> None:
    raise ExpectedException("Task expected to fail", *args)


@worker.task("note")
def note(label: str, *given: Any) -> str:
    """A callback that counts its runs (Celery's redis_echo / redis_count)."""
    _log(f"note {label}")
    return label


@worker.task("note_error")
def note_error(error: dict[str, Any], label: str) -> dict[str, Any]:
    """An error callback that records which task failed and returns the error it was given."""
    _log(f"error {label} {error['task_id']} {error['type']}")
    return error
