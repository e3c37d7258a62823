"""Tasks used by the end-to-end tests, run by `conveyor worker tests.e2e.workload`.

Side effects that tests count (how often a callback ran, which worker ran what) are
appended to the file named by CONVEYOR_TEST_LOG, one line per event: appends of short
lines are atomic, so several worker processes can share it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import Retry, Worker, current_task

worker = Worker(concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "8")))


def _log(line: str) -> None:
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


@worker.task("add")
def add(x: int, y: int) -> int:
    return x + y


@worker.task("mul")
def mul(x: int, y: int) -> int:
    return x * y


@worker.task("noop")
def noop() -> None:
    return None


@worker.task("echo")
async def echo(*args: Any, **kwargs: Any) -> Any:
    return {"args": list(args), "kwargs": kwargs}


@worker.task("member")
def member(index: int) -> int:
    _log(f"member {index} pid={os.getpid()}")
    time.sleep(0.01)  # long enough that members spread over the workers
    return index * index


@worker.task("collect")
def collect(results: list[Any]) -> list[Any]:
    """A chord callback that counts its own runs."""
    _log(f"collect {current_task().task_id}")
    return results


@worker.task("tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@worker.task("fail")
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@worker.task("record_error")
def record_error(error: dict[str, Any], *rest: Any) -> str:
    _log(f"error {error['type']} {error['message']}")
    return str(error["type"])


@worker.task("sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@worker.task("sleep_sync")
def sleep_sync(seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        current_task().check_cancelled()
        time.sleep(0.01)
    return seconds


@worker.task("flaky")
def flaky(succeed_on: int) -> int:
    """Fails until attempt `succeed_on`, logging when each attempt ran."""
    attempt = current_task().attempt
    _log(f"flaky {current_task().task_id} attempt={attempt} at={time.time():.3f}")
    if attempt < succeed_on:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@worker.task("retry_later")
def retry_later(delay: float) -> None:
    _log(f"retry_later {current_task().task_id} attempt={current_task().attempt}")
    raise Retry(delay=delay)


@worker.task("stamp")
def stamp(label: str) -> float:
    now = time.time()
    _log(f"stamp {label} {current_task().task_id} at={now:.3f}")
    return now
