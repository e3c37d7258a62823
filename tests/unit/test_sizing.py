"""Assignments messages cut to fit the worker's receive limit (issue #14: eight legal 900 KiB
tasks batched into one 7 MiB message stalled every 4 MiB worker)."""

from __future__ import annotations

import asyncio
import time

from conveyor.v1 import task_pb2, worker_service_pb2
from conveyor_server.api.worker_service import _coalesce
from conveyor_server.core.sizing import DEFAULT_WORKER_RECEIVE_BYTES, split_to_fit
from tests.unit.replicas import Replicas, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below
KIB = 1024


def assignment(task_id: str, payload_bytes: int) -> worker_service_pb2.Assignment:
    signature = task_pb2.Signature(id=task_id, name="big", args=[task_pb2.Value(bytes_value=b"x" * payload_bytes)])
    return worker_service_pb2.Assignment(task=signature, lease_token=task_id)


def message_size(batch: list[worker_service_pb2.Assignment]) -> int:
    return worker_service_pb2.ConnectResponse(assignments=worker_service_pb2.Assignments(items=batch)).ByteSize()


def test_batches_keep_order_and_each_fits_the_limit() -> None:
    items = [assignment(f"t{i}", 900 * KIB) for i in range(8)]
    batches, oversized = split_to_fit(items, 0)
    assert oversized == []
    assert [a.lease_token for batch in batches for a in batch] == [f"t{i}" for i in range(8)]
    assert len(batches) == 2  # four 900 KiB tasks fit in 4 MiB, five do not
    assert all(message_size(batch) <= DEFAULT_WORKER_RECEIVE_BYTES for batch in batches)


def test_a_batch_is_filled_up_to_the_exact_limit() -> None:
    items = [assignment(f"t{i}", 100) for i in range(10)]
    exact = message_size(items[:3]) + 64  # the envelope room split_to_fit keeps
    batches, _ = split_to_fit(items, exact)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert all(message_size(b) <= exact for b in batches)


def test_a_task_larger_than_the_limit_alone_is_left_out() -> None:
    items = [assignment("small", 10), assignment("huge", 5000), assignment("small2", 10)]
    batches, oversized = split_to_fit(items, 2000)
    assert [[a.lease_token for a in b] for b in batches] == [["small", "small2"]]
    assert [a.lease_token for a in oversized] == ["huge"]


async def test_a_worker_with_a_small_limit_gets_fitting_messages_and_the_rest_goes_back(replicas: Replicas) -> None:
    big = [task_pb2.Value(bytes_value=b"x" * (300 * KIB))]
    await submit(replicas.a, *(lone(task(task_id=f"t{i}", args=big)) for i in range(3)))
    await submit(replicas.a, lone(task(task_id="huge", args=[task_pb2.Value(bytes_value=b"x" * (700 * KIB))])))
    connections = replicas.a.connections
    session = connections.open(
        worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=10, max_receive_bytes=650 * KIB)
    )
    sent(session)  # the Welcome
    deliveries = await replicas.broker.fetch(QUEUE, 10, 30.0)
    claim = await connections.dispatcher.claim(deliveries, "w1", time.monotonic())
    await session.settle(0, claim.leases)
    await connections._send_claimed(session, claim)

    messages = [m for m in sent(session) if m.WhichOneof("message") == "assignments"]
    assert all(m.ByteSize() <= 650 * KIB for m in messages)
    assert sorted(a.task.id for m in messages for a in m.assignments.items) == ["t0", "t1", "t2"]
    assert [len(m.assignments.items) for m in messages] == [2, 1]
    # The task too large for this worker is not held by it, and waits in the queue for another.
    assert sorted(lease.task_id for lease in session.leases.values()) == ["t0", "t1", "t2"]
    stats = await replicas.broker.stats(QUEUE)
    assert stats.in_flight == 3 and stats.ready + stats.delayed == 1
    record = await replicas.a.store.get("huge")
    assert record is not None and record.deliveries == 0 and not record.lease_token


def test_the_stream_writer_merges_queued_assignments_only_up_to_the_limit() -> None:
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse | None] = asyncio.Queue()
    batches = [[assignment(f"t{i}", 300 * KIB)] for i in range(4)]
    for batch in batches[1:]:
        outbox.put_nowait(worker_service_pb2.ConnectResponse(assignments=worker_service_pb2.Assignments(items=batch)))
    outbox.put_nowait(worker_service_pb2.ConnectResponse(acks=worker_service_pb2.ResultAcks(acks=[worker_service_pb2.ResultAck(task_id="x")])))
    first = worker_service_pb2.ConnectResponse(assignments=worker_service_pb2.Assignments(items=batches[0]))
    merged, ended = _coalesce(first, outbox, 650 * KIB)
    assert not ended
    assert [[a.lease_token for a in m.assignments.items] for m in merged if m.HasField("assignments")] == [
        ["t0", "t1"], ["t2", "t3"],
    ]
    assert all(m.ByteSize() <= 650 * KIB for m in merged)
    assert merged[-1].HasField("acks")
