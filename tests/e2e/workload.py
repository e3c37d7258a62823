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

worker = Worker(
    concurrency=int(os.environ.get("CONVEYOR_TEST_CONCURRENCY", "8")),
    drain_timeout=float(os.environ.get("CONVEYOR_TEST_DRAIN_SECONDS", "30")),
)


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
def member(index: int, seconds: float = 0.01) -> int:
    _log(f"member {index} pid={os.getpid()}")
    time.sleep(seconds)  # long enough that members spread over the workers
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


# -- reliability and chaos tests ----------------------------------------------------------------

@worker.task("chaos")
def chaos(index: int, seconds: float) -> int:
    """Logs each run (a task may run again after its worker was killed), then sleeps."""
    _log(f"chaos {current_task().task_id} attempt={current_task().attempt} pid={os.getpid()}")
    time.sleep(seconds)
    return index


@worker.task("nap")
async def nap(label: str, seconds: float) -> str:
    """An async task that logs when it starts, ends, or is cancelled."""
    _log(f"nap-start {label} {current_task().task_id} pid={os.getpid()}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _log(f"nap-cancelled {label} {current_task().task_id} pid={os.getpid()}")
        raise
    _log(f"nap-end {label} {current_task().task_id} pid={os.getpid()}")
    return label


@worker.task("nap_sync")
def nap_sync(label: str, seconds: float) -> str:
    """A sync task (run in a thread) that checks for cancellation and logs like `nap`."""
    context = current_task()
    _log(f"nap-start {label} {context.task_id} pid={os.getpid()}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if context.cancelled:
            _log(f"nap-cancelled {label} {context.task_id} pid={os.getpid()}")
            context.check_cancelled()
        time.sleep(0.01)
    _log(f"nap-end {label} {context.task_id} pid={os.getpid()}")
    return label


@worker.task("fragile")
def fragile(path: str) -> str:
    """Fails until the file `path` exists (a dead letter that a fix lets succeed on replay)."""
    _log(f"fragile {current_task().task_id}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing")
    return "fixed"


@worker.task("retry_in")
def retry_in(delay: float) -> None:
    """Always asks to run again after `delay` seconds, logging when each attempt ran."""
    context = current_task()
    _log(f"retry_in {context.task_id} attempt={context.attempt} at={time.time():.3f}")
    raise Retry(delay=delay)


@worker.task("gate")
def gate(path: str) -> str:
    """Logs its run, then waits (up to a minute) until the file `path` exists: the test decides when it ends."""
    context = current_task()
    _log(f"gate {context.task_id} attempt={context.attempt} pid={os.getpid()}")
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return path


@worker.task("crash_worker")
def crash_worker(code: int) -> None:
    """A poison task: ends the whole worker process, as a segfault or a stray os._exit would."""
    _log(f"crash_worker {current_task().task_id} pid={os.getpid()}")
    os._exit(code)


# -- fault-injection suite (tests/faults/) ------------------------------------------------------
# One line per execution: "fault <kind> <task id> attempt=<n> pid=<pid> at=<unix time>", so the
# harness counts executions (not states) per task, chord member and chord callback.

def _fault_log(kind: str) -> None:
    context = current_task()
    _log(f"fault {kind} {context.task_id} attempt={context.attempt} pid={os.getpid()} at={time.time():.3f}")


@worker.task("fault_task")
def fault_task(index: int, seconds: float) -> int:
    _fault_log("task")
    time.sleep(seconds)
    return index


@worker.task("fault_member")
def fault_member(index: int, seconds: float) -> int:
    _fault_log("member")
    time.sleep(seconds)
    return index


@worker.task("fault_callback")
def fault_callback(results: list[int]) -> int:
    """A chord callback: logs its own execution, so callbacks are counted by execution."""
    _fault_log("callback")
    return sum(results)
