"""Schedule storage: records are ScheduleRecord protos; the JSON envelopes stored before them
are still read, and each is rewritten in the new form the next time a replica writes it."""

from __future__ import annotations

import base64
import json

import pytest
from google.protobuf.message import DecodeError

from conveyor_server.backends.base import Backend
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.core.schedule_records import ScheduleRecord, parse
from conveyor_server.core.schedules import SCHEDULES_GROUP, schedule_key, task_id_for
from tests.unit.test_schedules import MINUTE, T0, Clock, engines, replica, schedule

__all__ = ["engines"]  # the fixture (memory and SQLite backends), used by name

Engines = tuple[MemoryBroker, Backend]


def envelope(stored: dict[str, object]) -> bytes:
    return json.dumps(stored).encode()


def legacy_live(name: str = "tick", cron: str = "* * * * *", touched: float = T0, **extra: object) -> bytes:
    """A record as schedules were stored before ScheduleRecord: created at T0, due at MINUTE."""
    created = schedule(name, cron)
    created.task.queue = "default"
    created.next_run_at.FromSeconds(MINUTE)
    for field, seconds in extra.items():
        getattr(created, field).FromSeconds(seconds)
    blob = base64.b64encode(created.SerializeToString()).decode()
    return envelope({"schedule": blob, "touched": touched})


async def store_legacy(engines: Engines, name: str, data: bytes) -> None:
    assert await engines[1].insert({schedule_key(name): data}) == []
    await engines[1].add_member(SCHEDULES_GROUP, name, b"")


async def stored_record(engines: Engines, name: str) -> ScheduleRecord:
    """The record as the backend holds it, which must be in the new form."""
    found = (await engines[1].get([schedule_key(name)]))[schedule_key(name)]
    assert not found.data.startswith(b"{")
    return ScheduleRecord.FromString(found.data)


async def test_a_schedule_is_stored_as_a_schedule_record(engines: Engines) -> None:
    created = await replica(engines, Clock(T0 + 0.25)).create(schedule("tick"))
    record = await stored_record(engines, "tick")
    assert record.schedule == created
    assert not record.deleted
    assert record.touched_at.ToNanoseconds() == (T0 + 0.25) * 10**9


async def test_a_deleted_schedule_is_stored_as_a_tombstone_record(engines: Engines) -> None:
    scheduler = replica(engines, Clock(T0))
    await scheduler.create(schedule("tick"))
    await scheduler.delete("tick")
    record = await stored_record(engines, "tick")
    assert record.deleted
    assert not record.HasField("schedule")


async def test_a_legacy_schedule_is_listed_fires_and_is_rewritten_as_a_record(engines: Engines) -> None:
    await store_legacy(engines, "tick", legacy_live("tick"))
    clock = Clock(T0)
    scheduler = replica(engines, clock)
    (listed,) = await scheduler.all()
    assert (listed.name, listed.cron, listed.next_run_at.seconds) == ("tick", "* * * * *", MINUTE)
    clock.now = MINUTE + 0.5
    assert await scheduler.run_due() == [task_id_for("tick", MINUTE)]
    record = await stored_record(engines, "tick")
    assert record.schedule.last_run_at.seconds == MINUTE
    assert record.schedule.next_run_at.seconds == MINUTE + 60
    assert record.touched_at.ToNanoseconds() == (MINUTE + 0.5) * 10**9


async def test_replacing_a_legacy_schedule_keeps_its_last_run(engines: Engines) -> None:
    await store_legacy(engines, "tick", legacy_live("tick", last_run_at=MINUTE - 60))
    replaced = await replica(engines, Clock(T0)).create(schedule("tick", "0 * * * *"))
    assert replaced.last_run_at.seconds == MINUTE - 60
    assert (await stored_record(engines, "tick")).schedule == replaced


async def test_a_legacy_tombstone_hides_the_schedule_and_a_create_starts_afresh(engines: Engines) -> None:
    await store_legacy(engines, "gone", envelope({"deleted": True, "touched": T0}))
    scheduler = replica(engines, Clock(T0))
    assert await scheduler.all() == []
    again = await scheduler.create(schedule("gone"))
    assert not again.HasField("last_run_at")
    assert (await stored_record(engines, "gone")).schedule == again


async def test_deleting_a_legacy_schedule_writes_a_tombstone_record(engines: Engines) -> None:
    await store_legacy(engines, "tick", legacy_live("tick"))
    await replica(engines, Clock(T0)).delete("tick")
    assert (await stored_record(engines, "tick")).deleted


async def test_a_legacy_record_without_a_touched_stamp_is_rewritten_at_the_first_pass(engines: Engines) -> None:
    stored = json.loads(legacy_live("yearly", "0 0 1 1 *", next_run_at=MINUTE + 10**8))
    del stored["touched"]
    await store_legacy(engines, "yearly", envelope(stored))
    await replica(engines, Clock(T0)).run_due()  # nothing due, but touched at the epoch: stale
    assert (await stored_record(engines, "yearly")).touched_at.seconds == T0


async def test_an_unreadable_record_is_left_out_and_does_not_hide_the_others(engines: Engines) -> None:
    await store_legacy(engines, "a-broken", b'{"schedule": "not base64!"}')
    await store_legacy(engines, "b-broken", b"\xff\xff not a proto")
    scheduler = replica(engines, Clock(T0))
    await scheduler.create(schedule("tick"))
    assert [s.name for s in await scheduler.all()] == ["tick"]


@pytest.mark.parametrize("data", [b'{"touched": 1}', b'{"schedule": 5}', b'{"schedule": "@@"}', b"{not json"])
def test_a_malformed_envelope_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse(data)


def test_bytes_that_are_no_record_are_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        parse(b"\xff\xff")
