"""How reported outcomes end an attempt: the edges mutation testing found unpinned in
core/outcomes.py (the history entry of a task refused, requeued past the cap or given up, the
reason it gives, the delivery a requeue or a rejection gives back, tasks dispatch did not send).

On the shared memory engines of tests/unit/replicas.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, worker_service_pb2
from conveyor_server.core.connection import settle
from conveyor_server.core.outcomes import MAX_REQUEUES, Recorded
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_outcomes_mutants import FINISHED, entries, record_of, version
from tests.unit.test_task_rejects import refusal, requeue

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
Ending = Callable[[Replicas, str], Awaitable[Recorded]]


async def lease_token(replicas: Replicas, task_id: str) -> str:
    """Lease every ready task to w1; the lease token of `task_id`."""
    claim = await lease_all(replicas.a)
    [token] = [lease.token for lease in claim.leases if lease.task_id == task_id]
    return token


async def last_report(replicas: Replicas, task_id: str, **fields: object) -> records_pb2.TaskRecord:
    """Lease the task to w7 and report the outcome `fields` describe; its record after."""
    claim = await lease_all(replicas.a, "w7")
    await replicas.a.connections.recorder.record([outcome(claim, task_id, **fields)], "w7")  # type: ignore[arg-type]
    return await record_of(replicas, task_id)


async def requeued_to_the_cap(replicas: Replicas, **last: object) -> records_pb2.TaskRecord:
    """Submit t1, let it requeue itself until one short of the cap, then report the requeue
    `last` describes (by w7); the record after that one."""
    await submit(replicas.a, lone(task(task_id="t1")))
    for _ in range(MAX_REQUEUES - 1):
        await requeue(replicas, "t1")
    return await last_report(replicas, "t1", kind=worker_service_pb2.OUTCOME_REQUEUED, **last)


async def as_if_delivered(replicas: Replicas, task_id: str, deliveries: int) -> None:
    """Count `deliveries` deliveries of the current attempt (as after earlier ones were lost)."""

    def count(_: str, record: records_pb2.TaskRecord) -> bool:
        record.deliveries = deliveries
        return True

    await replicas.a.store.update([task_id], count)


def stamped_now(entry: result_pb2.Transition, before: float) -> bool:
    """The entry carries the server's time of the report (none was reported)."""
    return before - 1 <= entry.at.seconds <= time.time() + 1


# -- the failure entry of a task that refused itself -------------------------------------------------

async def test_a_rejected_task_fails_in_its_workers_name_at_the_reported_time(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    record = await last_report(
        replicas, "t1", kind=worker_service_pb2.OUTCOME_REJECTED, error=refusal("refused"), finished_at=FINISHED
    )
    assert entries(record)[-1] == ("FAILURE", "w7", FINISHED.seconds, "Rejected")
    assert record.result.history[-1].error.message == "refused"
    assert record.result.finished_at == FINISHED


async def test_a_task_past_the_requeue_cap_fails_in_its_workers_name_with_its_reason(replicas: Replicas) -> None:
    record = await requeued_to_the_cap(replicas, error=refusal("busy"), finished_at=FINISHED)
    assert entries(record)[-1] == ("FAILURE", "w7", FINISHED.seconds, "Rejected")
    assert record.result.error.message == f"busy (requeued itself {MAX_REQUEUES} times; the limit is {MAX_REQUEUES})"


@pytest.mark.parametrize("reported", [None, refusal("", kind="Later")], ids=["no error", "an error without message"])
async def test_a_task_past_the_requeue_cap_without_a_reason_says_requeued_at_the_servers_time(
    replicas: Replicas, reported: result_pb2.TaskError | None,
) -> None:
    before = time.time()
    record = await requeued_to_the_cap(replicas, **({"error": reported} if reported else {}))
    message = record.result.error.message
    assert message == f"requeued (requeued itself {MAX_REQUEUES} times; the limit is {MAX_REQUEUES})"
    assert stamped_now(record.result.history[-1], before)


@pytest.mark.parametrize("finished_at", [FINISHED, None], ids=["reported time", "no time reported"])
async def test_a_refused_replacement_fails_in_its_workers_name_at_the_reported_or_servers_time(
    replicas: Replicas, finished_at: Timestamp | None,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    before = time.time()
    reported = {"finished_at": finished_at} if finished_at else {}
    record = await last_report(replicas, "t1", kind=worker_service_pb2.OUTCOME_REPLACED, **reported)
    state, worker, _at, kind = entries(record)[-1]
    assert (state, worker, kind) == ("FAILURE", "w7", "InvalidReplacement")
    if finished_at:
        assert record.result.history[-1].at == FINISHED
    else:
        assert stamped_now(record.result.history[-1], before)


# -- the delivery a requeue or a rejection gives back ------------------------------------------------

async def test_a_requeue_keeps_the_attempt_and_gives_back_only_its_own_delivery(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    await as_if_delivered(replicas, "t1", 3)
    requeued = outcome(claim, "t1", worker_service_pb2.OUTCOME_REQUEUED, error=refusal("not yet"))
    await replicas.a.connections.recorder.record([requeued], "w1")
    record = await record_of(replicas, "t1")
    assert (record.deliveries, record.result.attempts) == (2, 1)


async def test_a_rejection_by_a_worker_gives_back_only_its_own_delivery(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    token = await lease_token(replicas, "t1")
    await as_if_delivered(replicas, "t1", 3)
    rejected = worker_service_pb2.RejectedTask(task_id="t1", lease_token=token, reason="no task named noop")
    await replicas.a.connections.recorder.reject([rejected], "w1")
    assert (await record_of(replicas, "t1")).deliveries == 2


# -- tasks dispatch did not send ---------------------------------------------------------------------

async def give_up(replicas: Replicas, token: str) -> Recorded:
    return await replicas.a.connections.recorder.give_up({"t1": token}, 3)


async def expire(replicas: Replicas, token: str) -> Recorded:
    return await replicas.a.connections.recorder.expire({"t1": token})


ENDINGS = pytest.mark.parametrize("end", [give_up, expire], ids=["given up", "expired"])


async def test_a_task_given_up_fails_with_a_worker_lost_entry_and_holds_no_lease(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await give_up(replicas, await lease_token(replicas, "t1"))
    record = await record_of(replicas, "t1")
    assert entries(record)[-1][::3] == ("FAILURE", "WorkerLost")
    assert record.result.error.message.endswith(": the task kills or hangs its workers")
    assert not record.lease_token


@ENDINGS
async def test_an_unsent_task_that_got_another_lease_is_left_alone(replicas: Replicas, end: Ending) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    await lease_all(replicas.a)
    leased = await version(replicas, "t1")
    recorded = await end(replicas, "an-earlier-lease")
    assert recorded.requeue == {}
    assert await version(replicas, "t1") == leased, "nothing was written"


@ENDINGS
async def test_an_unsent_task_whose_follow_ups_fail_comes_back_for_repair(replicas: Replicas, end: Ending) -> None:
    await submit(replicas.a, lone(task(task_id="t1", on_error=[task(task_id="alert")])))
    claim = await lease_all(replicas.a)
    replicas.broker.fail_publishes = 1  # the error callback's publish
    recorded = await end(replicas, claim.leases[0].token)
    assert recorded.requeue == {"t1": 0.0}
    await settle(replicas.broker, claim.leases, recorded.requeue)
    assert (await replicas.broker.stats(QUEUE)).ready == 1, "its message is back"
