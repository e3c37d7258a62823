"""Taking over the leases another replica handed out.

A worker whose stream breaks reconnects, perhaps to another replica (it was given every
replica's address and its own died) or to its own, restarted, and names the tasks it still
holds (Hello.held). This replica does not know those leases. On a broker whose receipts any
replica can use (`Broker.portable_receipts`), the task's record has what it needs: the write of
RECEIVED stamped the lease's broker delivery beside its token (`TaskRecord.lease_delivery`).

A lease is taken over only while the record still names it: the task RECEIVED or STARTED under
the very token the worker holds (a token only the lease's worker was sent), so a worker cannot
claim a task it was not given, nor a lease that lapsed and went to another worker. Taking it
over writes this replica as the lease's holder, so that a replica still keeping the lease as
its own (its old stream not ended yet) does not hand it back when that stream ends; and it
extends the delivery at once, since the lease may be close to lapsing. That replica, handing
its leases back, withdraws them from their records the same way (compare-and-set): of a
takeover and a hand-back, the one that writes second finds the lease gone. A stale receipt (the
message was leased again since) matches nothing in the broker: extending it does nothing.

Not found, and so lapsing and running again as before: a lease whose RECEIVED was not written
yet (handed out moments before its replica died), a lease handed back before its worker
reconnected (its replica's grace ran out), and any lease on AMQP or SQS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import worker_service_pb2
from conveyor.values import seconds_of

from ..brokers.base import Broker, Delivery
from .clock import SYSTEM_CLOCK, Clock
from .dispatch import Lease
from .limits.concurrency import is_keyed
from .records import TaskStates
from .replacement import is_replaced
from .store import Loaded, TaskStore

log = logging.getLogger(__name__)

_RUNNING = (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED)


def names_lease(record: records_pb2.TaskRecord, task_id: str, token: str) -> bool:
    """Whether the record shows this lease live, with a delivery another replica can act on."""
    return (
        record.result.state in _RUNNING
        and not is_replaced(record)
        and record.result.task_id == task_id
        and bool(token) and record.lease_token == token
        and bool(record.lease_delivery.receipt)
    )


def taken_over_elsewhere(record: records_pb2.TaskRecord, lease: Lease, server_id: str) -> bool:
    """Whether another replica took this lease over (its worker reconnected there)."""
    holder = record.lease_delivery.holder
    return names_lease(record, lease.task_id, lease.token) and bool(holder) and holder != server_id


def lease_from(record: records_pb2.TaskRecord, now: float, wall: float) -> Lease:
    """The lease the record names, as this replica keeps one (`now`: monotonic, `wall`: epoch seconds)."""
    stamped = record.lease_delivery
    signature = record.result.signature
    lease = Lease(
        task_id=record.result.task_id,
        token=record.lease_token,
        attempt=record.result.attempts,
        delivery=Delivery(stamped.message_id, b"", stamped.queue, stamped.receipt, stamped.delivery_count),
        time_limit=seconds_of(signature.time_limit),
        assigned_at=now,
        receipt_pending=False,  # RECEIVED is what the record shows
        concurrency_key=signature.concurrency_key if is_keyed(signature) else "",
    )
    lease.recorded.set_result(None)
    if record.result.state == TaskStates.TASK_STATE_STARTED and record.result.HasField("started_at"):
        # The time limit's clock keeps counting from the start the record shows.
        lease.started_at = now - max(wall - seconds_of(record.result.started_at), 0.0)
    return lease


async def take_over(
    store: TaskStore, broker: Broker, held: Sequence[worker_service_pb2.LeaseRef], server_id: str,
    lease_seconds: float, allowed_queues: Iterable[str] = (), *, clock: Clock = SYSTEM_CLOCK,
) -> list[Lease]:
    """The leases among `held` that this replica could take over (written as their holder and
    extended); none on a broker whose receipts stay with the replica that received them."""
    if not held or not broker.portable_receipts():
        return []
    tokens = {ref.task_id: ref.lease_token for ref in held}
    allowed = set(allowed_queues)

    def claim(task_id: str, record: records_pb2.TaskRecord) -> bool:
        if not names_lease(record, task_id, tokens[task_id]):
            return False
        if allowed and record.lease_delivery.queue not in allowed:
            return False  # not a queue this worker's token may serve
        # Written even when it names this replica already (a restart keeps a configured id): the
        # compare-and-set is what makes the check above hold against a concurrent result or cancel.
        record.lease_delivery.holder = server_id
        return True

    written: dict[str, Loaded] = await store.update_loaded(list(tokens), claim)
    if not written:
        return []
    leases = [lease_from(found.record, clock.monotonic(), clock.wall()) for found in written.values()]
    await broker.extend([lease.delivery for lease in leases], lease_seconds)
    return leases


async def withdraw_unmoved(store: TaskStore, broker: Broker, orphans: list[Lease], server_id: str) -> list[Lease]:
    """The leases of a worker that left this replica that no other replica took over, withdrawn
    from their records: the ones to hand back. A worker cut off from this replica alone goes on
    with its tasks on another.

    Each lease still named by its record is taken off it by compare-and-set as it is handed back,
    so this and a takeover (which writes the holder the same way) exclude each other: the one
    that writes second finds the record changed. Reading the holder alone left a window where
    both went ahead, and a worker reaching the other replica just after the grace had its lease
    "taken over" while its task was back in the queue, to be handed out again."""
    if not orphans or not broker.portable_receipts():
        return orphans
    by_token = {lease.token: lease for lease in orphans}
    moved: dict[str, str] = {}  # task id -> the token of its lease another replica took over

    def hand_back(task_id: str, record: records_pb2.TaskRecord) -> bool:
        moved.pop(task_id, None)  # decided afresh on each read
        lease = by_token.get(record.lease_token)
        if lease is None or lease.task_id != task_id or not names_lease(record, task_id, lease.token):
            return False  # the record names none of these leases: nothing to take off
        if taken_over_elsewhere(record, lease, server_id):
            moved[task_id] = lease.token
            return False
        record.ClearField("lease_delivery")
        return True

    try:
        await store.update_loaded([lease.task_id for lease in orphans], hand_back)
    except Exception as exc:  # handing back is what happens without a takeover
        log.warning("checking whether %d leases were taken over failed: %s: %s", len(orphans),
                    type(exc).__name__, exc)
        return orphans
    if moved:
        log.info("%d leases of a worker that left were taken over by another replica", len(moved))
    return [lease for lease in orphans if lease.token not in moved.values()]
