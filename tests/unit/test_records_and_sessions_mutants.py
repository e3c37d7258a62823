"""Records, errors and worker sessions: the edges mutation testing found unpinned (what a new
record and a transition write, a unique task's key, a session's reservations and high-water
mark, leaving twice)."""

from __future__ import annotations

import random

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.brokers.base import Delivery
from conveyor_server.core.dispatch import Lease
from conveyor_server.core.records import error, new_record, transition, unique_key
from conveyor_server.core.sessions import SessionRegistry, WorkerSession

# -- records ---------------------------------------------------------------------------------------

def test_an_error_keeps_its_traceback() -> None:
    expected = result_pb2.TaskError(type="Boom", message="m", traceback="Traceback ...")
    assert error("Boom", "m", "Traceback ...") == expected


def test_a_new_lone_task_record_belongs_to_no_workflow_and_starts_its_history_when_submitted() -> None:
    stamp = Timestamp(seconds=1_700_000_000, nanos=5)
    record = new_record(task_pb2.Signature(name="n", id="t1"), at=stamp)
    assert record.result.workflow_id == ""
    assert record.result.submitted_at == stamp
    assert [(h.state, h.at) for h in record.result.history] == [(result_pb2.TASK_STATE_PENDING, stamp)]


def test_a_transition_records_the_attempt_and_the_worker_or_no_worker() -> None:
    record = new_record(task_pb2.Signature(name="n", id="t1"))
    record.result.attempts = 2
    transition(record, result_pb2.TASK_STATE_STARTED, worker_id="w7")
    transition(record, result_pb2.TASK_STATE_RETRY)
    started, retry = record.result.history[-2:]
    assert (started.state, started.attempt, started.worker_id) == (result_pb2.TASK_STATE_STARTED, 2, "w7")
    assert (retry.state, retry.attempt, retry.worker_id) == (result_pb2.TASK_STATE_RETRY, 2, "")


def kwargs_call(kwargs: dict[str, int], name: str = "n", queue: str = "q") -> task_pb2.Signature:
    """A call of `name` on `queue` with one arg, its kwargs set in the order `kwargs` has them."""
    call = task_pb2.Signature(name=name, queue=queue, args=[task_pb2.Value(int_value=1)])
    for key, number in kwargs.items():
        call.kwargs[key].int_value = number
    return call


def orders_that_serialize_apart() -> tuple[task_pb2.Signature, task_pb2.Signature]:
    """One call with its kwargs set in two orders whose plain serializations differ (the case the
    key must absorb). Whether two orders do depends on the protobuf map's hash seed, which
    changes per process, so a few key sets are tried: most pairs of orders differ."""
    rng = random.Random(21)
    for attempt in range(100):
        keys = [f"k{attempt}-{i}" for i in range(10)]
        shuffled = keys[:]
        rng.shuffle(shuffled)
        first, second = kwargs_call(dict.fromkeys(keys, 1)), kwargs_call(dict.fromkeys(shuffled, 1))
        if first.SerializeToString() != second.SerializeToString():
            return first, second
    raise AssertionError("no two orders of kwargs serialized apart in 100 tries")


def test_a_unique_tasks_key_does_not_depend_on_the_order_its_kwargs_were_set_in() -> None:
    first, second = orders_that_serialize_apart()
    assert unique_key(first) == unique_key(second)


def test_a_unique_tasks_key_tells_apart_calls_that_differ_only_in_name_queue_or_kwargs() -> None:
    call = kwargs_call({"a": 1})
    for other in (kwargs_call({"a": 1}, name="m"), kwargs_call({"a": 1}, queue="r"), kwargs_call({"a": 2}),
                  kwargs_call({})):
        assert unique_key(other) != unique_key(call), other
    same = kwargs_call({"a": 1})
    same.id, same.idempotency_key = "another-id", "another-key"  # not part of what it runs or where
    assert unique_key(same) == unique_key(call)


# -- worker sessions -------------------------------------------------------------------------------

def session(window: int) -> WorkerSession:
    return WorkerSession("w1", worker_service_pb2.Hello(), ["q"], window, Timestamp(), last_seen=0.0)


def lease(token: str) -> Lease:
    return Lease(token, token, 1, Delivery(token, b"", "q", token), 0.0, 0.0)


async def test_reservations_add_up_within_the_window() -> None:
    worker = session(window=4)
    assert await worker.reserve(1) == 1
    assert await worker.reserve(2) == 2
    assert worker.free() == 1
    assert await worker.reserve(5) == 1


async def test_the_high_water_mark_counts_leases_and_slots_still_reserved() -> None:
    worker = session(window=4)
    await worker.reserve(3)
    await worker.settle(1, [lease("a")])
    assert worker.high_water == 3  # one lease held, two slots still reserved by other fetches


async def test_leaving_twice_and_taking_a_lease_that_is_no_orphan_are_harmless() -> None:
    registry = SessionRegistry()
    worker = session(window=2)
    registry.add(worker)
    await worker.reserve(1)
    await worker.settle(1, [lease("a")])
    assert [o.token for o in registry.remove(worker)] == ["a"]
    assert registry.remove(worker) == []
    assert registry.take_orphans([lease("never-orphaned")]) == []
    assert [o.token for o in registry.take_orphans([lease("a")])] == ["a"]
    assert registry.take_orphans([lease("a")]) == []


async def test_a_reconnected_worker_keeps_the_orphans_it_names_and_nothing_else() -> None:
    registry = SessionRegistry()
    before = session(window=4)
    registry.add(before)
    await before.reserve(3)
    await before.settle(3, [lease("a"), lease("b"), lease("c")])
    orphans = registry.remove(before)
    after = session(window=4)
    registry.add(after)
    held = [worker_service_pb2.LeaseRef(task_id="a", lease_token="a"),
            worker_service_pb2.LeaseRef(task_id="someone-else", lease_token="b"),  # the token of another task
            worker_service_pb2.LeaseRef(task_id="z", lease_token="z")]  # no such orphan
    assert [adopted.token for adopted in registry.adopt(after, held)] == ["a"]
    assert list(after.leases) == ["a"] and after.free() == 3
    # The grace ends: only what was not adopted goes back to the queue.
    assert [o.token for o in registry.take_orphans(orphans)] == ["b", "c"]
    # A stream that names it again (the worker reconnected once more before this replica saw the second
    # stream end) takes the lease from the second: one session holds it, the latest.
    latest = session(window=4)
    assert [adopted.token for adopted in registry.adopt(latest, held)] == ["a"]
    assert list(latest.leases) == ["a"] and not after.leases


async def test_a_worker_reconnecting_before_its_old_stream_is_seen_ending_keeps_what_it_names() -> None:
    """A connection that died without a word is still open here when the worker's new stream comes: the
    leases it names move to the new stream (else the old stream's end would hand them back, still running)."""
    registry = SessionRegistry()
    before = session(window=4)
    registry.add(before)
    await before.reserve(2)
    await before.settle(2, [lease("a"), lease("b")])
    after = session(window=4)
    registry.add(after)
    held = [worker_service_pb2.LeaseRef(task_id="a", lease_token="a"),
            worker_service_pb2.LeaseRef(task_id="other", lease_token="b")]  # b's token under another task id
    assert [adopted.token for adopted in registry.adopt(after, held)] == ["a"]
    assert list(after.leases) == ["a"] and list(before.leases) == ["b"]
    assert [o.token for o in registry.remove(before)] == ["b"]  # only b goes back when the old stream ends
