"""Time as the core reads it: through the one Clock that Core.build wires into every
component. Each test moves a ManualClock (tests/unit/clocks.py) and checks what the core did at
that time: retry due times, expiry, dispatch and start stamps, the server's time-limit backstop,
how long a submit waits for a key's holder, an eta's delay, outbox entries' age, unroutable
counts and admission's queue ages. Round clock values keep every sum exact.

On the shared memory engines of tests/unit/replicas.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.config import QueueLimit
from conveyor_server.core import connection
from conveyor_server.core.admission import admission_for
from conveyor_server.core.errors import ResourceExhausted, Unavailable
from conveyor_server.core.records import new_record
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import Loaded, TaskStore
from conveyor_server.core.task_index import TaskIndexer
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, cancels, lease_all, outcome, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_publisher_mutants import Capturing

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below

FAILURE = worker_service_pb2.OUTCOME_FAILURE


def on_clock(replicas: Replicas, manual: ManualClock) -> Core:
    """A replica over the shared memory engines that reads `manual`'s time."""
    return Core.build(replicas.a.settings, replicas.broker, replicas.backend, clock=manual.clock)


def wall_at(manual: ManualClock, later: float = 0.0) -> Timestamp:
    """The manual wall time (`later` seconds on) as a record keeps it."""
    return Timestamp(seconds=int(manual.wall + later))


async def state_of(core: Core, task_id: str) -> result_pb2.TaskResult:
    record = await core.store.get(task_id)
    assert record is not None
    return record.result


async def started(core: Core, session: WorkerSession) -> None:
    """The worker reports every attempt it holds running."""
    refs = [worker_service_pb2.LeaseRef(task_id=lease.task_id, lease_token=lease.token)
            for lease in session.leases.values()]
    await core.connections._handle(session, worker_service_pb2.ConnectRequest(
        started=worker_service_pb2.Started(tasks=refs)
    ))


async def test_a_retry_is_due_its_backoff_delay_after_the_clocks_wall_time(replicas: Replicas) -> None:
    manual = ManualClock()
    core = on_clock(replicas, manual)
    policy = task_pb2.RetryPolicy(max_attempts=3, initial=Duration(seconds=7), backoff=task_pb2.BACKOFF_KIND_FIXED)
    await submit(core, lone(task(task_id="t1", retry=policy)))
    claim = await lease_all(core)
    manual.advance(30)
    recorded = await core.connections.recorder.record([outcome(claim, "t1", FAILURE)], "w1")
    assert recorded.requeue == {"t1": 7.0}
    record = await core.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RETRY
    assert record.retry_at == wall_at(manual, 7)
    assert record.result.history[-1].at == wall_at(manual), "no finished_at from the worker: the clock's time"


async def test_a_failure_recorded_past_the_expiry_by_the_clock_ends_expired_without_a_retry(
    replicas: Replicas,
) -> None:
    manual = ManualClock()
    core = on_clock(replicas, manual)
    policy, expires = task_pb2.RetryPolicy(max_attempts=3), wall_at(manual, 100)
    await submit(core, *(lone(task(task_id=t, retry=policy, expires_at=expires)) for t in ("early", "late")))
    claim = await lease_all(core)
    assert sorted(lease.task_id for lease in claim.leases) == ["early", "late"], "not expired yet by the clock"
    manual.advance(50)
    early = await core.connections.recorder.record([outcome(claim, "early", FAILURE)], "w1")
    assert early.requeue == {"early": 1.0}, "its retry is due before the expiry"
    assert (await state_of(core, "early")).state == result_pb2.TASK_STATE_RETRY
    manual.advance(150)
    late = await core.connections.recorder.record([outcome(claim, "late", FAILURE)], "w1")
    assert late.requeue == {}, "no retry"
    result = await state_of(core, "late")
    assert (result.state, result.error.type) == (result_pb2.TASK_STATE_EXPIRED, "Expired")
    assert result.history[-1].at == wall_at(manual)


async def test_dispatch_and_the_started_report_stamp_the_clocks_time(replicas: Replicas) -> None:
    manual = ManualClock()
    core = on_clock(replicas, manual)
    await submit(core, lone(task(task_id="t1")))
    manual.advance(5)
    session = core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    assert (session.connected_at, session.last_seen) == (wall_at(manual), manual.monotonic)
    claim = await lease_all(core)
    [claimed] = claim.claimed
    assert claimed.lease.dispatched_at == wall_at(manual)
    assert claimed.assignment.lease_expires_at == wall_at(manual, core.settings.lease_seconds)
    received = (await state_of(core, "t1")).history[-1]
    assert (received.state, received.at) == (result_pb2.TASK_STATE_RECEIVED, wall_at(manual))
    await session.settle(0, claim.leases)
    manual.advance(2)
    await started(core, session)
    assert (await state_of(core, "t1")).started_at == wall_at(manual)
    assert claimed.lease.started_at == manual.monotonic, "the time limit counts from here"


async def test_a_running_attempt_is_failed_only_once_the_clock_passes_its_time_limit_and_grace(
    replicas: Replicas,
) -> None:
    manual = ManualClock()
    core = on_clock(replicas, manual)
    await submit(core, lone(task(task_id="slow", time_limit=Duration(seconds=2))))
    session = core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    claim = await lease_all(core)
    await session.settle(0, claim.leases)
    await started(core, session)
    heartbeat = worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())
    manual.advance(2 + connection.TIME_LIMIT_GRACE_SECONDS)
    await core.connections._handle(session, heartbeat)
    assert (await state_of(core, "slow")).state == result_pb2.TASK_STATE_STARTED, "exactly at the limit: not yet"
    assert cancels(sent(session)) == []
    manual.advance(0.5)
    await core.connections._handle(session, heartbeat)
    result = await state_of(core, "slow")
    assert (result.state, result.error.type) == (result_pb2.TASK_STATE_FAILURE, "TimeLimitExceeded")
    assert cancels(sent(session)) == ["slow"]


async def test_a_submit_waits_for_a_keys_holder_until_the_clock_passes_the_key_wait(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    manual = ManualClock()
    a, b = on_clock(replicas, manual), on_clock(replicas, manual)
    slow_a = asyncio.Event()
    replicas.backend.hold_after_insert("idem:", slow_a)  # A's key is in; A stalls before its records
    looks = 0
    load = b.store.load

    async def slow_look(task_ids: Sequence[str]) -> dict[str, Loaded]:
        """Each look of B for the key's holder takes 0.3 s by the clock (the wait is 0.5 s)."""
        nonlocal looks
        looks += 1
        manual.advance(0.3)
        return await load(task_ids)

    monkeypatch.setattr(b.store, "load", slow_look)

    async def b_then_a() -> None:
        await asyncio.sleep(0)  # A takes the key first
        try:
            await submit(b, lone(task("charge", idempotency_key="k")))
        finally:
            slow_a.set()

    first, second = await asyncio.gather(
        submit(a, lone(task("charge", idempotency_key="k"))), b_then_a(), return_exceptions=True
    )
    assert not isinstance(first, BaseException)
    assert isinstance(second, Unavailable)
    assert looks == 2, "gave up at the first look past the wait by the clock (real time: six looks)"


async def test_an_eta_is_held_back_by_its_distance_from_the_clocks_wall_time(replicas: Replicas) -> None:
    manual = ManualClock()
    broker = Capturing()
    await broker.connect()
    core = Core.build(replicas.a.settings, broker, replicas.backend, clock=manual.clock)
    await submit(core, lone(task(task_id="later", eta=wall_at(manual, 60))), lone(task(task_id="due",
                                                                                      eta=wall_at(manual, -5))))
    assert sorted((m.message_id, m.delay) for m in broker.handed) == [("due", 0.0), ("later", 60.0)]
    await broker.close()


async def test_outbox_entries_are_stamped_and_aged_by_the_clock(replicas: Replicas) -> None:
    manual = ManualClock()
    core = on_clock(replicas, manual)
    entry_id = await core.outbox.promise(records_pb2.OUTBOX_KIND_PUBLISH, task_ids=["t1"])
    [(found, entry)] = await core.outbox.entries(0.0, manual.wall)
    assert (found, entry.created_at) == (entry_id, wall_at(manual))
    assert await core.outbox.entries(10.0, manual.wall + 5) == [], "5 s old by the clock"
    assert [found for found, _ in await core.outbox.entries(10.0, manual.wall + 30)] == [entry_id]


def test_tasks_turned_away_stop_counting_as_unroutable_by_the_clock(replicas: Replicas) -> None:
    manual = ManualClock()
    unroutable = on_clock(replicas, manual).registry.unroutable
    unroutable.turned_away(QUEUE, "t1")
    assert unroutable.count(QUEUE) == 1
    manual.advance(60)
    assert unroutable.count(QUEUE) == 0, "not turned away again for a minute by the clock: some worker took it"


async def test_admission_measures_a_queues_wait_by_the_clock(replicas: Replicas) -> None:
    manual = ManualClock()
    backend = MemoryBackend()
    await backend.connect()
    indexer = TaskIndexer.for_backend(backend)
    stamp = Timestamp(seconds=int(manual.wall))
    await TaskStore(backend, write_hook=indexer.note).create(
        [new_record(task_pb2.Signature(id="old", name="add", queue=QUEUE), at=stamp, enqueued=True)]
    )
    await indexer.flush()
    admission = admission_for(replicas.broker, {QUEUE: QueueLimit(max_age_seconds=15)}, indexer, manual.clock)
    await admission.admit([QUEUE])
    manual.advance(20)
    with pytest.raises(ResourceExhausted, match=r"ready for 20\.0 s"):
        await admission.admit([QUEUE])
    await indexer.close()
    await backend.close()
