"""Copies of backend state kept in memory (core/refreshed.py): while kept fresh in the
background, a caller after a quiet spell does not wait for a read; a failing backend keeps the
last copy and is logged once; a started Core keeps the paused queues and the rate limits fresh.

Real time where the background loop is under test (its half-period sleeps), a set clock elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import pytest

from conveyor_server.app import Core
from conveyor_server.backends.base import Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from conveyor_server.core.limits.table import RATE_LIMITS_KEY
from conveyor_server.core.pauses import PAUSED_QUEUES_GROUP
from conveyor_server.core.refreshed import RefreshedCopy
from tests.unit.test_schedules import Clock


class Counted(RefreshedCopy):
    """A copy whose value is how many reads have worked; the next `failures` reads raise."""

    what = "the counted copy"

    def __init__(self, refresh_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(refresh_seconds, clock)
        self.reads = 0
        self.failures = 0

    async def value(self) -> int:
        await self._fresh()
        return self.reads

    async def _read(self) -> None:
        await asyncio.sleep(0)  # a round trip: concurrent callers interleave here
        if self.failures:
            self.failures -= 1
            raise ConnectionError("backend unreachable")
        self.reads += 1
        self._mark_read()


async def test_while_kept_fresh_a_caller_after_a_quiet_spell_does_not_wait_for_a_read() -> None:
    copy = Counted(refresh_seconds=1.0)
    keeper = asyncio.create_task(copy.keep_fresh())
    try:
        await asyncio.sleep(2.2)  # no caller for over two periods, as between sparse tasks
        read_in_background = copy.reads
        assert await copy.value() == read_in_background  # nothing read on the caller's path
        # Every half period: at 0, 0.5, 1.0, 1.5 and 2.0 s (a loaded machine may lag one).
        assert 4 <= read_in_background <= 6
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def test_callers_that_find_the_copy_old_together_share_one_read() -> None:
    copy = Counted(refresh_seconds=1.0, clock=Clock(1000.0))
    assert await asyncio.gather(*(copy.value() for _ in range(3))) == [1, 1, 1]
    assert copy.reads == 1


async def test_a_failing_backend_keeps_the_last_copy_is_asked_once_a_period_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(1000.0)
    copy = Counted(refresh_seconds=1.0, clock=clock)
    assert await copy.value() == 1
    copy.failures = 3
    with caplog.at_level(logging.INFO, logger="conveyor_server.core.refreshed"):
        for _ in range(3):
            clock.now += 1.0
            assert await copy.value() == 1  # the last known copy stays in force
            assert await copy.value() == 1  # and the failed read is not tried again at once
        assert copy.failures == 0
        clock.now += 1.0
        assert await copy.value() == 2
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "reading the counted copy failed (ConnectionError: backend unreachable); "
                          "keeping the last known copy"),
        (logging.INFO, "reading the counted copy works again"),
    ]


class ReadCounting(MemoryBackend):
    """The memory backend, counting reads of the paused set and of the rate-limit table."""

    def __init__(self) -> None:
        super().__init__(86_400.0)
        self.pause_reads = 0
        self.limit_reads = 0

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        self.pause_reads += group == PAUSED_QUEUES_GROUP
        return await super().members(group, after, limit)

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        self.limit_reads += RATE_LIMITS_KEY in keys
        return await super().get(keys)


async def test_a_started_core_keeps_the_paused_queues_and_the_rate_limits_fresh() -> None:
    backend = ReadCounting()
    core = Core.build(Settings(broker_url="memory://", backend_url="memory://"), MemoryBroker(), backend)
    await core.start()
    try:
        for _ in range(100):  # both are read at start, with no claim and no pump asking
            if backend.pause_reads and backend.limit_reads:
                break
            await asyncio.sleep(0.01)
        assert backend.pause_reads >= 1 and backend.limit_reads >= 1
    finally:
        await core.stop()
