"""Tasks for the worker pool and limit tests (tests/e2e/test_worker_pools.py,
test_worker_limits.py, tests/integration/test_pools.py). Module level, so that child processes of the
processes pool can import them; `conveyor worker tests.e2e.pool_tasks` serves them all.

Tasks that leave a side effect write a file (a path the test chose): the file's existence is
how a test sees that code ran past a point, from any process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from conveyor import Retry, SyncClient, Worker, current_task
from conveyor.errors import SoftTimeLimitExceeded

worker = Worker(concurrency=2, pool="processes")
# Memory a task keeps after it returns (the max_memory_per_child test grows a child with it).
_kept: list[bytearray] = []


class CustomStop(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


@worker.task("pool.add")
def add(x: int, y: int) -> int:
    return x + y


@worker.task("pool.noop")
def noop() -> None:
    return None


@worker.task("pool.async_add")
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x + y


@worker.task("pool.pid")
def pid() -> int:
    return os.getpid()


@worker.task("pool.sleep_then_write")
def sleep_then_write(path: str, seconds: float) -> str:
    """Cooperates with nothing: a sleep, then the side effect."""
    time.sleep(seconds)
    Path(path).write_text("ran past the sleep")
    return "wrote"


@worker.task("pool.spin_then_write")
def spin_then_write(path: str, seconds: float) -> str:
    """A busy loop that never checks for cancellation, then the side effect."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    Path(path).write_text("ran past the loop")
    return "wrote"


@worker.task("pool.async_sleep_then_write")
async def async_sleep_then_write(path: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    Path(path).write_text("ran past the sleep")  # noqa: ASYNC240 - tiny, and the point of the task
    return "wrote"


@worker.task("pool.catch_soft_limit")
def catch_soft_limit(seconds: float) -> str:
    """Sleeps (checking in, for the thread pool) until the soft limit, then cleans up and returns."""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
            current_task().check_cancelled()
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "never hit the soft limit"


@worker.task("pool.async_catch_soft_limit")
async def async_catch_soft_limit(seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "never hit the soft limit"


@worker.task("pool.sys_exit")
def sys_exit(code: int) -> None:
    sys.exit(code)


@worker.task("pool.hard_exit")
def hard_exit(code: int) -> None:
    os._exit(code)


@worker.task("pool.keyboard_interrupt")
def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@worker.task("pool.custom_base_exception")
def custom_base_exception() -> None:
    raise CustomStop("not an Exception")


@worker.task("pool.async_sys_exit")
async def async_sys_exit(code: int) -> None:
    sys.exit(code)


@worker.task("pool.context")
def context() -> dict[str, Any]:
    task = current_task()
    return {
        "task_id": task.task_id, "workflow_id": task.workflow_id, "parent_id": task.parent_id,
        "attempt": task.attempt, "deliveries": task.deliveries, "priority": task.priority,
        "time_limit": task.time_limit, "soft_time_limit": task.soft_time_limit, "queue": task.queue,
        "headers": {k: v for k, v in task.headers.items() if not k.startswith("trace")},
    }


@worker.task("pool.size")
def size(data: bytes) -> int:
    return len(data)


@worker.task("pool.grow")
def grow(mebibytes: int) -> int:
    """Keep `mebibytes` MiB alive in this process after returning."""
    block = bytearray(mebibytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page, so it is resident
    _kept.append(block)
    return os.getpid()


@worker.task("pool.progress")
def progress() -> str:
    current_task().progress({"step": 1})
    time.sleep(0.3)
    return "ok"


@worker.task("pool.retry_once")
def retry_once() -> str:
    if current_task().attempt == 1:
        raise Retry(delay=0.2, reason="not yet")
    return "second time"


@worker.task("pool.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@worker.task("pool.submit_child")
def submit_child(address: str) -> str:
    """Submit pool.context from inside this task; the child's parent is this task."""
    with SyncClient(address) as client:
        return client.submit("pool.context").task_id


@worker.task("pool.stubborn")
def stubborn(path: str) -> None:
    """Swallows every exception, the pool's own stop included: only SIGKILL ends it."""
    Path(path).write_text(str(os.getpid()))
    while True:
        with contextlib.suppress(BaseException):
            time.sleep(0.05)
