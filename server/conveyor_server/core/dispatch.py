"""Turns leased broker messages into worker assignments.

`claim` decides which tasks may run and builds their assignments from the messages; the
caller sends them at once. RECEIVED, which makes a lease token valid in the record, is written
later: a quick task's result arrives first and both go into one write (as a task quicker than
the worker's STARTED report skips that report); a slower task gets RECEIVED from `record`
after a short delay. A lease that replaces an earlier one (a redelivery, a retry) gets its
RECEIVED at once, so that results under the earlier lease are refused from then on. Anything
that checks a lease token against the record (a result, a Started or progress report) first
makes sure its RECEIVED is written or is being written with it. A task found ended when its
RECEIVED is written (cancelled by another replica a moment before) is withdrawn: its message
is acked and the worker told to cancel it.

Whether a task may run is decided on a fresh read of its record, never on this process's
remembered copy: another replica may have cancelled it since. A message whose task already
ended (a duplicate, a cancelled task, or a redelivery after the server died between recording
a result and acking) is dropped: for ended tasks the follow-ups are first repeated
idempotently (repair), and the message is acked only once they are done. A replaced task
(core/replacement.py) counts as ended: its replacement is started again (idempotently). A
retry's message that comes back before its next attempt is due is handed back with the
remaining delay.

Deliveries are counted: a message that comes back for a task still RECEIVED or STARTED under
an earlier lease was lost with its worker (or that worker's server) mid-run; the record notes a
WorkerLost for it, and after `max_deliveries` such deliveries of one attempt the task is not run
again but fails for good (`Claim.exhausted`), so a task that kills its workers cannot loop.

A task past its expiry (core/expiry.py), or a retry due after it, is not sent either: it is
left in `Claim.expired`, to end EXPIRED with the follow-ups of a failure.

Limits come last (core/limits/): of the tasks that may run, those over a rate limit or without
a free slot of their concurrency key are not assigned but wait in their queue (`Claim.limited`,
each with its delay); a task is never failed for a limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import worker_service_pb2
from conveyor.values import seconds_of

from ..brokers.base import Broker, Delivery
from ..random_ids import hex_tokens
from . import withdrawn
from .clock import SYSTEM_CLOCK, Clock
from .confirmed import RepairPending
from .expiry import is_expired
from .followups import FollowUps
from .publisher import decode_message
from .records import FAILED_STATES, TaskStates, error, is_terminal, new_record, transition
from .repair import replaces_stale_lease
from .replacement import is_replaced, waits_for_replacement
from .store import Loaded, TaskStore

if TYPE_CHECKING:
    from .limits import DispatchLimits

_RUNNING = (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED)
# Ended tasks whose repair failed (an engine error) come back for another try after this long.
REPAIR_RETRY_SECONDS = 2.0
# Deliveries of one attempt that may end without an outcome before the task fails for good.
DEFAULT_MAX_DELIVERIES = 3

log = logging.getLogger(__name__)

_Messages = dict[str, tuple[Delivery, records_pb2.TaskMessage]]


@dataclass(slots=True)
class Lease:
    """One assignment held by a worker."""

    task_id: str
    token: str
    attempt: int
    delivery: Delivery
    # Seconds the attempt may run (0: no limit) and when it was handed out (monotonic).
    time_limit: float
    assigned_at: float
    # When it was handed out, for the RECEIVED transition.
    dispatched_at: Timestamp = field(default_factory=Timestamp)
    # True until a write of RECEIVED for this lease begins (alone, or with the result).
    receipt_pending: bool = True
    # Done once that write has ended (or the lease was withdrawn).
    recorded: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # When the worker reported the attempt running (monotonic); the server's time-limit
    # backstop counts from here, since a prefetched task may wait in the worker for a slot.
    started_at: float | None = None
    # The concurrency key whose slot this attempt holds (core/limits/); empty: none.
    concurrency_key: str = ""


def _trace_dispatch(assignment: worker_service_pb2.Assignment, worker_id: str) -> None:
    """The task's "dispatch" span; the worker's execute span becomes its child."""
    task = assignment.task
    attributes = tracing.task_attributes("dispatch", task.id, task.name, task.queue, assignment.attempt)
    attributes["conveyor.worker.id"] = worker_id
    with tracing.span(f"dispatch {task.name}", task.headers, attributes=attributes):
        tracing.inject(task.headers)


@dataclass(slots=True)
class Claimed:
    assignment: worker_service_pb2.Assignment
    lease: Lease


@dataclass(slots=True)
class Claim:
    """Assignments to send now, and the messages that will not run."""

    claimed: list[Claimed]
    read: dict[str, Loaded]
    ended: dict[str, Delivery]
    duplicates: list[Delivery]
    # Retries that came back before their next attempt is due, with the seconds still to wait.
    early: list[tuple[Delivery, float]]
    # Leases that replace an earlier one (a redelivery, a retry): their RECEIVED is written at
    # once, so that results under the earlier lease are refused from now on.
    replacing: list[Lease] = field(default_factory=list)
    # Tasks whose deliveries were all lost (max_deliveries): to fail for good, by task id, with
    # the lease token of the last lost delivery and the message.
    exhausted: dict[str, tuple[str, Delivery]] = field(default_factory=dict)
    # Messages of tasks this worker did not register (core/routing.py), with their task names.
    elsewhere: list[tuple[Delivery, records_pb2.TaskMessage]] = field(default_factory=list)
    # Messages of tasks held back by a rate limit or a concurrency key, with how long each waits.
    limited: list[tuple[Delivery, float]] = field(default_factory=list)
    # Tasks past their expiry, not to run: to end EXPIRED, by task id, with the lease token their
    # record held (empty: none) and the message.
    expired: dict[str, tuple[str, Delivery]] = field(default_factory=dict)

    @property
    def leases(self) -> list[Lease]:
        return [c.lease for c in self.claimed]


def mark_received(record: records_pb2.TaskRecord, lease: Lease, worker_id: str) -> bool:
    """RECEIVED with the lease's token; False (and no change) when the task already ended (or
    was replaced)."""
    if is_terminal(record) or is_replaced(record):
        return False
    if record.result.state in _RUNNING and record.lease_token and record.lease_token != lease.token:
        record.attempt_errors.append(error(
            "WorkerLost",
            f"delivery {record.deliveries} of attempt {record.result.attempts} ended without an outcome: "
            "its worker (or that worker's server) was lost mid-run",
        ))
    if record.lease_token != lease.token:
        record.deliveries += 1
        record.ClearField("lease_delivery")  # the earlier lease's
    record.lease_token = lease.token
    record.enqueued = True
    record.result.attempts = lease.attempt
    record.result.worker_id = worker_id
    transition(record, TaskStates.TASK_STATE_RECEIVED, at=lease.dispatched_at, worker_id=worker_id)
    return True


def stamp_delivery(record: records_pb2.TaskRecord, delivery: Delivery, holder: str) -> None:
    """Write the lease's broker delivery into the record, with the replica that keeps it, for
    another replica to take the lease over (core/takeover.py)."""
    stamped = record.lease_delivery
    stamped.queue = delivery.queue
    stamped.message_id = delivery.message_id
    stamped.receipt = delivery.receipt
    stamped.delivery_count = delivery.delivery_count
    stamped.holder = holder


class Dispatcher:
    def __init__(
        self, store: TaskStore, broker: Broker, followups: FollowUps, lease_seconds: float,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES, limits: DispatchLimits | None = None,
        *, clock: Clock = SYSTEM_CLOCK, server_id: str = "",
    ) -> None:
        self.store = store
        self.broker = broker
        self.followups = followups
        self.lease_seconds = lease_seconds
        self.max_deliveries = max(max_deliveries, 1)
        self.limits = limits
        self.clock = clock
        # Written into the records of the leases this replica keeps, where others may take them over.
        self.server_id = server_id
        # Attempts this replica handed out whose lease has not ended: task id -> (attempt, when,
        # monotonic). A second copy of a task's message (a follow-up published again because its
        # confirmation failed) can be fetched before the first copy's RECEIVED is written, when
        # the record cannot tell yet that the task is held; this can.
        self._handed_out: dict[str, tuple[int, float]] = {}
        self._pruned_at = 0.0

    async def claim(
        self, deliveries: Sequence[Delivery], worker_id: str, now: float,
        can_run: Callable[[str], bool] = lambda name: True,
    ) -> Claim:
        """Build an assignment for each delivered task that has not ended and that the worker
        can run (`can_run(task name)`; the others are left in `Claim.elsewhere`)."""
        messages: _Messages = {}
        duplicates: list[Delivery] = []
        elsewhere: list[tuple[Delivery, records_pb2.TaskMessage]] = []
        for delivery in deliveries:
            try:
                message = decode_message(delivery.body)
            except Exception:  # a foreign or corrupt message must not wedge the queue
                log.exception("dropping undecodable message %s on %s", delivery.message_id, delivery.queue)
                duplicates.append(delivery)
                continue
            task_id = message.signature.id
            if task_id in messages:
                duplicates.append(delivery)
            elif not can_run(message.signature.name):
                elsewhere.append((delivery, message))
            else:
                messages[task_id] = (delivery, message)
        records = await self._read(messages)
        stamp = self.clock.timestamp()
        wall = seconds_of(stamp)
        # Once per claim, not per task: each costs a system call (Python 3.11's
        # get_running_loop asks for the pid; a token reads the system's random source).
        loop = asyncio.get_running_loop()
        tokens = hex_tokens(len(messages))
        traced = tracing.enabled()
        claimed: list[Claimed] = []
        ended: dict[str, Delivery] = {}
        early: list[tuple[Delivery, float]] = []
        exhausted: dict[str, tuple[str, Delivery]] = {}
        expired: dict[str, tuple[str, Delivery]] = {}
        for task_id, (delivery, message) in messages.items():
            found = records.get(task_id)
            if found is None or is_terminal(found.record) or is_replaced(found.record):
                ended[task_id] = delivery  # a replaced task's run is over: it waits for its replacement
                continue
            record = found.record
            if (record.result.state in _RUNNING and record.lease_token and delivery.delivery_count <= 1
                    and not replaces_stale_lease(record, message)):
                # A first delivery of a task that some worker holds: a second copy of its
                # message (a publish repeated after an error). The copy held is the one that
                # comes back, redelivered, if that worker is lost. A repair's copy made for a
                # lease that showed no sign of life (its message was lost) replaces that lease.
                duplicates.append(delivery)
                continue
            if record.result.state in _RUNNING and record.lease_token and record.deliveries >= self.max_deliveries:
                exhausted[task_id] = (record.lease_token, delivery)
                continue
            if is_expired(message.signature, record, wall):
                expired[task_id] = (record.lease_token, delivery)
                continue
            attempt = max(message.attempt, record.result.attempts, 1)
            if record.result.state == TaskStates.TASK_STATE_RETRY:
                due = seconds_of(record.retry_at) - wall
                if due > 0:
                    early.append((delivery, due))
                    continue
                attempt = record.result.attempts + 1
            if (delivery.delivery_count <= 1 and self._holds(task_id, attempt, now)
                    and not replaces_stale_lease(record, message)):
                duplicates.append(delivery)  # as above: the copy held comes back if its worker is lost
                continue
            self._handed_out[task_id] = (attempt, now)
            # From the message, not the record: a remembered record may predate the arguments a
            # workflow step got from its predecessor on another replica; its message has them.
            limit = message.signature.time_limit
            assignment = worker_service_pb2.Assignment(
                task=message.signature,
                attempt=attempt,
                lease_token=next(tokens),
                workflow_id=message.workflow_id,
                deliveries=record.deliveries + 1,  # as RECEIVED will count this one
            )
            assignment.lease_expires_at.FromSeconds(int(stamp.seconds + self.lease_seconds))
            if traced:
                _trace_dispatch(assignment, worker_id)
            claimed.append(Claimed(assignment, Lease(
                task_id, assignment.lease_token, attempt, delivery, seconds_of(limit), now,
                dispatched_at=stamp, recorded=loop.create_future(),
            )))
        limited: list[tuple[Delivery, float]] = []
        if self.limits is not None and claimed:
            admitted, limited = await self.limits.admit(claimed)
            kept = {id(c) for c in admitted}
            self.released(c.lease for c in claimed if id(c) not in kept)
            claimed = admitted
        replacing = [c.lease for c in claimed if records[c.lease.task_id].record.lease_token]
        return Claim(claimed, records, ended, duplicates, early, replacing, exhausted, elsewhere, limited, expired)

    def _holds(self, task_id: str, attempt: int, now: float) -> bool:
        """Whether this replica handed out this attempt of the task and its lease has not ended.
        Past half a lease an entry is ignored (and pruned): RECEIVED is written by then, so the
        record tells, and an entry a lost path never released cannot block the task for good."""
        horizon = self.lease_seconds / 2
        if now - self._pruned_at > horizon:
            self._handed_out = {k: v for k, v in self._handed_out.items() if now - v[1] <= horizon}
            self._pruned_at = now
        held = self._handed_out.get(task_id)
        return held is not None and held[0] == attempt and now - held[1] <= horizon

    def running_here(self, task_id: str) -> bool:
        """Whether this replica handed the task out and no result, hand-back or loss ended that
        yet (an entry a lost path never released lasts until pruned, past half a lease)."""
        return task_id in self._handed_out

    def taken_over(self, leases: Iterable[Lease]) -> None:
        """This replica keeps these leases now (another handed them out): their tasks are held."""
        now = self.clock.monotonic()
        for lease in leases:
            self._handed_out[lease.task_id] = (lease.attempt, now)

    def released(self, leases: Iterable[Lease]) -> None:
        """These leases ended (a result, a hand-back, a lost worker): their tasks may be handed out again."""
        for lease in leases:
            held = self._handed_out.get(lease.task_id)
            if held is not None and held[0] == lease.attempt:
                del self._handed_out[lease.task_id]

    async def _read(self, messages: _Messages) -> dict[str, Loaded]:
        """Fresh records of the messages' tasks; a queued task whose record is missing (it
        expired, or the backend lost it) gets it back from its message: nothing accepted is lost."""
        read = await self.store.load(list(messages))
        missing = [message for task_id, (_, message) in messages.items() if task_id not in read]
        if missing:
            await self._recreate(missing)
            read.update(await self.store.load([m.signature.id for m in missing]))
        return read

    async def _recreate(self, messages: Sequence[records_pb2.TaskMessage]) -> None:
        """Give queued tasks whose records are gone their records back, from their messages."""
        log.warning("recreating %d missing task records from their queued messages", len(messages))
        await self.store.create(new_record(m.signature, workflow_id=m.workflow_id) for m in messages)

    async def drop_unrunnable(self, claim: Claim) -> None:
        """Hand back retries that came early; repair the follow-ups of ended tasks and ack
        their messages, and ack duplicates."""
        for delivery, delay in claim.early:
            await self.broker.nack([delivery], delay)
        if claim.ended or claim.duplicates:
            await self._drop(claim.ended, claim.duplicates)

    async def record(
        self, leases: Sequence[Lease], worker_id: str, known: dict[str, Loaded] | None = None
    ) -> list[Lease]:
        """Write RECEIVED for these leases; returns those withdrawn because their task ended
        meanwhile (their messages are acked). Does not resolve `recorded`."""
        by_id = {lease.task_id: lease for lease in leases}
        portable = self.broker.portable_receipts()

        def receive(task_id: str, record: records_pb2.TaskRecord) -> bool:
            lease = by_id[task_id]
            if not mark_received(record, lease, worker_id):
                return False
            if portable:  # so that another replica can take the lease over (core/takeover.py)
                stamp_delivery(record, lease.delivery, self.server_id)
            return True

        written = await self.store.update_loaded(list(by_id), receive, known=known)
        withdrawn = [lease for lease in leases if lease.task_id not in written]
        if withdrawn:
            await self._drop({lease.task_id: lease.delivery for lease in withdrawn}, [])
        return withdrawn

    async def _drop(self, ended: dict[str, Delivery], duplicates: list[Delivery]) -> None:
        """Repeat the follow-ups of tasks that ended, then ack their messages (and the
        duplicates). A record that vanished since the claim read it is restored and its message
        returned to the queue; a repair that fails returns the message for another try."""
        if duplicates:
            await self.broker.ack(duplicates)
        if not ended:
            return
        records = await self.store.load(list(ended))
        vanished = [task_id for task_id in ended if task_id not in records]
        if vanished:
            await self._recreate([decode_message(ended[task_id].body) for task_id in vanished])
            await self.broker.nack([ended[task_id] for task_id in vanished])
        finished = [
            found.record for found in records.values()
            if found.record.result.state == TaskStates.TASK_STATE_SUCCESS or found.record.result.state in FAILED_STATES
            or waits_for_replacement(found.record)  # its replacement is started again
        ]
        try:
            if finished:
                await self.followups.after_terminal(finished, repair=True)
        except Exception as exc:
            level = logging.INFO if isinstance(exc, RepairPending) else logging.WARNING
            log.log(level, "repairing the follow-ups of %d ended tasks: %s: %s; trying again later",
                    len(finished), type(exc).__name__, exc)
            await self.broker.nack([ended[r.result.task_id] for r in finished], REPAIR_RETRY_SECONDS)
            settled = [task_id for task_id in records if task_id not in {r.result.task_id for r in finished}]
        else:
            settled = list(records)
        await self.broker.ack([ended[task_id] for task_id in settled])
        await withdrawn.dropped(self.store.backend, settled)
