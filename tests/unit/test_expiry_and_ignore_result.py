"""Task expiry and ignore_result on the memory engines: dispatch sends no task past its expiry
(it ends EXPIRED, with the follow-ups of a failure, so chords and waits on it end), a retry due
after the expiry ends EXPIRED instead of waiting, and a task that ignores its result ends SUCCESS
without a value."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor import ResultIgnored, Sig, State, TaskFailed, value_of
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.core.dispatch import Claim
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.expiry import is_expired
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from conveyor_server.core.sessions import WorkerSession
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, SharedBackend, lease_all, outcome, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, Clock, FlakyBroker, build, chord, lone, submit, task
from tests.unit.test_outcomes_and_dispatch import record_of

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
# A retry policy whose next attempt is an hour away.
AN_HOUR_LATER = task_pb2.RetryPolicy(max_attempts=3, backoff=task_pb2.BACKOFF_KIND_FIXED)
AN_HOUR_LATER.initial.FromSeconds(3600)


def expiry_in(seconds: float, now: float | None = None) -> Timestamp:
    """`seconds` after `now` (a wall time; the real time unless given)."""
    stamp = Timestamp()
    stamp.FromNanoseconds((time.time_ns() if now is None else round(now * 1e9)) + int(seconds * 1e9))
    return stamp


@pytest.fixture
async def manual_replicas() -> AsyncIterator[tuple[Replicas, ManualClock]]:
    """Replicas whose cores and broker (its delays) read a clock the test moves."""
    manual = ManualClock()
    broker, backend, clock = FlakyBroker(clock=manual.clock.monotonic), SharedBackend(), Clock()
    await broker.connect()
    await backend.connect()
    cores = [build(broker, backend, clock, core_clock=manual.clock) for _ in range(2)]
    yield Replicas(cores[0], cores[1], broker, backend, clock), manual
    await broker.close()
    await backend.close()


async def dispatch(replicas: Replicas, worker_id: str = "w9") -> tuple[Claim, WorkerSession]:
    """Fetch what is ready and hand it to a worker's stream as the server does."""
    session = replicas.a.connections.open(
        worker_service_pb2.Hello(worker_id=worker_id, queues=[QUEUE], max_in_flight=10)
    )
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(
        deliveries, worker_id, replicas.a.connections.clock.monotonic()
    )
    await replicas.a.connections._send_claimed(session, claim)
    return claim, session


def assigned(session: WorkerSession) -> list[str]:
    return [a.task.id for m in sent(session) if m.WhichOneof("message") == "assignments" for a in m.assignments.items]


def states(record: records_pb2.TaskRecord) -> list[str]:
    return [result_pb2.TaskState.Name(h.state).removeprefix("TASK_STATE_") for h in record.result.history]


# -- expiry at dispatch -----------------------------------------------------------------------------


async def test_a_task_past_its_expiry_is_not_sent_and_ends_expired_with_its_error_callback(replicas: Replicas) -> None:
    callback = task(name="on_error", task_id="cb")
    await submit(replicas.a, lone(task(task_id="t1", expires_at=expiry_in(-1), on_error=[callback])))
    claim, session = await dispatch(replicas)
    assert claim.claimed == [] and list(claim.expired) == ["t1"]
    assert assigned(session) == [], "an expired task is never sent to a worker"
    record = await record_of(replicas, "t1")
    assert states(record) == ["PENDING", "EXPIRED"] and record.result.attempts == 0
    assert record.result.error.type == "Expired" and "not started by its expiry" in record.result.error.message
    assert not await replicas.backend.members(DEAD_LETTERS_GROUP), "an expiry is not a dead letter"
    # Its message is acked; its error callback is queued once, with the error naming the task.
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (1, 0)
    [message] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    again = await replicas.a.connections.dispatcher.claim([message], "w9", time.monotonic())
    [errback] = [c.assignment.task for c in again.claimed]
    assert errback.id == "cb"
    given = json.loads(errback.args[0].json_value)
    assert (given["task_id"], given["type"]) == ("t1", "Expired")


async def test_a_task_before_its_expiry_runs(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", expires_at=expiry_in(60))))
    claim, session = await dispatch(replicas)
    assert [c.lease.task_id for c in claim.claimed] == ["t1"] and not claim.expired
    assert assigned(session) == ["t1"]


async def test_a_retry_due_after_the_expiry_ends_expired_instead_of_waiting(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", expires_at=expiry_in(60), retry=AN_HOUR_LATER)))
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1"
    )
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert recorded.requeue == {}, "its message is acked, not handed back for an hour"
    record = await record_of(replicas, "t1")
    assert states(record)[-2:] == ["RETRY", "EXPIRED"] and not record.lease_token
    assert record.result.error.type == "Expired" and "retry (attempt 2)" in record.result.error.message


async def test_a_retry_due_before_the_expiry_waits_for_its_next_attempt(replicas: Replicas) -> None:
    soon = task_pb2.RetryPolicy(max_attempts=3, backoff=task_pb2.BACKOFF_KIND_FIXED)
    soon.initial.FromSeconds(1)
    await submit(replicas.a, lone(task(task_id="t1", expires_at=expiry_in(60), retry=soon)))
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1"
    )
    assert recorded.requeue == {"t1": pytest.approx(1.0)}
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_RETRY


async def test_a_retry_that_comes_back_past_its_expiry_is_not_run_again(
    manual_replicas: tuple[Replicas, ManualClock],
) -> None:
    replicas, manual = manual_replicas
    soon = task_pb2.RetryPolicy(max_attempts=3, backoff=task_pb2.BACKOFF_KIND_FIXED)
    soon.initial.FromMilliseconds(50)
    await submit(replicas.a, lone(task(task_id="t1", expires_at=expiry_in(0.5, manual.wall), retry=soon)))
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1"
    )
    await replicas.broker.nack([lease.delivery for lease in claim.leases], recorded.requeue["t1"])
    manual.advance(0.55)  # the retry was due before the expiry, but comes up after it
    again, session = await dispatch(replicas)
    assert again.claimed == [] and list(again.expired) == ["t1"] and assigned(session) == []
    record = await record_of(replicas, "t1")
    assert states(record)[-2:] == ["RETRY", "EXPIRED"] and record.result.attempts == 1


async def test_a_chord_with_an_expired_member_ends(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chord(
        [task(task_id="a"), task(task_id="b", expires_at=expiry_in(-1))], task(name="merge", task_id="cb"),
    ))
    claim, _ = await dispatch(replicas)
    assert [c.lease.task_id for c in claim.claimed] == ["a"] and list(claim.expired) == ["b"]
    await asyncio.sleep(0.05)  # RECEIVED of a is written
    await replicas.a.connections.recorder.record([outcome(claim, "a")], "w9")
    assert (await record_of(replicas, "b")).result.state == result_pb2.TASK_STATE_EXPIRED
    callback = await record_of(replicas, "cb")
    assert callback.result.state == result_pb2.TASK_STATE_FAILURE and callback.result.error.type == "ChordMemberFailed"
    assert "Expired" in callback.result.error.message
    whole = await replicas.a.reader.get(response.workflow_id)
    assert whole.state == result_pb2.TASK_STATE_FAILURE


async def test_a_lone_expired_task_reads_as_expired_through_its_workflow(replicas: Replicas) -> None:
    [response] = await submit(replicas.a, chord([task(task_id="b", expires_at=expiry_in(-1))], task(task_id="cb")))
    await dispatch(replicas)
    states_now = {t: (await record_of(replicas, t)).result.state for t in ("b", "cb")}
    assert states_now == {"b": result_pb2.TASK_STATE_EXPIRED, "cb": result_pb2.TASK_STATE_FAILURE}
    assert (await replicas.a.reader.get(response.workflow_id)).error.type == "ChordMemberFailed"


def test_expiry_is_checked_against_the_clock_and_a_pending_retry() -> None:
    record = records_pb2.TaskRecord()
    signature = task_pb2.Signature(name="t", expires_at=Timestamp(seconds=1_000))
    assert not is_expired(task_pb2.Signature(name="t"), record, 10**10), "no expiry: never expired"
    assert not is_expired(signature, record, 999.9) and is_expired(signature, record, 1_000)
    record.result.state = result_pb2.TASK_STATE_RETRY
    record.retry_at.FromSeconds(999)
    assert not is_expired(signature, record, 500)
    record.retry_at.FromSeconds(1_000)
    assert is_expired(signature, record, 500), "a retry due at the expiry never runs"


# -- ignore_result --------------------------------------------------------------------------------


async def test_an_ignored_result_ends_success_without_a_value(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", ignore_result=True)))
    claim = await lease_all(replicas.a)
    reported = outcome(claim, "t1", result=task_pb2.Value(int_value=7))
    await replicas.a.connections.recorder.record([reported], "w1")
    result = (await record_of(replicas, "t1")).result
    assert result.state == result_pb2.TASK_STATE_SUCCESS and not result.HasField("result")
    with pytest.raises(ResultIgnored, match="t1 ignores its result"):
        value_of(result)


async def test_a_kept_result_is_stored(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record([outcome(claim, "t1", result=task_pb2.Value(int_value=7))], "w1")
    assert value_of((await record_of(replicas, "t1")).result) == 7


async def test_ignore_result_with_success_callbacks_or_a_bad_expiry_is_refused(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match="ignore_result is set"):
        await submit(replicas.a, lone(task(task_id="t1", ignore_result=True, on_success=[task(task_id="cb")])))
    with pytest.raises(InvalidArgument, match="expires_at"):
        await submit(replicas.a, lone(task(task_id="t2", expires_at=Timestamp(seconds=-5))))


# -- the SDK's side ---------------------------------------------------------------------------------


def test_the_sdk_knows_expired_as_a_final_failure() -> None:
    assert State.EXPIRED.done and State(result_pb2.TASK_STATE_EXPIRED) is State.EXPIRED
    expired = result_pb2.TaskResult(task_id="t1", state=result_pb2.TASK_STATE_EXPIRED,
                                    error=result_pb2.TaskError(type="Expired", message="too late"))
    with pytest.raises(TaskFailed, match="t1 ended EXPIRED: Expired: too late"):
        value_of(expired)


def test_sig_expires_takes_seconds_from_submit_or_a_datetime() -> None:
    before = time.time()
    relative = Sig("t").set(expires=30).to_proto().expires_at
    assert before + 30 <= relative.seconds + relative.nanos / 1e9 <= time.time() + 30
    at = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert Sig("t", expires=at).to_proto().expires_at.ToDatetime(tzinfo=dt.UTC) == at
    naive = Sig("t", expires=at.replace(tzinfo=None)).to_proto().expires_at
    assert naive.ToDatetime(tzinfo=dt.UTC) == at, "a naive datetime is UTC"
    assert not Sig("t").to_proto().HasField("expires_at")
    assert Sig("t", ignore_result=True).to_proto().ignore_result
