"""A heartbeat extends the worker's leases and stops what was cancelled elsewhere: a task
cancelled through another replica while this replica's worker runs it gets a CancelTasks on
the worker's stream at its next heartbeat."""

from __future__ import annotations

from conveyor.v1 import worker_service_pb2
from conveyor_server.core.sessions import WorkerSession
from tests.unit.replicas import Replicas, cancels, lease_all, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
HEARTBEAT = worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat())


async def running_on_a(replicas: Replicas, *task_ids: str) -> WorkerSession:
    """A worker session on replica A holding leases on `task_ids` (RECEIVED written)."""
    await submit(replicas.a, *(lone(task(task_id=t)) for t in task_ids))
    session = replicas.a.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10))
    claim = await lease_all(replicas.a)
    await session.settle(0, claim.leases)
    sent(session)  # the Welcome
    return session


async def test_a_task_cancelled_through_another_replica_is_stopped_at_the_next_heartbeat(
    replicas: Replicas,
) -> None:
    session = await running_on_a(replicas, "t1", "t2")
    assert await replicas.b.canceller.cancel("t1") == ["t1"]
    assert sent(session) == [], "replica B holds no session for t1: it cannot tell the worker"

    await replicas.a.connections._handle(session, HEARTBEAT)
    assert cancels(sent(session)) == ["t1"], "t2 runs on"
    await session.close()


async def test_a_heartbeat_with_nothing_cancelled_sends_nothing(replicas: Replicas) -> None:
    session = await running_on_a(replicas, "t1")
    await replicas.a.connections._handle(session, HEARTBEAT)
    assert sent(session) == []
    assert (await replicas.broker.stats(QUEUE)).in_flight == 1
    await session.close()


async def test_a_task_cancelled_on_the_same_replica_is_stopped_at_once(replicas: Replicas) -> None:
    session = await running_on_a(replicas, "t1")
    await replicas.a.canceller.cancel("t1")
    assert cancels(sent(session)) == ["t1"]
    await session.close()
