"""What InspectTask shows beyond a task's result: its lease (holder and expiry), deliveries,
workflow node, and whether its follow-ups are still owed."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2
from conveyor.values import seconds_of, set_seconds

from .clock import SYSTEM_CLOCK, Clock
from .outbox import FOLLOW_UPS, Outbox
from .records import TaskStates
from .results import ResultReader
from .sessions import SessionRegistry
from .store import TaskStore

# States in which a worker holds the task under a lease.
LEASED = (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED)


class Inspector:
    def __init__(
        self, store: TaskStore, reader: ResultReader, registry: SessionRegistry, lease_seconds: float,
        *, clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.reader = reader
        self.registry = registry
        self.lease_seconds = lease_seconds
        # The connections' clock: a session's last_seen is on its monotonic clock.
        self.clock = clock

    async def inspect(self, task_id: str) -> admin_service_pb2.InspectTaskResponse:
        """NotFound for an unknown id; a workflow id gives the workflow's result alone."""
        result = await self.reader.get(task_id)
        response = admin_service_pb2.InspectTaskResponse(result=result)
        record = await self.store.get(task_id)
        if record is None:  # a workflow id: its result has no record of its own
            return response
        response.deliveries = record.deliveries
        response.workflow_node_id = record.node_id
        response.enqueued = record.enqueued
        if result.state in LEASED and not record.replaced_by:  # a replaced task's lease ended with its report
            response.lease_holder = result.worker_id
            response.lease_expires_at.CopyFrom(self._lease_expiry(task_id, record))
        response.follow_ups_pending = await self._follow_ups_pending(task_id)
        return response

    def _lease_expiry(self, task_id: str, record: records_pb2.TaskRecord) -> Timestamp:
        """The latest sign of life plus a lease: a heartbeat of the holder connected to this
        replica, else what the record holds (a renewal, or the RECEIVED/STARTED transition)."""
        signs = [seconds_of(record.lease_renewed_at)]
        signs += [seconds_of(t.at) for t in record.result.history if t.state in LEASED]
        for session in self.registry.holding([task_id]):
            signs.append(self.clock.wall() - (self.clock.monotonic() - session.last_seen))
        expiry = Timestamp()
        set_seconds(expiry, max(signs) + self.lease_seconds)
        return expiry

    async def _follow_ups_pending(self, task_id: str) -> bool:
        entries = await Outbox(self.store.backend, self.clock).entries(0.0, math.inf)  # every entry, whatever its age
        return any(entry.kind == FOLLOW_UPS and task_id in entry.task_ids for _, entry in entries)

