"""Tasks for tests/e2e/test_streamed_groups.py (generator groups), run by
`conveyor worker tests.e2e.stream_tasks`: a member as cheap as a task gets, and a chord callback
that notes each of its runs in the file named by CONVEYOR_TEST_LOG."""

from __future__ import annotations

import os
from typing import Any

from conveyor import Worker

worker = Worker(concurrency=64)


@worker.task("stream.echo")
async def echo(value: Any) -> Any:
    return value


@worker.task("stream.gather")
def gather(values: list[Any], label: str) -> list[Any]:
    """A chord callback: notes that it ran (with how many values), and returns the values."""
    path = os.environ.get("CONVEYOR_TEST_LOG")
    if path:
        with open(path, "a") as out:
            out.write(f"gather {label} {len(values)}\n")
    return values
