"""Cancel notices between replicas (core/cancel_notices.py): a replica stops what it holds itself and
tells the others of the rest; each replica acts on every notice once; the record stays bounded."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core.cancel_notices import (
    KEEP_SECONDS,
    MAX_IDS,
    NOTICES_KEY,
    CancelNotices,
    Notice,
    appended,
    parse,
    serialize,
)
from tests.support.wait import wait_for


class Holder:
    """A replica's workers: the task ids they hold, and the stops they were sent."""

    def __init__(self, *held: str) -> None:
        self.held = set(held)
        self.stopped: list[list[str]] = []

    async def stop_held(self, task_ids: list[str]) -> list[str]:
        hits = [t for t in task_ids if t in self.held]
        if hits:
            self.stopped.append(hits)
        return hits

    async def stops(self, count: int) -> bool:
        return len(self.stopped) >= count



async def test_a_replica_stops_what_it_holds_and_tells_the_others_of_the_rest(backend: MemoryBackend) -> None:
    here, there = Holder("a"), Holder("b", "c")
    listening = asyncio.create_task(CancelNotices(backend, there.stop_held).run())
    try:
        await CancelNotices(backend, here.stop_held).stop(["a", "b", "x"])
        await wait_for(lambda: there.stops(1), 5.0, "the other replica acted on the notice")
        assert here.stopped == [["a"]]
        assert there.stopped == [["b"]]
        [notice] = parse((await backend.get([NOTICES_KEY]))[NOTICES_KEY].data)
        assert notice.task_ids == ("b", "x"), "only the ids this replica did not hold are announced"
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def test_a_notice_is_acted_on_once(backend: MemoryBackend) -> None:
    there = Holder("b", "c")
    listening = asyncio.create_task(CancelNotices(backend, there.stop_held).run())
    try:
        sender = CancelNotices(backend, Holder().stop_held)
        await sender.stop(["b"])
        await wait_for(lambda: there.stops(1), 5.0, "the first notice acted on")
        await sender.stop(["c"])
        await wait_for(lambda: there.stops(2), 5.0, "the second notice acted on")
        await asyncio.sleep(0.05)
        assert there.stopped == [["b"], ["c"]]
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def test_nothing_is_written_when_this_replica_held_every_task(backend: MemoryBackend) -> None:
    await CancelNotices(backend, Holder("a", "b").stop_held).stop(["a", "b"])
    assert await backend.get([NOTICES_KEY]) == {}


def test_old_notices_are_pruned_and_the_newest_kept_within_the_id_bound() -> None:
    notices = [Notice(1, 0.0, ("old",)), Notice(2, KEEP_SECONDS, ("recent",))]
    kept = appended(notices, ["new"], now=KEEP_SECONDS + 1)
    assert [(n.seq, n.task_ids) for n in kept] == [(2, ("recent",)), (3, ("new",))]
    many = appended([Notice(1, 0.0, tuple(f"t{i}" for i in range(MAX_IDS)))], ["last"], now=1.0)
    assert [n.seq for n in many] == [2], "the oldest notice goes when the ids exceed the bound"


def test_the_record_round_trips_and_garbage_is_refused() -> None:
    notices = [Notice(4, 12.5, ("a", "b"))]
    assert parse(serialize(notices)) == notices
    for garbage in (b"{", b"[1]", b'[{"seq": 1}]'):
        with pytest.raises(ValueError):
            parse(garbage)
