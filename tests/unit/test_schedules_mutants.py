"""Schedules: the edges mutation testing found unpinned (tick planning limits, the tick header,
the grace, storage races, deletes of half-written schedules, the firing loop).

On the memory engines with an injected clock; races are scripted by a backend wrapper.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Self

import pytest

from conveyor_server.app import Core
from conveyor_server.backends.base import DEFAULT_TTL_SECONDS, Backend, Update, Versioned
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from conveyor_server.core.errors import NotFound
from conveyor_server.core.pauses import KEEPALIVE_MEMBER, keepalive_interval
from conveyor_server.core.schedule_records import ScheduleRecord
from conveyor_server.core.schedules import (
    MAX_FIRES_PER_PASS,
    RUN_ONCE,
    SCHEDULES_GROUP,
    SKIP,
    TICK_HEADER,
    Plan,
    Schedules,
    next_tick,
    plan_ticks,
    schedule_key,
    task_id_for,
)
from tests.support.processes import until
from tests.unit.test_schedules import MINUTE, T0, Clock, schedule

Engines = tuple[MemoryBroker, "Interfering"]


class Interfering:
    """The memory backend, with scripted interference from other replicas and expiry:
    `miss_gets` next reads of a schedule record find nothing (it expired just then),
    `claimed_inserts` next inserts report the key as existing without writing (a record that
    expires right after), `lost_cas` next compare-and-sets lose; index keepalives are counted."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self.miss_gets = 0
        self.claimed_inserts = 0
        self.lost_cas = 0
        self.keepalives = 0

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        return cls(MemoryBackend.from_url(url, ttl_seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        found = await self._backend.get(keys)
        if self.miss_gets and any(key.startswith("schedule:") for key in keys):
            self.miss_gets -= 1
            return {}
        return found

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        if self.claimed_inserts:
            self.claimed_inserts -= 1
            return list(records)
        return await self._backend.insert(records, keep)

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        if self.lost_cas:
            self.lost_cas -= 1
            return [False] * len(updates)
        return await self._backend.compare_and_set(updates)

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        if (group, member) == (SCHEDULES_GROUP, KEEPALIVE_MEMBER):
            self.keepalives += 1
        return await self._backend.add_member(group, member, payload, keep)


@pytest.fixture
async def engines() -> AsyncIterator[Engines]:
    broker, backend = MemoryBroker(), MemoryBackend()
    await broker.connect()
    await backend.connect()
    yield broker, Interfering(backend)
    await backend.close()
    await broker.close()


def replica(engines: Engines, clock: Clock, **settings: Any) -> Schedules:
    broker, backend = engines
    core = Core.build(Settings(**settings), broker=broker, backend=backend)
    return Schedules(backend, core.submitter, core.settings, clock)


async def ready(engines: Engines, queue: str = "default") -> int:
    return (await engines[0].stats(queue)).ready


# -- pure tick planning -------------------------------------------------------------------------

def test_a_plan_is_exactly_the_ticks_due_the_next_tick_and_whether_any_was_missed() -> None:
    assert plan_ticks("* * * * *", MINUTE, MINUTE + 0.4, SKIP, grace=5) == Plan([MINUTE], MINUTE + 60, False)
    assert plan_ticks("* * * * *", MINUTE, MINUTE - 0.1, SKIP, grace=5) == Plan([], MINUTE, False)


def test_a_tick_exactly_at_the_grace_cutoff_is_on_time_not_missed() -> None:
    # T0 is due and `now` is T0 + grace: it still fires as itself (RUN_ONCE adds nothing earlier).
    expected = Plan([T0 + n for n in range(6)], T0 + 6, False)
    assert plan_ticks("* * * * * *", T0, T0 + 5, RUN_ONCE, grace=5) == expected
    assert plan_ticks("* * * * * *", T0, T0 + 5, SKIP, grace=5) == expected


def test_one_pass_fires_at_most_max_fires_and_then_waits_for_the_next_future_tick() -> None:
    now = T0 + 2 * MAX_FIRES_PER_PASS + 0.5  # a seconds cron stalled far longer than the cap, within the grace
    plan = plan_ticks("* * * * * *", T0, now, SKIP, grace=10 * MAX_FIRES_PER_PASS)
    assert plan == Plan([T0 + n for n in range(MAX_FIRES_PER_PASS)], math.floor(now) + 1, False)
    # Missed ticks before the grace, then more on-time ones than the cap: still reported missed.
    cutoff = math.floor(now) - MAX_FIRES_PER_PASS - 100
    plan = plan_ticks("* * * * * *", T0, now, SKIP, grace=MAX_FIRES_PER_PASS + 100)
    assert plan == Plan([cutoff + n for n in range(MAX_FIRES_PER_PASS)], math.floor(now) + 1, True)


def test_six_fields_put_the_seconds_first() -> None:
    # T0 is hh:13:20; "*/10" in the seconds field (not in the minutes) ticks ten seconds later.
    assert next_tick("*/10 * * * * *", T0) == T0 + 10
    assert plan_ticks("*/10 * * * * *", T0 + 10, T0 + 10.5, SKIP, grace=5) == Plan([T0 + 10], T0 + 20, False)


# -- the grace follows the scheduler's pass interval ---------------------------------------------

@pytest.mark.parametrize(
    ("tick_seconds", "late", "fires"),
    [
        (2.0, 10, True),  # grace = 5 passes of 2 s
        (2.0, 11, False),
        (0.5, 5, True),  # grace is never below 5 s ...
        (0.5, 6, False),  # ... nor above it for passes shorter than a second
    ],
)
async def test_a_tick_fires_until_five_passes_late_and_at_least_five_seconds(
    engines: Engines, tick_seconds: float, late: int, fires: bool
) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, schedule_tick_seconds=tick_seconds)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + late + 0.5
    assert await scheduler.run_due() == ([task_id_for("tick", MINUTE)] if fires else [])


# -- firing --------------------------------------------------------------------------------------

async def test_the_fired_task_names_its_tick_in_utc_iso_form(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    (task_id,) = await scheduler.run_due()
    record = await Core.build(Settings(), *engines).store.get(task_id)
    assert record is not None
    assert record.result.signature.headers[TICK_HEADER] == "2023-11-14T22:14:00Z"


async def test_a_deleted_schedule_left_in_the_index_does_not_stop_the_others(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("a-gone"))
    await scheduler.create(schedule("tick"))
    await scheduler.delete("a-gone")
    # A create racing the delete put the name back in the index over the tombstone.
    await engines[1].add_member(SCHEDULES_GROUP, "a-gone", b"")
    clock.now = MINUTE + 0.5
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE)]


async def test_an_indexed_name_without_a_record_does_not_hide_the_others(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await engines[1].add_member(SCHEDULES_GROUP, "a-expired", b"")  # its record expired
    await scheduler.create(schedule("tick"))
    assert [s.name for s in await scheduler.all()] == ["tick"]
    clock.now = MINUTE + 0.5
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE)]


async def test_a_record_without_a_touched_stamp_counts_as_touched_at_the_epoch(engines: Engines) -> None:
    # Written before records carried the stamp: it is rewritten (kept alive) at the first pass.
    keepalive = keepalive_interval(Settings().result_ttl_seconds)
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    created = await scheduler.create(schedule("yearly", "0 0 1 1 *"))
    key = schedule_key("yearly")
    [found] = (await engines[1].get([key])).values()
    record = ScheduleRecord.FromString(found.data)
    record.ClearField("touched_at")
    assert await engines[1].compare_and_set([Update(key, found.version, record.SerializeToString())]) == [True]
    clock.now = keepalive  # exactly one keepalive interval after the epoch
    assert await scheduler.run_due() == []
    assert (await engines[1].get([key]))[key].version == found.version + 2
    assert list(await scheduler.all()) == [created]


async def test_the_index_keepalive_is_written_once_per_interval_and_only_with_schedules(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, result_ttl_seconds=400.0)  # keepalive every 100 s
    await scheduler.run_due()
    assert engines[1].keepalives == 0  # nothing to keep alive
    await scheduler.create(schedule("yearly", "0 0 1 1 *"))
    await scheduler.run_due()
    assert engines[1].keepalives == 1
    clock.now += 99.5
    await scheduler.run_due()
    assert engines[1].keepalives == 1
    clock.now += 0.5  # exactly one interval later
    await scheduler.run_due()
    assert engines[1].keepalives == 2


async def test_the_record_is_rewritten_exactly_one_keepalive_interval_after_its_last_write(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, result_ttl_seconds=400.0)
    await scheduler.create(schedule("yearly", "0 0 1 1 *"))
    key = schedule_key("yearly")
    version = (await engines[1].get([key]))[key].version
    clock.now += 100.0
    await scheduler.run_due()
    assert (await engines[1].get([key]))[key].version == version + 1


async def test_the_loop_fires_due_schedules_and_keeps_going_after_a_failed_pass(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, schedule_tick_seconds=0.01)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    real_run_due = scheduler.run_due
    passes = 0
    fired: list[str] = []

    async def first_pass_fails() -> list[str]:
        nonlocal passes
        passes += 1
        if passes == 1:
            raise ConnectionError("backend unreachable")
        fired.extend(await real_run_due())
        return fired

    monkeypatch.setattr(scheduler, "run_due", first_pass_fails)
    loop = asyncio.create_task(scheduler.run())
    try:
        await until(lambda: fired, 10.0, "a pass after the failed one fired the tick")
        assert fired == [task_id_for("tick", MINUTE)]
        assert not loop.done()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert loop.cancelled()


# -- create and delete against other writers ------------------------------------------------------

async def test_replacing_a_schedule_that_never_ran_gives_it_no_last_run(engines: Engines) -> None:
    scheduler = replica(engines, Clock(T0))
    await scheduler.create(schedule("tick"))
    replaced = await scheduler.create(schedule("tick", "0 * * * *"))
    assert not replaced.HasField("last_run_at")
    assert list(await scheduler.all()) == [replaced]


async def test_a_create_whose_record_expired_midway_stores_the_new_schedule(engines: Engines) -> None:
    scheduler = replica(engines, Clock(T0))
    engines[1].claimed_inserts = 1  # the record was there, and expired right after
    created = await scheduler.create(schedule("tick", "0 * * * *"))
    assert list(await scheduler.all()) == [created]
    assert created.cron == "0 * * * *"


async def test_a_replace_that_finds_the_record_gone_and_then_recreated_still_replaces_it(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    await scheduler.run_due()
    engines[1].miss_gets = 1  # it expired, and another replica wrote it again
    replaced = await scheduler.create(schedule("tick", "0 * * * *"))
    assert replaced.last_run_at.seconds == MINUTE
    assert list(await scheduler.all()) == [replaced]


async def test_a_deleted_schedule_created_again_starts_afresh(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    await scheduler.run_due()
    await scheduler.delete("tick")
    again = await scheduler.create(schedule("tick"))
    assert not again.HasField("last_run_at")  # the tombstone kept nothing of the old one


async def test_a_delete_that_loses_to_a_concurrent_write_still_leaves_a_tombstone(engines: Engines) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    await scheduler.run_due()
    engines[1].lost_cas = 1  # another replica moved the schedule on between the read and the write
    await scheduler.delete("tick")
    again = await scheduler.create(schedule("tick"))
    assert not again.HasField("last_run_at")


async def test_a_name_indexed_without_a_record_can_be_deleted(engines: Engines) -> None:
    scheduler = replica(engines, Clock(T0))
    await engines[1].add_member(SCHEDULES_GROUP, "expired", b"")
    await scheduler.delete("expired")
    assert "expired" not in await engines[1].members(SCHEDULES_GROUP)
    with pytest.raises(NotFound):
        await scheduler.delete("expired")
