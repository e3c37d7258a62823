"""Typed access to task records and workflow plans over any Backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2

from ..backends.base import Backend, Update
from .records import plan_key, task_key

log = logging.getLogger(__name__)

# Conditional writes that lose to a concurrent writer are retried on a fresh read this often.
MAX_CAS_ROUNDS = 20

# A mutation edits the record in place and says whether it changed anything.
Mutation = Callable[[records_pb2.TaskRecord], bool]


@dataclass(slots=True)
class Loaded:
    record: records_pb2.TaskRecord
    version: int


class ConflictError(RuntimeError):
    """A record kept changing under a conditional write."""


def _parse(data: bytes) -> records_pb2.TaskRecord:
    record = records_pb2.TaskRecord()
    record.ParseFromString(data)
    return record


class TaskStore:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # Plans never change once written, so every replica may cache them.
        self._plans: dict[str, records_pb2.WorkflowPlan] = {}

    async def create(self, records: Iterable[records_pb2.TaskRecord]) -> list[str]:
        """Insert new records; returns the task ids that already existed (left unchanged)."""
        encoded = {task_key(r.result.task_id): r.SerializeToString() for r in records}
        if not encoded:
            return []
        existing = await self.backend.insert(encoded)
        return [key.removeprefix("task:") for key in existing]

    async def load(self, task_ids: Sequence[str]) -> dict[str, Loaded]:
        if not task_ids:
            return {}
        found = await self.backend.get([task_key(t) for t in task_ids])
        return {key.removeprefix("task:"): Loaded(_parse(v.data), v.version) for key, v in found.items()}

    async def get(self, task_id: str) -> records_pb2.TaskRecord | None:
        loaded = (await self.load([task_id])).get(task_id)
        return loaded.record if loaded else None

    async def update(
        self, task_ids: Sequence[str], mutate: Callable[[str, records_pb2.TaskRecord], bool],
        known: dict[str, Loaded] | None = None,
    ) -> dict[str, records_pb2.TaskRecord]:
        written = await self.update_loaded(task_ids, mutate, known)
        return {task_id: loaded.record for task_id, loaded in written.items()}

    async def update_loaded(
        self, task_ids: Sequence[str], mutate: Callable[[str, records_pb2.TaskRecord], bool],
        known: dict[str, Loaded] | None = None,
    ) -> dict[str, Loaded]:
        """Read, mutate and conditionally write each record until it sticks.

        Returns the records that this call changed, as written. `mutate` may run more than
        once for a record (after losing a race); it must decide from the record alone.
        `known` holds records the caller just read: the first round uses them instead of
        reading again (a stale one only costs a lost compare-and-set and a re-read).
        """
        written: dict[str, Loaded] = {}
        pending = list(dict.fromkeys(task_ids))
        for _ in range(MAX_CAS_ROUNDS):
            if not pending:
                return written
            if known is not None and all(task_id in known for task_id in pending):
                loaded, known = known, None
            else:
                loaded, known = await self.load(pending), None
            updates: list[Update] = []
            candidates: list[tuple[str, Loaded]] = []
            for task_id in pending:
                current = loaded.get(task_id)
                if current is None:
                    continue
                if mutate(task_id, current.record):
                    updates.append(Update(task_key(task_id), current.version, current.record.SerializeToString()))
                    candidates.append((task_id, current))
            if not updates:
                return written
            applied = await self.backend.compare_and_set(updates)
            pending = []
            for (task_id, current), ok in zip(candidates, applied, strict=True):
                if ok:
                    written[task_id] = Loaded(current.record, current.version + 1)
                else:
                    pending.append(task_id)
        raise ConflictError(f"records kept changing under concurrent writers: {pending[:5]}")

    async def save_plan(self, plan: records_pb2.WorkflowPlan) -> bool:
        existing = await self.backend.insert({plan_key(plan.workflow_id): plan.SerializeToString()})
        self._plans[plan.workflow_id] = plan
        return not existing

    async def plan(self, workflow_id: str) -> records_pb2.WorkflowPlan | None:
        cached = self._plans.get(workflow_id)
        if cached is not None:
            return cached
        found = await self.backend.get([plan_key(workflow_id)])
        if plan_key(workflow_id) not in found:
            return None
        plan = records_pb2.WorkflowPlan()
        plan.ParseFromString(found[plan_key(workflow_id)].data)
        self._plans[workflow_id] = plan
        return plan
