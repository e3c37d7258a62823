"""Dispatch: the edges mutation testing found unpinned (a record restored from its message keeps
its workflow, receipts written from what the claim read, the attempt of a redelivered retry).

On the shared memory engines of tests/unit/replicas.py.
"""

from __future__ import annotations

import logging
import time

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor.values import seconds_of
from conveyor_server.app import Core
from conveyor_server.core import dispatch
from conveyor_server.core.connection import settle
from conveyor_server.core.publisher import Publication
from tests.unit.clocks import ManualClock
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_a_record_restored_from_its_message_keeps_the_messages_workflow(replicas: Replicas) -> None:
    publisher = replicas.a.connections.dispatcher.followups.publisher
    await publisher.publish([Publication(task(task_id="lost"), 1, "wf-of-lost")])  # its record is gone
    claim = await lease_all(replicas.a)
    assert [c.assignment.workflow_id for c in claim.claimed] == ["wf-of-lost"]
    record = await replicas.a.store.get("lost")
    assert record is not None and record.result.workflow_id == "wf-of-lost"


async def test_receipts_are_written_from_the_records_the_claim_read(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    dispatcher = replicas.b.connections.dispatcher  # it remembers nothing of t1
    claim = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    replicas.backend.fail_reads = 1_000
    assert await dispatcher.record(claim.leases, "w1", claim.read) == []
    replicas.backend.fail_reads = 0
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RECEIVED


def due_now(_: str, record: records_pb2.TaskRecord) -> bool:
    record.retry_at.Clear()
    return True


async def test_a_retry_redelivered_after_its_worker_was_lost_is_still_its_attempt(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=3))))
    first = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(first, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1"
    )
    await settle(replicas.broker, first.leases, dict.fromkeys(recorded.requeue, 0.0))  # due at once
    await replicas.a.store.update(["t1"], due_now)
    second = await lease_all(replicas.a)
    assert [lease.attempt for lease in second.leases] == [2]
    await settle(replicas.broker, second.leases, {"t1": 0.0})  # its worker is lost: the message comes back
    third = await lease_all(replicas.a)
    assert [lease.attempt for lease in third.leases] == [2]


async def test_ended_tasks_whose_repair_fails_come_back_and_the_others_are_acked(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="done", on_success=[task(name="next")])), lone(task(task_id="gone")))
    first = await lease_all(replicas.a)
    replicas.broker.fail_publishes = 1  # the callback's publish: "done" needs a repair
    await replicas.a.connections.recorder.record([outcome(first, "done")], "w1")
    await replicas.a.canceller.cancel("gone")
    await settle(replicas.broker, first.leases, {"done": 0.0, "gone": 0.0})  # both messages come back
    dispatcher = replicas.a.connections.dispatcher
    again = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    assert sorted(again.ended) == ["done", "gone"]
    await dispatcher.drop_unrunnable(again)  # the repair meets the callback's claim, moments old
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (1, 0), "gone's message acked, done's handed back for repair"
    [back] = await replicas.broker.fetch(QUEUE, 10, 30.0)
    assert back.message_id == "done"


async def test_a_message_whose_repair_fails_comes_back_only_after_the_repair_delay(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "REPAIR_RETRY_SECONDS", 60.0)  # as in production, not at once
    await submit(replicas.a, lone(task(task_id="done", on_success=[task(name="next")])))
    first = await lease_all(replicas.a)
    replicas.broker.fail_publishes = 1  # the callback's publish: "done" needs a repair
    await replicas.a.connections.recorder.record([outcome(first, "done")], "w1")
    await settle(replicas.broker, first.leases, {"done": 0.0})
    dispatcher = replicas.a.connections.dispatcher
    again = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 10, 30.0), "w1", time.monotonic())
    await dispatcher.drop_unrunnable(again)  # the repair meets the callback's claim, moments old
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 1, 0)


async def test_a_second_copy_fetched_before_the_first_copys_receipt_is_a_duplicate(replicas: Replicas) -> None:
    # A follow-up published twice (its confirmation failed, repair published it again): both copies
    # reach two pumps of one replica before the first copy's RECEIVED is written.
    await submit(replicas.a, lone(task(task_id="cb")))
    await replicas.a.connections.dispatcher.followups.publisher.publish([Publication(task(task_id="cb"), 1, "")])
    dispatcher = replicas.a.connections.dispatcher
    first = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w1", time.monotonic())
    second = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w2", time.monotonic())
    assert [lease.task_id for lease in first.leases] == ["cb"]
    assert second.leases == [] and len(second.duplicates) == 1


async def test_a_task_handed_out_again_after_its_lease_ended_is_not_a_duplicate(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    dispatcher = replicas.a.connections.dispatcher
    first = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w1", time.monotonic())
    dispatcher.released(first.leases)  # e.g. handed back as too large for its worker
    await dispatcher.followups.publisher.publish([Publication(task(task_id="t1"), 1, "")])  # a first delivery
    again = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w2", time.monotonic())
    assert [lease.task_id for lease in again.leases] == ["t1"]


async def test_a_hand_out_older_than_half_a_lease_no_longer_blocks_a_copy(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    dispatcher = replicas.a.connections.dispatcher
    await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w1", time.monotonic())
    await dispatcher.followups.publisher.publish([Publication(task(task_id="t1"), 1, "")])
    later = time.monotonic() + dispatcher.lease_seconds / 2 + 1  # its RECEIVED decides by now
    again = await dispatcher.claim(await replicas.broker.fetch(QUEUE, 1, 30.0), "w2", later)
    assert [lease.task_id for lease in again.leases] == ["t1"]


async def test_a_retry_claimed_exactly_at_its_due_time_runs(replicas: Replicas) -> None:
    manual = ManualClock()
    core = Core.build(replicas.a.settings, replicas.broker, replicas.backend, clock=manual.clock)
    await submit(core, lone(task(task_id="t1", retry=task_pb2.RetryPolicy(max_attempts=3))))
    first = await lease_all(core)
    recorded = await core.connections.recorder.record([outcome(first, "t1", worker_service_pb2.OUTCOME_FAILURE)], "w1")
    await settle(replicas.broker, first.leases, dict.fromkeys(recorded.requeue, 0.0))  # back at once
    record = await core.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RETRY
    manual.wall = seconds_of(record.retry_at)  # the claim happens at the due time
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, "w1", manual.monotonic)
    assert ([lease.task_id for lease in claim.leases], claim.early) == (["t1"], [])


async def test_a_claim_of_tasks_whose_records_exist_recreates_none(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        claim = await lease_all(replicas.a)
    assert [lease.task_id for lease in claim.leases] == ["t1"]
    assert "recreating" not in caplog.text


# -- a lost delivery noted, and what is not one ------------------------------------------------------

async def test_a_lost_delivery_is_noted_with_which_delivery_of_which_attempt_was_lost(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    first = await lease_all(replicas.a)
    await settle(replicas.broker, first.leases, {"t1": 0.0})  # its worker is lost: the message comes back
    await lease_all(replicas.a, "w2")
    record = await replicas.a.store.get("t1")
    assert record is not None
    assert [(e.type, e.message) for e in record.attempt_errors] == [(
        "WorkerLost",
        "delivery 1 of attempt 1 ended without an outcome: its worker (or that worker's server) was lost mid-run",
    )]


async def test_a_task_a_worker_rejected_is_not_noted_as_lost_when_delivered_again(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    first = await lease_all(replicas.a)
    [lease] = first.leases
    rejected = worker_service_pb2.RejectedTask(task_id="t1", lease_token=lease.token, reason="unknown task: n")
    recorded = await replicas.a.connections.recorder.reject([rejected], "w1")
    assert list(recorded.requeue) == ["t1"]  # handed back for another worker: its lease ended, nothing ran
    await settle(replicas.broker, first.leases, {"t1": 0.0})  # back at once
    record = await replicas.a.store.get("t1")
    assert record is not None and record.result.state == result_pb2.TASK_STATE_RECEIVED and not record.lease_token
    again = await lease_all(replicas.a, "w2")
    assert [lease.task_id for lease in again.leases] == ["t1"]
    record = await replicas.a.store.get("t1")
    assert record is not None and list(record.attempt_errors) == []


# -- hand-outs this replica remembers, at the edges of half a lease ------------------------------------

T0 = 1_000.0  # a monotonic time; the claims below say when they happen


async def claim_one(dispatcher: dispatch.Dispatcher, now: float) -> dispatch.Claim:
    """Claim the next ready message at monotonic time `now`."""
    return await dispatcher.claim(await dispatcher.broker.fetch(QUEUE, 1, 30.0), "w1", now)


async def test_a_copy_fetched_within_half_a_lease_of_the_hand_out_is_a_duplicate(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    dispatcher = replicas.a.connections.dispatcher
    horizon = dispatcher.lease_seconds / 2
    assert [lease.task_id for lease in (await claim_one(dispatcher, T0)).leases] == ["t1"]
    await dispatcher.followups.publisher.publish([Publication(task(task_id="t1"), 1, "")])
    copy = await claim_one(dispatcher, T0 + 0.8 * horizon)  # past a third of a lease, within half of one
    assert copy.leases == [] and len(copy.duplicates) == 1


async def test_pruning_keeps_a_hand_out_exactly_half_a_lease_old(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t0")), lone(task(task_id="t1")))
    dispatcher = replicas.a.connections.dispatcher
    horizon = dispatcher.lease_seconds / 2
    assert [lease.task_id for lease in (await claim_one(dispatcher, T0)).leases] == ["t0"]  # pruned at T0
    assert [lease.task_id for lease in (await claim_one(dispatcher, T0 + 1)).leases] == ["t1"]
    await dispatcher.followups.publisher.publish([Publication(task(task_id="t1"), 1, "")])
    # More than half a lease since the last pruning: this claim prunes, and t1's hand-out,
    # exactly half a lease old, still holds.
    copy = await claim_one(dispatcher, T0 + 1 + horizon)
    assert copy.leases == [] and len(copy.duplicates) == 1
