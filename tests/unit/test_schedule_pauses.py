"""Pausing and resuming schedules, and the errors naming a missing one (core/schedules.py), on the
core with an injected clock (tests/unit/test_schedules.py's engines, replicas and clock)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from conveyor_server.backends.base import Backend, Update
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.core.errors import AlreadyExists, NotFound
from conveyor_server.core.schedules import RUN_ONCE, schedule_key, task_id_for
from tests.unit.test_schedules import MINUTE, T0, Clock, _CrashBeforeAdvance, engines, replica, schedule

__all__ = ["engines"]  # the fixture the tests below use


async def test_a_missing_schedule_is_named_in_the_error_details(engines: tuple[MemoryBroker, Backend]) -> None:
    scheduler = replica(engines, Clock(T0))
    name = "n" * 300  # no schedule can have it; the details quote at most 200 characters of it
    for missing in (scheduler.delete(name), scheduler.set_paused(name, True)):
        with pytest.raises(NotFound) as raised:
            await missing
        assert (raised.value.reason, raised.value.metadata) == ("SCHEDULE_NOT_FOUND", {"schedule": "n" * 200})


async def test_a_paused_schedule_is_rewritten_only_to_outlive_the_backend_ttl(
    engines: tuple[MemoryBroker, Backend],
) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, result_ttl_seconds=400.0)  # rewritten every 100 s
    await scheduler.create(schedule("yearly", "0 0 1 1 *"))
    paused = await scheduler.set_paused("yearly", True)
    backend = engines[1]

    async def version() -> int:
        return (await backend.get([schedule_key("yearly")]))[schedule_key("yearly")].version

    written = await version()
    clock.now += 99
    assert await scheduler.run_due() == []
    assert await version() == written, "not rewritten on every pass"
    clock.now += 1
    assert await scheduler.run_due() == []
    assert await version() == written + 1, "rewritten once the interval has passed"
    assert list(await scheduler.all()) == [paused], "still paused, waiting for the same tick"


async def test_resuming_skips_the_ticks_missed_while_paused(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick", missed=RUN_ONCE))
    await scheduler.set_paused("tick", True)
    clock.now = MINUTE + 600.3  # ten ticks pass while it is paused
    assert await scheduler.run_due() == []
    resumed = await scheduler.set_paused("tick", False)
    assert resumed.next_run_at.seconds == MINUTE + 660
    assert await scheduler.run_due() == [], "RUN_ONCE does not fire for the ticks it was paused through"
    clock.now = MINUTE + 660.3
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE + 660)]


async def test_a_delete_cut_short_after_unlisting_the_schedule_can_be_done_again(
    engines: tuple[MemoryBroker, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = replica(engines, Clock(T0))
    await scheduler.create(schedule("tick"))
    with monkeypatch.context() as dying:
        dying.setattr(scheduler, "backend", _CrashBeforeAdvance(engines[1]))
        with pytest.raises(ConnectionError):
            await scheduler.delete("tick")  # unlisted, but its record is not yet a tombstone
    await scheduler.delete("tick")
    with pytest.raises(NotFound):
        await scheduler.delete("tick")
    assert await scheduler.all() == []


class _AlwaysOutrun(_CrashBeforeAdvance):
    """The backend as seen by a replica whose every conditional write loses to another writer."""

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        return [False] * len(updates)


async def test_a_schedule_that_keeps_changing_under_a_pause_is_refused_by_name(
    engines: tuple[MemoryBroker, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = replica(engines, Clock(T0))
    await scheduler.create(schedule("tick"))
    monkeypatch.setattr(scheduler, "backend", _AlwaysOutrun(engines[1]))
    with pytest.raises(AlreadyExists, match=r"^schedule 'tick' kept changing under concurrent writers; try again$"):
        await scheduler.set_paused("tick", True)
