"""Records what workers report: starts, results, failures with retries, rejections.

The first terminal result for the attempt holding the live lease wins; everything else is
refused with a ResultAck saying why. A retry clears the lease (results of the failed attempt
are stale from then on) and its message goes back to the broker, delayed until the next
attempt is due. A message is acked only once its result and follow-ups are durable; when a
follow-up fails, the message is handed back and comes back for repair.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import Span

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2, worker_service_pb2
from conveyor.values import set_seconds

from ..backends.base import Backend
from .clock import SYSTEM_CLOCK, Clock
from .dispatch import Lease, mark_received
from .expiry import is_expired, mark_expired
from .followups import FollowUps
from .records import DEAD_LETTERS_GROUP, TaskStates, error, is_terminal, transition
from .replacement import Checked, is_replaced, mark_replaced, waits_for_replacement
from .retry import attempts_allowed, next_delay, seconds
from .routing import bounce_delay
from .routing_timeout import mark_unroutable
from .store import TaskStore

log = logging.getLogger(__name__)

# Attempts allowed for a task that asks to be retried but whose policy sets no maximum.
DEFAULT_EXPLICIT_RETRY_ATTEMPTS = 3
# Rejections of one task (by workers that registered its name but could not run it) before it
# fails with UnknownTask.
MAX_REJECTS = 5
# Times a task may send itself back to its queue (Reject(requeue=True)) before it fails with
# Rejected: a task that always requeues itself cannot loop forever.
MAX_REQUEUES = 10
# A task whose follow-ups failed (an engine error) comes back for repair after this long.
REPAIR_DELAY_SECONDS = 1.0
AckStatus: TypeAlias = worker_service_pb2.AckStatus.ValueType
ACCEPTED = worker_service_pb2.ACK_STATUS_ACCEPTED


@dataclass(slots=True)
class _Decision:
    status: AckStatus = ACCEPTED
    retry_delay: float = 0.0
    # The task asked to go back to its queue: its message is handed back after retry_delay.
    requeue: bool = False


@dataclass(slots=True)
class Recorded:
    """What became of reported outcomes."""

    statuses: dict[str, AckStatus] = field(default_factory=dict)
    # Task id -> delay: messages to hand back to the broker instead of acking (a retry waits
    # there for its next attempt; a task whose follow-ups failed comes back for repair).
    requeue: dict[str, float] = field(default_factory=dict)


def mark_started(record: records_pb2.TaskRecord, at: Timestamp, worker_id: str) -> bool:
    if record.result.state != TaskStates.TASK_STATE_RECEIVED:
        return False
    record.result.started_at.CopyFrom(at)
    transition(record, TaskStates.TASK_STATE_STARTED, at=at, worker_id=worker_id)
    return True


class OutcomeRecorder:
    def __init__(
        self, store: TaskStore, followups: FollowUps,
        on_attempt_ended: Callable[[records_pb2.TaskRecord], None] | None = None, *, clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.followups = followups
        self.on_attempt_ended = on_attempt_ended
        self.clock = clock
        self.backend: Backend = store.backend

    async def started(self, refs: Sequence[worker_service_pb2.LeaseRef], worker_id: str) -> None:
        tokens = {ref.task_id: ref.lease_token for ref in refs}
        at = self.clock.timestamp()

        def apply(task_id: str, record: records_pb2.TaskRecord) -> bool:
            return record.lease_token == tokens[task_id] and mark_started(record, at, worker_id)

        await self.store.update(list(tokens), apply)

    async def progress(self, items: Sequence[worker_service_pb2.ProgressItem]) -> None:
        by_id = {item.task_id: item for item in items}

        def apply(task_id: str, record: records_pb2.TaskRecord) -> bool:
            item = by_id[task_id]
            if record.lease_token != item.lease_token or is_terminal(record):
                return False
            record.result.progress.CopyFrom(item.progress)
            return True

        await self.store.update(list(by_id), apply)

    async def record(
        self, outcomes: Sequence[worker_service_pb2.TaskOutcome], worker_id: str,
        receipts: Mapping[str, Lease] | None = None, allowed_queues: Collection[str] = (),
    ) -> Recorded:
        """Apply outcomes; returns the ack status per task id and the messages to hand back.
        `receipts` holds the leases whose RECEIVED is not written yet: it is written along
        with their outcome. `allowed_queues`: the only queues the worker's replacements may
        use (its token's; empty: any)."""
        by_id = {o.task_id: o for o in outcomes}
        decisions: dict[str, _Decision] = {}
        receipts = receipts or {}
        replacements = await self.followups.replacements.prepare(outcomes, allowed_queues)

        def apply(task_id: str, record: records_pb2.TaskRecord) -> bool:
            decision = decisions[task_id] = _Decision()
            outcome = by_id[task_id]
            if is_terminal(record) or is_replaced(record):
                decision.status = worker_service_pb2.ACK_STATUS_ALREADY_DONE
                return False
            receipt = receipts.get(task_id)
            if receipt is not None and receipt.token == outcome.lease_token:
                mark_received(record, receipt, worker_id)
            if not record.lease_token or record.lease_token != outcome.lease_token:
                decision.status = worker_service_pb2.ACK_STATUS_STALE_LEASE
                return False
            if outcome.HasField("started_at"):
                mark_started(record, outcome.started_at, worker_id)
            if outcome.outcome == worker_service_pb2.OUTCOME_REQUEUED:
                decision.requeue = _requeue(record, outcome, self._finished_at(outcome), worker_id)
                decision.retry_delay = bounce_delay(record.requeues)
            elif outcome.outcome == worker_service_pb2.OUTCOME_REPLACED:
                _replace(record, outcome, replacements.get(task_id), self._finished_at(outcome), worker_id)
            else:
                decision.retry_delay = self._apply_outcome(record, outcome, worker_id)
            return True

        written = await self.store.update(list(by_id), apply)
        recorded = Recorded()
        for task_id in by_id:
            # A decision counts only if its write stuck: one from a round that lost its
            # compare-and-set, or whose record was not found again, accepted nothing.
            decision = decisions.get(task_id)
            status = decision.status if decision is not None else worker_service_pb2.ACK_STATUS_STALE_LEASE
            if status == ACCEPTED and task_id not in written:
                status = worker_service_pb2.ACK_STATUS_STALE_LEASE
            recorded.statuses[task_id] = status
        await asyncio.sleep(0)  # clients waiting for these results get them before the follow-ups run
        await self._after(written, decisions, recorded)
        return recorded

    async def reject(self, rejected: Sequence[worker_service_pb2.RejectedTask], worker_id: str) -> Recorded:
        """A worker cannot run these (it lacks the name): hand each back to its queue for another
        worker (that delivery ran nothing, so it is not counted), and fail it with UnknownTask
        once it has been rejected MAX_REJECTS times, instead of letting it bounce forever."""
        by_id = {r.task_id: r for r in rejected}
        at = self.clock.timestamp()

        def apply(task_id: str, record: records_pb2.TaskRecord) -> bool:
            item = by_id[task_id]
            if is_terminal(record) or not record.lease_token or record.lease_token != item.lease_token:
                return False
            record.rejects += 1
            record.lease_token = ""
            if record.rejects < MAX_REJECTS:
                record.deliveries = max(record.deliveries - 1, 0)
                return True
            cause = error("UnknownTask", f"{item.reason} (worker {worker_id}; rejected {record.rejects} times)")
            record.result.error.CopyFrom(cause)
            record.attempt_errors.append(cause)
            transition(record, TaskStates.TASK_STATE_FAILURE, at=at, worker_id=worker_id, error=cause)
            return True

        written = await self.store.update(list(by_id), apply)
        recorded = Recorded()
        for task_id, record in written.items():
            if not is_terminal(record):
                recorded.requeue[task_id] = bounce_delay(record.rejects)
        await self._after({t: r for t, r in written.items() if is_terminal(r)}, {}, recorded)
        return recorded

    async def give_up(self, exhausted: Mapping[str, str], max_deliveries: int) -> Recorded:
        """Fail for good the tasks (task id -> lease token of their last delivery) whose every
        delivery of an attempt was lost with its worker: no retry, a dead letter, follow-ups as
        for any failure. A task that ended meanwhile, or got another lease, is left alone."""

        def lost(record: records_pb2.TaskRecord, at: Timestamp) -> None:
            cause = error("WorkerLost", f"gave up after {record.deliveries} deliveries of attempt "
                          f"{record.result.attempts} ended without an outcome (max_deliveries is {max_deliveries}): "
                          "the task kills or hangs its workers")
            record.attempt_errors.append(cause)
            record.result.error.CopyFrom(cause)
            record.lease_token = ""
            transition(record, TaskStates.TASK_STATE_FAILURE, at=at, error=cause)

        return await self._end_unsent(exhausted, lost)

    async def expire(self, expired: Mapping[str, str]) -> Recorded:
        """End EXPIRED the tasks (task id -> lease token their record held when dispatch found
        them past their expiry) that were not sent to a worker: follow-ups as for any failure,
        no dead letter. A task that ended meanwhile, or got another lease, is left alone."""
        return await self._end_unsent(expired, mark_expired)

    async def fail_unroutable(self, unroutable: Mapping[str, str]) -> Recorded:
        """Fail for good the tasks (task id -> lease token their record held) that waited past
        their routing_timeout for a worker that can run them (core/routing_timeout.py): a dead
        letter, follow-ups as for any failure. One that ended meanwhile is left alone."""
        return await self._end_unsent(unroutable, mark_unroutable)

    async def _end_unsent(
        self, tokens: Mapping[str, str], end: Callable[[records_pb2.TaskRecord, Timestamp], None]
    ) -> Recorded:
        """End with `end` (at the clock's time) the records of tasks dispatch did not send (task
        id -> the lease token their record held), unless one ended meanwhile or got another
        lease; then follow-ups."""
        at = self.clock.timestamp()

        def apply(task_id: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record) or record.lease_token != tokens[task_id]:
                return False
            end(record, at)
            return True

        written = await self.store.update(list(tokens), apply)
        recorded = Recorded()
        await self._after(written, {}, recorded)
        return recorded

    async def fail_leased(
        self, leases: Sequence[tuple[str, str]], cause: result_pb2.TaskError, worker_id: str
    ) -> Recorded:
        """Fail attempts the server gave up on (past their time limit); retries still apply."""
        outcomes = [
            worker_service_pb2.TaskOutcome(
                task_id=t, lease_token=token, outcome=worker_service_pb2.OUTCOME_FAILURE, error=cause
            )
            for t, token in leases
        ]
        return await self.record(outcomes, worker_id)

    def _apply_outcome(
        self, record: records_pb2.TaskRecord, outcome: worker_service_pb2.TaskOutcome, worker_id: str
    ) -> float:
        """Move the record to the outcome's state; returns the retry delay when one is due."""
        result = record.result
        at = self._finished_at(outcome)
        if outcome.outcome == worker_service_pb2.OUTCOME_SUCCESS:
            if not result.signature.ignore_result:  # an ignored result ends without a value
                result.result.CopyFrom(outcome.result)
            transition(record, TaskStates.TASK_STATE_SUCCESS, at=at, worker_id=worker_id)
            return 0.0
        if outcome.outcome == worker_service_pb2.OUTCOME_CANCELLED:
            result.error.CopyFrom(error("Cancelled", "stopped by a cancel request"))
            transition(record, TaskStates.TASK_STATE_CANCELLED, at=at, worker_id=worker_id)
            return 0.0
        cause = outcome.error if outcome.HasField("error") else error("Error", "the task failed without details")
        if outcome.outcome == worker_service_pb2.OUTCOME_REJECTED:
            _fail_rejected(record, cause, at, worker_id)  # no retry: the task refused itself
            return 0.0
        record.attempt_errors.append(cause)
        policy = result.signature.retry
        allowed = attempts_allowed(policy)
        if outcome.outcome == worker_service_pb2.OUTCOME_RETRY and policy.max_attempts <= 0:
            allowed = DEFAULT_EXPLICIT_RETRY_ATTEMPTS
        if result.attempts < allowed:
            transition(record, TaskStates.TASK_STATE_RETRY, at=at, worker_id=worker_id, error=cause)
            # The failed attempt's lease ends here: a result it sends again is stale.
            record.lease_token = ""
            record.deliveries = 0  # the next attempt counts its own deliveries
            if outcome.outcome == worker_service_pb2.OUTCOME_RETRY and outcome.HasField("retry_delay"):
                delay = seconds(outcome.retry_delay)
            else:
                delay = next_delay(policy, result.attempts)
            wall = self.clock.wall()
            set_seconds(record.retry_at, wall + delay)
            if is_expired(result.signature, record, wall):  # the next attempt would be due past its expiry: none runs
                mark_expired(record, self.clock.timestamp())
                return 0.0
            return delay
        if outcome.outcome == worker_service_pb2.OUTCOME_RETRY:
            cause = error("MaxRetriesExceeded", f"gave up after {result.attempts} attempts: {cause.message}")
        result.error.CopyFrom(cause)
        transition(record, TaskStates.TASK_STATE_FAILURE, at=at, worker_id=worker_id, error=cause)
        return 0.0

    def _finished_at(self, outcome: worker_service_pb2.TaskOutcome) -> Timestamp:
        """When the attempt ended: as the worker says, else now."""
        return outcome.finished_at if outcome.HasField("finished_at") else self.clock.timestamp()

    async def _after(
        self, written: dict[str, records_pb2.TaskRecord], decisions: dict[str, _Decision], recorded: Recorded
    ) -> None:
        """Per recorded outcome, inside its "result" span (child of the task's trace): hand a
        retry's message back with its delay, or list the dead letter and run the follow-ups.
        A follow-up that fails marks its task for repair instead of failing the report."""
        traced = tracing.enabled()  # once, not per task (its attributes are skipped too when not)
        for task_id, record in written.items():
            result = record.result
            if self.on_attempt_ended is not None:
                self.on_attempt_ended(record)
            with _result_span(task_id, result) if traced else tracing.NO_SPAN:
                decision = decisions.get(task_id)
                if result.state == TaskStates.TASK_STATE_RETRY or (decision is not None and decision.requeue):
                    recorded.requeue[task_id] = decisions[task_id].retry_delay
                    continue
                if not is_terminal(record) and not waits_for_replacement(record):
                    continue
                try:
                    if result.state == TaskStates.TASK_STATE_FAILURE:
                        await self.backend.add_member(DEAD_LETTERS_GROUP, task_id, result.queue.encode())
                    await self.followups.after_terminal([record])
                except Exception as exc:
                    log.warning("follow-ups of task %s failed (%s: %s); its message comes back for repair",
                                task_id, type(exc).__name__, exc)
                    recorded.requeue[task_id] = REPAIR_DELAY_SECONDS


def _fail_rejected(
    record: records_pb2.TaskRecord, cause: result_pb2.TaskError, at: Timestamp, worker_id: str
) -> None:
    """FAILURE for good with a "Rejected" error: a rejected task is never retried."""
    rejected = result_pb2.TaskError()
    rejected.CopyFrom(cause)
    rejected.type = rejected.type or "Rejected"
    record.attempt_errors.append(rejected)
    record.result.error.CopyFrom(rejected)
    transition(record, TaskStates.TASK_STATE_FAILURE, at=at, worker_id=worker_id, error=rejected)


def _replace(
    record: records_pb2.TaskRecord, outcome: worker_service_pb2.TaskOutcome, checked: Checked | None,
    at: Timestamp, worker_id: str,
) -> None:
    """The task asked to be replaced (core/replacement.py): its record keeps the replacement,
    which its follow-ups start; a refused one fails the task for good, as a rejection does."""
    refusal = mark_replaced(record, outcome, checked)
    if refusal is not None:
        _fail_rejected(record, refusal, at, worker_id)


def _requeue(
    record: records_pb2.TaskRecord, outcome: worker_service_pb2.TaskOutcome, at: Timestamp, worker_id: str
) -> bool:
    """The task asked to go back to its queue: end its lease and hand the message back, so the
    same attempt runs again (as Celery redelivers the same message); True when it goes back.
    That delivery ended with an outcome, so it does not count toward max_deliveries. Past
    MAX_REQUEUES the task fails with Rejected instead."""
    record.lease_token = ""
    record.requeues += 1
    if record.requeues < MAX_REQUEUES:
        record.deliveries = max(record.deliveries - 1, 0)
        return True
    reason = outcome.error.message if outcome.HasField("error") and outcome.error.message else "requeued"
    cause = error("Rejected", f"{reason} (requeued itself {record.requeues} times; the limit is {MAX_REQUEUES})")
    _fail_rejected(record, cause, at, worker_id)
    return False


def _result_span(task_id: str, result: result_pb2.TaskResult) -> AbstractContextManager[Span]:
    """The task's "result" span, child of its trace: the follow-ups' spans are its children."""
    attributes = tracing.task_attributes("result", task_id, result.name, result.queue, result.attempts)
    attributes["conveyor.task.state"] = TaskStates.Name(result.state)
    return tracing.span(f"result {result.name}", result.signature.headers, attributes=attributes)
