"""Accepts tasks and workflows: validates, stores their records, then publishes them.

Accepted means it will run. Before any record is written, an outbox entry names what the
submission will publish; a submission is acknowledged once its records are stored. A publish
that fails then (the broker is down, the server dies) leaves the entry behind, and the
server retries the publish with backoff during `outbox_grace_seconds`, and past that grace the
reconciler on any replica publishes the submission's tasks (as it does when this server dies).
The entry is removed once the tasks are out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2, task_service_pb2
from conveyor.values import seconds_of

from ..backends.base import GroupMember, Update
from ..background import stop_tasks
from ..backoff import Backoff
from ..config import Limits, Settings
from .admission import Admission
from .canvas.options import apply_options
from .clock import SYSTEM_CLOCK, Clock
from .errors import AlreadyExists, InvalidArgument, PermissionDenied, Unavailable
from .outbox import PUBLISH, Outbox, new_entry_id
from .planner import CompiledWorkflow, compile_workflow, new_workflow_id, result_task_id, task_ids
from .publisher import Publication, Publisher
from .records import TaskStates, error, idempotency_key, is_terminal, new_record, plan_key, transition, unique_key
from .signatures import filled, queues_named
from .store import Loaded, TaskStore
from .task_schemas import SubmitChecks
from .validation import check_signature, check_workflow
from .workflow import WorkflowEngine

log = logging.getLogger(__name__)
# A publish that failed is retried here with a jittered backoff (first delay, cap) during the
# grace; the cap bounds how long after the broker's return the submission goes out.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 0.5
# How long a submit waits for the holder of a key it met (one taken moments ago by another
# submission) to be stored, before it tells its caller to retry.
KEY_WAIT_FIRST_SECONDS = 0.01
KEY_WAIT_SECONDS = 0.5
# A batch is checked and planned this many requests at a time, the event loop serving other
# calls between slices: a SubmitBatch of 1,000 held the loop for tens of milliseconds in one go,
# long enough for the workers' windows to run dry while a client submitted.
PREPARE_SLICE = 100


@dataclass
class _Prepared:
    response: task_service_pb2.SubmitResponse
    record: records_pb2.TaskRecord | None = None
    workflow: CompiledWorkflow | None = None
    duplicate_of: str = ""


class Submitter:
    def __init__(
        self, settings: Settings, store: TaskStore, publisher: Publisher, workflow: WorkflowEngine,
        outbox: Outbox, on_submitted: Callable[[list[records_pb2.TaskRecord]], None] | None = None,
        admission: Admission | None = None, checks: SubmitChecks | None = None, *, clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.admission = admission
        # Args that are JSON must be; strict submits must match the task registry.
        self.checks = checks
        self.store = store
        self.publisher = publisher
        self.workflow = workflow
        self.outbox = outbox
        self.on_submitted = on_submitted
        self._background: set[asyncio.Task[None]] = set()

    async def submit(
        self, requests: Sequence[task_service_pb2.SubmitRequest], headers: Mapping[str, str] | None = None,
        queues: Collection[str] = (),
        streamed: bool = False,
    ) -> list[task_service_pb2.SubmitResponse]:
        """Accept the requests; `queues`, when given, are the only queues the caller may use.
        A `streamed` submission (core/streamed.py) may hold up to max_stream_tasks tasks."""
        if not requests:
            raise InvalidArgument("nothing to submit: the batch is empty")
        limits = self.settings.limits
        if streamed:
            limits = dataclasses.replace(limits, max_workflow_tasks=limits.max_stream_tasks)

        def prepare(start: int = 0, stop: int = len(requests)) -> list[_Prepared]:
            stop = min(stop, len(requests))
            return [self._prepare(requests[i], i, len(requests), headers, limits) for i in range(start, stop)]

        if streamed:
            # Checking and planning 100,000s of streamed tasks takes seconds: off the event loop,
            # so that workers' heartbeats and other calls are still served meanwhile.
            prepared = await asyncio.to_thread(prepare)
        else:
            prepared = []
            for start in range(0, len(requests), PREPARE_SLICE):
                if start:
                    await asyncio.sleep(0)
                prepared += prepare(start, start + PREPARE_SLICE)
        self._check_total(prepared, limits)
        named = self._check_scope(requests, prepared, queues)
        if self.checks is not None:
            await self.checks.check(requests)
        await self._resolve_idempotency(prepared, queues)
        await self._resolve_unique(prepared, queues)
        fresh = [p for p in prepared if not p.duplicate_of]
        if not fresh:
            return [p.response for p in prepared]
        records = await asyncio.to_thread(self._records, fresh) if streamed else self._records(fresh)
        if self.admission is not None:
            await self.admission.admit({r.result.queue for r in records} | named)
        lone = [p.record for p in fresh if p.record is not None]
        plans = [p.workflow.plan for p in fresh if p.workflow is not None]
        entry_id = new_entry_id()
        for record in lone:
            record.outbox_id = entry_id
        promise = self.outbox.entry(
            PUBLISH, [r.result.task_id for r in lone], [plan.workflow_id for plan in plans], entry_id
        )
        await self._write(promise, plans, records)
        # Accepted from here on: the records and the promise to publish them are durable.
        if not await self._publish(entry_id, lone, plans, repair=False):
            self._spawn(self._publish_later(entry_id, lone, plans))
        if self.on_submitted is not None:
            self.on_submitted(records)  # workflows' tasks too, not only lone tasks
        return [p.response for p in prepared]

    async def _publish(
        self, entry_id: str, lone: Sequence[records_pb2.TaskRecord], plans: Sequence[records_pb2.WorkflowPlan],
        repair: bool,
    ) -> bool:
        """Publish an accepted submission; True once it is out (and its outbox entry let go)."""
        try:
            if lone:
                await self.publisher.publish([Publication(r.result.signature) for r in lone])
            for plan in plans:
                await self.workflow.start_workflow(plan, repair)
        except Exception as exc:
            log.warning("publishing submission %s failed (%s: %s); retrying", entry_id, type(exc).__name__, exc)
            return False
        self.outbox.confirm(entry_id)
        return True

    async def _publish_later(
        self, entry_id: str, lone: Sequence[records_pb2.TaskRecord], plans: Sequence[records_pb2.WorkflowPlan],
    ) -> None:
        """Retry a failed publish with backoff while the outbox grace lasts; after that the
        reconciler (on any replica) has it, as it would if this process had died."""
        failures = Backoff(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
        deadline = self.clock.monotonic() + self.settings.outbox_grace_seconds
        while self.clock.monotonic() + (delay := failures.next()) < deadline:
            await asyncio.sleep(delay)
            if await self._publish(entry_id, lone, plans, repair=True):
                return

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop retrying (the server is stopping): the reconciler takes over what is left."""
        await stop_tasks(*self._background)

    def _prepare(
        self, request: task_service_pb2.SubmitRequest, index: int, total: int, headers: Mapping[str, str] | None,
        limits: Limits,
    ) -> _Prepared:
        where = f"requests[{index}]" if total > 1 else "request"
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgument(f"{where}: set task or workflow")
        apply_options(request, where)
        if target == "task" or request.workflow.WhichOneof("kind") == "task":
            source = request.task if target == "task" else request.workflow.task
            check_signature(source, limits, f"{where}.task")
            signature = filled(source, self.settings.default_queue, inherit_headers=headers)
            response = task_service_pb2.SubmitResponse(task_id=signature.id, task_ids=[signature.id])
            return _Prepared(response, record=new_record(signature, at=self.clock.timestamp()))
        check_workflow(request.workflow, limits)
        workflow_id = new_workflow_id()

        def fill(sig: task_pb2.Signature) -> task_pb2.Signature:
            return filled(sig, self.settings.default_queue, inherit_headers=headers)

        compiled = compile_workflow(request.workflow, workflow_id, fill)
        response = task_service_pb2.SubmitResponse(
            task_id=result_task_id(compiled.plan), workflow_id=workflow_id, task_ids=task_ids(compiled.plan)
        )
        return _Prepared(response, workflow=compiled)

    def _check_scope(
        self, requests: Sequence[task_service_pb2.SubmitRequest], prepared: Sequence[_Prepared],
        queues: Collection[str],
    ) -> set[str]:
        """Refuse a submission that names a queue outside `queues` (when given), before it gets
        any answer, a duplicate's included; returns the queues it names (none when unscoped)."""
        if not queues:
            return set()
        named = {q for request in requests for q in queues_named(request, self.settings.default_queue)}
        for item in prepared:
            if item.record is not None:
                named.add(item.record.result.queue)
            elif item.workflow is not None:
                named |= {signature.queue for signature in item.workflow.signatures.values()}
        if not named <= set(queues):
            raise PermissionDenied(
                f"this token may submit only to queues {sorted(queues)}; "
                f"the submission uses {sorted(named - set(queues))}"
            )
        return named

    def _check_total(self, prepared: Sequence[_Prepared], limits: Limits) -> None:
        total = sum(len(p.response.task_ids) for p in prepared)
        if total > limits.max_workflow_tasks:
            raise InvalidArgument(f"the submission holds {total} tasks, over the limit of {limits.max_workflow_tasks}")

    async def _resolve_idempotency(self, prepared: Sequence[_Prepared], queues: Collection[str]) -> None:
        """A task whose idempotency key was seen within the retention window is not submitted
        again: the caller gets the first task's id. Repeats of a key within one batch count too.
        A caller limited to `queues` is refused the id of a first task on another queue."""

        def key_of(signature: task_pb2.Signature) -> str | None:
            return idempotency_key(signature.idempotency_key) if signature.idempotency_key else None

        await self._resolve_keys(prepared, key_of, lambda holder, at: True, _Scope(queues, "idempotency key"))

    async def _resolve_unique(self, prepared: Sequence[_Prepared], queues: Collection[str]) -> None:
        """A unique task is not submitted while another with its unique key is live (queued,
        delayed, running) and younger than its `unique_for`: the caller gets that task's id
        (refused, for a caller limited to `queues`, when that task is on another queue)."""

        def key_of(signature: task_pb2.Signature) -> str | None:
            return unique_key(signature) if signature.HasField("unique_for") else None

        def holds(holder: records_pb2.TaskRecord, at: float) -> bool:
            submitted = seconds_of(holder.result.submitted_at)
            lasts = seconds_of(holder.result.signature.unique_for)
            return not is_terminal(holder) and at < submitted + lasts

        await self._resolve_keys(
            [p for p in prepared if not p.duplicate_of], key_of, holds, _Scope(queues, "unique key")
        )

    async def _resolve_keys(
        self, prepared: Sequence[_Prepared], key_of: Callable[[task_pb2.Signature], str | None],
        holds: Callable[[records_pb2.TaskRecord, float], bool], scope: _Scope,
    ) -> None:
        """Lone tasks that name a key (`key_of`) take it, or get the id of the task holding it
        while `holds(holder, now)`; a key whose holder no longer holds it is taken over. A
        holder outside `scope` is never answered: the submission is refused."""
        keyed: dict[str, _Prepared] = {}
        repeats: list[tuple[str, _Prepared]] = []
        for p in prepared:
            key = key_of(p.record.result.signature) if p.record is not None else None
            if key is None:
                continue
            if key in keyed:
                repeats.append((key, p))
            else:
                keyed[key] = p
        if not keyed:
            return
        backend = self.store.backend
        at = self.clock.wall()
        existing = set(await backend.insert({k: _key_value(p.response.task_id, at) for k, p in keyed.items()}))
        found = await backend.get(list(existing)) if existing else {}
        firsts = {key: _parse_key_value(found[key].data) for key in existing if key in found}
        first_ids = {key: first for key, (first, _) in firsts.items()}
        # A key whose task was never stored (the server died between the two writes) is taken
        # over by this submission instead of pointing at nothing, once it is older than the
        # outbox grace; a younger one may belong to a submission still writing its records.
        stored = await self._holders(first_ids, firsts, at)
        unstored = [key for key, first in first_ids.items() if first not in stored]
        released = [key for key, first in first_ids.items() if first in stored and not holds(stored[first].record, at)]
        takeovers = [
            Update(key, found[key].version, _key_value(keyed[key].response.task_id, at)) for key in unstored + released
        ]
        applied = await backend.compare_and_set(takeovers) if takeovers else []
        taken = {u.key for u, ok in zip(takeovers, applied, strict=True) if ok}
        answered = {key: first for key, first in first_ids.items() if key not in taken}
        scope.check(answered, stored)
        for key, first in answered.items():
            _same_as(keyed[key], first)
        for key, item in repeats:
            original = keyed[key]
            _same_as(item, original.duplicate_of or original.response.task_id)

    async def _holders(
        self, first_ids: Mapping[str, str], firsts: Mapping[str, tuple[str, float]], at: float
    ) -> dict[str, Loaded]:
        """The stored records of the keys' holders. A holder taken moments ago may belong to a
        submission still writing its records: it gets a moment to finish, and if it does not,
        the caller is told to retry (UNAVAILABLE) rather than given an id that may never exist."""
        delay = KEY_WAIT_FIRST_SECONDS
        deadline = self.clock.monotonic() + KEY_WAIT_SECONDS
        while True:
            stored = await self.store.load(list(first_ids.values()))
            in_progress = [
                key for key, first in first_ids.items()
                if first not in stored and at - firsts[key][1] < self.settings.outbox_grace_seconds
            ]
            if not in_progress:
                return stored
            if self.clock.monotonic() + delay > deadline:
                raise Unavailable(f"a submission with key {in_progress[0].partition(':')[2]!r} "
                                  "is being stored right now; retry")
            await asyncio.sleep(delay)
            delay *= 2

    def _records(self, prepared: Sequence[_Prepared]) -> list[records_pb2.TaskRecord]:
        """Every record the submission creates."""
        records: list[records_pb2.TaskRecord] = []
        for item in prepared:
            if item.record is not None:
                records.append(item.record)
            elif item.workflow is not None:
                plan = item.workflow.plan
                nodes = {n.task_id: n.node_id for n in plan.nodes if n.task_id}
                records.extend(
                    new_record(sig, workflow_id=plan.workflow_id, node_id=nodes[task_id], enqueued=False,
                               at=self.clock.timestamp())
                    for task_id, sig in item.workflow.signatures.items()
                )
        ids = [r.result.task_id for r in records]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("the submission uses the same task id more than once")
        return records

    async def _write(
        self, promise: GroupMember, plans: Sequence[records_pb2.WorkflowPlan], records: list[records_pb2.TaskRecord]
    ) -> None:
        """Store the outbox promise, then plans and records (a lone task's promise travels with
        its record in one round trip). Ids are not read first: the insert itself finds those that
        exist (a resubmission, a clash), and then the whole submission is refused: what it did
        create ends CANCELLED, its plans expire and its outbox entry goes, so nothing runs."""
        if plans:
            await self.outbox.write(promise)
            for plan in plans:
                await self.store.save_plan(plan)
        existing = await self.store.create(records, after=None if plans else promise)
        if not existing:
            return
        taken = set(existing)
        cause = error("AlreadyExists", f"refused with its submission: task ids already exist: {existing[0]}")

        def abandon(_: str, record: records_pb2.TaskRecord) -> bool:
            if record.result.state != TaskStates.TASK_STATE_PENDING:
                return False
            record.result.error.CopyFrom(cause)
            transition(record, TaskStates.TASK_STATE_CANCELLED, at=self.clock.timestamp(), error=cause)
            return True

        await self.store.update([r.result.task_id for r in records if r.result.task_id not in taken], abandon)
        if plans:
            await self.store.backend.expire(records=[plan_key(plan.workflow_id) for plan in plans])
        await self.outbox.remove(promise.name)
        raise AlreadyExists(f"task ids already exist: {', '.join(existing[:5])}")


@dataclass(frozen=True)
class _Scope:
    """The queues a caller may use (empty: any), for answers that name a task holding a key."""

    queues: Collection[str]
    kind: str  # of the keys checked: "idempotency key", "unique key"

    def check(self, answered: Mapping[str, str], stored: Mapping[str, Loaded]) -> None:
        """Refuse, without naming it, a holder (`answered`: key -> task id) on another queue:
        its id would let the caller read a task it may not see."""
        if not self.queues:
            return
        for key, first in answered.items():
            holder = stored.get(first)
            if holder is not None and holder.record.result.queue not in self.queues:
                raise PermissionDenied(
                    f"this token may submit only to queues {sorted(self.queues)}; the {self.kind} "
                    f"{key.partition(':')[2]!r} is held by a task on another queue"
                )


def _key_value(task_id: str, at: float) -> bytes:
    """What an idempotency key holds: the task id and when the key was taken."""
    return f"{task_id}\n{at:.3f}".encode()


def _parse_key_value(data: bytes) -> tuple[str, float]:
    task_id, _, at = data.decode().partition("\n")
    return task_id, float(at) if at else 0.0  # a key written before times were kept counts as old


def _same_as(item: _Prepared, first: str) -> None:
    """Answer `item` with the task `first` instead of submitting it."""
    item.duplicate_of = first
    item.response.task_id = first
    del item.response.task_ids[:]
    item.response.task_ids.append(first)
