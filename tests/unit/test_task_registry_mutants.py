"""The task registry (core/task_registry.py) and the strict submit checks (core/task_schemas.py)
at their edges: which registrations count and in what order, when an entry stops being live
and when it is pruned, what the writer removes, what closing, leaving and the refresh loop
write, and when a strict submit reads the registry again. Registries over one memory backend
stand for replicas; their wall clock is set by hand (round values: exact in a Timestamp)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor import sig
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, task_service_pb2, worker_service_pb2, workflow_pb2
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.background import stop_tasks
from conveyor_server.core import task_registry as task_registry_module
from conveyor_server.core import task_schemas
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.task_registry import (
    CLOSE_SECONDS,
    REGISTRY_GROUP,
    KnownTask,
    Seen,
    Snapshot,
    TaskRegistry,
)
from conveyor_server.core.task_schemas import calls_of
from tests.unit.replicas import Replicas, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, Clock, submit
from tests.unit.test_task_registry import hello, refusal, strict

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below

BEAT = 1.0
RETENTION = 100.0
START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    return Clock(START)



def registry(backend: MemoryBackend, clock: Clock, server_id: str = "a") -> TaskRegistry:
    """One replica's registry: a beat of BEAT seconds (stale after 3), RETENTION seconds kept."""
    return TaskRegistry(backend, server_id, beat_seconds=BEAT, retention_seconds=RETENTION, clock=clock)


def session(worker_id: str, *names: str, queue: str = QUEUE) -> WorkerSession:
    """A connected worker that registered `names` (no schema) on `queue`."""
    return WorkerSession(
        worker_id=worker_id,
        hello=worker_service_pb2.Hello(worker_id=worker_id, queues=[queue], max_in_flight=1, task_names=names),
        queues=[queue], window=1, connected_at=Timestamp(), last_seen=0.0,
    )


async def joined(tasks: TaskRegistry, *sessions: WorkerSession) -> None:
    for s in sessions:
        tasks.joined(s)
    await tasks.written()


async def entries(backend: MemoryBackend) -> dict[str, records_pb2.TaskRegistration]:
    found = {}
    for member, payload in (await backend.members(REGISTRY_GROUP)).items():
        found[member] = records_pb2.TaskRegistration.FromString(payload)
    return found


def seen(description: str, queue: str, seen_at: float, live: bool, worker_id: str = "w") -> Seen:
    return Seen(
        task_pb2.TaskInfo(name="t", description=description, call_schema=f'{{"title": "{description}"}}'),
        records_pb2.TaskRegistration(worker_id=worker_id, queues=[queue]),
        seen_at, live,
    )


# -- KnownTask and Snapshot ------------------------------------------------------------------------

def test_the_current_registrations_are_the_live_ones_newest_first() -> None:
    old, new = seen("old", "q-old", 10.0, True), seen("new", "q-new", 20.0, True)
    away = seen("away", "q-away", 30.0, False)
    known = KnownTask("t", (old, new, away))
    assert known.current() == [new, old]
    listed = known.listed()
    assert listed.description == "new" and listed.call_schema == '{"title": "new"}'
    assert list(listed.queues) == ["q-new", "q-old"] and listed.schema_variants == 2
    assert known.call_schemas() == ['{"title": "new"}', '{"title": "old"}']
    nobody_live = KnownTask("t", (seen("old", "q", 10.0, False), away, seen("new", "q", 20.0, False)))
    assert [s.info.description for s in nobody_live.current()] == ["away", "new", "old"]


def test_a_runner_is_a_live_worker_that_registered_the_name_on_that_queue() -> None:
    snapshot = Snapshot({"t": KnownTask("t", (seen("a", "on-a", 1.0, True), seen("b", "on-b", 2.0, False)))}, 0.0)
    assert snapshot.runner_on("on-a", "t")
    assert not snapshot.runner_on("on-b", "t"), "the worker on on-b is away"
    assert not snapshot.runner_on("elsewhere", "t"), "the live worker is on another queue"
    assert not snapshot.runner_on("on-a", "other")


# -- live, stale, pruned -----------------------------------------------------------------------------

async def test_an_entry_is_live_until_exactly_three_beats_after_its_last_write(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"))
    clock.now += 3 * BEAT
    assert (await b.load()).runner_on(QUEUE, "t")
    clock.now += 0.5
    assert not (await b.load()).runner_on(QUEUE, "t")


async def test_a_stale_entry_that_is_the_only_record_is_kept_for_exactly_the_retention(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"))  # then A dies: nobody rewrites it
    clock.now += RETENTION
    await b.refresh()
    assert len(await entries(backend)) == 1 and "t" in (await b.current()).tasks
    clock.now += 0.5
    await b.refresh()
    assert await entries(backend) == {}


async def test_a_first_entry_another_replica_wrote_is_neither_pruned_nor_dropped(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"))  # generation 0, A has not refreshed yet
    [member] = await entries(backend)
    await b.refresh()
    assert list(await entries(backend)) == [member]
    assert (await b.current()).runner_on(QUEUE, "t")


async def test_an_unreadable_entry_is_removed_and_the_others_are_still_read(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await backend.add_member(REGISTRY_GROUP, "!garbage", b"\xff", keep=True)  # sorts before any entry
    await joined(a, session("w1", "t"))
    assert (await b.load()).runner_on(QUEUE, "t")
    assert "!garbage" not in await entries(backend)
    assert len(await entries(backend)) == 1


# -- this replica's connections ------------------------------------------------------------------

async def test_a_draining_or_closing_worker_of_this_replica_is_not_live(backend: MemoryBackend, clock: Clock) -> None:
    a = registry(backend, clock)
    draining, closing = session("w1", "drained"), session("w2", "closing")
    await joined(a, draining, closing, session("w3", "open"))
    await draining.set_draining()
    await closing.close()  # the leaving path closes the session before the registry hears of it
    snapshot = await a.load()
    assert snapshot.runner_on(QUEUE, "open")
    assert not snapshot.runner_on(QUEUE, "drained") and "drained" in snapshot.tasks
    assert not snapshot.runner_on(QUEUE, "closing") and "closing" in snapshot.tasks


async def test_a_draining_worker_is_not_rewritten_so_other_replicas_see_it_go_stale(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    draining = session("w1", "t")
    await joined(a, draining)
    await draining.set_draining()
    clock.now += 3 * BEAT + 1
    await a.refresh()
    assert not (await b.load()).runner_on(QUEUE, "t")
    [entry] = (await entries(backend)).values()
    assert entry.generation == 0


async def test_the_snapshot_is_reused_until_connections_come_or_go(backend: MemoryBackend, clock: Clock) -> None:
    a = registry(backend, clock)
    await a.load()
    first = await a.current()
    assert await a.current() is first
    a.joined(session("w1", "t"))
    changed = await a.current()
    assert changed is not first and changed.runner_on(QUEUE, "t")
    assert await a.current() is changed
    await a.written()


async def test_the_first_current_reads_the_registry(backend: MemoryBackend, clock: Clock) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"))
    assert (await b.current()).runner_on(QUEUE, "t")


async def test_a_leaving_worker_stops_counting_at_once_and_the_other_entries_stay(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("wa", "add"))
    leaving = session("wb", "mul")
    await joined(b, leaving)
    before = await b.load()
    assert before.runner_on(QUEUE, "mul") and before.runner_on(QUEUE, "add")
    b.left(leaving)
    after = await b.current()  # no read: rebuilt from what B holds
    assert not after.runner_on(QUEUE, "mul") and "mul" in after.tasks
    assert after.runner_on(QUEUE, "add"), "A's worker, read before, still counts"
    await b.written()


# -- what the writer writes and removes ------------------------------------------------------------

class Recording(MemoryBackend):
    """The memory backend, recording every remove_member call."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[tuple[str, str]] = []

    async def remove_member(self, group: str, member: str) -> None:
        self.removed.append((group, member))
        await super().remove_member(group, member)


async def test_the_first_write_removes_nothing_and_a_rewrite_replaces_the_previous_generation(clock: Clock) -> None:
    backend = Recording()
    a = registry(backend, clock)
    leaving = session("w1", "t")
    await joined(a, leaving)
    [first] = await entries(backend)
    assert backend.removed == []
    a.left(leaving)
    await a.written()
    assert backend.removed == [(REGISTRY_GROUP, first)]
    [(member, entry)] = (await entries(backend)).items()
    assert member == first[:-10] + "0000000001" and entry.gone


async def test_registry_entries_are_kept_past_the_backends_ttl(clock: Clock) -> None:
    backend = MemoryBackend(ttl_seconds=0.0)  # an unkept group expires at once
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"))
    assert len(await entries(backend)) == 1
    assert (await b.load()).runner_on(QUEUE, "t")


async def test_closing_marks_this_replicas_workers_gone_for_the_other_replicas(
    backend: MemoryBackend, clock: Clock
) -> None:
    a, b = registry(backend, clock, "a"), registry(backend, clock, "b")
    await joined(a, session("w1", "t"), session("w2", "u"))
    await a.close()
    snapshot = await b.load()
    assert sorted(snapshot.tasks) == ["t", "u"], "still known"
    assert not snapshot.runner_on(QUEUE, "t") and not snapshot.runner_on(QUEUE, "u")
    assert all(entry.gone and entry.generation == 1 for entry in (await entries(backend)).values())


class Stuck(MemoryBackend):
    """The memory backend whose adds never return."""

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.looptime
async def test_closing_waits_for_a_stuck_write_at_most_close_seconds(clock: Clock) -> None:
    a = registry(Stuck(), clock)
    a.joined(session("w1", "t"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(a.close(), 10 * CLOSE_SECONDS)
    assert loop.time() - started == pytest.approx(CLOSE_SECONDS)


@pytest.mark.looptime
async def test_run_refreshes_every_beat(backend: MemoryBackend, clock: Clock) -> None:
    a = registry(backend, clock)
    await joined(a, session("w1", "t"))
    running = asyncio.create_task(a.run())
    await asyncio.sleep(2.5 * BEAT)  # refreshes at 0, 1 and 2 beats
    await stop_tasks(running)
    [entry] = (await entries(backend)).values()
    assert entry.generation == 3


class Blocked(MemoryBackend):
    """The memory backend whose group reads never return."""

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_read_cancelled_at_shutdown_reports_nothing_to_the_loop(clock: Clock) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        before = asyncio.all_tasks()
        a = registry(Blocked(), clock)
        waiting = asyncio.create_task(a.load())
        await asyncio.sleep(0)
        started = asyncio.all_tasks() - before
        assert waiting in started and len(started) == 2, "the caller and its read"
        for task in started:  # as asyncio.run cancels what is left when the server exits
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


# -- strict submits ------------------------------------------------------------------------------

def test_a_starmap_item_holding_an_integer_beyond_int64_is_checked_as_it_stands() -> None:
    item = task_pb2.Value(json_value=json.dumps([1, 2**64]))
    star = workflow_pb2.Map(task=task_pb2.Signature(name="f"), items=[item], star=True)
    [call] = calls_of(task_service_pb2.SubmitRequest(workflow=workflow_pb2.Workflow(map=star)), "request")
    assert list(call.signature.args) == [item]


class Monotonic:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monotonic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Monotonic]:
    """The monotonic clock the registry stamps its reads with and the submit checks read."""
    clock = Monotonic()
    fake = SimpleNamespace(monotonic=clock, time=time.time)
    monkeypatch.setattr(task_registry_module, "time", fake)
    monkeypatch.setattr(task_schemas, "time", fake)
    monkeypatch.setattr(task_schemas, "RELOAD_BEFORE_REFUSING_SECONDS", 0.5)
    yield clock


async def test_a_strict_submit_reads_the_registry_again_only_to_refuse_on_a_snapshot_older_than_the_limit(
    replicas: Replicas, monotonic: Monotonic
) -> None:
    b = replicas.b
    await b.task_registry.load()  # at 100.0, before the worker came
    replicas.a.connections.open(hello("w1"))
    await replicas.a.task_registry.written()

    def reads() -> int:
        return replicas.backend.group_reads(REGISTRY_GROUP)

    read = reads()
    unknown = "request.task: no worker has registered task 'add' (a strict submit needs one)"
    assert await refusal(b, strict(sig("add", 1, 2))) == unknown, "a fresh snapshot is not read again"
    monotonic.now = 100.5
    assert await refusal(b, strict(sig("add", 1, 2))) == unknown, "exactly the limit old: still fresh"
    assert reads() == read
    monotonic.now = 100.75
    assert await submit(b, strict(sig("add", 1, 2)))
    assert reads() == read + 1
    monotonic.now = 1_000.0
    assert await submit(b, strict(sig("add", 1, 2))), "a call that passes does not read again"
    assert reads() == read + 1


async def test_an_entry_names_the_replica_that_wrote_it(backend: MemoryBackend, clock: Clock) -> None:
    await joined(registry(backend, clock, "replica-a"), session("w1", "t"))
    [entry] = (await entries(backend)).values()
    assert entry.server_id == "replica-a"


async def test_a_worker_that_leaves_before_its_entry_is_written_was_last_seen_when_it_said_hello(
    backend: MemoryBackend, clock: Clock
) -> None:
    a = registry(backend, clock)
    await a.load()
    brief = session("w1", "t")
    a.joined(brief)  # its write is spawned, not run yet
    clock.now += 5.0
    a.left(brief)
    snapshot = await a.current()  # no read: rebuilt from what A holds
    assert snapshot.tasks["t"].listed().last_seen.seconds == int(START)
    await a.written()
