"""Typed access to task records and workflow plans over any Backend.

The store remembers the records this process wrote last (a bounded cache of their bytes and
versions): a read-modify-write starts from that copy instead of reading the backend again,
and a stale copy (another replica wrote since) only costs a lost compare-and-set and a re-read.
Callers in this process can also be told as soon as a record is written here, which spares a
waiting GetResult the backend's change feed (that feed still covers other replicas' writes).

Expiry: the result TTL starts when a task ends. A record is written with no expiry while its
task is live (queued, delayed, running, retrying) and, for a workflow's own tasks, until the
workflow ends (the workflow engine then starts the TTL of its records, plan and groups).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2

from ..backends.base import Backend, GroupMember, Update
from .records import is_terminal, plan_key, task_key

log = logging.getLogger(__name__)

# Conditional writes that lose to a concurrent writer are retried on a fresh read this often.
MAX_CAS_ROUNDS = 20

# A mutation edits the record in place and says whether it changed anything.
Mutation = Callable[[records_pb2.TaskRecord], bool]
# Records remembered as last written here: enough for every task in flight at high load,
# a few MB of memory.
RECENT_RECORDS = 20_000
# Called with each record as this process wrote it; must only read it.
WriteListener = Callable[[records_pb2.TaskRecord], None]
# Plans cached per process (they never change); the oldest are read again when needed.
CACHED_PLANS = 1_000


@dataclass(slots=True)
class Loaded:
    record: records_pb2.TaskRecord
    version: int


# Called with each record as this process wrote it, and the version the write made; must only read it.
OwnWriteListener = Callable[[Loaded], None]


class ConflictError(RuntimeError):
    """A record kept changing under a conditional write."""


def keeps(record: records_pb2.TaskRecord) -> bool:
    """True while the record must not expire: its task is live, or it is a step of a workflow
    (kept until the workflow ends)."""
    return not is_terminal(record) or bool(record.node_id)


def _parse(data: bytes) -> records_pb2.TaskRecord:
    record = records_pb2.TaskRecord()
    record.ParseFromString(data)
    return record


async def load_records(backend: Backend, task_ids: Sequence[str]) -> dict[str, Loaded]:
    """The records as the backend holds them now (TaskStore.load, for readers that hold no store)."""
    if not task_ids:
        return {}
    found = await backend.get([task_key(t) for t in task_ids])
    return {key.removeprefix("task:"): Loaded(_parse(v.data), v.version) for key, v in found.items()}


class TaskStore:
    def __init__(
        self, backend: Backend, recent_records: int = RECENT_RECORDS, cached_plans: int = CACHED_PLANS,
        *, write_hook: WriteListener | None = None,
    ) -> None:
        self.backend = backend
        # Plans never change once written, so every replica may cache them (the latest few).
        self._plans: OrderedDict[str, records_pb2.WorkflowPlan] = OrderedDict()
        self._plans_limit = cached_plans
        self._recent: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._recent_limit = recent_records
        self._listeners: dict[str, list[OwnWriteListener]] = {}
        # Called with every record this process writes (the task index: core/task_index.py).
        self.write_hook = write_hook

    async def create(
        self, records: Iterable[records_pb2.TaskRecord], after: GroupMember | None = None
    ) -> list[str]:
        """Insert new records; returns the task ids that already existed (left unchanged).
        New records are live (PENDING), so they do not expire. `after`, when given, is a member
        (an outbox promise) stored before them, in the same round trip where the engine can."""
        by_id = {r.result.task_id: r for r in records}
        encoded = {task_key(task_id): r.SerializeToString() for task_id, r in by_id.items()}
        if not encoded:
            if after is not None:
                await self.backend.add_member(after.group, after.name, after.payload, after.keep)
            return []
        inserted = (
            self.backend.insert(encoded, keep=True) if after is None
            else self.backend.insert_after(after, encoded, keep=True)
        )
        existing = {key.removeprefix("task:") for key in await inserted}
        for task_id, record in by_id.items():
            if task_id not in existing:
                self._wrote(task_id, record, encoded[task_key(task_id)], 1)
        return [task_id for task_id in by_id if task_id in existing]

    async def load(self, task_ids: Sequence[str]) -> dict[str, Loaded]:
        """The records as the backend holds them now."""
        return await load_records(self.backend, task_ids)

    def remembers(self, task_id: str) -> bool:
        """True when this process wrote the record lately (an update need not read it first)."""
        return task_id in self._recent

    def remembered(self, task_ids: Iterable[str]) -> dict[str, Loaded]:
        """This process's last writes of these records (fresh copies), where it has them."""
        found: dict[str, Loaded] = {}
        for task_id in task_ids:
            hit = self._recent.get(task_id)
            if hit is not None:
                found[task_id] = Loaded(_parse(hit[0]), hit[1])
        return found

    def _wrote(self, task_id: str, record: records_pb2.TaskRecord, data: bytes, version: int) -> None:
        self._recent[task_id] = (data, version)
        self._recent.move_to_end(task_id)
        if len(self._recent) > self._recent_limit:
            self._recent.popitem(last=False)
        listeners = self._listeners.get(task_id)
        if listeners:
            written = Loaded(record, version)
            for listener in listeners:
                listener(written)
        if self.write_hook is not None:
            self.write_hook(record)

    @contextmanager
    def on_write(self, task_id: str, listener: OwnWriteListener) -> Iterator[None]:
        """Call `listener` with the record and its version each time this process writes it,
        while inside."""
        self._listeners.setdefault(task_id, []).append(listener)
        try:
            yield
        finally:
            listeners = self._listeners[task_id]
            listeners.remove(listener)
            if not listeners:
                del self._listeners[task_id]

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
        The first round starts from `known` (records the caller just read) and this process's
        own last writes; later rounds, after a lost compare-and-set, read the backend. A mutation
        that declines a remembered copy is asked again on a fresh read, since that copy may be
        stale.
        """
        written: dict[str, Loaded] = {}
        pending = list(dict.fromkeys(task_ids))
        loaded = {task_id: found for task_id, found in (known or {}).items() if task_id in pending}
        remembered = self.remembered(task_id for task_id in pending if task_id not in loaded)
        loaded.update(remembered)
        unread = [task_id for task_id in pending if task_id not in loaded]
        for _ in range(MAX_CAS_ROUNDS):
            if not pending:
                return written
            if unread:
                loaded.update(await self.load(unread))
            updates: list[Update] = []
            candidates: list[tuple[str, Loaded]] = []
            recheck: list[str] = []
            for task_id in pending:
                current = loaded.get(task_id)
                if current is None:
                    continue
                if mutate(task_id, current.record):
                    updates.append(Update(
                        task_key(task_id), current.version, current.record.SerializeToString(), keeps(current.record)
                    ))
                    candidates.append((task_id, current))
                elif task_id in remembered:
                    recheck.append(task_id)
            applied = await self.backend.compare_and_set(updates) if updates else []
            pending, remembered, loaded = recheck, {}, {}
            for (task_id, current), update, ok in zip(candidates, updates, applied, strict=True):
                if ok:
                    written[task_id] = Loaded(current.record, current.version + 1)
                    self._wrote(task_id, current.record, update.data, current.version + 1)
                else:
                    self._recent.pop(task_id, None)
                    pending.append(task_id)
            unread = pending
        raise ConflictError(f"records kept changing under concurrent writers: {pending[:5]}")

    async def save_plan(self, plan: records_pb2.WorkflowPlan) -> bool:
        existing = await self.backend.insert({plan_key(plan.workflow_id): plan.SerializeToString()}, keep=True)
        self._cache_plan(plan)
        return not existing

    def _cache_plan(self, plan: records_pb2.WorkflowPlan) -> None:
        self._plans[plan.workflow_id] = plan
        self._plans.move_to_end(plan.workflow_id)
        if len(self._plans) > self._plans_limit:
            self._plans.popitem(last=False)

    async def plan(self, workflow_id: str) -> records_pb2.WorkflowPlan | None:
        cached = self._plans.get(workflow_id)
        if cached is not None:
            self._plans.move_to_end(workflow_id)
            return cached
        found = await self.backend.get([plan_key(workflow_id)])
        if plan_key(workflow_id) not in found:
            return None
        plan = records_pb2.WorkflowPlan()
        plan.ParseFromString(found[plan_key(workflow_id)].data)
        self._cache_plan(plan)
        return plan
