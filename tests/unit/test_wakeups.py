"""fetch_unless_drained: a fetch after one that drained its queue does not look again before a
wake-up or the look-again time that drained look gave; any other fetch looks at once."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from conveyor_server.brokers._wakeups import Wakeups, fetch_unless_drained

QUEUE = "q"
WANT = 4


class Queue:
    """Work items and a count of the looks taken at them."""

    def __init__(self, items: int = 0, look_again: float = 60.0) -> None:
        self.items = items
        self.look_again = look_again
        self.looks = 0
        # When set, the next look reads the queue, then waits for it to open before it answers
        # (a look in flight, its answer on the way back).
        self.gate: asyncio.Event | None = None

    async def attempt(self) -> tuple[list[int], float]:
        gate, self.gate = self.gate, None
        self.looks += 1
        taken = list(range(min(self.items, WANT)))
        self.items -= len(taken)
        if gate is not None:
            await gate.wait()
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


async def waiting_fetches(wakeups: Wakeups, queue: Queue, count: int) -> list[asyncio.Task[list[int]]]:
    """`count` fetches waiting on `queue`, drained by a first one."""
    assert await fetch(wakeups, queue) == [0]
    fetches = [asyncio.create_task(fetch(wakeups, queue)) for _ in range(count)]
    await asyncio.sleep(0.05)
    return fetches


async def cancelled(fetches: Collection[asyncio.Task[list[int]]]) -> None:
    """Cancel the fetches still waiting, and let them end."""
    for task in fetches:
        task.cancel()
    await asyncio.gather(*fetches, return_exceptions=True)


async def test_a_wake_for_one_task_makes_one_look_however_many_fetches_wait() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    fetches = await waiting_fetches(wakeups, queue, 6)  # one per idle worker connection
    looks_before = queue.looks

    queue.items = 1
    wakeups.wake(QUEUE)
    done, waiting = await asyncio.wait(fetches, timeout=0.2)
    assert [task.result() for task in done] == [[0]]
    assert queue.looks == looks_before + 1, "fetches woken together each looked at the queue"
    assert len(waiting) == 5

    queue.items = 1  # the others still wait, and the next wake-up is theirs
    wakeups.wake(QUEUE)
    done, waiting = await asyncio.wait(waiting, timeout=0.2)
    assert [task.result() for task in done] == [[0]]
    assert queue.looks == looks_before + 2
    await cancelled(waiting)


async def test_fetches_waiting_alike_poll_with_one_look_between_them() -> None:
    poll = 0.05
    wakeups, queue = Wakeups(), Queue(items=1, look_again=poll)
    fetches = await waiting_fetches(wakeups, queue, 6)
    looks_before = queue.looks
    await asyncio.sleep(10 * poll)
    polls = queue.looks - looks_before
    assert 1 <= polls <= 15, f"{polls} looks in ten poll intervals of 6 waiting fetches"
    await cancelled(fetches)


async def test_woken_fetches_look_too_when_the_first_look_takes_all_it_asked_for() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    fetches = await waiting_fetches(wakeups, queue, 3)

    queue.items = WANT + 2  # the first look takes all it asks for: the others look too
    wakeups.wake(QUEUE)
    done, waiting = await asyncio.wait(fetches, timeout=0.2)
    assert sorted(len(task.result()) for task in done) == [2, WANT]
    assert queue.items == 0
    assert len(waiting) == 1
    await cancelled(waiting)


async def test_a_woken_fetch_does_not_rely_on_a_look_that_began_before_its_wake() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    [woken] = await waiting_fetches(wakeups, queue, 1)
    queue.gate = gate = asyncio.Event()
    slow = asyncio.create_task(fetch(wakeups, queue, wait=0.0))  # a fresh fetch looks at once
    await asyncio.sleep(0.01)  # its look read the empty queue; its answer is on the way back
    queue.items = 1
    wakeups.wake(QUEUE)
    assert await asyncio.wait_for(woken, 0.5) == [0], "the woken fetch waited on a look that could not see its task"
    gate.set()
    assert await slow == []


async def test_a_cancelled_fetch_does_not_end_the_look_others_joined() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    looker, *joiners = await waiting_fetches(wakeups, queue, 3)
    queue.gate = gate = asyncio.Event()
    queue.items = 1
    wakeups.wake(QUEUE)
    await asyncio.sleep(0.01)  # the first woken looks (its answer held), the others joined it
    assert queue.looks == 2
    joiners[-1].cancel()
    gate.set()
    assert await asyncio.wait_for(looker, 0.5) == [0]
    await asyncio.sleep(0.05)
    assert joiners[-1].cancelled()
    assert not joiners[0].done(), "a joined fetch ended with the one that was cancelled"
    assert queue.looks == 2, "the joined fetch looked again at a queue the look drained"
    await cancelled(joiners)


# -- takers: a publish here fetching for a waiting fetch in its own round trip -------------------

async def taking_fetch(wakeups: Wakeups, queue: Queue, args: str, wait: float = 5.0) -> list[int]:
    return await fetch_unless_drained(wakeups, QUEUE, WANT, queue.attempt, wait, take_args=args)


async def test_a_waiting_fetch_is_handed_what_a_publish_fetched_for_it_and_does_not_look() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    assert await taking_fetch(wakeups, queue, "first") == [0]  # drained
    waiting = asyncio.create_task(taking_fetch(wakeups, queue, "second"))
    await asyncio.sleep(0.05)
    taker = wakeups.taker(QUEUE)
    assert taker is not None and (taker.want, taker.args) == (WANT, "second")
    assert wakeups.taker(QUEUE) is None, "one waiting fetch stood as a taker twice"
    assert taker.hand([7])
    assert await asyncio.wait_for(waiting, 0.5) == [7]
    assert queue.looks == 1


async def test_takers_are_offered_longest_waiting_first_and_a_wake_lets_the_rest_look() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    assert await taking_fetch(wakeups, queue, "drain") == [0]
    fetches = []
    for name in ("a", "b", "c"):
        fetches.append(asyncio.create_task(taking_fetch(wakeups, queue, name)))
        await asyncio.sleep(0.01)
    first = wakeups.taker(QUEUE)
    assert first is not None and first.args == "a"
    first.release()  # the publish failed, or fetched nothing for it: it looks for itself
    queue.items = 1
    wakeups.wake(QUEUE)
    done, waiting = await asyncio.wait(fetches, timeout=0.2)
    assert [task.result() for task in done] == [[0]]
    assert queue.looks == 2, "the released and the woken fetches did not share one look"
    assert wakeups.taker(QUEUE) is not None, "fetches that went back to waiting stand as takers again"
    await cancelled(waiting)


async def test_a_taker_whose_fetch_has_left_refuses_what_is_handed_to_it() -> None:
    wakeups, queue = Wakeups(), Queue(items=1)
    assert await taking_fetch(wakeups, queue, "drain") == [0]
    waiting = asyncio.create_task(taking_fetch(wakeups, queue, "late", wait=0.05))
    await asyncio.sleep(0.01)
    taker = wakeups.taker(QUEUE)  # a publish holds it while its round trip is on the way
    assert taker is not None
    assert await waiting == []  # the fetch's time ran out meanwhile
    assert not taker.hand([7]), "a taker that left took messages nobody will run"

    cancelled_fetch = asyncio.create_task(taking_fetch(wakeups, queue, "cancelled"))
    await asyncio.sleep(0.01)
    taker = wakeups.taker(QUEUE)
    assert taker is not None
    await cancelled([cancelled_fetch])
    assert not taker.hand([7])
    assert wakeups.taker(QUEUE) is None, "fetches that left still stand as takers"
