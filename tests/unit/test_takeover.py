"""A worker that reconnects to another replica (its own died, or restarted) names the tasks it still holds, and
that replica takes their leases over from the records (core/takeover.py): it extends them, acks them with the
result, and the replica the worker left does not hand them back. Two replicas over shared memory engines, whose
receipts any caller of the engine can use, as Redis's and SQLite's can."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from conveyor.v1 import worker_service_pb2
from conveyor_server.brokers.base import Delivery
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.sessions import WorkerSession
from conveyor_server.core.store import Loaded
from tests.unit.replicas import Replicas, quick_repairs, replicas, sent
from tests.unit.test_durability import QUEUE
from tests.unit.test_worker_stream import holding, state

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def reconnect(replicas: Replicas, held: Sequence[tuple[str, str]], queues: Sequence[str] = (QUEUE,),
              allowed: Sequence[str] = ()) -> WorkerSession:
    """The worker's new stream, on replica B, naming (task id, lease token) pairs it holds."""
    hello = worker_service_pb2.Hello(
        worker_id="w1", queues=list(queues), max_in_flight=10,
        held=[worker_service_pb2.LeaseRef(task_id=task_id, lease_token=token) for task_id, token in held],
    )
    session = replicas.b.connections.open(hello, allowed)
    sent(session)  # the Welcome
    return session


async def end_grace_on_a(replicas: Replicas, on_a: WorkerSession, orphans: list[Lease]) -> None:
    """A's grace for the worker's lost stream ends now: A hands back what no other replica took over."""
    replicas.a.connections.settings = replicas.a.connections.settings.replace(stream_grace_seconds=0.0)
    await replicas.a.connections._requeue_after_grace(on_a, orphans)


async def reconnect_and_take_over(
    replicas: Replicas, held: Sequence[tuple[str, str]], queues: Sequence[str] = (QUEUE,), allowed: Sequence[str] = ()
) -> WorkerSession:
    """The worker's new stream on B, once B has taken over what it could of the leases it names."""
    session = reconnect(replicas, held, queues, allowed)
    await replicas.b.connections._take_over(session)
    return session


@pytest.fixture
def extended(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The receipts the broker is asked to extend."""
    receipts: list[str] = []
    extend = replicas.broker.extend

    async def counting(deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        receipts.extend(d.receipt for d in deliveries)
        await extend(deliveries, lease_seconds)

    monkeypatch.setattr(replicas.broker, "extend", counting)
    return receipts


async def test_the_leases_a_worker_names_move_to_the_replica_it_reconnects_to(
    replicas: Replicas, extended: list[str]
) -> None:
    on_a, tokens = await holding(replicas, "t1", "t2", "t3")
    receipts = {lease.task_id: lease.delivery.receipt for lease in on_a.leases.values()}
    orphans = replicas.a.registry.remove(on_a)  # A lost the worker's stream

    held = [("t1", tokens["t1"]), ("t2", "not-its-token"), ("t9", "no-such-task")]
    on_b = await reconnect_and_take_over(replicas, held)

    [lease] = on_b.leases.values()
    assert (lease.task_id, lease.token, lease.delivery.receipt) == ("t1", tokens["t1"], receipts["t1"])
    assert lease.delivery.queue == QUEUE and lease.attempt == 1 and lease.recorded.done()
    assert extended == [receipts["t1"]], "extended at once: the lease may be close to lapsing"
    record = await replicas.b.store.get("t1")
    assert record is not None and record.lease_delivery.holder == replicas.b.settings.server_id

    # A's grace ends: it hands back what its worker did not take elsewhere, and not t1.
    await end_grace_on_a(replicas, on_a, orphans)
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (2, 1), "t2 and t3 are back in the queue; t1 still runs"

    # The result on B is recorded and acks the message A leased.
    result = worker_service_pb2.TaskOutcome(task_id="t1", lease_token=tokens["t1"],
                                            outcome=worker_service_pb2.OUTCOME_SUCCESS)
    await replicas.b.connections._handle(on_b, worker_service_pb2.ConnectRequest(
        results=worker_service_pb2.Results(outcomes=[result])))
    [acks] = sent(on_b)
    assert [a.status for a in acks.acks.acks] == [worker_service_pb2.ACK_STATUS_ACCEPTED]
    assert await state(replicas, "t1") == "TASK_STATE_SUCCESS"
    assert (await replicas.broker.stats(QUEUE)).in_flight == 0 and not on_b.leases


async def test_a_started_task_keeps_its_time_limit_clock_and_its_concurrency_slot(replicas: Replicas) -> None:
    on_a, tokens = await holding(replicas, "t1", concurrency_key="tenant-1", concurrency_limit=1)
    await replicas.a.connections._handle(on_a, worker_service_pb2.ConnectRequest(started=worker_service_pb2.Started(
        tasks=[worker_service_pb2.LeaseRef(task_id="t1", lease_token=tokens["t1"])])))
    replicas.a.registry.remove(on_a)

    on_b = await reconnect_and_take_over(replicas, [("t1", tokens["t1"])])
    [lease] = on_b.leases.values()
    assert lease.started_at is not None, "the time limit counts from the start the record shows"
    assert lease.concurrency_key == "tenant-1", "the slot is freed when the attempt ends, on B"


async def test_an_ended_task_or_a_queue_the_token_may_not_serve_is_not_taken_over(replicas: Replicas) -> None:
    _, tokens = await holding(replicas, "t1", "t2")
    await replicas.b.canceller.cancel("t1")
    on_b = await reconnect_and_take_over(replicas, [("t1", tokens["t1"])])
    assert not on_b.leases

    limited = await reconnect_and_take_over(replicas, [("t2", tokens["t2"])], queues=["other"], allowed=["other"])
    assert not limited.leases


async def test_nothing_is_taken_over_where_receipts_stay_with_their_replica(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch, extended: list[str]
) -> None:
    monkeypatch.setattr(replicas.broker, "portable_receipts", lambda: False)  # as on AMQP and SQS
    _, tokens = await holding(replicas, "t1")
    record = await replicas.a.store.get("t1")
    assert record is not None and not record.HasField("lease_delivery"), "no receipt is written where none helps"
    on_b = await reconnect_and_take_over(replicas, [("t1", tokens["t1"])])
    assert not on_b.leases and extended == []


async def test_a_lease_handed_back_before_its_worker_reconnects_is_not_taken_over(
    replicas: Replicas, extended: list[str]
) -> None:
    """A's grace ends before the worker reaches B: A hands t1 back and withdraws it from the record, so B does
    not keep a lease whose message is back in the queue (it would extend a dead receipt and count a lease
    that is not there while the task is handed out again)."""
    on_a, tokens = await holding(replicas, "t1")
    orphans = replicas.a.registry.remove(on_a)
    await end_grace_on_a(replicas, on_a, orphans)
    assert (await replicas.broker.stats(QUEUE)).ready == 1, "t1 is back in the queue"
    record = await replicas.a.store.get("t1")
    assert record is not None and not record.HasField("lease_delivery"), "the hand-back withdrew the lease"

    on_b = await reconnect_and_take_over(replicas, [("t1", tokens["t1"])])
    assert not on_b.leases and extended == []


async def test_a_takeover_written_after_a_hand_back_read_the_record_wins_over_it(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's takeover lands between A's read of the record and A's write: A's compare-and-set fails, A reads
    again, sees the lease held by B and does not hand it back; t1 runs on, on B."""
    on_a, tokens = await holding(replicas, "t1")
    orphans = replicas.a.registry.remove(on_a)
    on_b = reconnect(replicas, [("t1", tokens["t1"])])
    store = replicas.a.connections.store
    load = store.load
    raced = False

    async def takeover_after_read(task_ids: Sequence[str]) -> dict[str, Loaded]:
        nonlocal raced
        loaded = await load(task_ids)
        if not raced:
            raced = True
            await replicas.b.connections._take_over(on_b)
        return loaded

    monkeypatch.setattr(store, "load", takeover_after_read)
    monkeypatch.setattr(store, "remembered", lambda task_ids: {})  # A reads the backend, as after a restart
    await end_grace_on_a(replicas, on_a, orphans)
    assert raced and [lease.task_id for lease in on_b.leases.values()] == ["t1"]
    stats = await replicas.broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight) == (0, 1), "t1 stays leased, to its worker on B"
    record = await replicas.b.store.get("t1")
    assert record is not None and record.lease_delivery.holder == replicas.b.settings.server_id
