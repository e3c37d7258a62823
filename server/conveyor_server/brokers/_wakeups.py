"""How a fetch waits for work: one-shot wake-ups per queue, and the loop that looks, waits and
looks again until work comes or the wait is over."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# An attempt's answer: what it took, and how long the wait may last before it looks again
# (math.inf when only a wake-up or the deadline should end the wait).
Attempt = Callable[[], Awaitable[tuple[list[T], float]]]


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


async def fetch_waiting(
    attempt: Attempt[T],
    signal: Callable[[], asyncio.Event],
    wait_seconds: float,
    before_wait: Callable[[float], object] = lambda remaining: None,
    stopped: Callable[[], bool] = lambda: False,
) -> list[T]:
    """Broker.fetch()'s wait: `attempt` until it takes something or `wait_seconds` are over.

    Between attempts it waits for the event `signal` gave before that attempt (so work that
    arrives while the attempt looks still ends the wait), for at most what the attempt allowed.
    `before_wait` gets the seconds left before each wait; once `stopped` (the broker closed),
    it returns nothing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(wait_seconds, 0.0)
    while True:
        arrived = signal()
        taken, look_again = await attempt()
        remaining = deadline - loop.time()
        if taken or remaining <= 0:
            return taken
        before_wait(remaining)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), min(remaining, look_again))
        if stopped():
            return []
