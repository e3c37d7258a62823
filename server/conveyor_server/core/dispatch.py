"""Turns leased broker messages into worker assignments.

A message whose task already ended (a duplicate, a cancelled task, or a redelivery after
the server died between recording a result and acking) is acked and dropped; for ended
tasks the follow-ups are repeated idempotently, which repairs a crash in that window.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import worker_service_pb2
from conveyor.values import timestamp_now

from ..brokers.base import Broker, Delivery
from .followups import FollowUps
from .publisher import decode_message
from .records import S, is_terminal, new_record, transition
from .store import Loaded, TaskStore

log = logging.getLogger(__name__)


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
    # When the worker reported the attempt running (monotonic); the server's time-limit
    # backstop counts from here, since a prefetched task may wait in the worker for a slot.
    started_at: float | None = None


@dataclass(slots=True)
class Claimed:
    assignment: worker_service_pb2.Assignment
    lease: Lease


class Dispatcher:
    def __init__(self, store: TaskStore, broker: Broker, followups: FollowUps, lease_seconds: float) -> None:
        self.store = store
        self.broker = broker
        self.followups = followups
        self.lease_seconds = lease_seconds

    async def claim(self, deliveries: Sequence[Delivery], worker_id: str, now: float) -> list[Claimed]:
        """Record RECEIVED for each delivered task and build its assignment; drop the rest."""
        messages: dict[str, tuple[Delivery, records_pb2.TaskMessage]] = {}
        duplicates: list[Delivery] = []
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
            else:
                messages[task_id] = (delivery, message)
        loaded = await self._restore_missing(messages)
        tokens: dict[str, str] = {}
        stamp = timestamp_now()

        def receive(task_id: str, record: records_pb2.TaskRecord) -> bool:
            if is_terminal(record):
                return False
            message = messages[task_id][1]
            token = tokens[task_id] = secrets.token_hex(16)
            record.lease_token = token
            record.enqueued = True
            record.result.attempts = message.attempt
            record.result.worker_id = worker_id
            transition(record, S.TASK_STATE_RECEIVED, at=stamp, worker_id=worker_id)
            return True

        written = await self.store.update_loaded(list(messages), receive, known=loaded)
        claimed: list[Claimed] = []
        ended: dict[str, Delivery] = {}
        for task_id, (delivery, message) in messages.items():
            stored = written.get(task_id)
            if stored is None:
                ended[task_id] = delivery
                continue
            record = stored.record
            limit = record.result.signature.time_limit
            assignment = worker_service_pb2.Assignment(
                task=record.result.signature,
                attempt=message.attempt,
                lease_token=tokens[task_id],
                workflow_id=record.result.workflow_id,
            )
            assignment.lease_expires_at.FromSeconds(int(stamp.seconds + self.lease_seconds))
            with tracing.span(f"dispatch {assignment.task.name}", assignment.task.headers,
                              attributes={"conveyor.task_id": task_id, "conveyor.attempt": message.attempt,
                                          "conveyor.worker_id": worker_id}):
                # The worker's execute span becomes a child of this dispatch.
                tracing.inject(assignment.task.headers)
            claimed.append(Claimed(assignment, Lease(
                task_id, tokens[task_id], message.attempt, delivery, limit.seconds + limit.nanos / 1e9, now,
            )))
        if ended or duplicates:
            await self._drop(ended, duplicates, messages)
        return claimed

    async def _restore_missing(
        self, messages: dict[str, tuple[Delivery, records_pb2.TaskMessage]]
    ) -> dict[str, Loaded] | None:
        """A queued task whose record expired gets its record back: nothing accepted is lost.
        Returns the records as read, for the update that follows (None after a restore); the
        store already holds the records this process wrote last, which need no read."""
        loaded = await self.store.load([task_id for task_id in messages if not self.store.remembers(task_id)])
        missing = [
            m for task_id, (_, m) in messages.items() if task_id not in loaded and not self.store.remembers(task_id)
        ]
        if not missing:
            return loaded
        log.warning("recreating %d expired task records from their queued messages", len(missing))
        await self.store.create(new_record(m.signature, workflow_id=m.workflow_id) for m in missing)
        return None

    async def _drop(
        self, ended: dict[str, Delivery], duplicates: list[Delivery],
        messages: dict[str, tuple[Delivery, records_pb2.TaskMessage]],
    ) -> None:
        """Ack what will not run and repeat the follow-ups of tasks that ended. A record that
        vanished since the claim read it (it expired) is restored and its message returned to
        the queue instead: nothing accepted is lost."""
        records = await self.store.load(list(ended))
        vanished = {task_id: delivery for task_id, delivery in ended.items() if task_id not in records}
        await self.broker.ack([d for task_id, d in ended.items() if task_id not in vanished] + duplicates)
        if vanished:
            await self._restore_missing({task_id: messages[task_id] for task_id in vanished})
            await self.broker.nack(list(vanished.values()))
        finished = [
            found.record for found in records.values()
            if found.record.result.state in (S.TASK_STATE_SUCCESS, S.TASK_STATE_FAILURE)
        ]
        if finished:
            await self.followups.after_terminal(finished, repair=True)
