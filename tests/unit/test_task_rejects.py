"""A task that rejects itself, on the memory engines: OUTCOME_REJECTED fails it for good with
"Rejected" (no retry, a dead letter); OUTCOME_REQUEUED hands its message back so the same attempt
runs again, not counted as a failure nor as a lost delivery, and past MAX_REQUEUES it fails with
"Rejected" instead of requeueing itself forever."""

from __future__ import annotations

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.core.connection import settle
from conveyor_server.core.outcomes import MAX_REQUEUES
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from tests.unit.replicas import Replicas, lease_all, outcome, quick_repairs, replicas
from tests.unit.test_durability import QUEUE, lone, submit, task
from tests.unit.test_outcomes_and_dispatch import record_of

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
RETRIED = task_pb2.RetryPolicy(max_attempts=3)


def refusal(message: str, kind: str = "Rejected") -> result_pb2.TaskError:
    return result_pb2.TaskError(type=kind, message=message)


async def requeue(replicas: Replicas, task_id: str) -> dict[str, float]:
    """Lease the task, report that it requeued itself, and hand its message back at once;
    returns the delays the recorder asked for."""
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, task_id, worker_service_pb2.OUTCOME_REQUEUED, error=refusal("not yet"))], "w1"
    )
    assert recorded.statuses[task_id] == worker_service_pb2.ACK_STATUS_ACCEPTED
    await settle(replicas.broker, claim.leases, dict.fromkeys(recorded.requeue, 0.0))
    return recorded.requeue


async def test_a_rejected_task_fails_for_good_despite_its_retry_policy_and_is_a_dead_letter(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=RETRIED)))
    claim = await lease_all(replicas.a)
    recorded = await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_REJECTED, error=refusal("refused"))], "w1"
    )
    assert recorded.requeue == {}, "nothing goes back to the queue"
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_FAILURE and record.result.attempts == 1
    assert (record.result.error.type, record.result.error.message) == ("Rejected", "refused")
    assert await replicas.backend.members(DEAD_LETTERS_GROUP) == {"t1": QUEUE.encode()}


async def test_a_rejection_without_an_error_type_is_typed_rejected(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    await replicas.a.connections.recorder.record(
        [outcome(claim, "t1", worker_service_pb2.OUTCOME_REJECTED, error=refusal("why", kind=""))], "w1"
    )
    assert (await record_of(replicas, "t1")).result.error.type == "Rejected"


async def test_a_requeued_task_runs_the_same_attempt_again_without_a_failure(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1", retry=RETRIED)))
    delays = await requeue(replicas, "t1")
    assert list(delays) == ["t1"] and delays["t1"] > 0, "it waits a moment before coming back"
    record = await record_of(replicas, "t1")
    assert not record.lease_token and record.requeues == 1 and record.deliveries == 0
    assert not record.attempt_errors and not record.result.HasField("error")
    assert await replicas.backend.members(DEAD_LETTERS_GROUP) == {}
    again = await lease_all(replicas.a, "w2")
    assert [lease.attempt for lease in again.leases] == [1], "the same attempt, as Celery redelivers its message"
    await replicas.a.connections.recorder.record([outcome(again, "t1")], "w2")
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_SUCCESS and record.result.attempts == 1


async def test_a_result_under_the_lease_that_requeued_is_stale(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    claim = await lease_all(replicas.a)
    recorder = replicas.a.connections.recorder
    await recorder.record([outcome(claim, "t1", worker_service_pb2.OUTCOME_REQUEUED, error=refusal("not yet"))], "w1")
    late = await recorder.record([outcome(claim, "t1")], "w1")
    assert late.statuses["t1"] == worker_service_pb2.ACK_STATUS_STALE_LEASE


async def test_a_task_that_keeps_requeueing_itself_fails_with_rejected_at_the_cap(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="t1")))
    for _ in range(MAX_REQUEUES - 1):
        assert "t1" in await requeue(replicas, "t1")
    assert await requeue(replicas, "t1") == {}, "the last one does not go back"
    record = await record_of(replicas, "t1")
    assert record.result.state == result_pb2.TASK_STATE_FAILURE and record.result.error.type == "Rejected"
    assert f"requeued itself {MAX_REQUEUES} times" in record.result.error.message
    assert await replicas.backend.members(DEAD_LETTERS_GROUP) == {"t1": QUEUE.encode()}
