"""Periodic tasks: cron schedules kept in the backend and fired by every replica's scheduler.

Storage: one `ScheduleRecord` per schedule (`schedule:<name>`, core/schedule_records.py),
written by compare-and-set (core/versioned.py), and the index group `schedules` (member =
name). The backend has no delete, so a deleted schedule is a tombstone record plus its removal
from the index. Records and the index are rewritten now and then, so they outlive the
backend's TTL.

Exactly once per tick, across any number of replicas: every replica looks at every due
schedule once per `schedule_tick_seconds` and submits the tick's task with the deterministic
id `cron-<name>-<tick epoch seconds>`. Submitting creates the task record with the backend's
atomic insert, so exactly one submission per tick is accepted; the others get AlreadyExists
and count the tick as fired. Winning the tick and creating its task are one write, so there
is no separate claim to lose: a replica that dies before that write leaves the tick to the
next replica that looks; one that dies after it has fired the tick, and nobody fires it
again. (A replica that dies between storing the task and publishing it leaves an outbox
entry behind, as any submission does, and the reconciler publishes the task.) Only after
firing is the schedule's next_run_at moved forward, by a compare-and-set that at most one replica wins.

Missed ticks: a tick is *missed* when no replica got to it within `grace` seconds of its time
(no server was running). SKIP (the default) drops missed ticks and waits for the next one;
RUN_ONCE fires once, as the latest missed tick, for all of them. Ticks within the grace fire
as usual, one task each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import admin_service_pb2, task_pb2, task_service_pb2

from ..backends.base import Backend
from ..config import Settings
from . import schedule_records
from .errors import AlreadyExists, CoreError, InvalidArgument, NotFound
from .pauses import KEEPALIVE_MEMBER, keepalive_interval
from .schedule_records import ScheduleRecord
from .store import ConflictError
from .submission import Submitter
from .validation import check_signature
from .versioned import Stored, VersionedRecords

log = logging.getLogger(__name__)

Schedule = admin_service_pb2.Schedule
MissedTicks = admin_service_pb2.MissedTicks
SKIP = admin_service_pb2.MISSED_TICKS_SKIP
RUN_ONCE = admin_service_pb2.MISSED_TICKS_RUN_ONCE

SCHEDULES_GROUP = "schedules"
SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
# Croniter's hashed (H) and random (R) fields differ between processes: no replica could agree.
_NON_DETERMINISTIC = re.compile(r"(?:^|[,/\-(])[HhRr](?=$|[,/\-(])")
# A tick is missed when no replica fired it within this many seconds (at least; see grace_seconds).
MIN_GRACE_SECONDS = 5.0
# Headers set on every task a schedule fires.
SCHEDULE_HEADER = "conveyor-schedule"
TICK_HEADER = "conveyor-tick"
# Most on-time ticks fired in one pass for one schedule (a seconds cron after a stall).
MAX_FIRES_PER_PASS = 1000


def schedule_key(name: str) -> str:
    return f"schedule:{name}"


def task_id_for(name: str, tick: int) -> str:
    """The id of the task fired for `tick`; the same on every replica."""
    return f"cron-{name}-{tick}"


def grace_seconds(tick_seconds: float) -> int:
    return math.ceil(max(MIN_GRACE_SECONDS, 5 * tick_seconds))


# -- cron ---------------------------------------------------------------------------------------

def check_cron(expression: str) -> str:
    """Validate a cron expression; returns it normalized (single spaces).

    Five fields (minute hour day-of-month month day-of-week) in UTC, or six with a leading
    seconds field, or one of the macros @hourly, @daily, @weekly, @monthly, @yearly.
    """
    fields = expression.split()
    normalized = " ".join(fields)
    where = f"schedule.cron {normalized[:100]!r}"
    if len(fields) == 1 and fields[0].lower() in MACROS:
        normalized = normalized.lower()
    elif len(fields) not in (5, 6):
        raise InvalidArgument(
            f"{where}: expected 5 fields (minute hour day-of-month month day-of-week), or 6 with a "
            f"leading seconds field, got {len(fields)}"
        )
    elif any(_NON_DETERMINISTIC.search(field) for field in fields):
        raise InvalidArgument(f"{where}: hashed (H) and random (R) fields are not supported")
    try:
        _cron(normalized, time.time()).get_next(float)
    except (ValueError, KeyError, IndexError) as exc:  # croniter's errors are ValueErrors
        raise InvalidArgument(f"{where} is not a valid cron expression: {exc}") from exc
    return normalized


def _cron(expression: str, start: float) -> Any:
    return croniter(expression, start, second_at_beginning=len(expression.split()) == 6)


def next_tick(expression: str, after: float) -> int:
    """The first tick strictly after `after` (ticks are whole seconds)."""
    return int(_cron(expression, math.floor(after)).get_next(float))


@dataclass(frozen=True)
class Plan:
    """What one pass does for one schedule: the ticks to fire and the next tick to wait for."""

    fire: list[int]
    next_run_at: int
    missed: bool = False


def plan_ticks(
    expression: str, next_run_at: int, now: float, policy: MissedTicks.ValueType, grace: float
) -> Plan:
    """Pure: which ticks are due at `now` for a schedule waiting for `next_run_at`."""
    current = math.floor(now)
    if next_run_at > current:
        return Plan([], next_run_at)
    cutoff = math.floor(current - grace)
    fire: list[int] = []
    missed = False
    start = next_run_at - 1
    if next_run_at < cutoff:
        # Ticks before the cutoff were missed: at most one fires for all of them.
        missed = True
        if policy == RUN_ONCE:
            fire.append(int(_cron(expression, cutoff).get_prev(float)))
        start = cutoff - 1
    ticks = _cron(expression, start)
    while (tick := int(ticks.get_next(float))) <= current:
        fire.append(tick)
        if len(fire) >= MAX_FIRES_PER_PASS:
            return Plan(fire, next_tick(expression, current), missed)
    return Plan(fire, tick, missed)


def schedule_not_found(name: str) -> NotFound:
    """The refusal for a name no schedule has (the name cut to fit the message and metadata)."""
    return NotFound(f"no schedule named {name[:80]!r}", reason="SCHEDULE_NOT_FOUND", metadata={"schedule": name[:200]})


def _stamp(seconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromSeconds(seconds)
    return stamp


class Schedules:
    """Create, list and delete schedules, and fire them (see the module docstring)."""

    def __init__(
        self, backend: Backend, submitter: Submitter, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.backend = backend
        self.submitter = submitter
        self.settings = settings
        self.clock = clock
        self.tick_seconds = max(settings.schedule_tick_seconds, 0.01)
        self.grace = grace_seconds(self.tick_seconds)
        self._keepalive_seconds = keepalive_interval(settings.result_ttl_seconds)
        self._index_kept_alive_at: float | None = None

    @property
    def _records(self) -> VersionedRecords[ScheduleRecord]:
        # Built on use, over whatever `backend` is now (tests swap it to script a crash).
        return VersionedRecords(self.backend, schedule_records.parse, ScheduleRecord.SerializeToString)

    # -- operator API ------------------------------------------------------------------------

    async def create(self, requested: Schedule) -> Schedule:
        """Store a schedule; one with the same name is replaced (its last_run_at is kept)."""
        schedule = self._validated(requested)
        now = self.clock()

        def replacing(read: Stored[ScheduleRecord] | None) -> ScheduleRecord:
            record = schedule_records.live(schedule, now)
            previous = read.record if read is not None else None
            if previous is not None and not previous.deleted:
                if previous.schedule.HasField("last_run_at"):
                    record.schedule.last_run_at.CopyFrom(previous.schedule.last_run_at)
                # Paused by an operator: a redeploy that stores the schedule again does not resume it.
                record.schedule.paused = previous.schedule.paused
            return record

        written = await self._change(schedule.name, replacing)
        assert written is not None  # `replacing` always writes
        schedule = written.schedule
        await self.backend.add_member(SCHEDULES_GROUP, schedule.name, b"")
        log.info("schedule %s stored: %r, task %s, next run %s", schedule.name, schedule.cron,
                 schedule.task.name, schedule.next_run_at.ToJsonString())
        return schedule

    async def all(self) -> list[Schedule]:
        stored = await self._load(await self._names())
        return [stored[name].record.schedule for name in sorted(stored) if not stored[name].record.deleted]

    async def delete(self, name: str) -> None:
        """Forget a schedule; its future ticks never fire. NotFound when there is none."""
        stored = (await self._load([name])).get(name)
        indexed = name in await self._names()
        if not indexed and (stored is None or stored.record.deleted):
            raise schedule_not_found(name)
        await self.backend.remove_member(SCHEDULES_GROUP, name)

        def burying(read: Stored[ScheduleRecord] | None) -> ScheduleRecord | None:
            if read is None or read.record.deleted:
                return None
            return schedule_records.tombstone(self.clock())

        await self._change(name, burying)
        log.info("schedule %s deleted", name)

    async def set_paused(self, name: str, paused: bool) -> Schedule:
        """Pause a schedule (it does not fire) or resume it from its next tick after now, so
        the ticks it missed while paused never fire. NotFound when there is none."""
        now = self.clock()

        unchanged: list[Schedule] = []

        def pausing(read: Stored[ScheduleRecord] | None) -> ScheduleRecord | None:
            if read is None or read.record.deleted:
                raise schedule_not_found(name)
            if read.record.schedule.paused == paused:
                unchanged[:] = [read.record.schedule]
                return None  # already so: nothing to write
            schedule = Schedule()
            schedule.CopyFrom(read.record.schedule)
            schedule.paused = paused
            if not paused:
                schedule.next_run_at.CopyFrom(_stamp(next_tick(schedule.cron, now)))
            return schedule_records.live(schedule, now)

        written = await self._change(name, pausing)
        if written is None:
            return unchanged[0]
        log.info("schedule %s %s", name, "paused" if paused else "resumed")
        return written.schedule

    # -- firing -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Fire due schedules every `schedule_tick_seconds`, forever (one loop per replica)."""
        while True:
            await asyncio.sleep(self.tick_seconds)
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking schedules failed; will retry")

    async def run_due(self) -> list[str]:
        """One pass over every schedule; returns the ids of the tasks this replica submitted."""
        now = self.clock()
        stored = await self._load(await self._names())
        if stored and (self._index_kept_alive_at is None or now - self._index_kept_alive_at >= self._keepalive_seconds):
            await self.backend.add_member(SCHEDULES_GROUP, KEEPALIVE_MEMBER, b"")
            self._index_kept_alive_at = now
        submitted: list[str] = []
        for name, item in sorted(stored.items()):
            if item.record.deleted:
                continue
            try:
                submitted.extend(await self._advance(item, now))
            except Exception:
                log.exception("schedule %s: firing failed; will retry on the next pass", name)
        return submitted

    async def _advance(self, item: Stored[ScheduleRecord], now: float) -> list[str]:
        schedule = item.record.schedule
        stale = now - schedule_records.touched(item.record) >= self._keepalive_seconds
        if schedule.paused:
            if stale:  # rewritten only to outlive the backend's TTL
                await self._records.put(schedule_key(schedule.name), item, schedule_records.live(schedule, now))
            return []
        plan = plan_ticks(
            schedule.cron, schedule.next_run_at.seconds, now, schedule.missed_ticks or SKIP, self.grace
        )
        if not plan.fire and plan.next_run_at == schedule.next_run_at.seconds and not stale:
            return []
        if plan.missed:
            log.warning("schedule %s missed ticks while no server ran; %s", schedule.name,
                        "firing once for them" if schedule.missed_ticks == RUN_ONCE else "skipping them")
        submitted = [task_id for tick in plan.fire if (task_id := await self._fire(schedule, tick))]
        updated = Schedule()
        updated.CopyFrom(schedule)
        updated.next_run_at.CopyFrom(_stamp(plan.next_run_at))
        if plan.fire:
            updated.last_run_at.CopyFrom(_stamp(max(plan.fire)))
        # Losing this race is fine: another replica (or a re-created schedule) moved it on.
        await self._records.put(schedule_key(schedule.name), item, schedule_records.live(updated, now))
        return submitted

    async def _fire(self, schedule: Schedule, tick: int) -> str:
        """Submit the task for one tick; '' when it was already submitted (by anyone)."""
        signature = task_pb2.Signature()
        signature.CopyFrom(schedule.task)
        signature.id = task_id_for(schedule.name, tick)
        signature.headers[SCHEDULE_HEADER] = schedule.name
        signature.headers[TICK_HEADER] = datetime.fromtimestamp(tick, UTC).isoformat().replace("+00:00", "Z")
        try:
            await self.submitter.submit([task_service_pb2.SubmitRequest(task=signature)])
        except AlreadyExists:
            return ""
        except CoreError as exc:
            # The stored task no longer passes validation (limits changed): drop this tick.
            log.error("schedule %s: the task for tick %d was refused: %s", schedule.name, tick, exc)
            return ""
        log.info("schedule %s fired task %s", schedule.name, signature.id)
        return signature.id

    # -- helpers ------------------------------------------------------------------------------

    def _validated(self, requested: Schedule) -> Schedule:
        if not SCHEDULE_NAME.match(requested.name):
            raise InvalidArgument(f"schedule.name {requested.name[:80]!r} must be 1-64 of [A-Za-z0-9_.-]")
        cron = check_cron(requested.cron)
        if requested.missed_ticks not in MissedTicks.values():
            raise InvalidArgument(f"schedule.missed_ticks {requested.missed_ticks} is not a known policy")
        if not requested.HasField("task"):
            raise InvalidArgument("schedule.task is required: the task to submit on every tick")
        task = requested.task
        check_signature(task, self.settings.limits, "schedule.task")
        if task.id:
            raise InvalidArgument("schedule.task.id must be empty: each run gets the id cron-<name>-<tick>")
        if task.HasField("eta"):
            raise InvalidArgument("schedule.task.eta cannot be set: the schedule decides when it runs")
        if task.idempotency_key:
            raise InvalidArgument("schedule.task.idempotency_key cannot be set: it would keep every later run out")
        schedule = Schedule(
            name=requested.name, cron=cron, task=task, missed_ticks=requested.missed_ticks or SKIP
        )
        if not schedule.task.queue:
            schedule.task.queue = self.settings.default_queue
        schedule.next_run_at.CopyFrom(_stamp(next_tick(cron, self.clock())))
        return schedule

    async def _change(
        self, name: str, edit: Callable[[Stored[ScheduleRecord] | None], ScheduleRecord | None]
    ) -> ScheduleRecord | None:
        try:
            return await self._records.change(schedule_key(name), edit)
        except ConflictError:
            raise AlreadyExists(f"schedule {name!r} kept changing under concurrent writers; try again") from None

    async def _names(self) -> list[str]:
        return [name for name in await self.backend.members(SCHEDULES_GROUP) if name != KEEPALIVE_MEMBER]

    async def _load(self, names: list[str]) -> dict[str, Stored[ScheduleRecord]]:
        """The readable records of `names`, by name (an expired or unreadable one is left out)."""
        found = await self._records.load([schedule_key(name) for name in names])
        return {name: found[schedule_key(name)] for name in names if schedule_key(name) in found}
