"""Tasks that reject themselves (conveyor.Reject), for tests/e2e/test_reject.py; run by
`conveyor worker tests.e2e.reject_tasks`, with canvas_tasks' tasks (note, note_error, ...) too.

Each run appends a line to the file named by CONVEYOR_TEST_LOG, so a test can count runs across
requeues (appends of short lines are atomic, so worker threads and processes can share it).
"""

from __future__ import annotations

import os
from typing import Any

from conveyor import Reject, current_task
from tests.e2e.canvas_tasks import worker

__all__ = ["worker"]


def _log(line: str) -> None:
    with open(os.environ["CONVEYOR_TEST_LOG"], "a") as out:
        out.write(line + "\n")


def _runs(label: str) -> int:
    """Runs of tasks labelled `label` so far, this one included (it logged itself first)."""
    with open(os.environ["CONVEYOR_TEST_LOG"]) as lines:
        return sum(1 for line in lines if line.rstrip("\n") == f"run {label}")


@worker.task("reject")
def reject(label: str) -> None:
    _log(f"run {label}")
    raise Reject(f"refused {label}")


@worker.task("requeue_then_succeed")
def requeue_then_succeed(label: str, requeues: int) -> dict[str, Any]:
    """Requeues itself `requeues` times, then returns how many runs it took and its attempt."""
    _log(f"run {label}")
    runs = _runs(label)
    if runs <= requeues:
        raise Reject(f"not yet ({runs})", requeue=True)
    return {"runs": runs, "attempt": current_task().attempt}


@worker.task("requeue_forever")
def requeue_forever(label: str) -> None:
    _log(f"run {label}")
    raise Reject("never ready", requeue=True)


@worker.task("reject_async")
async def reject_async(label: str, requeues: int) -> int:
    """An async task (run on the worker's event loop): requeues itself `requeues` times, then rejects."""
    _log(f"run {label}")
    runs = _runs(label)
    raise Reject(f"refused after {runs} runs", requeue=runs <= requeues)
