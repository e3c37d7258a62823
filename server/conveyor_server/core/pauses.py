"""Paused queues: stored in the backend, so every replica sees them and they survive restarts.

A paused queue keeps accepting tasks, but no replica hands its tasks to workers until it is
resumed. Each replica keeps a copy of the paused set (core/refreshed.py), read again every half
`refresh_seconds` in the background; a pause or resume made through this replica takes effect
here at once and on the other replicas within `refresh_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from ..backends.base import Backend
from .errors import InvalidArgument
from .refreshed import RefreshedCopy
from .validation import QUEUE_NAME

PAUSED_QUEUES_GROUP = "paused-queues"
# Backend groups live until `ttl` after their latest write; this member (never a valid queue
# name) is written now and then so the group outlives quiet periods without a pause or resume.
KEEPALIVE_MEMBER = "~keepalive"
DEFAULT_REFRESH_SECONDS = 1.0
# Longest time between keep-alive writes (shorter when the backend's TTL is short).
MAX_KEEPALIVE_SECONDS = 3600.0


def keepalive_interval(ttl_seconds: float) -> float:
    """How often to rewrite something that must outlive the backend's TTL."""
    return max(min(ttl_seconds / 4, MAX_KEEPALIVE_SECONDS), 0.001)


def check_queue(queue: str) -> None:
    if not QUEUE_NAME.match(queue):
        raise InvalidArgument(f"invalid queue name {queue[:80]!r}: use 1-64 of [A-Za-z0-9_.-]")


class QueuePauses(RefreshedCopy):
    what = "the paused queues"

    def __init__(
        self,
        backend: Backend,
        ttl_seconds: float,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(refresh_seconds, clock)
        self.backend = backend
        self._keepalive_seconds = keepalive_interval(ttl_seconds)
        self._paused: frozenset[str] = frozenset()
        self._kept_alive_at: float | None = None
        # Pulsed on every local pause/resume, so waiting pumps re-check at once.
        self._changed = asyncio.Event()

    async def pause(self, queue: str) -> None:
        check_queue(queue)
        await self.backend.add_member(PAUSED_QUEUES_GROUP, queue, b"")
        await self.refresh()

    async def resume(self, queue: str) -> None:
        """Resume `queue`; resuming a queue that is not paused does nothing."""
        check_queue(queue)
        await self.backend.remove_member(PAUSED_QUEUES_GROUP, queue)
        await self.refresh()

    async def paused(self) -> frozenset[str]:
        """The paused queues, as read at most `refresh_seconds` ago (the last known set while
        the backend cannot be read)."""
        await self._fresh()
        return self._paused

    async def is_paused(self, queue: str) -> bool:
        return queue in await self.paused()

    async def refresh(self) -> frozenset[str]:
        """Read the paused set now (after a local change) and wake waiting pumps."""
        await self._read_now()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self._paused

    async def wait_for_change(self, seconds: float | None = None) -> None:
        """Sleep until a local pause/resume, or for `seconds` (default: one refresh period)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds or self.refresh_seconds)

    async def _read(self) -> None:
        members = await self.backend.members(PAUSED_QUEUES_GROUP)
        now = self._clock()
        if members and (self._kept_alive_at is None or now - self._kept_alive_at >= self._keepalive_seconds):
            await self.backend.add_member(PAUSED_QUEUES_GROUP, KEEPALIVE_MEMBER, b"")
            self._kept_alive_at = now
        self._paused = frozenset(m for m in members if m != KEEPALIVE_MEMBER)
        self._mark_read()
