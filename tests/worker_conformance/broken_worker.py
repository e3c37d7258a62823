"""The Python conformance worker with one task broken on purpose, chosen by CONFORMANCE_BREAK:

- `echo`: conformance.echo returns its value wrapped in a list;
- `cancel`: conformance.sleep ignores cancels and time limits (it swallows the cancellation);
- `resend`: results not acked when the stream broke are forgotten, not sent again;
- `held`: the Hello after a reconnect names none of the tasks the worker still runs.

The kit must fail such a worker with a message that names the fault.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Any

WORKER_FILE = Path(__file__).resolve().parents[2] / "workers" / "python" / "conformance_worker.py"


def _load_conformance_worker() -> Any:
    spec = importlib.util.spec_from_file_location("conformance_worker", WORKER_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrapped_echo(value: Any) -> Any:
    return [value]


async def stubborn_sleep(seconds: float) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            continue  # the fault: a cancel is swallowed and the sleep goes on
    return seconds


def forget_results_on_reconnect(worker: Any) -> None:
    connect_once = worker._connect_once

    async def forgetful_connection() -> None:
        worker._unacked.clear()  # the fault: what the server never acked is lost
        await connect_once()

    worker._connect_once = forgetful_connection


def forget_held_tasks_in_hello(worker: Any) -> None:
    hello = worker._hello

    def hello_without_held() -> Any:
        message = hello()
        del message.held[:]  # the fault: the server is not told which tasks still run here
        return message

    worker._hello = hello_without_held


def break_worker(worker: Any, fault: str) -> None:
    if fault == "echo":
        worker.tasks["conformance.echo"] = wrapped_echo
    elif fault == "cancel":
        worker.tasks["conformance.sleep"] = stubborn_sleep
    elif fault == "resend":
        forget_results_on_reconnect(worker)
    elif fault == "held":
        forget_held_tasks_in_hello(worker)
    else:
        raise SystemExit(f"CONFORMANCE_BREAK={fault!r}: use echo, cancel or resend")


if __name__ == "__main__":
    worker = _load_conformance_worker().worker
    break_worker(worker, os.environ["CONFORMANCE_BREAK"])
    worker.run_forever()
