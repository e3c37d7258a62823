"""Time for unit tests that run on looptime's fake loop clock (`@pytest.mark.looptime`).

Under the mark the event loop skips the time its sleeps would take: a backoff or an interval
that takes seconds of real time takes none, while the gaps measured on the loop's clock are
exactly the delays the code chose (no scheduling noise, so the timing assertions cannot flake on
a loaded machine). Only code that waits with asyncio (sleep, wait_for, call_later) moves with
that clock: a test whose code under test reads `time` must give it `loop_clock()`.
"""

from __future__ import annotations

import asyncio
import time

from conveyor_server.core.clock import Clock


def loop_now() -> float:
    """The running loop's time: the clock fake-time tests measure gaps on."""
    return asyncio.get_running_loop().time()


def loop_clock() -> Clock:
    """The core's clock on the running loop's time: its monotonic clock is the loop's, and its
    wall clock starts at the real time and moves with the loop's."""
    loop = asyncio.get_running_loop()
    offset = time.time() - loop.time()
    return Clock(wall=lambda: offset + loop.time(), monotonic=loop.time)
