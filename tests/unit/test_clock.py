"""Time as the core reads it: through the one Clock that Core.build wires into every
component. Each test moves a ManualClock (tests/unit/clocks.py) and checks what the core did at
that time: retry due times, expiry, dispatch and start stamps, the server's time-limit backstop,
and how long a submit waits for a key's holder. Round clock values keep every sum exact.

On the shared memory engines of tests/unit/replicas.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.core import connection
from conveyor_server.core.errors import Unavailable
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import Loaded
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, cancels, lease_all, outcome, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task

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
