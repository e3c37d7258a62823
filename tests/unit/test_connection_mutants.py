"""A worker's stream: the edges mutation testing found unpinned (what the Welcome tells the
worker, and that a served stream's pumps hand out the tasks of every queue it named).

Driven through WorkerConnections on the memory engines; the session's outbox is what the
worker would read.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.brokers.base import Delivery
from conveyor_server.config import Settings
from conveyor_server.core import connection
from conveyor_server.core.clock import Clock
from conveyor_server.core.connection import settle
from conveyor_server.core.dispatch import REPAIR_RETRY_SECONDS, Lease
from conveyor_server.core.limits import rate_limit
from conveyor_server.core.routing import bounce_delay
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import ConflictError
from tests.support.loop_time import loop_clock, loop_now
from tests.support.processes import until
from tests.support.wait import wait_for
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_replacement import as_task
from tests.unit.test_worker_stream import handle, holding

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, object]]]:
    """What the event loop reports as unhandled during the test (it should be nothing)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    loop.set_exception_handler(previous)


async def test_the_welcome_names_the_server_its_message_limit_and_exact_intervals(replicas: Replicas) -> None:
    settings = Settings(server_id="srv-x", heartbeat_interval_seconds=5.0, lease_seconds=30.0)
    core = Core.build(settings, broker=replicas.broker, backend=replicas.backend)
    session = core.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1))
    welcome = (await session.outbox.get()).welcome  # type: ignore[union-attr]
    assert welcome.server_id == "srv-x"
    assert welcome.max_message_bytes == settings.limits.max_message_bytes
    assert welcome.heartbeat_interval == Duration(seconds=5) and welcome.lease_duration == Duration(seconds=30)


async def assigned_within(replicas: Replicas, session: WorkerSession, wanted: set[str], seconds: float) -> bool:
    """Serve `session` (its worker silent) until the tasks `wanted` were assigned to it, or
    `seconds` passed; True when they were."""
    assigned: set[str] = set()
    done = asyncio.Event()

    async def silent() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        await done.wait()
        return
        yield  # an async generator

    served = asyncio.create_task(replicas.a.connections.run(session, silent()))
    try:
        async with asyncio.timeout(seconds):
            while assigned != wanted:
                message = await session.outbox.get()
                assert message is not None
                assigned.update(a.task.id for a in message.assignments.items)
    except TimeoutError:
        return False
    finally:
        done.set()
        await asyncio.wait_for(served, 10)
    return True


async def two_queues(replicas: Replicas, window: int) -> WorkerSession:
    for queue in ("q1", "q2"):
        await submit(replicas.a, lone(task_pb2.Signature(name="noop", id=f"on-{queue}", queue=queue)))
    session = replicas.a.connections.open(
        worker_service_pb2.Hello(worker_id="w1", queues=["q1", "q2"], max_in_flight=window)
    )
    await session.outbox.get()  # the Welcome
    return session


async def test_a_served_stream_hands_out_the_tasks_of_every_queue_it_named(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(assignment_batch=2)
    session = await two_queues(replicas, window=4)  # room for both pumps' batches
    assert await assigned_within(replicas, session, {"on-q1", "on-q2"}, 10.0)


@pytest.mark.looptime  # the pump's fetch waits out its poll when the session closes
async def test_a_worker_on_two_queues_gets_the_second_queues_task_with_a_window_below_the_batch(
    replicas: Replicas,
) -> None:
    session = await two_queues(replicas, window=4)  # the default batch is 100
    # Both are ready at once; 1.5 s is more than one long-poll of the empty queue.
    assert await assigned_within(replicas, session, {"on-q1", "on-q2"}, 1.5)


async def pumping_until_handed_back(
    replicas: Replicas, session: WorkerSession, meanwhile: Callable[[], Awaitable[None]]
) -> bool:
    """Run the session's pump while `meanwhile` happens during its fetch of a ready task; True
    when the pump handed the fetched task back rather than sending it to the worker."""
    broker, nacked = replicas.broker, asyncio.Event()
    fetch, nack = broker.fetch, broker.nack

    async def fetch_then(*args: Any) -> list[Delivery]:
        deliveries = await fetch(*args)
        await meanwhile()
        return deliveries

    async def nack_and_tell(deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        await nack(deliveries, delay)
        nacked.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(broker, "fetch", fetch_then)
        patch.setattr(broker, "nack", nack_and_tell)
        pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
        await until(lambda: nacked.is_set() or not session.outbox.empty(), 10.0, "the fetched task handled")
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    return nacked.is_set() and session.outbox.empty()


@pytest.mark.parametrize("event", ["closed", "draining", "paused"])
async def test_a_task_fetched_while_the_worker_left_said_goodbye_or_its_queue_paused_goes_back(
    replicas: Replicas, event: str
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    await session.outbox.get()  # the Welcome
    happen = {"closed": session.close, "draining": session.set_draining,
              "paused": lambda: replicas.a.connections.pauses.pause(QUEUE)}[event]
    assert await pumping_until_handed_back(replicas, session, happen)


async def test_a_pump_whose_claim_and_hand_back_both_fail_keeps_fetching(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claims: list[object] = []

    async def broken(*args: object) -> None:
        claims.append(args)
        raise RuntimeError("not an outage (injected)")

    monkeypatch.setattr(replicas.a.connections.dispatcher, "claim", broken)
    monkeypatch.setattr(replicas.broker, "nack", broken)  # its lease lapses and brings the task back
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    await until(lambda: len(claims) == 2, 10.0, "the claim and the hand-back tried")
    for _ in range(20):
        await asyncio.sleep(0)
    assert not pump.done(), "the pump waits and fetches again"
    pump.cancel()
    await asyncio.gather(pump, return_exceptions=True)



@pytest.mark.looptime
async def test_a_pump_retries_a_failed_fetch_after_a_short_backoff_capped_below_a_second(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an engine is away the pump backs off from 0.1 s up to its cap: the first retry comes
    soon and none waits longer than the cap, so work resumes quickly after the engine returns."""
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    attempts: list[float] = []
    twelve = asyncio.Event()

    async def unreachable(*args: object) -> list[Delivery]:
        attempts.append(loop_now())
        if len(attempts) >= 12:
            twelve.set()
        raise ConnectionError("engine away (injected)")

    monkeypatch.setattr(replicas.broker, "fetch", unreachable)
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    # Enough attempts that a larger cap (the default backoff's 1 s) shows: on the fake clock they
    # take no real time, and the gaps are the delays the pump chose. Waited for on the loop's
    # clock (polling it would take a loop turn every few fake milliseconds).
    await asyncio.wait_for(twelve.wait(), 600.0)
    pump.cancel()
    await asyncio.gather(pump, return_exceptions=True)
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] <= connection.RETRY_FIRST_SECONDS + 0.01, f"the first retry waited {gaps[0]:.2f} s"
    cap = connection.RETRY_MAX_SECONDS
    assert max(gaps) <= cap + 0.01, f"a retry waited {max(gaps):.2f} s, past the cap of {cap} s"
    assert gaps[-1] >= cap / 2 - 0.01, "the delay grows while the engine stays away"

@pytest.mark.looptime
async def test_results_an_engine_refused_are_retried_after_a_short_backoff_capped_below_a_second(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results not yet recorded hold their slots in the worker's window: like a fetch, their retry
    never waits longer than the cap, so the worker is busy again soon after the engine returns."""
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    attempts: list[float] = []
    away = True
    twelve = asyncio.Event()

    async def handle(*args: object) -> None:
        attempts.append(loop_now())
        if len(attempts) >= 12:
            twelve.set()
        if away:
            raise ConnectionError("engine away (injected)")

    monkeypatch.setattr(replicas.a.connections, "_handle", handle)
    request = worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results())
    retrying = asyncio.create_task(replicas.a.connections._retry_results(session, request))
    try:
        await asyncio.wait_for(twelve.wait(), 600.0)  # on the loop's clock, as in the test above
        away = False
        await asyncio.wait_for(retrying, connection.RETRY_MAX_SECONDS + 0.5)
    finally:
        retrying.cancel()
        await asyncio.gather(retrying, return_exceptions=True)
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    cap = connection.RETRY_MAX_SECONDS
    assert max(gaps) <= min(cap + 0.01, 1.0), f"a retry waited {max(gaps):.2f} s (the cap: {cap} s)"
    assert gaps[-1] >= cap / 2 - 0.01, "the delay grows while the engine stays away"


# -- messages on the stream --------------------------------------------------------------------------

async def test_acks_name_the_lease_and_started_entries_the_worker(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    await handle(
        replicas,
        session,
        started=worker_service_pb2.Started(tasks=[worker_service_pb2.LeaseRef(task_id="t1", lease_token=tokens["t1"])]),
    )
    results = worker_service_pb2.Results(
        outcomes=[
            worker_service_pb2.TaskOutcome(
                task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
            )
        ]
    )
    [acks] = await handle(replicas, session, results=results)
    assert [(a.task_id, a.lease_token) for a in acks.acks.acks] == [("t1", tokens["t1"])]
    record = await replicas.a.store.get("t1")
    assert record is not None
    [started] = [h for h in record.result.history if h.state == result_pb2.TASK_STATE_STARTED]
    assert started.worker_id == "w1"


async def test_a_short_time_limit_is_enforced_in_the_workers_name_and_says_why(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "quick", time_limit=Duration(nanos=500_000_000))
    lease = session.leases[tokens["quick"]]
    lease.started_at = time.monotonic() - 0.5 - connection.TIME_LIMIT_GRACE_SECONDS - 1
    await handle(replicas, session, heartbeat=worker_service_pb2.Heartbeat())
    record = await replicas.a.store.get("quick")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_FAILURE
    assert record.result.error == result_pb2.TaskError(
        type="TimeLimitExceeded", message="the attempt ran past its time limit and the worker did not stop it"
    )
    assert record.result.history[-1].worker_id == "w1"


async def test_an_attempt_exactly_at_its_time_limit_and_grace_is_not_failed_yet(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "quick", time_limit=Duration(nanos=500_000_000))
    now = 1_000.0
    replicas.a.connections.clock = Clock(monotonic=lambda: now)
    session.leases[tokens["quick"]].started_at = now - 0.5 - connection.TIME_LIMIT_GRACE_SECONDS
    await handle(replicas, session, heartbeat=worker_service_pb2.Heartbeat())
    record = await replicas.a.store.get("quick")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RECEIVED


async def test_a_worker_silent_for_exactly_one_lease_is_not_drained_yet(replicas: Replicas) -> None:
    settings = Settings(heartbeat_interval_seconds=0.001, lease_seconds=30.0)
    core = Core.build(settings, broker=replicas.broker, backend=replicas.backend)
    session = core.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1))
    session.last_seen = 1_000.0
    draining_at_look: list[bool] = []

    def monotonic() -> float:  # the watchdog's first look is exactly one lease on, later ones a second more
        draining_at_look.append(session.draining)
        return 1_000.0 + 30.0 + (1.0 if len(draining_at_look) > 1 else 0.0)

    core.connections.clock = Clock(monotonic=monotonic)
    watchdog = asyncio.create_task(core.connections._watchdog(session))
    await until(lambda: len(draining_at_look) >= 3, 10.0, "three looks of the watchdog")
    assert draining_at_look[:3] == [False, False, True], "drained at the look after the lease, not at its exact end"
    await session.close()
    await asyncio.wait_for(watchdog, 5)


def test_a_window_of_one_stays_one_and_a_worker_without_an_id_gets_a_short_random_one(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(max_in_flight=1))
    assert session.window == 1
    assert re.fullmatch(r"worker-[0-9a-f]{12}", session.worker_id)


# -- results, rejections and receipts ----------------------------------------------------------------

async def unreceived(replicas: Replicas, *task_ids: str) -> tuple[WorkerSession, dict[str, Lease]]:
    """A session holding fresh leases on `task_ids` whose RECEIVED is not written yet."""
    await submit(replicas.a, *(lone(task(task_id=t)) for t in task_ids))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    await session.outbox.get()  # the Welcome
    dispatcher = replicas.a.connections.dispatcher
    claim = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    await session.settle(0, claim.leases)
    return session, {lease.task_id: lease for lease in claim.leases}


async def test_a_delayed_receipt_is_written_from_the_records_the_claim_read(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "RECEIVED_DELAY_SECONDS", 0.0)
    await submit(replicas.a, lone(task(task_id="t1")))
    connections = replicas.b.connections  # its store remembers nothing of t1
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claim = await connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    await session.settle(0, claim.leases)
    replicas.backend.fail_reads = 1_000  # a read now would fail: only the claim's own read serves
    await connections._record_later(session, claim)
    replicas.backend.fail_reads = 0
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RECEIVED


async def test_receipts_that_cannot_be_recorded_are_cancelled_even_when_handing_them_back_fails(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, leases = await unreceived(replicas, "t1")

    async def broken(*_: object) -> None:
        raise RuntimeError("not an outage (injected)")

    monkeypatch.setattr(replicas.a.connections.dispatcher, "record", broken)
    monkeypatch.setattr(replicas.broker, "nack", broken)  # the lease lapses and brings it back instead
    await replicas.a.connections._record_receipts(session, [leases["t1"]])
    [message] = sent(session)
    assert list(message.cancel.task_ids) == ["t1"]


async def test_the_lease_replacing_a_lost_workers_is_recorded_at_once_from_the_claims_read(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    lost = await lease_all(replicas.a, "w0")
    await settle(replicas.broker, lost.leases, {"t1": 0.0})  # its worker is lost: the message comes back
    connections = replicas.b.connections  # its store remembers nothing of t1
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claim = await connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    await session.settle(0, claim.leases)
    assert claim.replacing == claim.leases
    replicas.backend.fail_reads = 1_000  # a read now would fail: only the claim's own read serves
    await connections._send_claimed(session, claim)
    replicas.backend.fail_reads = 0
    record = await replicas.a.store.get("t1")
    assert record is not None and record.lease_token == claim.leases[0].token
    await connections.shutdown()


def success(lease: Lease) -> worker_service_pb2.Results:
    done = worker_service_pb2.TaskOutcome(
        task_id=lease.task_id, lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    return worker_service_pb2.Results(outcomes=[done])


def acked(session: WorkerSession) -> dict[str, int]:
    statuses: dict[str, int] = {}
    session.send_acks()
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None:
            statuses.update((a.task_id, a.status) for a in message.acks.acks)
    return statuses


async def test_a_result_waits_for_the_received_write_of_its_lease_in_flight(replicas: Replicas) -> None:
    session, leases = await unreceived(replicas, "t1")
    lease = leases["t1"]
    lease.receipt_pending = False  # its RECEIVED write has begun, in the background
    reporting = asyncio.create_task(replicas.a.connections._results(session, success(lease)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not reporting.done(), "the result waits for the RECEIVED write"
    await replicas.a.connections.dispatcher.record([lease], "w1")
    lease.recorded.set_result(None)
    await asyncio.wait_for(reporting, 5)
    assert acked(session) == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}


async def test_a_result_written_with_its_receipt_is_written_with_it_again_after_a_failed_write(
    replicas: Replicas,
) -> None:
    session, leases = await unreceived(replicas, "t1")
    replicas.backend.lose_cas = 10_000  # every conditional write loses
    with pytest.raises(ConflictError):
        await replicas.a.connections._results(session, success(leases["t1"]))
    replicas.backend.lose_cas = 0
    await replicas.a.connections._results(session, success(leases["t1"]))  # the worker's retry
    assert acked(session) == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}


async def test_a_result_with_an_unknown_lease_does_not_keep_the_next_ones_receipt_back(replicas: Replicas) -> None:
    session, leases = await unreceived(replicas, "t1")
    unknown = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token="not-a-lease", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    results = worker_service_pb2.Results(outcomes=[unknown, *success(leases["t1"]).outcomes])
    await replicas.a.connections._results(session, results)
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_rejection_before_the_received_write_still_hands_the_task_back(replicas: Replicas) -> None:
    session, leases = await unreceived(replicas, "t1")
    rejected = worker_service_pb2.RejectedTask(
        task_id="t1", lease_token=leases["t1"].token, reason="no task named noop"
    )
    await replicas.a.connections._handle(
        session, worker_service_pb2.ConnectRequest(reject=worker_service_pb2.Reject(tasks=[rejected]))
    )
    record = await replicas.a.store.get("t1")
    assert record is not None and record.rejects == 1 and not record.lease_token


# -- leaving and stopping ------------------------------------------------------------------------------

def pending_tasks(*names: str) -> list[asyncio.Task[object]]:
    return [
        t for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "").rpartition(".")[2] in names
    ]


async def test_a_stopping_server_leaves_the_leases_of_a_worker_that_left_in_flight_and_nothing_running(
    replicas: Replicas, loop_errors: list[dict[str, object]],
) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(stream_grace_seconds=3600.0)
    session, _ = await holding(replicas, "t1", "t2")

    async def nothing() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        return
        yield  # an async generator

    await connections.run(session, nothing())  # the worker left: its leases wait out the grace
    assert not pending_tasks("_pump", "_watchdog"), "leaving ends the session's pumps and watchdog"
    assert pending_tasks("_requeue_after_grace")
    await connections.shutdown()
    assert not pending_tasks("_requeue_after_grace")
    stats = await replicas.broker.stats(QUEUE)
    # Left to the worker's results (reported to another replica) or to the leases' expiry.
    assert (stats.ready, stats.in_flight) == (0, 2), "handed back by the stopping server"
    await asyncio.sleep(0)  # done-callbacks run
    assert loop_errors == []


@pytest.mark.parametrize("reports_first", [0, 1], ids=["silent-from-the-start", "silent-after-a-heartbeat"])
async def test_a_served_worker_that_falls_silent_for_a_lease_is_drained(replicas: Replicas, reports_first: int) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(heartbeat_interval_seconds=0.01, lease_seconds=0.05)
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    done = asyncio.Event()

    async def silent() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        for _ in range(reports_first):  # handled, then silence: the watchdog counts it again
            yield worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())
        await done.wait()

    served = asyncio.create_task(connections.run(session, silent()))
    try:
        await until(lambda: session.draining, 10.0, "the silent worker drained")
    finally:
        done.set()
        await asyncio.wait_for(served, 10)


@pytest.mark.looptime
async def test_a_worker_is_not_drained_while_the_server_is_slow_to_handle_its_report(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An engine outage holds one report for longer than a lease; the reports behind it wait in the stream.
    connections = replicas.a.connections
    connections.clock = loop_clock()  # the watchdog measures silence on the loop's fake time
    connections.settings = connections.settings.replace(heartbeat_interval_seconds=0.01, lease_seconds=0.05)
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    draining_after: list[bool] = []

    async def slow_engine(_: object, __: worker_service_pb2.ConnectRequest) -> None:
        await asyncio.sleep(0.3)
        draining_after.append(session.draining)

    monkeypatch.setattr(connections, "_handle_through_outages", slow_engine)

    async def reports() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        yield worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())

    await asyncio.wait_for(connections.run(session, reports()), 10)
    assert draining_after == [False]


async def test_a_result_resent_on_a_new_session_under_the_old_sessions_unwritten_lease_is_taken(
    replicas: Replicas,
) -> None:
    session, leases = await unreceived(replicas, "t1")
    replicas.a.registry.remove(session)  # the stream broke; the worker reconnects
    again = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    await again.outbox.get()  # the Welcome
    await replicas.a.connections._results(again, success(leases["t1"]))
    assert acked(again) == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}


async def test_settling_hands_a_retry_back_with_its_delay(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    await settle(replicas.broker, claim.leases, {"t1": 60.0})
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed) == (0, 1)


async def pumped(replicas: Replicas, session: WorkerSession) -> worker_service_pb2.ConnectResponse | None:
    """Run one pump of `session` on QUEUE until it sent something (None if it did not within 2 s)."""
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    try:
        return await asyncio.wait_for(session.outbox.get(), 2.0)
    except TimeoutError:
        return None
    finally:
        await session.close()
        await asyncio.wait_for(pump, 5)


@pytest.mark.looptime  # the pump's fetch waits out its poll when the session closes
async def test_a_pump_acks_the_message_of_a_task_that_ended_meanwhile(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await replicas.a.canceller.cancel("t1")  # its message is still queued
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=2))
    await session.outbox.get()  # the Welcome

    async def acked() -> bool:
        stats = await replicas.broker.stats(QUEUE)
        return (stats.ready, stats.in_flight) == (0, 0)

    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    try:
        await wait_for(acked, 5.0, "the ended task's message acked")
        assert session.outbox.empty(), "nothing to run"
    finally:
        await session.close()
        await asyncio.wait_for(pump, 5)


@pytest.mark.looptime  # the pump's fetch waits out its poll when the session closes
async def test_a_pump_that_takes_over_a_lost_workers_task_records_the_new_lease_at_once(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    first = await lease_all(replicas.a)  # RECEIVED by a worker that is then lost
    await replicas.broker.nack([first.leases[0].delivery], 0.0)  # its message comes back
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w2", queues=[QUEUE], max_in_flight=2))
    await session.outbox.get()  # the Welcome
    message = await pumped(replicas, session)
    assert message is not None
    [assignment] = message.assignments.items
    record = await replicas.a.store.get("t1")
    assert record is not None and record.lease_token == assignment.lease_token, "the lost worker's lease is stale now"


@pytest.mark.looptime  # each fetch of the empty queue waits FETCH_WAIT_SECONDS: none on the fake clock
@pytest.mark.parametrize(("window", "queues", "share"), [(3, 1, 3), (1, 1, 1), (5, 2, 2)])
async def test_a_pump_asks_for_a_batch_first_and_only_its_share_of_the_window_while_its_queue_is_empty(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch, window: int, queues: int, share: int
) -> None:
    names = [QUEUE, "other"][:queues]
    session = replicas.a.connections.open(
        worker_service_pb2.Hello(worker_id="w1", queues=names, max_in_flight=window)
    )
    asked: list[int] = []
    three = asyncio.Event()
    reserve = session.reserve

    async def recorded(most: int) -> int:
        asked.append(most)
        if len(asked) >= 3:
            three.set()
        return await reserve(most)

    monkeypatch.setattr(session, "reserve", recorded)
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    try:
        await asyncio.wait_for(three.wait(), 600.0)  # on the loop's clock: polling takes a turn per fake ms
    finally:
        await session.close()
        await asyncio.wait_for(pump, 5)
    assert asked[:3] == [replicas.a.connections.settings.assignment_batch, share, share]


async def test_a_worker_whose_token_is_limited_to_its_queues_may_not_replace_a_task_with_tasks_for_others(
    replicas: Replicas,
) -> None:
    """The session's queue scope reaches the check of the replacements its results carry."""
    await submit(replicas.a, lone(task(task_id="t1")))
    hello = worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10)
    session = replicas.a.connections.open(hello, allowed_queues=[QUEUE])
    claim = await lease_all(replicas.a)
    await session.settle(0, claim.leases)
    sent(session)  # the Welcome
    [lease] = claim.leases
    billing = task_pb2.Signature(name="noop", queue="billing")
    outcome = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_REPLACED, replacement=as_task(billing)
    )
    await handle(replicas, session, results=worker_service_pb2.Results(outcomes=[outcome]))
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_FAILURE
    assert record.result.error.type == "InvalidReplacement" and "['billing']" in record.result.error.message


# -- tasks handed back or ended unsent ---------------------------------------------------------------

def recording_nacks(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], float]]:
    """Every hand-back to the broker from now on: (message ids, delay), in order."""
    nacks: list[tuple[list[str], float]] = []
    nack = replicas.broker.nack

    async def recorded(deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        nacks.append(([d.message_id for d in deliveries], delay))
        await nack(deliveries, delay)

    monkeypatch.setattr(replicas.broker, "nack", recorded)
    return nacks


async def fetched(replicas: Replicas, task_id: str) -> dict[str, tuple[str, Delivery]]:
    """`task_id` submitted and its message fetched, as dispatch hands tasks to end unsent."""
    await submit(replicas.a, lone(task(task_id=task_id)))
    [delivery] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    return {task_id: ("", delivery)}


async def failing_end(_: object) -> None:
    raise ConnectionError("backend away (injected)")


async def test_tasks_whose_expiry_cannot_be_recorded_go_back_to_be_tried_again_after_the_repair_delay(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired = await fetched(replicas, "t1")
    monkeypatch.setattr(replicas.a.connections.recorder, "expire", failing_end)
    nacks = recording_nacks(replicas, monkeypatch)
    await replicas.a.connections._expire(expired)
    # As imported at startup (the quick_repairs fixture shortens only dispatch's own retries).
    assert nacks == [([expired["t1"][1].message_id], REPAIR_RETRY_SECONDS)]
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.in_flight, stats.ready, stats.delayed) == (0, 0, 1), "waits the repair delay, then comes back"


async def test_an_expiry_that_cannot_be_recorded_nor_handed_back_does_not_end_the_pump(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired = await fetched(replicas, "t1")
    monkeypatch.setattr(replicas.a.connections.recorder, "expire", failing_end)

    async def broken(*_: object) -> None:
        raise RuntimeError("not an outage (injected)")

    monkeypatch.setattr(replicas.broker, "nack", broken)  # its lease lapses and brings it back instead
    await replicas.a.connections._expire(expired)  # raises nothing
    stats = await replicas.broker.stats(QUEUE)
    assert stats.in_flight == 1


async def oversized_claim(replicas: Replicas) -> tuple[WorkerSession, Any]:
    """A session of a worker receiving at most 64 KiB, and a claim of "lost" (a small task whose
    first worker was lost) and "huge" (too large for this worker)."""
    await submit(replicas.a, lone(task(task_id="lost")))
    lost = await lease_all(replicas.a, "w0")
    await settle(replicas.broker, lost.leases, {"lost": 0.0})  # its worker is lost: the message comes back
    await submit(replicas.a, lone(task(task_id="huge", args=[task_pb2.Value(bytes_value=b"x" * 100_000)])))
    connections = replicas.a.connections
    session = connections.open(
        worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10, max_receive_bytes=64 * 1024)
    )
    sent(session)  # the Welcome
    claim = await connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    await session.settle(0, claim.leases)
    assert sorted(lease.task_id for lease in claim.replacing) == ["lost"]
    return session, claim


async def test_a_task_too_large_for_the_worker_goes_back_after_a_second_and_is_never_received_by_it(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, claim = await oversized_claim(replicas)
    nacks = recording_nacks(replicas, monkeypatch)
    connections = replicas.a.connections
    await connections._send_claimed(session, claim)
    [huge] = [lease for lease in claim.leases if lease.task_id == "huge"]
    assert nacks == [([huge.delivery.message_id], connection.OVERSIZED_RETRY_SECONDS)]
    # The receipts written a moment after dispatch.
    await asyncio.wait_for(asyncio.gather(*connections._background), 5)
    record = await replicas.a.store.get("huge")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_PENDING and not record.lease_token
    await connections.shutdown()


async def test_the_lease_replacing_a_lost_workers_is_recorded_at_once_beside_a_task_too_large_for_the_worker(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "RECEIVED_DELAY_SECONDS", 3600.0)  # only what is written at once
    session, claim = await oversized_claim(replicas)
    connections = replicas.a.connections
    await connections._send_claimed(session, claim)
    [lost] = [lease for lease in claim.leases if lease.task_id == "lost"]
    record = await replicas.a.store.get("lost")
    assert record is not None and record.lease_token == lost.token, "the lost worker's lease is stale now"
    huge = await replicas.a.store.get("huge")
    assert huge is not None and not huge.lease_token
    await connections.shutdown()


@pytest.mark.parametrize("pick", [0.0, 1.0, 0.3456], ids=["lowest", "highest", "between"])
async def test_a_task_no_worker_here_can_run_comes_back_after_its_bounce_delay_jittered_by_half_in_milliseconds(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch, pick: float
) -> None:
    """The jitter draws a factor between 0.5 and 1.5 (`pick` of the way); the delay is whole ms."""
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1")))
    connections = replicas.a.connections
    session = connections.open(worker_service_pb2.Hello(worker_id="py", queues=[QUEUE], max_in_flight=10,
                                                        task_names=["py.add"]))
    claim = await connections.dispatcher.claim(
        await replicas.broker.fetch(QUEUE, 10, 30.0), "py", time.monotonic(), session.can_run
    )
    [(delivery, _)] = claim.elsewhere
    monkeypatch.setattr(random, "uniform", lambda low, high: low + pick * (high - low))
    nacks = recording_nacks(replicas, monkeypatch)
    await connections._pass_on(QUEUE, claim.elsewhere)
    expected = round(bounce_delay(delivery.delivery_count) * (0.5 + pick), 3)
    assert nacks == [([delivery.message_id], expected)]
    assert expected * 1000 == round(expected * 1000)


async def test_a_task_failed_unroutable_is_not_also_handed_back(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(name="node.mul", task_id="n1", routing_timeout=Duration(seconds=0))))
    connections = replicas.a.connections
    session = connections.open(worker_service_pb2.Hello(worker_id="py", queues=[QUEUE], max_in_flight=10,
                                                        task_names=["py.add"]))
    claim = await connections.dispatcher.claim(
        await replicas.broker.fetch(QUEUE, 10, 30.0), "py", time.monotonic(), session.can_run
    )
    await connections._pass_on(QUEUE, claim.elsewhere)
    record = await replicas.a.store.get("n1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_FAILURE
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.in_flight, stats.ready, stats.delayed) == (0, 0, 0), "its message is settled, and gone"


# -- reports during an outage, pauses, heartbeats ------------------------------------------------------

@pytest.mark.looptime
async def test_a_heartbeat_an_engine_refused_is_skipped_not_retried(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = replicas.a.connections
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    handled: list[str] = []

    async def unreachable(_: WorkerSession, request: worker_service_pb2.ConnectRequest) -> None:
        handled.append(str(request.WhichOneof("message")))
        raise ConnectionError("engine away (injected)")

    monkeypatch.setattr(connections, "_handle", unreachable)
    request = worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())
    await connections._handle_through_outages(session, request)
    await asyncio.sleep(10 * connection.RETRY_MAX_SECONDS)  # on the loop's fake clock
    assert handled == ["heartbeat"], "the next heartbeat comes anyway"
    await session.close()
    await connections.shutdown()


@pytest.mark.looptime  # a paused pump waits for a change a refresh at a time: none on the fake clock
async def test_a_pump_of_a_paused_queue_fetches_nothing_until_the_queue_resumes(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    connections = replicas.a.connections
    await connections.pauses.pause(QUEUE)
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    sent(session)  # the Welcome
    fetched = asyncio.Event()
    fetch = replicas.broker.fetch

    async def told(*args: Any) -> list[Delivery]:
        fetched.set()
        return await fetch(*args)

    monkeypatch.setattr(replicas.broker, "fetch", told)
    pump = asyncio.create_task(connections._pump(session, QUEUE))
    try:
        with pytest.raises(TimeoutError):  # ten seconds on the loop's fake clock
            await asyncio.wait_for(fetched.wait(), 10.0)
        assert session.outbox.empty()
        await connections.pauses.resume(QUEUE)
        message = await asyncio.wait_for(session.outbox.get(), 10.0)
        assert message is not None and [a.task.id for a in message.assignments.items] == ["t1"]
    finally:
        await session.close()
        await asyncio.wait_for(pump, 5)
        await connections.shutdown()


async def test_a_heartbeat_stamps_the_lease_live_at_the_servers_wall_time(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    wall = float(int(time.time()) + 3600)
    replicas.a.connections.clock = Clock(wall=lambda: wall)
    await handle(replicas, session, heartbeat=worker_service_pb2.Heartbeat())
    record = await replicas.a.store.get("t1")
    assert record is not None and record.lease_token == tokens["t1"]
    assert record.lease_renewed_at.seconds == int(wall)


async def test_a_lease_being_reported_on_expires_a_lease_after_the_report_arrived(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, _ = await holding(replicas, "t1")
    manual = ManualClock(wall=float(int(time.time()) + 3600))  # later than the record's RECEIVED
    connections = replicas.a.connections
    connections.clock = replicas.a.admin.inspector.clock = manual.clock
    connections.settings = connections.settings.replace(stream_grace_seconds=3600.0)
    expiries: list[float] = []

    async def slow_engine(_: WorkerSession, __: worker_service_pb2.ConnectRequest) -> None:
        manual.advance(3.0)  # the report takes a while to handle
        inspected = await replicas.a.admin.inspection("t1")  # what InspectTask answers
        expiries.append(inspected.lease_expires_at.seconds + inspected.lease_expires_at.nanos / 1e9)

    monkeypatch.setattr(connections, "_handle_through_outages", slow_engine)

    async def reports() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        manual.advance(7.0)  # the worker reports a while after the lease began
        yield worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())

    arrived = manual.wall + 7.0
    await asyncio.wait_for(connections.run(session, reports()), 10)
    assert expiries == [arrived + connections.settings.lease_seconds]
    await connections.shutdown()


@pytest.mark.looptime  # the pump's fetch waits out its poll when the session closes
async def test_a_pump_sends_what_a_rate_limit_admits_and_hands_the_rest_back_to_wait_for_its_turn(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await replicas.a.admin.set_rate_limit(rate_limit("noop", "1/h", burst=1))
    await submit(replicas.a, lone(task(task_id="t1")), lone(task(task_id="t2")))
    connections = replicas.a.connections
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    sent(session)  # the Welcome
    nacks = recording_nacks(replicas, monkeypatch)
    pump = asyncio.create_task(connections._pump(session, QUEUE))
    try:
        await until(lambda: nacks or pump.done(), 10.0, "the limited task handed back")
        assert not pump.done(), "the pump goes on"
        [message] = sent(session)
        [(handed_back, delay)] = nacks
        assert [a.task.id for a in message.assignments.items] + handed_back == ["t1", "t2"] and delay > 0
    finally:
        await session.close()
        await asyncio.wait_for(pump, 5)
        await connections.shutdown()
