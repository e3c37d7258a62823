"""Reported outcomes: the edges mutation testing found unpinned (what each history entry says,
reports that must change nothing, the hook an ended attempt calls, rejections after the end).

On the shared memory engines of tests/unit/replicas.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.backends.base import Update
from conveyor_server.core.connection import settle
from conveyor_server.core.outcomes import MAX_REJECTS, OutcomeRecorder
from conveyor_server.core.records import task_key
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
STARTED, FINISHED = Timestamp(seconds=1_700_000_000), Timestamp(seconds=1_700_000_005)


async def record_of(replicas: Replicas, task_id: str) -> records_pb2.TaskRecord:
    record = await replicas.a.store.get(task_id)
    assert record is not None
    return record


async def version(replicas: Replicas, task_id: str) -> int:
    return (await replicas.a.store.load([task_id]))[task_id].version


def entries(record: records_pb2.TaskRecord) -> list[tuple[str, str, int, str]]:
    """The history as (state, worker, seconds, error type)."""
    return [
        (result_pb2.TaskState.Name(h.state).removeprefix("TASK_STATE_"), h.worker_id, h.at.seconds, h.error.type)
        for h in record.result.history
    ]


# -- what the history says -------------------------------------------------------------------------

async def test_each_step_of_an_attempt_names_its_worker_and_the_workers_times(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a, "w1")
    await replicas.a.connections.recorder.started(
        [worker_service_pb2.LeaseRef(task_id="t1", lease_token=claim.leases[0].token)], "w1"
    )
    recorder = replicas.a.connections.recorder
    await recorder.record([outcome(claim, "t1", finished_at=FINISHED)], "w1")
    record = await record_of(replicas, "t1")
    _pending, received, started, succeeded = entries(record)
    assert (received[0], received[1]) == ("RECEIVED", "w1")
    assert record.result.history[1].at == claim.leases[0].dispatched_at  # when it was handed out
    assert (started[0], started[1]) == ("STARTED", "w1")
    assert succeeded == ("SUCCESS", "w1", FINISHED.seconds, "")


async def test_a_started_time_reported_with_the_outcome_is_the_started_entrys(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a, "w1")
    boom = result_pb2.TaskError(type="Boom", message="m")
    reported = outcome(
        claim, "t1", worker_service_pb2.OUTCOME_FAILURE, error=boom, started_at=STARTED, finished_at=FINISHED
    )
    await replicas.a.connections.recorder.record([reported], "w1")
    assert entries(await record_of(replicas, "t1"))[-2:] == [
        ("STARTED", "w1", STARTED.seconds, ""), ("FAILURE", "w1", FINISHED.seconds, "Boom"),
    ]


async def test_a_retry_entry_carries_the_reported_time_and_error(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=3))))
    claim = await lease_all(replicas.a, "w1")
    boom = result_pb2.TaskError(type="Boom", message="m")
    await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_FAILURE, error=boom, finished_at=FINISHED)], "w1"
    )
    assert entries(await record_of(replicas, "t1"))[-1] == ("RETRY", "w1", FINISHED.seconds, "Boom")


async def test_a_task_given_up_by_the_server_is_failed_in_the_name_of_its_worker(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a, "w1")
    cause = result_pb2.TaskError(type="TimeLimitExceeded", message="over 1 s")
    await replicas.a.connections.recorder.fail_leased([("t1", claim.leases[0].token)], cause, "w1")
    assert entries(await record_of(replicas, "t1"))[-1][:2] == ("FAILURE", "w1")


async def test_a_task_rejected_too_often_fails_in_the_name_of_the_last_rejecting_worker(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    for _ in range(MAX_REJECTS):
        claim = await lease_all(replicas.a, "w1")
        rejected = worker_service_pb2.RejectedTask(
            task_id="t1", lease_token=claim.leases[0].token, reason="no task named noop"
        )
        recorded = await replicas.a.connections.recorder.reject([rejected], "w1")
        await settle(replicas.broker, claim.leases, dict.fromkeys(recorded.requeue, 0.0))  # back at once
    last = entries(await record_of(replicas, "t1"))[-1]
    assert last[:2] == ("FAILURE", "w1") and last[3] == "UnknownTask"


# -- reports that change nothing -------------------------------------------------------------------

async def test_a_repeated_started_report_and_stale_progress_write_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a, "w1")
    ref = worker_service_pb2.LeaseRef(task_id="t1", lease_token=claim.leases[0].token)
    recorder = replicas.a.connections.recorder
    await recorder.started([ref], "w1")
    written = await version(replicas, "t1")
    await recorder.started([ref], "w1")
    await recorder.progress(
        [worker_service_pb2.ProgressItem(task_id="t1", lease_token="stale", progress=task_pb2.Value(int_value=1))]
    )
    assert await version(replicas, "t1") == written


async def test_reports_for_an_ended_task_or_a_stale_lease_end_no_attempt(replicas: Replicas) -> None:
    ended: list[str] = []
    core = replicas.a
    followups = core.connections.dispatcher.followups
    recorder = OutcomeRecorder(core.store, followups, lambda r: ended.append(r.result.task_id))
    await submit(core, lone(task(task_id="done")), lone(task(task_id="live")))
    claim = await lease_all(core, "w1")
    assert (await recorder.record([outcome(claim, "done")], "w1")).statuses == {
        "done": worker_service_pb2.ACK_STATUS_ACCEPTED
    }
    assert ended == ["done"]
    written = await version(replicas, "done")
    again = await recorder.record([outcome(claim, "done")], "w1")
    stale = worker_service_pb2.TaskOutcome(
        task_id="live", lease_token="not-its-lease", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    refused = await recorder.record([stale], "w1")
    assert again.statuses == {"done": worker_service_pb2.ACK_STATUS_ALREADY_DONE}
    assert refused.statuses == {"live": worker_service_pb2.ACK_STATUS_STALE_LEASE}
    assert ended == ["done"], "no attempt ended with those reports"
    assert await version(replicas, "done") == written


async def test_a_rejection_after_the_task_ended_or_with_a_stale_lease_changes_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="done")), lone(task(task_id="live")))
    claim = await lease_all(replicas.a, "w1")
    recorder = replicas.a.connections.recorder
    await recorder.record([outcome(claim, "done")], "w1")
    tokens = {lease.task_id: lease.token for lease in claim.leases}
    rejected = await recorder.reject([
        worker_service_pb2.RejectedTask(task_id="done", lease_token=tokens["done"], reason="late"),
        worker_service_pb2.RejectedTask(task_id="live", lease_token="stale", reason="late"),
    ], "w1")
    assert rejected.requeue == {}
    done = await record_of(replicas, "done")
    assert done.result.state == result_pb2.TASK_STATE_SUCCESS and done.rejects == 0


# -- attempts and retries ----------------------------------------------------------------------------

async def test_a_task_allowed_one_attempt_that_asks_for_a_retry_fails_for_good(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=1))))
    claim = await lease_all(replicas.a, "w1")
    retry = outcome(claim, "t1", worker_service_pb2.OUTCOME_RETRY, retry_delay=Duration(seconds=0))
    recorded = await replicas.a.connections.recorder.record([retry], "w1")
    assert recorded.requeue == {}
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_FAILURE and record.result.error.type == "MaxRetriesExceeded"


async def test_a_retry_in_a_batch_does_not_stop_the_follow_ups_of_the_outcomes_after_it(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="a", retry=task_pb2.RetryPolicy(max_attempts=3))))
    await submit(replicas.a, lone(task(task_id="b", on_success=[task(name="next")])))
    claim = await lease_all(replicas.a, "w1")
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "a", worker_service_pb2.OUTCOME_FAILURE), outcome(claim, "b")], "w1"
    )
    assert set(recorded.requeue) == {"a"}
    assert replicas.broker.published["b.ok0"] == 1


async def test_a_result_for_a_task_without_a_record_is_a_stale_lease(replicas: Replicas) -> None:
    unknown = worker_service_pb2.TaskOutcome(
        task_id="never-submitted", lease_token="t", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    recorded = await replicas.a.connections.recorder.record([unknown], "w1")
    assert recorded.statuses == {"never-submitted": worker_service_pb2.ACK_STATUS_STALE_LEASE}


async def test_a_result_whose_record_vanished_after_a_lost_write_is_a_stale_lease(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    backend = replicas.backend

    async def lose_and_vanish(updates: Sequence[Update]) -> list[bool]:
        # The outcome was accepted from the record read, but its write loses to a concurrent
        # writer and the record is gone when read again: nothing was recorded.
        backend.hide.add(task_key("t1"))
        return [False] * len(updates)

    backend.compare_and_set = lose_and_vanish  # type: ignore[method-assign]
    recorded = await replicas.a.connections.recorder.record([outcome(claim, "t1")], "w1")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_STALE_LEASE}


async def test_a_task_failed_by_rejections_whose_follow_ups_fail_comes_back_for_repair(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", on_error=[task(name="alert")])))
    recorder = replicas.a.connections.recorder
    for rejection in range(1, MAX_REJECTS + 1):
        claim = await lease_all(replicas.a, "w1")
        if rejection == MAX_REJECTS:
            replicas.broker.fail_publishes = 1  # the error callback's publish
        rejected = worker_service_pb2.RejectedTask(
            task_id="t1", lease_token=claim.leases[0].token, reason="no task named noop"
        )
        recorded = await recorder.reject([rejected], "w1")
        await settle(replicas.broker, claim.leases, dict.fromkeys(recorded.requeue, 0.0))
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_FAILURE
    assert set(recorded.requeue) == {"t1"}, "its message comes back so the follow-ups are repaired"


# -- endings the server decides are stamped with its clock -------------------------------------------

def on_manual_clock(replicas: Replicas) -> tuple[OutcomeRecorder, Timestamp]:
    """A recorder on the core's store whose clock reads a fixed time (years before the real
    one), and that time: an ending stamped with the real time instead shows."""
    manual = ManualClock()
    core = replicas.a
    recorder = OutcomeRecorder(core.store, core.connections.dispatcher.followups, clock=manual.clock)
    return recorder, Timestamp(seconds=int(manual.wall))


async def test_a_task_rejected_too_often_ends_at_the_time_of_the_last_rejection(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    recorder, now = on_manual_clock(replicas)
    for _ in range(MAX_REJECTS):
        claim = await lease_all(replicas.a, "w1")
        rejected = worker_service_pb2.RejectedTask(task_id="t1", lease_token=claim.leases[0].token, reason="no")
        recorded = await recorder.reject([rejected], "w1")
        await settle(replicas.broker, claim.leases, dict.fromkeys(recorded.requeue, 0.0))
    record = await record_of(replicas, "t1")
    assert entries(record)[-1] == ("FAILURE", "w1", now.seconds, "UnknownTask")
    assert record.result.finished_at == now


@pytest.mark.parametrize("ending", ["give_up", "expire"])
async def test_a_task_ended_without_being_sent_ends_at_the_servers_time(replicas: Replicas, ending: str) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a, "w1")
    recorder, now = on_manual_clock(replicas)
    tokens = {"t1": claim.leases[0].token}
    if ending == "give_up":
        await recorder.give_up(tokens, 3)
    else:
        await recorder.expire(tokens)
    record = await record_of(replicas, "t1")
    state = "FAILURE" if ending == "give_up" else "EXPIRED"
    assert entries(record)[-1] == (state, "", now.seconds, "WorkerLost" if ending == "give_up" else "Expired")
    assert record.result.finished_at == now


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Tracing on, for this test only: the spans Conveyor makes end up in the returned exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    monkeypatch.setattr(tracing, "tracer", lambda name="conveyor": provider.get_tracer(name))
    return exporter


async def test_the_result_span_of_an_outcome_names_its_task_queue_attempt_and_state(
    replicas: Replicas, spans: InMemorySpanExporter
) -> None:
    await submit(replicas.a, lone(task(name="add", task_id="t1")))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record([outcome(claim, "t1")], "w1")
    [result] = [s for s in spans.get_finished_spans() if s.name == "result add"]
    assert result.attributes is not None
    assert {k: result.attributes[k] for k in (
        "messaging.operation.name", "messaging.message.id", "conveyor.task.name", "messaging.destination.name",
        "conveyor.attempt", "conveyor.task.state",
    )} == {
        "messaging.operation.name": "result", "messaging.message.id": "t1", "conveyor.task.name": "add",
        "messaging.destination.name": QUEUE, "conveyor.attempt": 1, "conveyor.task.state": "TASK_STATE_SUCCESS",
    }
