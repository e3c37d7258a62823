"""Feeds behind the pages' Server-Sent Events: each keeps its subscribers' queues and publishes
what changed. Nothing here runs while no page is open, except two list appends (a sample, an
index flush) that find no subscriber.

- samples: each sample the sampler takes (the overview's charts).
- tasks: "the task list changed", from the task index's flushes, at most once a second.
- queues: the queue table, re-read when this replica's counters move (submissions, outcomes,
  leases, unroutable tasks) and at least every QUEUES_REFRESH_SECONDS (other replicas' work).
- workers: the worker table, from this replica's sessions (memory only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from conveyor.values import set_seconds

from ..background import stop_tasks
from . import convert
from .sampler import Sample, counter_totals

if TYPE_CHECKING:
    from ..app import Core
    from ..core.sessions import WorkerSession

JSON = dict[str, Any]
# How often the queue and worker feeds look for a change while a page watches.
LOOK_SECONDS = 0.5
QUEUES_REFRESH_SECONDS = 5.0
TASKS_CHANGED_SECONDS = 1.0
# Messages a slow subscriber may fall behind by; older ones are dropped (each is a full state).
QUEUE_SIZE = 8


class Broadcast:
    """Subscribers each get every message (the oldest dropped when they fall behind)."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self._queues: set[asyncio.Queue[JSON]] = set()
        self._on_first = on_first
        self.last: JSON | None = None

    @property
    def watched(self) -> bool:
        return bool(self._queues)

    def publish(self, message: JSON) -> None:
        self.last = message
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[JSON]]:
        queue: asyncio.Queue[JSON] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        if len(self._queues) == 1 and self._on_first is not None:
            self._on_first()
        try:
            yield queue
        finally:
            self._queues.discard(queue)


def worker_json(session: WorkerSession, server_id: str) -> JSON:
    hello = session.hello
    return {
        "id": session.worker_id, "language": hello.language, "sdk_version": hello.sdk_version, "pid": hello.pid,
        "hostname": hello.hostname, "queues": list(session.queues), "slots_used": session.in_flight,
        "slots": session.window, "tasks": sorted(session.task_names),
        "connected_at": convert.when(session.connected_at),
        "last_heartbeat_at": _wall(session.last_seen), "draining": session.draining, "server_id": server_id,
    }


def _wall(monotonic: float) -> str | None:
    """A time.monotonic() reading as a wall-clock RFC 3339 time."""
    from google.protobuf.timestamp_pb2 import Timestamp  # noqa: PLC0415 - tiny, used here only

    stamp = Timestamp()
    set_seconds(stamp, time.time() - (time.monotonic() - monotonic))
    return convert.when(stamp)


class Live:
    def __init__(self, core: Core, rates: Callable[[], dict[str, float]] = dict) -> None:
        self.core = core
        self.samples = Broadcast()
        self.tasks = Broadcast()
        self.queues = Broadcast(lambda: self._start("queues", self._watch_queues))
        self.workers = Broadcast(lambda: self._start("workers", self._watch_workers))
        self._tasks_changed_at = 0.0
        self._pending_change: asyncio.TimerHandle | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}
        # Submissions per second by queue (the sampler's last sample), shown in the queue table.
        self.rates = rates

    def attach(self) -> None:
        """Hook into the sampler's and the task index's notifications (see module doc)."""
        self.core.admin.indexer.on_flush.append(self._tasks_flushed)

    def sample_taken(self, sample: Sample) -> None:
        self.samples.publish(sample.json())

    def _tasks_flushed(self, count: int) -> None:
        if not self.tasks.watched or self._pending_change is not None:
            return
        delay = max(0.0, self._tasks_changed_at + TASKS_CHANGED_SECONDS - time.monotonic())
        self._pending_change = asyncio.get_running_loop().call_later(delay, self._tell_tasks_changed)

    def _tell_tasks_changed(self) -> None:
        self._pending_change = None
        self._tasks_changed_at = time.monotonic()
        self.tasks.publish({"changed": True, "at": time.time()})

    def _start(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a feed's loop, unless it still runs (a page left and another came back at once)."""
        running = self._loops.get(name)
        if running is None or running.done():
            self._loops[name] = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        await stop_tasks(*self._loops.values())
        if self._pending_change is not None:
            self._pending_change.cancel()

    # -- queues and workers: looked at only while a page watches -------------------------------

    def _queue_fingerprint(self) -> tuple[Any, ...]:
        core = self.core
        return (
            sum(counter_totals(core.metrics.submitted, "queue").values()),
            sum(counter_totals(core.metrics.outcomes, "state").values()),
            tuple(s.in_flight for s in core.registry.sessions.values()),
        )

    async def queue_table(self) -> JSON:
        rates = self.rates()
        queues = [convert.queue(q) | {"submitted_per_second": rates.get(q.name, 0.0)}
                  for q in await self.core.admin.queues()]
        return {"queues": queues, "at": time.time()}

    async def _watch_queues(self) -> None:
        seen: tuple[Any, ...] | None = None
        refreshed = 0.0
        while self.queues.watched:
            fingerprint = self._queue_fingerprint()
            if fingerprint != seen or time.monotonic() - refreshed >= QUEUES_REFRESH_SECONDS:
                seen, refreshed = fingerprint, time.monotonic()
                with contextlib.suppress(Exception):  # an engine away: the next look tries again
                    table = await self.queue_table()
                    if self.queues.last is None or table["queues"] != self.queues.last["queues"]:
                        self.queues.publish(table)
            await asyncio.sleep(LOOK_SECONDS)
        self.queues.last = None

    def worker_table(self) -> JSON:
        server_id = self.core.settings.server_id
        workers = [worker_json(s, server_id) for s in self.core.registry.sessions.values()]
        return {"workers": sorted(workers, key=lambda w: str(w["id"])), "at": time.time()}

    async def _watch_workers(self) -> None:
        published = 0.0
        while self.workers.watched:
            table = self.worker_table()
            changed = self.workers.last is None or _without_times(table) != _without_times(self.workers.last)
            # Heartbeats alone are sent now and then, so "last heartbeat" stays current.
            if changed or time.monotonic() - published >= QUEUES_REFRESH_SECONDS:
                self.workers.publish(table)
                published = time.monotonic()
            await asyncio.sleep(LOOK_SECONDS)
        self.workers.last = None


def _without_times(table: JSON) -> list[JSON]:
    return [{k: v for k, v in w.items() if k != "last_heartbeat_at"} for w in table["workers"]]
