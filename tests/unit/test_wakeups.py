"""fetch_unless_drained: a fetch after one that drained its queue does not look again before a
wake-up or the look-again time that drained look gave; any other fetch looks at once."""

from __future__ import annotations

import asyncio

from conveyor_server.brokers._wakeups import Wakeups, fetch_unless_drained

QUEUE = "q"
WANT = 4


class Queue:
    """Work items and a count of the looks taken at them."""

    def __init__(self, items: int = 0, look_again: float = 60.0) -> None:
        self.items = items
        self.look_again = look_again
        self.looks = 0

    async def attempt(self) -> tuple[list[int], float]:
        self.looks += 1
        taken = list(range(min(self.items, WANT)))
        self.items -= len(taken)
        return taken, self.look_again


async def fetch(wakeups: Wakeups, queue: Queue, wait: float = 5.0) -> list[int]:
    return await fetch_unless_drained(wakeups, QUEUE, WANT, queue.attempt, wait)


async def test_after_a_fetch_that_drained_the_queue_the_next_waits_for_a_wake_before_looking() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    assert await fetch(wakeups, queue) == [0]  # took less than it asked: drained
    waiting = asyncio.create_task(fetch(wakeups, queue))
    await asyncio.sleep(0.1)
    assert queue.looks == 1, "a fetch looked again at a queue nothing had woken since it was drained"

    queue.items = 2
    wakeups.wake(QUEUE)
    assert await asyncio.wait_for(waiting, 1.0) == [0, 1]
    assert queue.looks == 2


async def test_a_drained_queue_is_looked_at_again_at_the_time_its_look_gave() -> None:
    wakeups, queue = Wakeups(), Queue(items=1, look_again=0.05)
    await fetch(wakeups, queue)
    queue.items = 1  # made ready without a wake, as a delayed message coming due
    assert await asyncio.wait_for(fetch(wakeups, queue), 1.0) == [0]


async def test_a_fetch_after_one_that_took_all_it_asked_for_looks_at_once() -> None:
    wakeups, queue = Wakeups(), Queue(items=WANT + 1)
    assert len(await fetch(wakeups, queue)) == WANT
    assert await asyncio.wait_for(fetch(wakeups, queue), 0.5) == [0]
    assert queue.looks == 2


async def test_a_wake_after_the_drained_look_makes_the_next_fetch_look_at_once() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    await fetch(wakeups, queue)
    queue.items = 1
    wakeups.wake(QUEUE)
    assert await asyncio.wait_for(fetch(wakeups, queue), 0.5) == [0]


async def test_a_wake_during_the_look_that_drained_the_queue_is_not_missed() -> None:
    wakeups = Wakeups()
    queue = Queue(items=1)
    original = queue.attempt

    async def attempt_then_publish() -> tuple[list[int], float]:
        taken = await original()
        queue.items += 1  # published while the look was on its way back, and woken
        wakeups.wake(QUEUE)
        return taken

    queue.attempt = attempt_then_publish  # type: ignore[method-assign]
    await fetch(wakeups, queue)
    queue.attempt = original  # type: ignore[method-assign]
    assert await asyncio.wait_for(fetch(wakeups, queue), 0.5) == [0]
