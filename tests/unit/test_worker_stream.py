"""One worker's stream without gRPC: what the server does with each message a worker sends
(results, started, progress, reject, credit, goodbye, a second hello), its window, its time
limits, and what happens to its leases when it leaves. Driven through WorkerConnections on the
memory engines; the session's outbox is what the worker would read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.core import connection, outcomes, routing
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.sessions import SessionRegistry, WorkerSession
from tests.support.wait import wait_for
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def holding(replicas: Replicas, *task_ids: str, **fields: object) -> tuple[WorkerSession, dict[str, str]]:
    """A session on replica A holding leases on `task_ids` (RECEIVED written); token by task id."""
    await submit(replicas.a, *(lone(task(task_id=t, **fields)) for t in task_ids))  # type: ignore[arg-type]
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claim = await lease_all(replicas.a)
    await session.settle(0, claim.leases)
    sent(session)  # the Welcome
    return session, {lease.task_id: lease.token for lease in claim.leases}


async def handle(
    replicas: Replicas, session: WorkerSession, **message: object
) -> list[worker_service_pb2.ConnectResponse]:
    await replicas.a.connections._handle(session, worker_service_pb2.ConnectRequest(**message))  # type: ignore[arg-type]
    return sent(session)


async def state(replicas: Replicas, task_id: str) -> str:
    record = await replicas.a.store.get(task_id)
    assert record is not None
    return result_pb2.TaskState.Name(record.result.state)


# -- opening a session --------------------------------------------------------------------------


def test_a_hello_opens_a_session_and_is_welcomed(replicas: Replicas) -> None:
    connections = replicas.a.connections
    session = connections.open(worker_service_pb2.Hello(queues=["q1", "q1", "q2"], max_in_flight=3))
    assert session.worker_id.startswith("worker-") and session.queues == ["q1", "q2"] and session.window == 3
    assert replicas.a.registry.sessions == {id(session): session}
    [welcome] = sent(session)
    assert welcome.welcome.worker_id == session.worker_id
    assert welcome.welcome.heartbeat_interval.ToTimedelta().total_seconds() == 5.0
    assert welcome.welcome.lease_duration.ToTimedelta().total_seconds() == 30.0
    assert connections.open(worker_service_pb2.Hello(worker_id="w2", max_in_flight=1)).queues == ["default"]


@pytest.mark.parametrize("hello", [
    worker_service_pb2.Hello(max_in_flight=0),
    worker_service_pb2.Hello(max_in_flight=1, queues=[""]),
    worker_service_pb2.Hello(max_in_flight=1, queues=["q" * 65]),
])
def test_a_hello_without_a_window_or_with_a_bad_queue_is_refused(
    replicas: Replicas, hello: worker_service_pb2.Hello
) -> None:
    with pytest.raises(InvalidArgument):
        replicas.a.connections.open(hello)
    assert not replicas.a.registry.sessions


def test_a_queue_name_of_64_characters_is_fine(replicas: Replicas) -> None:
    assert replicas.a.connections.open(worker_service_pb2.Hello(max_in_flight=1, queues=["q" * 64])).queues == [
        "q" * 64
    ]


# -- messages on the stream ----------------------------------------------------------------------


async def test_results_are_recorded_acked_and_their_messages_acked(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1", "t2")
    results = worker_service_pb2.Results(
        outcomes=[
            worker_service_pb2.TaskOutcome(
                task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
            ),
            worker_service_pb2.TaskOutcome(
                task_id="t2", lease_token="not-the-lease", outcome=worker_service_pb2.OUTCOME_SUCCESS
            ),
        ]
    )
    [acks] = await handle(replicas, session, results=results)
    assert {a.task_id: a.status for a in acks.acks.acks} == {
        "t1": worker_service_pb2.ACK_STATUS_ACCEPTED, "t2": worker_service_pb2.ACK_STATUS_STALE_LEASE,
    }
    assert await state(replicas, "t1") == "TASK_STATE_SUCCESS"
    assert [lease.task_id for lease in session.leases.values()] == ["t2"]
    assert (await replicas.broker.stats(QUEUE)).in_flight == 1, "t1's message is acked; t2's is still held"


async def test_a_result_before_the_received_write_brings_it_along(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    await session.settle(0, claim.leases)
    [lease] = claim.leases
    assert lease.receipt_pending
    result = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    await handle(replicas, session, results=worker_service_pb2.Results(outcomes=[result]))
    record = await replicas.a.store.get("t1")
    assert record is not None
    assert [result_pb2.TaskState.Name(h.state) for h in record.result.history] == [
        "TASK_STATE_PENDING", "TASK_STATE_RECEIVED", "TASK_STATE_SUCCESS",
    ]
    assert lease.recorded.done() and not lease.receipt_pending


async def test_a_result_for_a_task_already_done_sends_its_message_back_for_repair(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    await replicas.b.canceller.cancel("t1")
    result = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    [acks] = await handle(replicas, session, results=worker_service_pb2.Results(outcomes=[result]))
    assert [a.status for a in acks.acks.acks] == [worker_service_pb2.ACK_STATUS_ALREADY_DONE]
    assert (await replicas.broker.stats(QUEUE)).ready == 1, "handed back at once; dispatch drops it"


async def test_a_result_under_a_lease_of_the_workers_closed_session_is_taken(replicas: Replicas) -> None:
    old, tokens = await holding(replicas, "t1")
    replicas.a.registry.remove(old)  # the stream dropped: its leases wait out the grace
    new = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    sent(new)
    result = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    [acks] = await handle(replicas, new, results=worker_service_pb2.Results(outcomes=[result]))
    assert [a.status for a in acks.acks.acks] == [worker_service_pb2.ACK_STATUS_ACCEPTED]
    assert replicas.a.registry.take_all_orphans() == [], "the orphan was resolved"
    assert (await replicas.broker.stats(QUEUE)).in_flight == 0


async def test_started_marks_the_task_started_and_starts_its_clock(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1", "t2")
    started = worker_service_pb2.Started(tasks=[worker_service_pb2.LeaseRef(task_id="t1", lease_token=tokens["t1"]),
                               worker_service_pb2.LeaseRef(task_id="t2", lease_token="stale")])
    assert await handle(replicas, session, started=started) == []
    assert await state(replicas, "t1") == "TASK_STATE_STARTED"
    assert await state(replicas, "t2") == "TASK_STATE_RECEIVED"
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.started_at.seconds > 0 and record.result.worker_id == "w1"
    lease = session.leases[tokens["t1"]]
    assert lease.started_at is not None
    first = lease.started_at
    await handle(
        replicas,
        session,
        started=worker_service_pb2.Started(tasks=[worker_service_pb2.LeaseRef(task_id="t1", lease_token=tokens["t1"])]),
    )
    assert lease.started_at == first, "the clock starts once"
    assert await state(replicas, "t1") == "TASK_STATE_STARTED"


async def test_progress_is_stored_under_the_live_lease_only(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1", "t2")
    progress = worker_service_pb2.Progress(items=[
        worker_service_pb2.ProgressItem(task_id="t1", lease_token=tokens["t1"], progress=task_pb2.Value(int_value=50)),
        worker_service_pb2.ProgressItem(task_id="t2", lease_token="stale", progress=task_pb2.Value(int_value=99)),
    ])
    await handle(replicas, session, progress=progress)
    loaded = await replicas.a.store.load(["t1", "t2"])
    assert loaded["t1"].record.result.progress.int_value == 50
    assert not loaded["t2"].record.result.HasField("progress")


async def test_a_rejected_task_goes_back_to_its_queue_for_another_worker(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1", "t2")
    reject = worker_service_pb2.Reject(
        tasks=[
            worker_service_pb2.RejectedTask(task_id="t1", lease_token=tokens["t1"], reason="no task named noop"),
            worker_service_pb2.RejectedTask(task_id="t2", lease_token="stale", reason="x"),
        ]
    )
    await handle(replicas, session, reject=reject)
    record = await replicas.a.store.get("t1")
    assert record is not None and result_pb2.TaskState.Name(record.result.state) == "TASK_STATE_RECEIVED"
    assert not record.lease_token and record.rejects == 1
    assert record.deliveries == 0, "a rejected delivery ran nothing: it is not counted"
    assert await state(replicas, "t2") == "TASK_STATE_RECEIVED"
    assert [lease.task_id for lease in session.leases.values()] == ["t2"]
    stats = await replicas.broker.stats(QUEUE)
    assert stats.in_flight == 1 and stats.ready + stats.delayed == 1
    # Another worker takes it (after a short delay); a new lease, counted as its first delivery.
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0, wait_seconds=5.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w2", time.monotonic())
    await replicas.a.connections.dispatcher.record(claim.leases, "w2", claim.read)
    assert [lease.task_id for lease in claim.leases] == ["t1"]
    record = await replicas.a.store.get("t1")
    assert record is not None and record.deliveries == 1 and record.lease_token == claim.leases[0].token


async def test_a_task_rejected_again_and_again_fails_as_unknown(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each rejection hands the task back after bounce_delay (0.05 s doubled per rejection: 0.75 s
    # of real waiting for the broker's fetch below); here it is back at once.
    monkeypatch.setattr(routing, "BOUNCE_FIRST_SECONDS", 0.0)
    await submit(replicas.a, lone(task(task_id="t1")))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    for rejection in range(1, outcomes.MAX_REJECTS + 1):
        deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0, wait_seconds=10.0)
        claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
        await replicas.a.connections.dispatcher.record(claim.leases, "w1", claim.read)
        await session.settle(0, claim.leases)
        token = claim.leases[0].token
        await handle(replicas, session, reject=worker_service_pb2.Reject(tasks=[
            worker_service_pb2.RejectedTask(task_id="t1", lease_token=token, reason="no task named noop")
        ]))
        rejected = await replicas.a.store.get("t1")
        assert rejected is not None and rejected.rejects == rejection
    record = await replicas.a.store.get("t1")
    assert record is not None and result_pb2.TaskState.Name(record.result.state) == "TASK_STATE_FAILURE"
    assert record.result.error.type == "UnknownTask"
    assert record.result.error.message == f"no task named noop (worker w1; rejected {outcomes.MAX_REJECTS} times)"
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 0)


async def test_credit_resizes_the_window_and_goodbye_drains(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=2))
    await handle(replicas, session, credit=worker_service_pb2.Credit(max_in_flight=7))
    assert session.window == 7 and session.free() == 7
    await handle(replicas, session, credit=worker_service_pb2.Credit(max_in_flight=0))
    assert session.window == 1
    assert not session.draining
    await handle(replicas, session, goodbye=worker_service_pb2.Goodbye())
    assert session.draining


async def test_a_second_hello_is_refused(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=2))
    with pytest.raises(InvalidArgument, match="only once"):
        await handle(replicas, session, hello=worker_service_pb2.Hello(max_in_flight=1))


# -- engine outages -------------------------------------------------------------------------------


async def test_results_are_retried_through_an_outage_and_other_reports_skipped(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "RETRY_FIRST_SECONDS", 0.0)
    session, tokens = await holding(replicas, "t1")
    connections = replicas.a.connections
    replicas.a.store._recent.clear()  # the report must read the record, and that read fails
    replicas.backend.fail_reads = 1
    started = worker_service_pb2.ConnectRequest(
        started=worker_service_pb2.Started(tasks=[worker_service_pb2.LeaseRef(task_id="t1", lease_token=tokens["t1"])])
    )
    await connections._handle_through_outages(session, started)  # skipped, not raised
    assert await state(replicas, "t1") == "TASK_STATE_RECEIVED"

    replicas.a.store._recent.clear()
    replicas.backend.fail_reads = 10**9  # down until the engine comes back below
    result = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    # The stream is not held up by the retries: the call returns, and a heartbeat that comes
    # meanwhile is handled (it extends the leases, so they do not lapse during an outage).
    await connections._handle_through_outages(
        session, worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=[result]))
    )
    extended: list[int] = []
    monkeypatch.setattr(replicas.broker, "extend", lambda deliveries, seconds: _count(extended, deliveries))
    await connections._handle_through_outages(
        session, worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())
    )
    assert extended == [1], "the heartbeat was handled while the results waited"
    assert await state_now(replicas, "t1") == "TASK_STATE_RECEIVED"
    replicas.backend.fail_reads = 0  # the engine is back

    async def recorded() -> bool:
        return await state(replicas, "t1") == "TASK_STATE_SUCCESS"

    await wait_for(recorded, 10, "the results recorded once the engine answers")
    assert [a.status for m in sent(session) for a in m.acks.acks] == [worker_service_pb2.ACK_STATUS_ACCEPTED]


async def state_now(replicas: Replicas, task_id: str) -> str:
    """The record's state, read while the backend's reads still fail for everyone else."""
    failing, replicas.backend.fail_reads = replicas.backend.fail_reads, 0
    try:
        return await state(replicas, task_id)
    finally:
        replicas.backend.fail_reads = failing


async def _count(extended: list[int], deliveries: Sequence[object]) -> None:
    extended.append(len(deliveries))


async def test_a_bug_is_not_mistaken_for_an_outage(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=2))

    async def broken(refs: object, worker_id: str) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(replicas.a.connections.recorder, "started", broken)
    with pytest.raises(KeyError):
        await replicas.a.connections._handle_through_outages(
            session, worker_service_pb2.ConnectRequest(started=worker_service_pb2.Started())
        )


async def test_a_heartbeat_whose_engine_is_away_fails_quietly_for_the_caller_to_skip(replicas: Replicas) -> None:
    session, _ = await holding(replicas, "t1")
    replicas.backend.fail_reads = 1
    await replicas.a.connections._handle_through_outages(
        session, worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())
    )
    assert sent(session) == []


# -- time limits ---------------------------------------------------------------------------------


async def test_an_attempt_past_its_time_limit_is_failed_and_the_worker_told_to_stop(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "slow", "fresh", "unstarted", time_limit=Duration(seconds=10))
    now = time.monotonic()
    session.leases[tokens["slow"]].started_at = now - 10 - connection.TIME_LIMIT_GRACE_SECONDS - 1
    session.leases[tokens["fresh"]].started_at = now - 10  # within the grace
    messages = await handle(replicas, session, heartbeat=worker_service_pb2.Heartbeat())
    assert [m.cancel.task_ids for m in messages if m.WhichOneof("message") == "cancel"] == [["slow"]]
    record = await replicas.a.store.get("slow")
    assert record is not None and record.result.error.type == "TimeLimitExceeded"
    assert result_pb2.TaskState.Name(record.result.state) == "TASK_STATE_FAILURE"
    assert await state(replicas, "fresh") == "TASK_STATE_RECEIVED"
    assert await state(replicas, "unstarted") == "TASK_STATE_RECEIVED", "the clock starts at Started"
    assert sorted(lease.task_id for lease in session.leases.values()) == ["fresh", "unstarted"]


async def test_a_task_without_a_time_limit_runs_as_long_as_it_takes(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    session.leases[tokens["t1"]].started_at = time.monotonic() - 10_000
    assert await handle(replicas, session, heartbeat=worker_service_pb2.Heartbeat()) == []
    assert await state(replicas, "t1") == "TASK_STATE_RECEIVED"


# -- leaving ---------------------------------------------------------------------------------------


async def no_more() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
    for _ in ():
        yield worker_service_pb2.ConnectRequest()


async def test_a_worker_that_leaves_gets_its_tasks_requeued_after_the_grace(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(stream_grace_seconds=0.0)
    session, _ = await holding(replicas, "t1")
    await connections.run(session, no_more())
    assert session.closed and id(session) not in replicas.a.registry.sessions
    for _ in range(100):
        if (await replicas.broker.stats(QUEUE)).ready:
            break
        await asyncio.sleep(0)
    assert (await replicas.broker.stats(QUEUE)).ready == 1, "t1 is back in its queue"


async def test_a_stopping_server_leaves_its_workers_leases_to_their_results_or_their_expiry(
    replicas: Replicas
) -> None:
    session, _ = await holding(replicas, "t1", "t2")
    replicas.a.registry.remove(session)
    await replicas.a.connections.shutdown()
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (0, 2), "the workers still run them: not handed out again"
    assert replicas.a.registry.take_all_orphans() == []


async def test_a_cancel_reaches_the_sessions_holding_the_task(replicas: Replicas) -> None:
    session, _ = await holding(replicas, "t1", "t2")
    other = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w2", max_in_flight=1))
    sent(other)
    await replicas.a.connections.cancel_running(["t2", "t9"])
    assert [m.cancel.task_ids for m in sent(session)] == [["t2"]]
    assert sent(other) == []


# -- the window ----------------------------------------------------------------------------------


async def test_a_session_reserves_within_its_window_and_remembers_its_high_water(replicas: Replicas) -> None:
    session, _ = await holding(replicas, "t1", "t2")
    session.window = 3
    assert session.in_flight == 2 and session.free() == 1
    assert await session.reserve(5) == 1 and session.free() == 0
    assert session.free() == 0
    await session.settle(1, [])
    assert session.high_water == 2 and session.free() == 1
    resolved = await session.resolve(list(session.leases)[:1])
    assert len(resolved) == 1 and session.free() == 2
    await session.close()
    assert await session.reserve(1) == 0, "a closed session reserves nothing"


def test_the_registry_keeps_a_closed_sessions_leases_until_their_grace_ends(replicas: Replicas) -> None:
    registry = SessionRegistry()
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1))
    registry.add(session)
    assert registry.holding(["t1"]) == {}
    assert registry.remove(session) == [] and registry.sessions == {}


async def test_a_stream_is_served_message_by_message_until_it_ends(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(stream_grace_seconds=0.0)
    session, tokens = await holding(replicas, "t1")
    session.last_seen = 0.0

    async def stream() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        yield worker_service_pb2.ConnectRequest(credit=worker_service_pb2.Credit(max_in_flight=4))
        yield worker_service_pb2.ConnectRequest(
            results=worker_service_pb2.Results(
                outcomes=[
                    worker_service_pb2.TaskOutcome(
                        task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
                    )
                ]
            )
        )

    await connections.run(session, stream())
    assert session.window == 4 and session.last_seen > 0
    assert [a.status for m in sent(session) for a in m.acks.acks] == [worker_service_pb2.ACK_STATUS_ACCEPTED]
    assert await state(replicas, "t1") == "TASK_STATE_SUCCESS"


async def test_a_result_with_an_unknown_lease_does_not_hide_the_next_one(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    results = worker_service_pb2.Results(
        outcomes=[
            worker_service_pb2.TaskOutcome(
                task_id="t9", lease_token="unknown", outcome=worker_service_pb2.OUTCOME_SUCCESS
            ),
            worker_service_pb2.TaskOutcome(
                task_id="t1", lease_token=tokens["t1"], outcome=worker_service_pb2.OUTCOME_SUCCESS
            ),
        ]
    )
    [acks] = await handle(replicas, session, results=results)
    assert {a.task_id: a.status for a in acks.acks.acks}["t1"] == worker_service_pb2.ACK_STATUS_ACCEPTED
    assert session.leases == {}


async def test_a_silent_worker_is_drained_once(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(heartbeat_interval_seconds=0.0, lease_seconds=0.0)
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1))
    sent(session)
    session.last_seen = time.monotonic() - 1
    watchdog = asyncio.create_task(connections._watchdog(session))
    for _ in range(50):
        await asyncio.sleep(0)
    await session.close()
    await watchdog
    drains = [m for m in sent(session) if m.WhichOneof("message") == "drain"]
    assert len(drains) == 1 and drains[0].drain.reason == "no heartbeat within the lease"
    assert session.draining


async def test_a_worker_heard_from_within_its_lease_is_not_drained(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(heartbeat_interval_seconds=0.0)
    session = connections.open(worker_service_pb2.Hello(worker_id="w1", max_in_flight=1))
    sent(session)
    watchdog = asyncio.create_task(connections._watchdog(session))
    for _ in range(20):
        await asyncio.sleep(0)
    await session.close()
    await watchdog
    assert sent(session) == [] and not session.draining


# -- handing out work -------------------------------------------------------------------------


async def claimed_for(replicas: Replicas, session: WorkerSession, *task_ids: str) -> list[Lease]:
    """Leases on `task_ids` held by `session`, their RECEIVED not written yet."""
    await submit(replicas.a, *(lone(task(task_id=t)) for t in task_ids))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, session.worker_id, time.monotonic())
    await session.settle(0, claim.leases)
    return claim.leases


async def test_receipts_are_written_for_held_leases_and_withdrawn_for_ended_tasks(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    sent(session)
    leases = await claimed_for(replicas, session, "t1", "t2")
    await replicas.b.canceller.cancel("t2")
    await replicas.a.connections._record_receipts(session, leases)
    assert await state(replicas, "t1") == "TASK_STATE_RECEIVED"
    assert [m.cancel.task_ids for m in sent(session)] == [["t2"]]
    assert [lease.task_id for lease in session.leases.values()] == ["t1"]
    assert all(lease.recorded.done() and not lease.receipt_pending for lease in leases)
    await replicas.a.connections._record_receipts(session, [])


async def test_a_receipt_write_in_an_outage_is_left_to_the_result(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    sent(session)
    [lease] = await claimed_for(replicas, session, "t1")
    replicas.a.store._recent.clear()
    replicas.backend.fail_reads = 1
    await replicas.a.connections._record_receipts(session, [lease])
    assert lease.receipt_pending and lease.recorded.done(), "waiters are released; the result will write it"
    assert await state(replicas, "t1") == "TASK_STATE_PENDING"
    assert session.leases, "the task runs on"


async def test_a_receipt_write_that_fails_for_good_hands_the_task_back(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    sent(session)
    [lease] = await claimed_for(replicas, session, "t1")

    async def broken(*args: object, **kwargs: object) -> list[Lease]:
        raise KeyError("bug")

    monkeypatch.setattr(replicas.a.connections.dispatcher, "record", broken)
    await replicas.a.connections._record_receipts(session, [lease])
    assert [m.cancel.task_ids for m in sent(session)] == [["t1"]]
    assert session.leases == {} and (await replicas.broker.stats(QUEUE)).ready == 1


async def test_claimed_tasks_are_sent_at_once_and_received_soon_after(replicas: Replicas) -> None:
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=5))
    sent(session)
    await submit(replicas.a, lone(task(task_id="t1")))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    await session.settle(0, claim.leases)
    await replicas.a.connections._send_claimed(session, claim)
    [assignments] = sent(session)
    assert [a.task.id for a in assignments.assignments.items] == ["t1"]
    await asyncio.wait_for(claim.leases[0].recorded, 5)
    assert await state(replicas, "t1") == "TASK_STATE_RECEIVED"


async def test_a_pump_fills_the_window_and_stops_with_the_session(replicas: Replicas) -> None:
    await submit(replicas.a, *(lone(task(task_id=f"t{i}")) for i in range(3)))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=2))
    sent(session)
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    message = await asyncio.wait_for(session.outbox.get(), 5)
    assert message is not None and len(message.assignments.items) == 2, "no more than the window"
    assert session.in_flight == 2 and session.high_water == 2
    await session.close()
    await asyncio.wait_for(pump, 5)
    assert (await replicas.broker.stats(QUEUE)).ready == 1


@pytest.mark.looptime  # the pump's fetch waits out its poll when the session closes
async def test_a_pump_of_a_paused_queue_hands_out_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await replicas.a.admin.pause(QUEUE)
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=2))
    sent(session)
    pump = asyncio.create_task(replicas.a.connections._pump(session, QUEUE))
    for _ in range(20):
        await asyncio.sleep(0)
    assert session.outbox.empty() and session.in_flight == 0
    await replicas.a.admin.resume(QUEUE)
    message = await asyncio.wait_for(session.outbox.get(), 5)
    assert message is not None and [a.task.id for a in message.assignments.items] == ["t1"]
    await session.close()
    await asyncio.wait_for(pump, 5)
