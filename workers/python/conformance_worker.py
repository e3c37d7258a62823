"""The conformance task set (docs/conformance.md) on the Python SDK, for `conveyor conformance`:

    conveyor conformance --worker-cmd "python workers/python/conformance_worker.py"

It serves CONVEYOR_QUEUE on CONVEYOR_ADDRESS with CONVEYOR_TOKEN (the SDK reads the address and
the token itself) and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from conveyor import Retry, Worker, current_task

worker = Worker(queues=[os.environ.get("CONVEYOR_QUEUE", "default")])


class ConformanceError(Exception):
    """The error conformance.fail raises; its class name is the error type the kit expects."""


@worker.task("conformance.echo")
def echo(value: Any) -> Any:
    return value


@worker.task("conformance.bytes")
def reverse_bytes(data: bytes) -> bytes:
    return data[::-1]


@worker.task("conformance.fail")
def fail(message: str) -> None:
    raise ConformanceError(message)


@worker.task("conformance.retry")
def retry(times: int) -> int:
    attempt = current_task().attempt
    if attempt <= times:
        raise Retry(0.1, f"attempt {attempt} of {times + 1}")
    return attempt


@worker.task("conformance.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)  # async: a cancel or the time limit cancels it here
    return seconds


@worker.task("conformance.progress")
async def progress(steps: int) -> int:
    task = current_task()
    for step in range(1, steps + 1):
        task.progress(step)
        await asyncio.sleep(0.05)
    return steps


if __name__ == "__main__":
    worker.run_forever()
