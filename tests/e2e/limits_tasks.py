"""Tasks for tests/e2e/test_limits.py, run by `conveyor worker tests.e2e.limits_tasks`: the tasks
of tests.e2e.workload, plus one that checks a concurrency limit from inside the running tasks."""

from __future__ import annotations

import fcntl
import os
import time

from conveyor import current_task
from tests.e2e.workload import worker

__all__ = ["worker"]


def _log(line: str) -> None:
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def count_running(counter: str, change: int) -> int:
    """Add `change` to the number in the file `counter` (shared by every worker process, under
    an exclusive lock) and return the new number."""
    with open(counter, "a+") as shared:
        fcntl.flock(shared, fcntl.LOCK_EX)
        shared.seek(0)
        running = int(shared.read() or 0) + change
        shared.seek(0)
        shared.truncate()
        shared.write(str(running))
        return running


@worker.task("limits.hold")
def hold(counter: str, seconds: float) -> int:
    """Run for `seconds`, counted in `counter` while it runs; returns how many tasks of its
    concurrency key were running when it started, itself included."""
    running = count_running(counter, +1)
    task_id = current_task().task_id
    _log(f"hold-start {task_id} pid={os.getpid()} at={time.time():.6f} running={running}")
    try:
        time.sleep(seconds)
    finally:
        _log(f"hold-end {task_id} pid={os.getpid()} at={time.time():.6f}")
        count_running(counter, -1)
    return running
