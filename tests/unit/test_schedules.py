"""Periodic schedules and paused queues, on the core with an injected clock (no gRPC, no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conveyor import sig
from conveyor.v1 import admin_service_pb2, task_service_pb2
from conveyor_server.app import Core
from conveyor_server.backends.base import Backend, Update
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.backends.sqlite import SqliteBackend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.config import Settings
from conveyor_server.core.errors import InvalidArgument, NotFound
from conveyor_server.core.pauses import KEEPALIVE_MEMBER, PAUSED_QUEUES_GROUP, QueuePauses
from conveyor_server.core.schedules import (
    RUN_ONCE,
    SCHEDULE_HEADER,
    SKIP,
    Schedules,
    check_cron,
    plan_ticks,
    schedule_key,
    task_id_for,
)

Schedule = admin_service_pb2.Schedule
# 2023-11-14 22:13:20 UTC; the next whole minute is T0 + 40.
T0 = 1_700_000_000
MINUTE = T0 + 40


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def schedule(
    name: str = "tick", cron: str = "* * * * *", missed: admin_service_pb2.MissedTicks.ValueType = SKIP, **task: Any
) -> Schedule:
    signature = sig("stamp", name).to_proto()
    for field, value in task.items():
        setattr(signature, field, value)
    return Schedule(name=name, cron=cron, task=signature, missed_ticks=missed)


# -- pure tick planning -------------------------------------------------------------------------

def test_a_tick_on_time_fires_once_and_the_next_one_is_planned() -> None:
    plan = plan_ticks("* * * * *", MINUTE, MINUTE + 0.4, SKIP, grace=5)
    assert plan.fire == [MINUTE]
    assert plan.next_run_at == MINUTE + 60
    assert not plan.missed


def test_nothing_is_due_before_the_tick() -> None:
    plan = plan_ticks("* * * * *", MINUTE, MINUTE - 0.1, SKIP, grace=5)
    assert plan.fire == []
    assert plan.next_run_at == MINUTE


def test_skip_drops_missed_ticks_and_waits_for_the_next_future_one() -> None:
    plan = plan_ticks("* * * * *", MINUTE, MINUTE + 630.5, SKIP, grace=5)
    assert plan.fire == []
    assert plan.missed
    assert plan.next_run_at == MINUTE + 660


def test_run_once_fires_once_for_all_missed_ticks() -> None:
    plan = plan_ticks("* * * * *", MINUTE, MINUTE + 630.5, RUN_ONCE, grace=5)
    # Eleven ticks were missed (MINUTE ... MINUTE + 600); one fire stands for all, as the latest.
    assert plan.fire == [MINUTE + 600]
    assert plan.next_run_at == MINUTE + 660


def test_ticks_within_the_grace_fire_each_and_older_ones_follow_the_policy() -> None:
    # A seconds cron whose replica stalled for 8 s: 3 ticks missed, 5 within the 5 s grace, the
    # current one too.
    now = T0 + 8
    assert plan_ticks("* * * * * *", T0, now, SKIP, grace=5).fire == [T0 + 3, T0 + 4, T0 + 5, T0 + 6, T0 + 7, T0 + 8]
    assert plan_ticks("* * * * * *", T0, now, RUN_ONCE, grace=5).fire == [
        T0 + 2, T0 + 3, T0 + 4, T0 + 5, T0 + 6, T0 + 7, T0 + 8
    ]


def test_cron_is_utc_and_five_field_by_default() -> None:
    day = at(2024, 3, 1)
    plan = plan_ticks("30 2 * * *", at(2024, 3, 1, 2, 30), at(2024, 3, 1, 2, 30, 1), SKIP, grace=5)
    assert plan.fire == [day + 2 * 3600 + 1800]
    assert plan.next_run_at == day + 86_400 + 2 * 3600 + 1800


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "not a valid cron expression"),
        ("* * * *", "expected 5 fields"),
        ("* * * * * * *", "expected 5 fields"),
        ("", "expected 5 fields"),
        ("H * * * *", "hashed (H) and random (R)"),
        ("R/5 * * * *", "hashed (H) and random (R)"),
        ("@reboot", "expected 5 fields"),
        ("0 0 31 2 *", "not a valid cron expression"),
        ("*/0 * * * *", "not a valid cron expression"),
    ],
)
def test_bad_cron_expressions_are_refused_clearly(expression: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_cron(expression)


def test_good_cron_expressions_are_normalized() -> None:
    assert check_cron("  0   3 * * mon-fri ") == "0 3 * * mon-fri"
    assert check_cron("*/2 * * * * *") == "*/2 * * * * *"
    assert check_cron("@Hourly") == "@hourly"
    assert check_cron("0 12 * mar thu") == "0 12 * mar thu"


# -- the scheduler on the core ------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
async def engines(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[MemoryBroker, Backend]]:
    broker = MemoryBroker()
    backend: Backend = MemoryBackend() if request.param == "memory" else SqliteBackend(str(tmp_path / "b.db"))
    await broker.connect()
    await backend.connect()
    yield broker, backend
    await backend.close()
    await broker.close()


def replica(engines: tuple[MemoryBroker, Backend], clock: Clock, **settings: Any) -> Schedules:
    """One server replica's scheduler over the shared engines (its own submitter and caches)."""
    broker, backend = engines
    core = Core.build(Settings(**settings), broker=broker, backend=backend)
    return Schedules(backend, core.submitter, core.settings, clock)


async def ready(engines: tuple[MemoryBroker, Backend], queue: str = "default") -> int:
    return (await engines[0].stats(queue)).ready


async def test_create_list_and_the_stored_shape(engines: tuple[MemoryBroker, Backend]) -> None:
    scheduler = replica(engines, Clock(T0))
    created = await scheduler.create(schedule("tick", " *  * * * * "))
    assert created.cron == "* * * * *"
    assert created.missed_ticks == SKIP
    assert created.task.queue == "default"
    assert created.next_run_at.seconds == MINUTE
    assert not created.HasField("last_run_at")
    assert [s.name for s in await scheduler.all()] == ["tick"]
    other = replica(engines, Clock(T0))
    assert list(await other.all()) == [created]


async def test_fires_once_per_tick_with_two_replicas(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    a, b = replica(engines, clock), replica(engines, clock)
    await a.create(schedule("tick"))
    fired: list[str] = []
    for minute in range(5):
        clock.now = MINUTE + 60 * minute + 0.3
        for ids in await asyncio.gather(a.run_due(), b.run_due(), a.run_due()):
            fired.extend(ids)
        fired.extend(await b.run_due())
    assert fired == [task_id_for("tick", MINUTE + 60 * m) for m in range(5)]
    assert await ready(engines) == 5
    (stored,) = await b.all()
    assert stored.last_run_at.seconds == MINUTE + 240
    assert stored.next_run_at.seconds == MINUTE + 300


async def test_a_paused_schedule_does_not_fire_and_resumes_from_its_next_tick(
    engines: tuple[MemoryBroker, Backend],
) -> None:
    clock = Clock(T0)
    a, b = replica(engines, clock), replica(engines, clock)
    await a.create(schedule("tick", missed=RUN_ONCE))
    paused = await a.set_paused("tick", True)
    assert paused.paused and (await b.all())[0].paused, "every replica sees it paused"
    assert (await a.set_paused("tick", True)).paused, "pausing twice is fine"
    for minute in range(3):  # three ticks pass while it is paused: on neither replica do they fire
        clock.now = MINUTE + 60 * minute + 0.3
        assert await a.run_due() == [] and await b.run_due() == []
    # A redeploy storing the schedule again keeps it paused.
    assert (await b.create(schedule("tick", missed=RUN_ONCE))).paused
    resumed = await b.set_paused("tick", False)
    assert not resumed.paused
    assert resumed.next_run_at.seconds == MINUTE + 180, "from the next tick after now, not the ticks it missed"
    assert await a.run_due() == [], "RUN_ONCE does not count paused ticks as missed"
    clock.now = MINUTE + 180.3
    assert await a.run_due() == [task_id_for("tick", MINUTE + 180)]
    assert await ready(engines) == 1


async def test_pausing_a_schedule_that_does_not_exist_is_not_found(engines: tuple[MemoryBroker, Backend]) -> None:
    scheduler = replica(engines, Clock(T0))
    for paused in (True, False):
        with pytest.raises(NotFound, match="no schedule named 'nope'"):
            await scheduler.set_paused("nope", paused)
    await scheduler.create(schedule("gone"))
    await scheduler.delete("gone")
    with pytest.raises(NotFound):
        await scheduler.set_paused("gone", True)


async def test_the_fired_task_carries_the_schedule(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(MINUTE + 0.2)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick", "* * * * * *", queue="cron", priority=3))
    clock.now += 1
    (task_id,) = await scheduler.run_due()
    (delivery,) = await engines[0].fetch("cron", 10, 30.0, 0.1)
    assert delivery.message_id == task_id == f"cron-tick-{MINUTE + 1}"
    record = await Core.build(Settings(), *engines).store.get(task_id)
    assert record is not None
    signature = record.result.signature
    assert (signature.name, signature.queue, signature.priority) == ("stamp", "cron", 3)
    assert signature.headers[SCHEDULE_HEADER] == "tick"


class _CrashBeforeAdvance:
    """The backend as seen by a replica that dies right after submitting (before moving the schedule)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        raise ConnectionError("replica died")


async def test_a_replica_dying_after_firing_does_not_make_the_tick_fire_twice(
    engines: tuple[MemoryBroker, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0)
    a, b = replica(engines, clock), replica(engines, clock)
    await a.create(schedule("tick"))
    monkeypatch.setattr(a, "backend", _CrashBeforeAdvance(engines[1]))
    clock.now = MINUTE + 0.5
    assert await a.run_due() == []  # it submitted, then failed to record the advance
    assert await ready(engines) == 1
    assert await b.run_due() == []  # the task exists: b only moves the schedule on
    assert await ready(engines) == 1
    (stored,) = await b.all()
    assert stored.next_run_at.seconds == MINUTE + 60
    assert stored.last_run_at.seconds == MINUTE


async def test_skip_after_downtime_waits_for_the_next_tick(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick", missed=SKIP))
    clock.now = MINUTE + 630.5  # every server was down for ten minutes
    assert await scheduler.run_due() == []
    (stored,) = await scheduler.all()
    assert stored.next_run_at.seconds == MINUTE + 660
    clock.now = MINUTE + 660.5
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE + 660)]
    assert await ready(engines) == 1


async def test_run_once_after_downtime_fires_one_task_for_all_missed_ticks(
    engines: tuple[MemoryBroker, Backend],
) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick", missed=RUN_ONCE))
    clock.now = MINUTE + 630.5
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE + 600)]
    assert await scheduler.run_due() == []
    assert await ready(engines) == 1
    (stored,) = await scheduler.all()
    assert stored.next_run_at.seconds == MINUTE + 660
    assert stored.last_run_at.seconds == MINUTE + 600


async def test_delete_stops_firing(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    a, b = replica(engines, clock), replica(engines, clock)
    await a.create(schedule("tick"))
    await a.create(schedule("other", "*/2 * * * *"))
    await b.delete("tick")
    assert [s.name for s in await a.all()] == ["other"]
    clock.now = MINUTE + 0.5
    assert await a.run_due() == [task_id_for("other", MINUTE)]
    with pytest.raises(NotFound, match="no schedule named 'tick'"):
        await a.delete("tick")
    with pytest.raises(NotFound):
        await a.delete("never-was")
    # The name can be used again.
    await a.create(schedule("tick"))
    assert [s.name for s in await b.all()] == ["other", "tick"]


async def test_create_with_an_existing_name_replaces_it(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))
    clock.now = MINUTE + 0.5
    assert len(await scheduler.run_due()) == 1
    replaced = await scheduler.create(schedule("tick", "0 * * * *", missed=RUN_ONCE))
    assert replaced.cron == "0 * * * *"
    assert replaced.missed_ticks == RUN_ONCE
    assert replaced.last_run_at.seconds == MINUTE  # kept
    assert replaced.next_run_at.seconds == at(2023, 11, 14, 23)
    assert list(await scheduler.all()) == [replaced]


async def test_records_are_kept_alive_past_the_backend_ttl(engines: tuple[MemoryBroker, Backend]) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock, result_ttl_seconds=400.0)  # rewritten every 100 s
    await scheduler.create(schedule("yearly", "0 0 1 1 *"))
    backend = engines[1]
    version = (await backend.get([schedule_key("yearly")]))[schedule_key("yearly")].version
    clock.now += 50
    await scheduler.run_due()
    assert (await backend.get([schedule_key("yearly")]))[schedule_key("yearly")].version == version
    clock.now += 60
    assert await scheduler.run_due() == []
    assert (await backend.get([schedule_key("yearly")]))[schedule_key("yearly")].version == version + 1
    assert KEEPALIVE_MEMBER in await backend.members("schedules")
    assert [s.name for s in await scheduler.all()] == ["yearly"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "schedule.name"),
        ({"name": "has space"}, "schedule.name"),
        ({"name": "x" * 65}, "schedule.name"),
        ({"cron": "nope"}, "schedule.cron"),
        ({"missed_ticks": 7}, "missed_ticks 7"),
        ({"task_id": "fixed"}, "schedule.task.id must be empty"),
        ({"task_idempotency_key": "k"}, "idempotency_key"),
        ({"task_name": ""}, "schedule.task: name is empty"),
        ({"task_queue": "bad queue"}, "schedule.task: queue"),
        ({"no_task": True}, "schedule.task is required"),
    ],
)
async def test_invalid_schedules_are_refused(
    engines: tuple[MemoryBroker, Backend], changes: dict[str, Any], message: str
) -> None:
    scheduler = replica(engines, Clock(T0))
    requested = schedule("ok")
    for field, value in changes.items():
        if field == "no_task":
            requested.ClearField("task")
        elif field.startswith("task_"):
            setattr(requested.task, field.removeprefix("task_"), value)
        else:
            setattr(requested, field, value)
    with pytest.raises(InvalidArgument, match=message):
        await scheduler.create(requested)
    assert await scheduler.all() == []


async def test_a_task_with_an_eta_is_refused(engines: tuple[MemoryBroker, Backend]) -> None:
    requested = schedule("ok")
    requested.task.eta.FromSeconds(T0 + 100)
    with pytest.raises(InvalidArgument, match="eta cannot be set"):
        await replica(engines, Clock(T0)).create(requested)


async def test_a_refused_task_does_not_block_the_schedule(
    engines: tuple[MemoryBroker, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    await scheduler.create(schedule("tick"))

    async def refuse(requests: Sequence[task_service_pb2.SubmitRequest], headers: Any = None) -> None:
        raise InvalidArgument("args are over the new limit")

    monkeypatch.setattr(scheduler.submitter, "submit", refuse)
    clock.now = MINUTE + 0.5
    assert await scheduler.run_due() == []
    (stored,) = await scheduler.all()
    assert stored.next_run_at.seconds == MINUTE + 60


# -- paused queues --------------------------------------------------------------------------

async def test_pause_and_resume_are_shared_and_cached(engines: tuple[MemoryBroker, Backend]) -> None:
    backend = engines[1]
    clock = Clock(0.0)
    here, there = QueuePauses(backend, 86_400, clock=clock), QueuePauses(backend, 86_400, clock=clock)
    assert not await there.is_paused("q")
    await here.pause("q")
    assert await here.is_paused("q")  # at once where it was paused
    assert not await there.is_paused("q")  # cached elsewhere ...
    clock.now += 1.0
    assert await there.is_paused("q")  # ... for at most one refresh
    await there.resume("q")
    await there.resume("q")  # idempotent
    assert not await there.is_paused("q")
    clock.now += 1.0
    assert await here.paused() == frozenset()


async def test_pause_keeps_its_group_alive_and_hides_the_keepalive(engines: tuple[MemoryBroker, Backend]) -> None:
    backend = engines[1]
    pauses = QueuePauses(backend, 86_400)
    await pauses.pause("a")
    await pauses.pause("b")
    assert await pauses.refresh() == {"a", "b"}
    assert set(await backend.members(PAUSED_QUEUES_GROUP)) == {"a", "b", KEEPALIVE_MEMBER}


@pytest.mark.parametrize("queue", ["", "has space", "x" * 65, KEEPALIVE_MEMBER])
async def test_pause_refuses_invalid_queue_names(engines: tuple[MemoryBroker, Backend], queue: str) -> None:
    pauses = QueuePauses(engines[1], 86_400)
    with pytest.raises(InvalidArgument, match="invalid queue name"):
        await pauses.pause(queue)
    with pytest.raises(InvalidArgument, match="invalid queue name"):
        await pauses.resume(queue)


async def test_a_waiting_pump_wakes_on_a_local_resume(engines: tuple[MemoryBroker, Backend]) -> None:
    pauses = QueuePauses(engines[1], 86_400, refresh_seconds=60.0)
    await pauses.pause("q")
    waiter = asyncio.ensure_future(pauses.wait_for_change())
    await asyncio.sleep(0)
    await pauses.resume("q")
    await asyncio.wait_for(waiter, 1.0)
    assert not await pauses.is_paused("q")
