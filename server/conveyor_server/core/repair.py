"""Repair of lost messages: republishes live tasks whose broker message is gone (a flushed
Redis, a deleted RabbitMQ queue, a lost SQS queue).

A live task shows signs of life: a queued one is waiting in its queue, a running one has a
lease that heartbeats renew (`stamp_live_leases` writes `lease_renewed_at` when the previous
sign is older than half of repair_after, so short tasks never pay). A task with no sign of
life for `repair_after` seconds looks lost:
- PENDING: since it was published (enqueued), and never before its ETA;
- RETRY: since its next attempt was due (`retry_at`);
- RECEIVED/STARTED: since its last transition or lease renewal (never less than the server's
  repair_after, whatever a manual repair asks).

Candidates come from the publish index (core/publish_index.py), never from a scan. Each pass
takes the buckets that ended repair_after ago (each claimed per period, so replicas do not
repeat each other) and, queue by queue:
- tasks whose queue still holds their message are live: they are carried forward without
  their records being read (brokers that can look messages up by id: Redis, SQLite, memory);
- the others' records are read in batches: ended tasks are done; tasks still waiting for their
  time (an ETA, a retry, a live lease) are carried into the bucket of the time they would look
  lost; tasks that look lost are republished with the same message as before (a running
  task's copy names the stale lease it may replace);
and the old buckets are retired. A pass reads a bucket in parts of MAX_TASKS_PER_PASS ids
and keeps task ids, never records: a bucket of a million queued tasks costs one part's ids.

Backlog safety: a queued task behind a long backlog shows no sign of life in its record. So a
task is republished only when its queue does not hold its message: brokers that can look
messages up by id say which they hold (above). The others (AMQP, SQS) are judged from counts:
when the queue holds (ready, delayed or leased) fewer messages than it has candidates, some
messages must be missing, and all its candidates are republished (the copies of those that were
not missing are dropped at dispatch as duplicates); otherwise they are carried forward and
checked again later. Repeated repairs of one task are spaced exponentially (`repairs`,
`repaired_at`, written with compare-and-set, which also makes one of two concurrent repairs the
one that republishes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from conveyor.internal.v1 import records_pb2
from conveyor.values import seconds_of, set_seconds

from ..brokers.base import Broker
from ..config import ConfigError, Settings
from .publish_index import Bucket, PublishIndex
from .publisher import Publication, Publisher
from .records import TERMINAL_STATES, TaskStates
from .replacement import is_replaced
from .store import Loaded, TaskStore

log = logging.getLogger(__name__)

# repair_after when the setting is 0, in lease lengths.
DEFAULT_LEASES = 4
# Records read (and republished) per backend call.
LOAD_BATCH = 500
# Bounds of one automatic pass; what is left waits for the next.
MAX_BUCKETS_PER_PASS = 64
MAX_TASKS_PER_PASS = 50_000
# Repeated repairs of one task wait repair_after, then twice that, ... up to 2**MAX_DOUBLINGS times.
MAX_DOUBLINGS = 10
_RUNNING = (TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED)


def with_repair_after(settings: Settings) -> Settings:
    """The settings with the repair_after in effect (0 means four lease lengths), checked."""
    configured = settings.repair_after_seconds
    repair_after = configured or DEFAULT_LEASES * settings.lease_seconds
    if not math.isfinite(repair_after) or repair_after <= 2 * settings.heartbeat_interval_seconds:
        raise ConfigError(
            f"setting 'repair_after_seconds' must exceed two heartbeat intervals "
            f"({2 * settings.heartbeat_interval_seconds:g} s), or be 0 for four lease lengths; got {configured:g}"
        )
    return settings.replace(repair_after_seconds=repair_after)


def _last_change(record: records_pb2.TaskRecord) -> float:
    history = record.result.history
    return seconds_of(history[-1].at) if history else 0.0


def eta_of(record: records_pb2.TaskRecord) -> float:
    """Epoch seconds of the task's ETA (from its countdown when it has one); 0 when it has none."""
    signature = record.result.signature
    if signature.HasField("countdown"):
        return seconds_of(record.enqueued_at) + seconds_of(signature.countdown)
    return seconds_of(signature.eta) if signature.HasField("eta") else 0.0


def last_sign_of_life(record: records_pb2.TaskRecord) -> float:
    """Epoch seconds of the latest sign that the task is being looked after."""
    state = record.result.state
    if state == TaskStates.TASK_STATE_PENDING:
        return max(seconds_of(record.enqueued_at), _last_change(record), eta_of(record))
    if state == TaskStates.TASK_STATE_RETRY:
        return max(seconds_of(record.retry_at), _last_change(record))
    return max(_last_change(record), seconds_of(record.lease_renewed_at))


@dataclass(frozen=True, slots=True)
class Verdict:
    lost: bool
    # When it looks lost (if nothing changes), and how long since its last sign of life.
    due: float
    age: float


def judge(
    record: records_pb2.TaskRecord, at: float, after: float, lease_after: float, backoff: bool = True
) -> Verdict | None:
    """Whether a task looks lost at `at`; None when it needs no watching (ended, replaced: its
    message is kept until its replacement started, or a workflow step not started yet)."""
    state = record.result.state
    if (
        state in TERMINAL_STATES
        or not record.enqueued
        or state == TaskStates.TASK_STATE_UNSPECIFIED
        or is_replaced(record)
    ):
        return None
    since = last_sign_of_life(record)
    due = since + (lease_after if state in _RUNNING else after)
    if backoff and record.repairs:
        due = max(due, seconds_of(record.repaired_at) + after * 2 ** min(record.repairs - 1, MAX_DOUBLINGS))
    return Verdict(at >= due, due, at - since)


def replaces_stale_lease(record: records_pb2.TaskRecord, message: records_pb2.TaskMessage) -> bool:
    """A repair's copy of a running task may replace the lease that the repair found stale,
    unless that lease was replaced or renewed since (dispatch asks, for a first delivery)."""
    return (bool(message.repairs_lease) and message.repairs_lease == record.lease_token
            and seconds_of(record.lease_renewed_at) <= seconds_of(record.repaired_at))


def _needs_stamp(record: records_pb2.TaskRecord, token: str, at: float, repair_after: float) -> bool:
    return (record.result.state in _RUNNING and record.lease_token == token
            and at - max(_last_change(record), seconds_of(record.lease_renewed_at)) >= repair_after / 2)


async def stamp_live_leases(
    store: TaskStore, leases: Sequence[tuple[str, str]], loaded: Mapping[str, Loaded], repair_after: float,
    at: float | None = None,
) -> None:
    """On a heartbeat: mark these (task id, lease token) leases live on records whose last sign
    of life is older than half of repair_after; one batched compare-and-set, usually none."""
    at = time.time() if at is None else at
    tokens = {
        task_id: token for task_id, token in leases
        if (found := loaded.get(task_id)) is not None and _needs_stamp(found.record, token, at, repair_after)
    }
    if not tokens:
        return

    def stamp(task_id: str, record: records_pb2.TaskRecord) -> bool:
        if not _needs_stamp(record, tokens[task_id], at, repair_after):
            return False
        set_seconds(record.lease_renewed_at, at)
        return True

    await store.update_loaded(list(tokens), stamp, known={task_id: loaded[task_id] for task_id in tokens})


@dataclass(frozen=True, slots=True)
class Repaired:
    record: records_pb2.TaskRecord
    age: float


@dataclass(slots=True)
class RepairReport:
    repaired: list[Repaired] = field(default_factory=list)
    checked: int = 0
    # Looked lost, but their queue still holds their messages (or as many, where the broker cannot tell which).
    held: int = 0
    carried: int = 0

    def add(self, other: RepairReport) -> None:
        self.repaired += other.repaired
        self.checked += other.checked
        self.held += other.held
        self.carried += other.carried


@dataclass(slots=True)
class _Sorted:
    """One pass's tasks, sorted by what becomes of them. Ids only, never records: a pass may
    cover a bucket of a million queued tasks."""

    # Queue -> (task id, seconds since its last sign of life).
    lost: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: defaultdict(list))
    # Next look -> queue -> task ids.
    waiting: dict[float, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    checked: int = 0
    held: int = 0


class Repairer:
    def __init__(
        self, store: TaskStore, broker: Broker, publisher: Publisher, index: PublishIndex, repair_after: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.broker = broker
        self.publisher = publisher
        self.index = index
        self.repair_after = repair_after
        self.clock = clock

    async def repair_due(self) -> RepairReport:
        """The reconciler's pass: the buckets that ended repair_after ago and no other replica
        took this period; they are retired once their tasks are settled."""
        at = self.clock()
        period = int(at // max(self.repair_after / 4, 1.0))
        report, indexed = RepairReport(), 0
        for bucket in await self.index.buckets_until(at - self.repair_after, MAX_BUCKETS_PER_PASS):
            if indexed >= MAX_TASKS_PER_PASS:
                break
            if not await self.store.backend.claim(f"repair:{bucket.name}:{period}"):
                continue
            # A part at a time: a bucket may hold a million queued tasks, and the pass keeps
            # only one part's ids (and what it carries forward is written per part).
            async for tasks in self.index.task_parts([bucket], MAX_TASKS_PER_PASS):
                indexed += len(tasks)
                report.add(await self._repair(tasks, at, self.repair_after, carry=True))
            await self.index.flush()  # the republished tasks are in the index before their old entries go
            await self.index.retire([bucket])
        if report.repaired or report.held:
            log.log(logging.WARNING if report.repaired else logging.INFO,
                    "repair of lost messages: republished %d tasks with no sign of life for %g s (%d checked, "
                    "%d still queued)", len(report.repaired), self.repair_after, report.checked,
                    report.held)
        return report

    async def repair_now(
        self, older_than: float, queue: str = "", dry_run: bool = False, force: bool = False
    ) -> RepairReport:
        """An operator's repair of tasks with no sign of life for `older_than` seconds (of one
        queue, when given). `force` republishes regardless of backlogs and recent repairs."""
        at = self.clock()
        # Every bucket begun by now, not only those ended `older_than` ago: a task's entry may
        # be a recent one (carried forward) though its last sign of life is old.
        report = RepairReport()
        async for part in self.index.task_parts(await self.index.buckets_until(at, begun=True), MAX_TASKS_PER_PASS):
            tasks = {task_id: q for task_id, q in part.items() if q == queue} if queue else part
            report.add(await self._repair(tasks, at, older_than, dry_run=dry_run, force=force))
        if not dry_run:
            await self.index.flush()
        return report

    async def _repair(
        self, tasks: Mapping[str, str], at: float, after: float, carry: bool = False, dry_run: bool = False,
        force: bool = False,
    ) -> RepairReport:
        by_queue: dict[str, list[str]] = defaultdict(list)
        for task_id, queue in tasks.items():
            by_queue[queue].append(task_id)
        found = _Sorted()
        for queue, indexed in by_queue.items():
            # A message its queue still holds is a sign of life: neither its record is read nor
            # is it a candidate (a backlog is carried without reading it). Not when forced.
            held = None if force else await self.broker.holding(queue, indexed)
            unheld = indexed
            if held:
                found.waiting[at][queue].extend(task_id for task_id in indexed if task_id in held)
                found.checked += len(held)
                found.held += len(held)
                unheld = [task_id for task_id in indexed if task_id not in held]
            await self._sort(queue, unheld, at, after, force, found)
            if held is None and not force:
                await self._judge_from_counts(queue, at, found)
        report = RepairReport(checked=found.checked, held=found.held)
        for candidates in found.lost.values():
            report.repaired += await self._republish(candidates, at, after, dry_run, force)
        if carry:
            report.carried = await self._carry(found.waiting, at, after)
        return report

    async def _judge_from_counts(self, queue: str, at: float, found: _Sorted) -> None:
        """For a broker that cannot say which messages it holds: when the queue holds (ready,
        delayed or leased) fewer messages than it has candidates, some must be missing and all
        are republished (the copies of those that were not are dropped at dispatch as
        duplicates); otherwise they are carried forward. Delayed messages count: a task handed
        back by dispatch for a rate limit or a worker that knows its name waits there, not only
        ETAs and retries; leased ones too: a pump may hold a task's message before dispatch
        marks it received."""
        candidates = found.lost.get(queue)
        if not candidates:
            return
        stats = await self.broker.stats(queue)
        if stats.ready + stats.delayed + stats.in_flight >= len(candidates):
            found.waiting[at][queue].extend(task_id for task_id, _ in candidates)
            found.held += len(candidates)
            del found.lost[queue]

    async def _sort(
        self, queue: str, task_ids: Sequence[str], at: float, after: float, force: bool, found: _Sorted
    ) -> None:
        """Reads the records of `queue`'s tasks in batches and sorts them into `found`."""
        lease_after = max(after, self.repair_after)
        for start in range(0, len(task_ids), LOAD_BATCH):
            for task_id, loaded in (await self.store.load(task_ids[start:start + LOAD_BATCH])).items():
                verdict = judge(loaded.record, at, after, lease_after, backoff=not force)
                if verdict is None:
                    continue
                found.checked += 1
                if verdict.lost:
                    found.lost[queue].append((task_id, verdict.age))
                else:
                    found.waiting[verdict.due][queue].append(task_id)

    async def _republish(
        self, lost: Sequence[tuple[str, float]], at: float, after: float, dry_run: bool, force: bool
    ) -> list[Repaired]:
        """Republish what still looks lost on a fresh read; each task is taken by a
        compare-and-set of its repair count, so one of two concurrent repairs sends it."""
        ages = dict(lost)
        lease_after = max(after, self.repair_after)

        def take(_: str, record: records_pb2.TaskRecord) -> bool:
            verdict = judge(record, at, after, lease_after, backoff=not force)
            if verdict is None or not verdict.lost:
                return False
            record.repairs += 1
            set_seconds(record.repaired_at, at)
            return True

        repaired: list[Repaired] = []
        for start in range(0, len(lost), LOAD_BATCH):
            batch = [task_id for task_id, _ in lost[start:start + LOAD_BATCH]]
            if dry_run:
                loaded = await self.store.load(batch)
                repaired += (Repaired(loaded[task_id].record, ages[task_id]) for task_id in batch if task_id in loaded)
                continue
            taken = await self.store.update(batch, take)
            if taken:
                await self.publisher.publish([_publication(record) for record in taken.values()])
            repaired += (Repaired(record, ages[task_id]) for task_id, record in taken.items())
        return repaired

    async def _carry(self, waiting: Mapping[float, Mapping[str, list[str]]], at: float, after: float) -> int:
        """Note still-live tasks again, in the bucket whose processing comes when they would
        look lost (never the current bucket's predecessors)."""
        by_bucket: dict[Bucket, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for due, queues in waiting.items():
            bucket = Bucket.at(max(due - after, at), self.index.bucket_seconds)
            for queue, ids in queues.items():
                by_bucket[bucket][queue].extend(ids)
        for bucket, queues in sorted(by_bucket.items()):
            await self.index.add(bucket, queues)
        return sum(len(ids) for queues in waiting.values() for ids in queues.values())


def _publication(record: records_pb2.TaskRecord) -> Publication:
    """The task's message as first published; a running task's copy names its stale lease."""
    result = record.result
    stale = record.lease_token if result.state in _RUNNING else ""
    return Publication(result.signature, max(result.attempts, 1), result.workflow_id, delay=0.0, repairs_lease=stale)
