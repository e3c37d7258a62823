"""A worker's stream: the edges mutation testing found unpinned (what the Welcome tells the
worker, and that a served stream's pumps hand out the tasks of every queue it named).

Driven through WorkerConnections on the memory engines; the session's outbox is what the
worker would read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import result_pb2, task_pb2
from conveyor_server.app import Core
from conveyor_server.config import Settings
from conveyor_server.core import connection
from conveyor_server.core.sessions import WorkerSession
from tests.unit.replicas import Replicas, W, quick_repairs, replicas
from tests.unit.test_durability import lone, submit
from tests.unit.test_worker_stream import handle, holding

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
S = result_pb2


async def test_the_welcome_names_the_server_its_message_limit_and_exact_intervals(replicas: Replicas) -> None:
    settings = Settings(server_id="srv-x", heartbeat_interval_seconds=5.0, lease_seconds=30.0)
    core = Core.build(settings, broker=replicas.broker, backend=replicas.backend)
    session = core.connections.open(W.Hello(worker_id="w1", max_in_flight=1))
    welcome = (await session.outbox.get()).welcome  # type: ignore[union-attr]
    assert welcome.server_id == "srv-x"
    assert welcome.max_message_bytes == settings.limits.max_message_bytes
    assert welcome.heartbeat_interval == Duration(seconds=5) and welcome.lease_duration == Duration(seconds=30)


async def assigned_within(replicas: Replicas, session: WorkerSession, wanted: set[str], seconds: float) -> bool:
    """Serve `session` (its worker silent) until the tasks `wanted` were assigned to it, or
    `seconds` passed; True when they were."""
    assigned: set[str] = set()
    done = asyncio.Event()

    async def silent() -> AsyncIterator[W.ConnectRequest]:
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
    session = replicas.a.connections.open(W.Hello(worker_id="w1", queues=["q1", "q2"], max_in_flight=window))
    await session.outbox.get()  # the Welcome
    return session


async def test_a_served_stream_hands_out_the_tasks_of_every_queue_it_named(replicas: Replicas) -> None:
    connections = replicas.a.connections
    connections.settings = connections.settings.replace(assignment_batch=2)
    session = await two_queues(replicas, window=4)  # room for both pumps' batches
    assert await assigned_within(replicas, session, {"on-q1", "on-q2"}, 10.0)


async def test_a_worker_on_two_queues_gets_the_second_queues_task_with_a_window_below_the_batch(
    replicas: Replicas,
) -> None:
    session = await two_queues(replicas, window=4)  # the default batch is 100
    # Both are ready at once; 1.5 s is more than one long-poll of the empty queue.
    assert await assigned_within(replicas, session, {"on-q1", "on-q2"}, 1.5)


# -- messages on the stream --------------------------------------------------------------------------

async def test_acks_name_the_lease_and_started_entries_the_worker(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "t1")
    await handle(replicas, session, started=W.Started(tasks=[W.LeaseRef(task_id="t1", lease_token=tokens["t1"])]))
    results = W.Results(outcomes=[W.TaskOutcome(task_id="t1", lease_token=tokens["t1"], outcome=W.OUTCOME_SUCCESS)])
    [acks] = await handle(replicas, session, results=results)
    assert [(a.task_id, a.lease_token) for a in acks.acks.acks] == [("t1", tokens["t1"])]
    record = await replicas.a.store.get("t1")
    assert record is not None
    [started] = [h for h in record.result.history if h.state == S.TASK_STATE_STARTED]
    assert started.worker_id == "w1"


async def test_a_short_time_limit_is_enforced_in_the_workers_name_and_says_why(replicas: Replicas) -> None:
    session, tokens = await holding(replicas, "quick", time_limit=Duration(nanos=500_000_000))
    lease = session.leases[tokens["quick"]]
    lease.started_at = time.monotonic() - 0.5 - connection.TIME_LIMIT_GRACE_SECONDS - 1
    await handle(replicas, session, heartbeat=W.Heartbeat())
    record = await replicas.a.store.get("quick")
    assert record is not None and record.result.state == S.TASK_STATE_FAILURE
    assert record.result.error == result_pb2.TaskError(
        type="TimeLimitExceeded", message="the attempt ran past its time limit and the worker did not stop it"
    )
    assert record.result.history[-1].worker_id == "w1"


def test_a_window_of_one_stays_one_and_a_worker_without_an_id_gets_a_short_random_one(replicas: Replicas) -> None:
    session = replicas.a.connections.open(W.Hello(max_in_flight=1))
    assert session.window == 1
    assert re.fullmatch(r"worker-[0-9a-f]{12}", session.worker_id)
