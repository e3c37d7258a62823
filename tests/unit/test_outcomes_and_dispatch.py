"""State transitions on the memory engines: what a reported outcome does to a task (success,
failure, retries with their delays and caps, cancellation, dead letters), and what dispatch does
with each message it fetches (run it, drop a duplicate, repair an ended task, hand back an early
retry, restore a lost record, replace an earlier lease)."""

from __future__ import annotations

import time

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.core import confirmed
from conveyor_server.core.connection import settle
from conveyor_server.core.outcomes import DEFAULT_EXPLICIT_RETRY_ATTEMPTS
from conveyor_server.core.publisher import Publication, encode_message
from conveyor_server.core.records import DEAD_LETTERS_GROUP, task_key
from conveyor_server.random_ids import hex_tokens
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, Outage, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def record_of(replicas: Replicas, task_id: str) -> records_pb2.TaskRecord:
    record = await replicas.a.store.get(task_id)
    assert record is not None
    return record


async def report(
    replicas: Replicas, task_id: str, kind: worker_service_pb2.Outcome.ValueType, **fields: object
) -> tuple[worker_service_pb2.AckStatus.ValueType, float | None]:
    """Lease `task_id` and report `kind` for it; returns its ack and requeue delay (None: acked)."""
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record([outcome(claim, task_id, kind, **fields)], "w1")
    return recorded.statuses[task_id], recorded.requeue.get(task_id)


# -- outcomes ---------------------------------------------------------------------------------------


async def test_a_success_stores_the_result_with_the_workers_timings(replicas: Replicas) -> None:
    ended: list[str] = []
    replicas.a.connections.recorder.on_attempt_ended = lambda r: ended.append(r.result.task_id)
    await submit(replicas.a, lone(task(task_id="t1")))
    started, finished = Timestamp(seconds=1_700_000_000), Timestamp(seconds=1_700_000_005)
    status, requeue = await report(
        replicas,
        "t1",
        worker_service_pb2.OUTCOME_SUCCESS,
        result=task_pb2.Value(int_value=7),
        started_at=started,
        finished_at=finished,
    )
    assert (status, requeue) == (worker_service_pb2.ACK_STATUS_ACCEPTED, None)
    record = await record_of(replicas, "t1")
    assert record.result.result.int_value == 7 and record.result.worker_id == "w1"
    assert record.result.started_at == started and record.result.finished_at == finished
    assert [result_pb2.TaskState.Name(h.state) for h in record.result.history][-2:] == [
        "TASK_STATE_STARTED", "TASK_STATE_SUCCESS",
    ]
    assert ended == ["t1"]
    assert not await replicas.backend.members(DEAD_LETTERS_GROUP)


async def test_a_failure_without_retries_fails_for_good_and_is_a_dead_letter(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    status, requeue = await report(replicas, "t1", worker_service_pb2.OUTCOME_FAILURE)
    assert (status, requeue) == (worker_service_pb2.ACK_STATUS_ACCEPTED, None)
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_FAILURE
    assert (record.result.error.type, record.result.error.message) == ("Error", "the task failed without details")
    assert await replicas.backend.members(DEAD_LETTERS_GROUP) == {"t1": b"default"}


async def test_a_cancelled_outcome_ends_the_task_cancelled(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await report(replicas, "t1", worker_service_pb2.OUTCOME_CANCELLED)
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_CANCELLED and record.result.error.type == "Cancelled"
    assert not await replicas.backend.members(DEAD_LETTERS_GROUP)


async def test_a_failure_retries_until_the_policy_runs_out(replicas: Replicas) -> None:
    policy = task_pb2.RetryPolicy(max_attempts=2, backoff=task_pb2.BACKOFF_KIND_FIXED, initial=Duration(seconds=2))
    await submit(replicas.a, lone(task(task_id="t1", retry=policy)))
    boom = result_pb2.TaskError(type="Boom", message="first")
    status, requeue = await report(replicas, "t1", worker_service_pb2.OUTCOME_FAILURE, error=boom)
    assert (status, requeue) == (worker_service_pb2.ACK_STATUS_ACCEPTED, 2.0)
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_RETRY and not record.lease_token
    assert list(record.attempt_errors) == [boom] and record.result.history[-1].error == boom
    assert 0 < record.retry_at.seconds - time.time() <= 2
    assert not await replicas.backend.members(DEAD_LETTERS_GROUP), "a retry is no dead letter"


async def test_an_explicit_retry_gives_up_after_the_default_attempts(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    recorder = replicas.a.connections.recorder
    for attempt in range(1, DEFAULT_EXPLICIT_RETRY_ATTEMPTS + 1):
        claim = await lease_all(replicas.a)
        assert [lease.attempt for lease in claim.leases] == [attempt]
        retry = outcome(claim, "t1", worker_service_pb2.OUTCOME_RETRY, retry_delay=Duration(seconds=0),
                        error=result_pb2.TaskError(type="Flaky", message=f"try {attempt}"))
        recorded = await recorder.record([retry], "w1")
        await settle(replicas.broker, claim.leases, recorded.requeue)
    final = await record_of(replicas, "t1")
    assert (
        final.result.state == result_pb2.TASK_STATE_FAILURE and final.result.attempts == DEFAULT_EXPLICIT_RETRY_ATTEMPTS
    )
    assert final.result.error.type == "MaxRetriesExceeded"
    assert final.result.error.message == f"gave up after {DEFAULT_EXPLICIT_RETRY_ATTEMPTS} attempts: try 3"


async def test_an_explicit_retry_delay_is_used_instead_of_the_policys(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=5))))
    status, requeue = await report(replicas, "t1", worker_service_pb2.OUTCOME_RETRY, retry_delay=Duration(seconds=42))
    assert status == worker_service_pb2.ACK_STATUS_ACCEPTED and requeue == 42.0
    record = await record_of(replicas, "t1")
    assert 40 < record.retry_at.seconds - time.time() <= 42


async def test_a_retry_without_an_explicit_delay_follows_the_policy(replicas: Replicas) -> None:
    policy = task_pb2.RetryPolicy(max_attempts=3, initial=Duration(seconds=7), backoff=task_pb2.BACKOFF_KIND_FIXED)
    await submit(replicas.a, lone(task(task_id="t1", retry=policy)))
    _, requeue = await report(replicas, "t1", worker_service_pb2.OUTCOME_RETRY)
    assert requeue == 7.0


async def test_a_result_without_a_live_lease_is_stale_and_changes_nothing(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await lease_all(replicas.a)
    stale = worker_service_pb2.TaskOutcome(
        task_id="t1", lease_token="other", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    unknown = worker_service_pb2.TaskOutcome(
        task_id="nope", lease_token="x", outcome=worker_service_pb2.OUTCOME_SUCCESS
    )
    recorded = await replicas.a.connections.recorder.record([stale, unknown], "w1")
    assert recorded.statuses == {
        "t1": worker_service_pb2.ACK_STATUS_STALE_LEASE,
        "nope": worker_service_pb2.ACK_STATUS_STALE_LEASE,
    }
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_RECEIVED


async def test_a_result_whose_follow_ups_fail_is_kept_and_its_message_comes_back(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", on_success=[task("cb")])))
    replicas.broker.fail_publishes = 1
    status, requeue = await report(replicas, "t1", worker_service_pb2.OUTCOME_SUCCESS)
    assert status == worker_service_pb2.ACK_STATUS_ACCEPTED and requeue == 0.0
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_SUCCESS


async def test_started_is_recorded_only_from_received(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    ref = worker_service_pb2.LeaseRef(task_id="t1", lease_token=claim.leases[0].token)
    await replicas.a.connections.recorder.started([ref], "w1")
    await replicas.a.connections.recorder.started([ref], "w1")
    history = [h.state for h in (await record_of(replicas, "t1")).result.history]
    assert history.count(result_pb2.TASK_STATE_STARTED) == 1


# -- dispatch ---------------------------------------------------------------------------------------


async def test_an_undecodable_message_and_a_second_copy_in_one_batch_are_dropped(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    [first] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    await replicas.broker.nack([first], 0.0)
    await replicas.broker.publish(QUEUE, [OutgoingMessage("junk", b"\xff\xfe not a message"),
                                          OutgoingMessage("t1-copy", first.body)])
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    assert len(deliveries) == 3
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert [c.lease.task_id for c in claim.claimed] == ["t1"]
    assert len(claim.duplicates) == 2 and "junk" in {d.message_id for d in claim.duplicates}
    await replicas.a.connections.dispatcher.drop_unrunnable(claim)
    assert (await replicas.broker.stats(QUEUE)).in_flight == 1, "only t1's message is still held"


async def test_messages_of_ended_tasks_are_dropped_and_acked(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="done")), lone(task(task_id="cancelled")))
    first = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record([outcome(first, "done")], "w1")
    await replicas.b.canceller.cancel("cancelled")
    # Both messages come back (the server died before acking them, say).
    await replicas.broker.nack([lease.delivery for lease in first.leases], 0.0)
    again = await replicas.a.connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1",
                                                           time.monotonic())
    assert not again.claimed and set(again.ended) == {"done", "cancelled"}
    await replicas.a.connections.dispatcher.drop_unrunnable(again)
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 0)
    assert (await record_of(replicas, "done")).result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_queued_task_whose_record_vanished_gets_it_back_from_its_message(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    replicas.backend._records.pop(task_key("t1"))
    replicas.a.store._recent.clear()
    claim = await lease_all(replicas.a)
    assert [lease.task_id for lease in claim.leases] == ["t1"]
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_RECEIVED


async def test_a_redelivered_running_task_gets_a_new_lease_and_the_old_one_goes_stale(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    first = await lease_all(replicas.a)
    await replicas.broker.nack([first.leases[0].delivery], 0.0)  # the worker was lost: redelivered
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    assert deliveries[0].delivery_count > 1
    second = await replicas.a.connections.dispatcher.claim(deliveries, "w2", time.monotonic())
    assert [lease.task_id for lease in second.replacing] == ["t1"]
    await replicas.a.connections.dispatcher.record(second.leases, "w2", second.read)
    recorded = await replicas.a.connections.recorder.record([outcome(first, "t1")], "w1")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_STALE_LEASE}
    recorded = await replicas.a.connections.recorder.record([outcome(second, "t1")], "w2")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}


async def test_a_retry_that_comes_back_early_is_handed_back_with_the_time_left(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=3))))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_RETRY, retry_delay=Duration(seconds=60))], "w1")
    await replicas.broker.nack([claim.leases[0].delivery], 0.0)  # back at once instead of in 60 s
    again = await replicas.a.connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1",
                                                           time.monotonic())
    assert not again.claimed
    [(_, due)] = again.early
    assert 55 < due <= 60
    await replicas.a.connections.dispatcher.drop_unrunnable(again)
    assert (await replicas.broker.stats(QUEUE)).delayed == 1


async def test_received_is_not_written_for_a_task_cancelled_meanwhile(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")), lone(task(task_id="t2")))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    await replicas.b.canceller.cancel("t1")
    withdrawn = await replicas.a.connections.dispatcher.record(claim.leases, "w1", claim.read)
    assert [lease.task_id for lease in withdrawn] == ["t1"]
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_CANCELLED
    assert (await record_of(replicas, "t2")).result.state == result_pb2.TASK_STATE_RECEIVED
    assert (await replicas.broker.stats(QUEUE)).in_flight == 1, "t1's message is acked"


async def test_an_assignment_carries_the_message_attempt_limit_and_lease(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", time_limit=Duration(seconds=3, nanos=500_000_000))))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    before = time.time()
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", 123.0)
    [claimed] = claim.claimed
    assert claimed.assignment.task.id == "t1" and claimed.assignment.attempt == 1
    assert claimed.lease.time_limit == 3.5 and claimed.lease.assigned_at == 123.0
    assert claimed.assignment.lease_token == claimed.lease.token and len(claimed.lease.token) == 32
    assert abs(claimed.assignment.lease_expires_at.seconds - (before + 30)) <= 2
    assert claim.replacing == []


async def test_each_task_of_a_claim_gets_a_lease_token_of_its_own(replicas: Replicas) -> None:
    """The tokens of one claim come from one read of the random source (random_ids.hex_tokens)."""
    for n in range(5):
        await submit(replicas.a, lone(task(task_id=f"t{n}")))
    claim = await replicas.a.connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", 1.0)
    tokens = [c.lease.token for c in claim.claimed]
    assert len(claim.claimed) == 5 and len(set(tokens)) == 5
    assert all(len(token) == 32 and int(token, 16) >= 0 for token in tokens)
    assert [c.assignment.lease_token for c in claim.claimed] == tokens
    assert list(hex_tokens(0)) == [] and len({*hex_tokens(1000)}) == 1000


async def test_a_claim_whose_read_fails_raises_for_the_caller_to_hand_back(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    replicas.backend.fail_reads = 1
    with pytest.raises(Outage):
        await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())


async def test_one_report_of_a_retry_and_a_success_handles_both(replicas: Replicas) -> None:
    retry = task_pb2.RetryPolicy(max_attempts=3, backoff=task_pb2.BACKOFF_KIND_FIXED, initial=Duration(seconds=5))
    await submit(replicas.a, lone(task(task_id="again", retry=retry)),
                 lone(task(task_id="ok", on_success=[task("cb")])))
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "again", worker_service_pb2.OUTCOME_FAILURE), outcome(claim, "ok")], "w1")
    assert recorded.requeue == {"again": 5.0}
    assert replicas.broker.published["ok.ok0"] == 1
    for task_id, state in (("again", result_pb2.TASK_STATE_RETRY), ("ok", result_pb2.TASK_STATE_SUCCESS)):
        record = await record_of(replicas, task_id)
        assert record.result.state == state and record.result.history[-1].worker_id == "w1"


async def test_every_ending_is_stamped_with_the_worker_and_the_reported_time(replicas: Replicas) -> None:
    finished = Timestamp(seconds=1_700_000_009)
    await submit(replicas.a, *(lone(task(task_id=t)) for t in ("s", "c", "f")))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record(
        [
            outcome(claim, "s", finished_at=finished),
            outcome(claim, "c", worker_service_pb2.OUTCOME_CANCELLED, finished_at=finished),
            outcome(claim, "f", worker_service_pb2.OUTCOME_FAILURE, finished_at=finished),
        ],
        "w1",
    )
    for task_id in ("s", "c", "f"):
        last = (await record_of(replicas, task_id)).result.history[-1]
        assert (last.worker_id, last.at) == ("w1", finished), task_id
    cancelled = await record_of(replicas, "c")
    assert cancelled.result.error.message == "stopped by a cancel request"


async def test_a_message_carries_the_attempt_it_was_published_for(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    [first] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    await replicas.broker.ack([first])
    signature = (await record_of(replicas, "t1")).result.signature
    await replicas.broker.publish(QUEUE, [OutgoingMessage("t1", encode_message(Publication(signature, 3)))])
    claim = await lease_all(replicas.a)
    assert [lease.attempt for lease in claim.leases] == [3]


async def test_a_duplicate_and_an_early_retry_do_not_stop_the_rest_of_the_batch(replicas: Replicas) -> None:
    policy = task_pb2.RetryPolicy(max_attempts=3)
    await submit(replicas.a, lone(task(task_id="running")), lone(task(task_id="retry", retry=policy)))
    first = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record(
        [outcome(first, "retry", worker_service_pb2.OUTCOME_RETRY, retry_delay=Duration(nanos=500_000_000))], "w1")
    await replicas.broker.nack([lease.delivery for lease in first.leases if lease.task_id == "retry"], 0.0)
    running = (await record_of(replicas, "running")).result.signature
    await replicas.broker.publish(QUEUE, [OutgoingMessage("running-copy", encode_message(Publication(running)))])
    await submit(replicas.a, lone(task(task_id="fresh")))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert [c.lease.task_id for c in claim.claimed] == ["fresh"]
    assert [d.message_id for d in claim.duplicates] == ["running-copy"]
    [(_, due)] = claim.early
    assert 0 < due <= 0.5


async def test_an_ended_task_whose_record_vanished_is_restored_and_its_message_returned(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await replicas.b.canceller.cancel("t1")
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    assert set(claim.ended) == {"t1"}
    replicas.backend._records.pop(task_key("t1"))
    replicas.a.store._recent.clear()
    await replicas.a.connections.dispatcher.drop_unrunnable(claim)
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_PENDING and record.result.name == "noop"
    assert (await replicas.broker.stats(QUEUE)).ready == 1, "handed back to run, not acked"


async def test_a_repair_that_fails_hands_the_message_back_and_a_later_one_finishes(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(confirmed, "CLAIM_GRACE_SECONDS", 0.0)
    await submit(replicas.a, lone(task(task_id="t1", on_success=[task("cb")])), lone(task(task_id="t2")))
    claim = await lease_all(replicas.a)
    replicas.broker.fail_publishes = 1  # cb's publish fails: t1 comes back for repair
    recorded = await replicas.a.connections.recorder.record([outcome(claim, "t1"), outcome(claim, "t2")], "w1")
    await settle(replicas.broker, claim.leases, recorded.requeue)
    assert recorded.requeue == {"t1": 0.0}
    replicas.broker.fail_publishes = 1  # and the repair's publish fails too
    again = await replicas.a.connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1",
                                                           time.monotonic())
    await replicas.a.connections.dispatcher.drop_unrunnable(again)
    assert (await replicas.broker.stats(QUEUE)).ready == 1 and replicas.broker.published["t1.ok0"] == 0
    last = await replicas.a.connections.dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1",
                                                          time.monotonic())
    await replicas.a.connections.dispatcher.drop_unrunnable(last)
    assert replicas.broker.published["t1.ok0"] == 1
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (1, 0), "t1's message acked; the callback waits to run"
