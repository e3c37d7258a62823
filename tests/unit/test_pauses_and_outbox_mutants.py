"""Paused queues and the outbox: the edges mutation testing found unpinned (the pause cache
under failures and concurrent callers, keepalive writes, outbox entries that never expire and
never share an id, confirmations that leave nothing behind).

On the memory backend, wrapped to count or fail its group calls; clocks are injected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core.outbox import CONFIRM_LINGER_SECONDS, FOLLOW_UPS, PUBLISH, Outbox
from conveyor_server.core.pauses import KEEPALIVE_MEMBER, PAUSED_QUEUES_GROUP, QueuePauses, keepalive_interval
from tests.unit.test_schedules import Clock


class CountingBackend(MemoryBackend):
    """The memory backend, counting reads of the paused set and its keepalive writes; the next
    `fail_members` reads of a group raise."""

    def __init__(self, ttl_seconds: float = 86_400.0) -> None:
        super().__init__(ttl_seconds)
        self.reads = 0
        self.keepalives = 0
        self.fail_members = 0
        self.removals: list[list[str]] = []
        self.fail_removals = 0

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        if self.fail_members:
            self.fail_members -= 1
            raise ConnectionError("backend unreachable")
        self.reads += group == PAUSED_QUEUES_GROUP
        await asyncio.sleep(0)  # a round trip: concurrent callers interleave here
        return await super().members(group, after, limit)

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        self.keepalives += member == KEEPALIVE_MEMBER
        return await super().add_member(group, member, payload, keep)

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        self.removals.append(sorted(members))
        if self.fail_removals:
            self.fail_removals -= 1
            raise ConnectionError("backend unreachable")
        await super().remove_members(group, members)


@pytest.fixture
async def backend() -> AsyncIterator[CountingBackend]:
    engine = CountingBackend()
    await engine.connect()
    yield engine
    await engine.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports as unhandled during the test (it should be nothing)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    loop.set_exception_handler(previous)


# -- paused queues -------------------------------------------------------------------------------

def test_keepalives_come_four_times_per_ttl_at_most_hourly_and_never_continuously() -> None:
    assert keepalive_interval(400.0) == 100.0
    assert keepalive_interval(10 * 86_400.0) == 3600.0
    assert keepalive_interval(0.0) == 0.001


async def test_a_replica_that_cannot_read_the_paused_set_at_first_treats_no_queue_as_paused(
    backend: CountingBackend,
) -> None:
    pauses = QueuePauses(backend, 86_400, clock=Clock(1000.0))
    backend.fail_members = 1
    assert not await pauses.is_paused("q")


async def test_after_a_failed_read_the_paused_set_is_read_again_only_after_a_refresh(backend: CountingBackend) -> None:
    clock = Clock(1000.0)
    pauses = QueuePauses(backend, 86_400, refresh_seconds=1.0, clock=clock)
    backend.fail_members = 1
    await pauses.paused()
    await pauses.paused()
    assert backend.reads == 0
    clock.now += 1.0
    await pauses.paused()
    assert backend.reads == 1


async def test_the_paused_set_is_cached_for_one_refresh_period(backend: CountingBackend) -> None:
    clock = Clock(1000.0)
    here = QueuePauses(backend, 86_400, clock=clock)
    there = QueuePauses(backend, 86_400, clock=clock)
    assert await there.paused() == frozenset()
    await here.pause("q")
    clock.now += 0.5
    assert await there.paused() == frozenset()  # still the copy read half a period ago
    clock.now += 0.5
    assert await there.paused() == {"q"}


async def test_callers_waiting_for_one_refresh_share_its_read(backend: CountingBackend) -> None:
    pauses = QueuePauses(backend, 86_400, clock=Clock(1000.0))
    await asyncio.gather(*(pauses.paused() for _ in range(3)))
    assert backend.reads == 1


async def test_the_paused_group_is_kept_alive_once_per_interval(backend: CountingBackend) -> None:
    clock = Clock(1000.0)
    pauses = QueuePauses(backend, ttl_seconds=400.0, clock=clock)  # keepalive every 100 s
    await pauses.pause("q")
    assert backend.keepalives == 1
    clock.now += 50.0
    await pauses.refresh()
    assert backend.keepalives == 1
    clock.now += 50.0
    await pauses.refresh()
    assert backend.keepalives == 2


async def test_waiting_for_a_change_that_does_not_come_just_returns(backend: CountingBackend) -> None:
    pauses = QueuePauses(backend, 86_400)
    await pauses.wait_for_change(0.01)  # no error: running out of time is the normal end


# -- the outbox ----------------------------------------------------------------------------------

async def test_promises_never_expire_and_each_gets_its_own_id() -> None:
    backend = MemoryBackend(ttl_seconds=0.0)  # whatever is not kept is gone at once
    await backend.connect()
    outbox = Outbox(backend)
    first = await outbox.promise(PUBLISH, ["t1"])
    second = await outbox.promise(FOLLOW_UPS, ["t2"])
    assert first != second and first.startswith("ob-")
    entries = dict(await outbox.entries(0.0, time.time() + 1))
    assert {entry_id: list(e.task_ids) for entry_id, e in entries.items()} == {first: ["t1"], second: ["t2"]}
    await backend.close()


async def test_a_confirmed_promise_goes_and_leaves_nothing_behind(
    backend: CountingBackend, loop_errors: list[dict[str, Any]]
) -> None:
    outbox = Outbox(backend)
    entry_id = await outbox.promise(PUBLISH, ["t1"])
    outbox.confirm(entry_id)
    await outbox.drain()
    assert await outbox.entries(0.0, time.time() + 1) == []
    await asyncio.sleep(0)  # the removal's done-callbacks run
    assert loop_errors == []


async def test_confirmations_of_a_moment_are_removed_in_one_call_without_a_drain(
    backend: CountingBackend, loop_errors: list[dict[str, Any]]
) -> None:
    outbox = Outbox(backend)
    first, second = await outbox.promise(PUBLISH, ["t1"]), await outbox.promise(PUBLISH, ["t2"])
    later = await outbox.promise(PUBLISH, ["t3"])
    outbox.confirm(first)
    outbox.confirm(second)
    assert backend.removals == [], "removals wait for the others of the moment"
    await asyncio.sleep(CONFIRM_LINGER_SECONDS / 2)
    assert backend.removals == []
    await asyncio.sleep(CONFIRM_LINGER_SECONDS)
    assert backend.removals == [sorted([first, second])], "both in one call, with no drain asked"
    assert [entry_id for entry_id, _ in await outbox.entries(0.0, time.time() + 1)] == [later]
    outbox.confirm(later)
    await asyncio.sleep(CONFIRM_LINGER_SECONDS * 1.5)
    assert backend.removals[1:] == [[later]], "a later confirmation gets a call of its own"
    assert await outbox.entries(0.0, time.time() + 1) == []
    assert loop_errors == []


async def test_a_failed_removal_leaves_the_entries_for_the_reconciler(
    backend: CountingBackend, loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(backend)
    entry_id = await outbox.promise(PUBLISH, ["t1"])
    backend.fail_removals = 1
    outbox.confirm(entry_id)
    await outbox.drain()
    assert [found for found, _ in await outbox.entries(0.0, time.time() + 1)] == [entry_id]
    assert "could not remove 1 confirmed outbox entries" in caplog.text
    await asyncio.sleep(0)
    assert loop_errors == []
