"""An in-memory copy of something stored in the backend that any replica may change (the paused
queues, the rate limits), for callers on a task's path that should not wait for a read.

A caller that finds the copy a refresh period old reads it again (callers arriving meanwhile
share that read). `keep_fresh`, run in the background, reads it every half period, so such a
caller seldom finds it old: with sparse traffic (a task every second or so) every claim used to
find it old and wait for a read on the task's path. A change made through another replica still
applies here within one refresh period. While the backend cannot be read the last known copy
stays in force; the failure is logged once until a read works again.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

log = logging.getLogger(__name__)


class RefreshedCopy(ABC):
    # What the copy holds, for the log ("the paused queues").
    what: ClassVar[str]

    def __init__(self, refresh_seconds: float, clock: Callable[[], float]) -> None:
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._read_at: float | None = None
        self._failing = False
        self._lock = asyncio.Lock()

    async def keep_fresh(self) -> None:
        """Read the copy now and then every half refresh period, until cancelled."""
        while True:
            await self._read_if_older_than(self.refresh_seconds / 2)
            await asyncio.sleep(self.refresh_seconds / 2)

    async def _read_now(self) -> None:
        """Read the copy now, after whatever read is in flight (a change made here, a listing);
        a failure is the caller's."""
        async with self._lock:
            await self._read()

    async def _fresh(self) -> None:
        """Make sure the copy was read (or a read failed) at most one refresh period ago."""
        await self._read_if_older_than(self.refresh_seconds)

    async def _read_if_older_than(self, age: float) -> None:
        if not self._older_than(age):
            return
        async with self._lock:
            if not self._older_than(age):  # another caller read it while this one waited
                return
            try:
                await self._read()
            except Exception as exc:
                if not self._failing:
                    log.warning("reading %s failed (%s: %s); keeping the last known copy",
                                self.what, type(exc).__name__, exc)
                self._failing = True
                self._read_at = self._clock()  # a failing backend is asked once a period, not per caller
            else:
                if self._failing:
                    log.info("reading %s works again", self.what)
                self._failing = False

    def _older_than(self, age: float) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= age

    def _mark_read(self) -> None:
        self._read_at = self._clock()

    @abstractmethod
    async def _read(self) -> None:
        """Read the copy from the backend and `_mark_read()`; raise if it cannot be read."""
