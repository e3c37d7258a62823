"""One-shot wake-ups per queue, for fetches that wait for work to arrive."""

from __future__ import annotations

import asyncio


class Wakeups:
    """`signal(queue)` gives the event that the next `wake(queue)` sets; each wake replaces the
    event, so a waiter that takes its event *before* checking the queue never misses one."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def signal(self, queue: str) -> asyncio.Event:
        event = self._events.get(queue)
        if event is None:
            event = self._events[queue] = asyncio.Event()
        return event

    def wake(self, queue: str) -> None:
        event = self._events.pop(queue, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for queue in list(self._events):
            self.wake(queue)
