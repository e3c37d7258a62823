"""The task of tests/chaos/test_duplicate_delivery.py, run by `conveyor worker tests.chaos.dup_tasks`.

Each run appends `chaos <task id> <start, unix time> pid=<pid>` to CONVEYOR_TEST_LOG (the format
tests/chaos/checks.py reads), so the test can tell when every run of a task began.
"""

from __future__ import annotations

import os
import time

from conveyor import Worker, current_task

worker = Worker(concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "8")))


@worker.task("hold")
def hold(index: int, seconds: float) -> int:
    started = time.time()
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:  # one short line: appends from several processes stay whole
            out.write(f"chaos {current_task().task_id} {started:.6f} pid={os.getpid()}\n")
    time.sleep(seconds)
    return index
