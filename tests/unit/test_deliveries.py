"""Poison protection on the memory engines: every delivery of an attempt is counted on its
record; one that comes back without an outcome (its worker was lost mid-run) is noted as a
WorkerLost and runs again, and after `max_deliveries` of those the task fails for good, is a dead
letter and fires its error callback once, instead of killing worker after worker forever."""

from __future__ import annotations

import time

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.core.dispatch import DEFAULT_MAX_DELIVERIES, Claim
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_outcomes_and_dispatch import record_of

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def lose(replicas: Replicas, claim: Claim) -> None:
    """The worker holding `claim` died mid-run: its messages come back, no outcome reported."""
    await replicas.broker.nack([lease.delivery for lease in claim.leases], 0.0)


async def redeliver(replicas: Replicas, worker_id: str) -> Claim:
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await replicas.a.connections.dispatcher.claim(deliveries, worker_id, time.monotonic())
    await replicas.a.connections.dispatcher.record(claim.leases, worker_id, claim.read)
    return claim


async def test_each_delivery_is_counted_and_a_lost_one_is_noted_as_worker_lost(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    first = await lease_all(replicas.a)
    assert (await record_of(replicas, "t1")).deliveries == 1
    await lose(replicas, first)
    second = await redeliver(replicas, "w2")
    record = await record_of(replicas, "t1")
    assert [c.lease.task_id for c in second.claimed] == ["t1"] and record.deliveries == 2
    assert record.result.attempts == 1  # a lost delivery runs the same attempt again
    assert [e.type for e in record.attempt_errors] == ["WorkerLost"]
    recorded = await replicas.a.connections.recorder.record([outcome(second, "t1")], "w2")
    assert recorded.statuses == {"t1": worker_service_pb2.ACK_STATUS_ACCEPTED}
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_retry_starts_counting_deliveries_again(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=2))))
    first = await lease_all(replicas.a)
    await lose(replicas, first)
    second = await redeliver(replicas, "w1")
    assert (await record_of(replicas, "t1")).deliveries == 2
    await replicas.a.connections.recorder.record([outcome(second, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1")
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_RETRY and record.deliveries == 0


async def test_after_max_deliveries_lost_the_task_fails_for_good_once(replicas: Replicas) -> None:
    callback = task(name="on_error", task_id="cb")
    await submit(replicas.a, lone(task(task_id="t1", on_error=[callback])))
    await submit(replicas.a, lone(task(task_id="t2")))
    claim = await lease_all(replicas.a)
    for _ in range(DEFAULT_MAX_DELIVERIES - 1):
        await lose(replicas, claim)
        claim = await redeliver(replicas, "w1")
    # t2 ends normally on this delivery; t1 is lost once more.
    recorded = await replicas.a.connections.recorder.record([outcome(claim, "t2")], "w1")
    assert recorded.statuses == {"t2": worker_service_pb2.ACK_STATUS_ACCEPTED}
    await replicas.broker.ack([lease.delivery for lease in claim.leases if lease.task_id == "t2"])
    await replicas.broker.nack([lease.delivery for lease in claim.leases if lease.task_id == "t1"], 0.0)
    assert (await record_of(replicas, "t1")).deliveries == DEFAULT_MAX_DELIVERIES

    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w9", queues=[QUEUE], max_in_flight=10))
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    last = await replicas.a.connections.dispatcher.claim(deliveries, "w9", time.monotonic())
    assert last.claimed == [] and list(last.exhausted) == ["t1"]
    await replicas.a.connections._send_claimed(session, last)

    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_FAILURE and record.result.error.type == "WorkerLost"
    assert f"max_deliveries is {DEFAULT_MAX_DELIVERIES}" in record.result.error.message
    assert [e.type for e in record.attempt_errors] == ["WorkerLost"] * DEFAULT_MAX_DELIVERIES
    assert await replicas.backend.members(DEAD_LETTERS_GROUP) == {"t1": QUEUE.encode()}
    # Its message is acked; the error callback is queued once, and nothing else is.
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (1, 0)
    [callback_message] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    again = await replicas.a.connections.dispatcher.claim([callback_message], "w9", time.monotonic())
    assert [c.lease.task_id for c in again.claimed] == ["cb"]


async def test_a_lost_task_that_ended_meanwhile_is_not_failed(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    token = claim.leases[0].token
    await replicas.a.connections.recorder.record([outcome(claim, "t1")], "w1")
    recorded = await replicas.a.connections.recorder.give_up({"t1": token}, DEFAULT_MAX_DELIVERIES)
    assert recorded.requeue == {}
    assert (await record_of(replicas, "t1")).result.state == result_pb2.TASK_STATE_SUCCESS
    assert not await replicas.backend.members(DEAD_LETTERS_GROUP)
