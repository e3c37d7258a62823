"""Waiting in async tests for a condition that needs a round trip to check (a gRPC call, an
admin query): the shared `wait_for(condition, seconds, what)`.

`condition` is a coroutine function; it is awaited until its value is truthy, which is
returned, and the test fails naming `what` once `seconds` have passed. For a condition that is
a plain local read, tests/support/processes.py has `eventually` (async) and `wait_for`
(blocking); to count runs "exactly once", wait there until the count has stopped changing for
SETTLE_SECONDS (`settled`), so that a late duplicate is still seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tests.support.processes import POLL_SECONDS

_T = TypeVar("_T")


async def wait_for(
    condition: Callable[[], Awaitable[_T]], seconds: float = 30.0, what: str = "condition",
    interval: float = POLL_SECONDS,
) -> _T:
    """The first truthy value of `await condition()`; AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {seconds} s (last value: {value!r})")
        await asyncio.sleep(interval)
