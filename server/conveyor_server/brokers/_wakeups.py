"""How a fetch waits for work: one-shot wake-ups per queue, and the loop that looks, waits and
looks again until work comes or the wait is over; a queue a look found drained is not looked at
again before a wake-up (or its look-again time). A waiting fetch may also be handed what a
publish on this process fetched for it in the publish's own round trip (a Taker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .base import Delivery, OutgoingMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

# An attempt's answer: what it took, and how long the wait may last before it looks again
# (math.inf when only a wake-up or the deadline should end the wait).
Attempt = Callable[[], Awaitable[tuple[list[T], float]]]


@dataclass(eq=False)
class Taker:
    """A fetch waiting on a queue that a publish here may fetch for in the publish's own round
    trip: up to `want`, with the broker's own fetch arguments `args`."""

    want: int
    args: Any
    offered: asyncio.Future[Sequence[Any] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def hand(self, taken: Sequence[Any]) -> bool:
        """Give the waiting fetch what was fetched for it; False when it left meanwhile (its wait
        ran out or was cancelled): the caller must then give the messages back."""
        if self.offered.done():
            return False
        self.offered.set_result(taken)
        return True

    def release(self) -> None:
        """Give the waiting fetch back to its own wait (the publish failed, or fetched nothing
        for it and wakes the queue next)."""
        if not self.offered.done():
            self.offered.set_result(None)


class Wakeups:
    """`signal(queue)` gives the event that the next `wake(queue)` sets; each wake replaces the
    event, so a waiter that takes its event *before* checking the queue never misses one."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        # queue -> the event taken before a look that drained it, and when to look again anyway
        # (a delayed message coming due, a poll for what does not wake).
        self._drained: dict[str, tuple[asyncio.Event, float]] = {}
        # queue -> the latest look in flight: the event taken before it, and its end.
        self._looks: dict[str, tuple[asyncio.Event, asyncio.Future[None]]] = {}
        # queue -> fetches waiting there that a publish may fetch for, longest waiting first.
        self._takers: dict[str, list[Taker]] = {}

    def signal(self, queue: str) -> asyncio.Event:
        event = self._events.get(queue)
        if event is None:
            event = self._events[queue] = asyncio.Event()
        return event

    def wake(self, queue: str) -> None:
        event = self._events.pop(queue, None)
        if event is not None:
            event.set()
        for taker in self._takers.pop(queue, ()):
            taker.release()

    def taker(self, queue: str) -> Taker | None:
        """The longest-waiting fetch on `queue` still waiting, now the caller's to `hand` what it
        fetches for it or `release`; None when no fetch waits there."""
        waiting = self._takers.get(queue)
        while waiting:
            taker = waiting.pop(0)
            if not taker.offered.done():
                return taker
        return None

    async def wait_or_take(
        self, queue: str, arrived: asyncio.Event, seconds: float, want: int, args: Any
    ) -> Sequence[Any] | None:
        """Wait for `arrived` (a wake-up) or `seconds`, and meanwhile stand as a Taker when
        `args` is given: what a publish handed over, or None (woken, or the time ran out)."""
        with contextlib.suppress(TimeoutError):
            if args is None:
                await asyncio.wait_for(arrived.wait(), seconds)
                return None
            if arrived.is_set():
                return None
            taker = Taker(want, args)
            self._takers.setdefault(queue, []).append(taker)
            try:
                # Cancelled when the time runs out: a publisher holding the taker then sees it
                # gone and gives back what it fetched.
                return await asyncio.wait_for(taker.offered, seconds)
            finally:
                waiting = self._takers.get(queue)
                if waiting is not None and taker in waiting:
                    waiting.remove(taker)
        return None

    def wake_all(self) -> None:
        for queue in list(self._events):
            self.wake(queue)

    def note_drained(self, queue: str, event: asyncio.Event, look_again_at: float) -> None:
        """A look that took its `event` first found `queue` drained (it took less than it asked)."""
        self._drained[queue] = (event, look_again_at)

    def drained(self, queue: str, now: float) -> tuple[asyncio.Event, float] | None:
        """The event and look-again time of the last look that drained `queue`, while nothing
        has woken it since and that time has not come: looking now would find it empty."""
        known = self._drained.get(queue)
        if known is None:
            return None
        event, look_again_at = known
        if event.is_set() or now >= look_again_at:
            del self._drained[queue]
            return None
        return known

    async def look(
        self, queue: str, taken_before: asyncio.Event, want: int, attempt: Attempt[T]
    ) -> tuple[list[T], float]:
        """`attempt()` for up to `want`, `taken_before` being `signal(queue)` taken just before
        it: noted drained when it takes less, and seen by `looked_since_wake` while it runs."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        self._looks[queue] = (taken_before, ended)
        try:
            taken, look_again = await attempt()
            if len(taken) < want:
                self.note_drained(queue, taken_before, loop.time() + look_again)
            return taken, look_again
        finally:
            latest = self._looks.get(queue)
            if latest is not None and latest[1] is ended:
                del self._looks[queue]
            ended.set_result(None)

    async def looked_since_wake(self, queue: str) -> None:
        """Wait for the look at `queue` in flight when it began after the last wake-up of the
        queue (the event it took is not set): it sees everything woken so far."""
        look = self._looks.get(queue)
        if look is not None and not look[0].is_set():
            await asyncio.shield(look[1])  # our cancellation must not end the look's future for others


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


async def fetch_unless_drained(
    wakeups: Wakeups,
    queue: str,
    want: int,
    attempt: Attempt[T],
    wait_seconds: float,
    stopped: Callable[[], bool] = lambda: False,
    take_args: Any = None,
) -> list[T]:
    """fetch_waiting()'s wait for up to `want` from `queue`, skipping a look while the last one
    drained the queue and nothing woke it since: at light load each task is fetched alone, and that
    second look (an engine round trip) always came back empty.

    Fetches woken together do not all look: one wake-up woke every fetch waiting on the queue
    (one per worker connection), and each looked, so a lone task cost a look per idle worker,
    all but one empty, and so did every poll. A woken fetch first waits for a look another
    fetch began after that wake-up, and when that look drained the queue it goes back to
    waiting.

    Sound under fetch_waiting's own rule: whatever makes work available wakes the queue or is
    found by the look-again time the drained look gave; a look that began after a wake-up sees
    what that wake-up announced.

    With `take_args` (the broker's fetch arguments) a waiting fetch stands as a Taker: a publish
    on this process may fetch for it in the publish's own round trip and hand it the messages,
    one engine call and one wake-up fewer on a lone task's path."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(wait_seconds, 0.0)
    # A fresh fetch (a window refilled under load) looks at once; one that was woken joins.
    woken = False
    while True:
        if woken:
            await wakeups.looked_since_wake(queue)
            if stopped():
                return []
        known = wakeups.drained(queue, loop.time())
        if known is not None and deadline > loop.time():
            arrived, look_again_at = known
            seconds = max(min(deadline, look_again_at) - loop.time(), 0.0)
            handed = await wakeups.wait_or_take(queue, arrived, seconds, want, take_args)
            if handed:
                return list(handed)
            if stopped():
                return []
            if deadline > loop.time():
                # Woken, or the look-again time came (a poll, a delayed message due): for every
                # fetch waiting alike at once, so they join one look as after a wake-up.
                woken = True
                continue
        arrived = wakeups.signal(queue)  # taken before the look, so a wake during it is not missed
        taken, look_again = await wakeups.look(queue, arrived, want, attempt)
        remaining = deadline - loop.time()
        if taken or remaining <= 0:
            return taken
        handed = await wakeups.wait_or_take(queue, arrived, min(remaining, look_again), want, take_args)
        if handed:
            return list(handed)
        if stopped():
            return []
        woken = True


async def publish_handing_over(
    wakeups: Wakeups,
    queue: str,
    messages: Sequence[OutgoingMessage],
    publish: Callable[[Taker | None], Awaitable[Sequence[Delivery]]],
    give_back: Callable[[Sequence[Delivery]], Awaitable[None]],
) -> bool:
    """Publish with a fetch waiting here, if any, as a Taker: `publish(taker)` writes the messages
    and then, in the same engine call, fetches for the taker what a look woken by this publish
    would have taken. Returns whether the queue still needs its wake-up: not when the taker took
    all that was ready and nothing was delayed (waking would only bring empty looks).

    A taker that left meanwhile gets nothing: `give_back` returns the messages, and a failure
    there is logged, not raised (the publish is done; their leases bring them back)."""
    taker = wakeups.taker(queue) if any(message.delay <= 0 for message in messages) else None
    try:
        taken = await publish(taker)
    except BaseException:
        if taker is not None:
            taker.release()
        raise
    if taker is None:
        return True
    if not taken:
        taker.release()  # another consumer took them first: it waits (and is woken) as before
        return True
    if not taker.hand(taken):
        try:
            await give_back(taken)
        except Exception as exc:
            log.warning("handing back %d messages on %s failed (%s: %s); their leases bring them back",
                        len(taken), queue, type(exc).__name__, exc)
        return True
    return len(taken) == taker.want or any(message.delay > 0 for message in messages)
