"""The task registry: every task name workers registered, on any replica, with what each task
does, the calls it accepts (TaskInfo), its queues, languages and live workers.

Storage: one member per worker connection in the backend group `task-registry`, named
`<connection id>.<generation>`, its payload a TaskRegistration. The connection's replica
writes it when the worker says Hello, rewrites it every heartbeat interval under the next
generation (add the new member, then remove the old one: a reader never finds a gap, and an
older generation left behind by a failed remove is pruned), and marks it gone when the worker
leaves. Add, read and remove are all it needs of the backend, so every engine has it.

Live: a connection is live while its entry is not gone and was rewritten within three
heartbeat intervals; a replica that died stops rewriting, so its workers stop being live
without anyone removing anything. A gone or stale entry stays only while it is the sole record
of one of its task names, and at most `task_registry_retention_seconds`: a task whose workers
are all away (a deploy, a crash) stays known, and is listed with its last-seen time.

Reads: every replica reloads the group each heartbeat interval into a snapshot that strict
submits read without a backend round trip (core/task_schemas.py); a strict submit that would be
refused reloads first, so a worker that just connected to another replica counts. The
replica's own connections count from their Hello on, before any write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import admin_service_pb2, task_pb2
from conveyor.values import seconds_of, set_seconds

from ..backends.base import Backend
from .call_schemas import BadSchema, check_task_info
from .errors import InvalidArgument
from .sessions import WorkerSession

log = logging.getLogger(__name__)
REGISTRY_GROUP = "task-registry"
# A connection's entry not rewritten for this many heartbeat intervals is no longer live.
STALE_AFTER_BEATS = 3
# Entries removed per refresh at most, so pruning after a mass disconnect stays cheap.
PRUNE_BATCH = 200
# How long stopping waits for the gone marks of its connections.
CLOSE_SECONDS = 2.0


def _stamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    set_seconds(stamp, seconds)
    return stamp




def member_name(registration: records_pb2.TaskRegistration) -> str:
    return f"{registration.connection_id}.{registration.generation:010d}"


def declared_tasks(hello_tasks: Iterable[task_pb2.TaskInfo], task_names: Iterable[str]) -> list[task_pb2.TaskInfo]:
    """The TaskInfos a Hello declares: its `tasks`, plus a bare entry (no schema) for each name in
    `task_names` it does not describe. InvalidArgument when an entry cannot be kept."""
    infos: dict[str, task_pb2.TaskInfo] = {}
    for index, info in enumerate(hello_tasks):
        try:
            check_task_info(info, f"hello.tasks[{index}]")
        except BadSchema as exc:
            raise InvalidArgument(str(exc)) from None
        infos.setdefault(info.name, info)
    for name in task_names:
        if name and name not in infos:
            infos[name] = task_pb2.TaskInfo(name=name)
    return list(infos.values())


@dataclass(frozen=True)
class Seen:
    """One registration of a task name, as a snapshot holds it."""

    info: task_pb2.TaskInfo
    registration: records_pb2.TaskRegistration
    seen_at: float
    live: bool


@dataclass(frozen=True)
class KnownTask:
    name: str
    seen: tuple[Seen, ...]

    def current(self) -> list[Seen]:
        """The registrations that count, newest first: the live ones, or all when none is live."""
        live = [s for s in self.seen if s.live]
        return sorted(live or self.seen, key=lambda s: s.seen_at, reverse=True)

    def call_schemas(self) -> list[str]:
        """Distinct call schemas of the current registrations, newest first ("" accepts any call)."""
        return list(dict.fromkeys(s.info.call_schema for s in self.current()))

    def listed(self) -> admin_service_pb2.RegisteredTask:
        current = self.current()
        newest = current[0]
        return admin_service_pb2.RegisteredTask(
            name=self.name,
            description=newest.info.description,
            call_schema=newest.info.call_schema,
            schema_variants=len(self.call_schemas()),
            queues=sorted({q for s in current for q in s.registration.queues}),
            languages=sorted({s.registration.language for s in current if s.registration.language}),
            worker_ids=sorted({s.registration.worker_id for s in self.seen if s.live}),
            last_seen=_stamp(max(s.seen_at for s in self.seen)),
        )


@dataclass(frozen=True)
class Snapshot:
    tasks: dict[str, KnownTask]
    # time.monotonic() of the backend read it reflects.
    loaded_at: float

    def runner_on(self, queue: str, name: str) -> bool:
        """Whether a live worker of any replica registered `name` on `queue` (a worker that
        names no task is not registered: its own replica routes to it, see runner_for)."""
        known = self.tasks.get(name)
        return known is not None and any(s.live and queue in s.registration.queues for s in known.seen)


@dataclass(eq=False)
class _Connection:
    """A worker connection of this replica and its entry."""

    session: WorkerSession
    registration: records_pb2.TaskRegistration
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    written: str = ""  # the member last written, to remove once the next one is in


class TaskRegistry:
    """This replica's view of the registry, and the writer of its own connections' entries."""

    def __init__(
        self, backend: Backend, server_id: str, beat_seconds: float, retention_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.server_id = server_id
        self.beat_seconds = beat_seconds
        self.retention_seconds = retention_seconds
        self.clock = clock
        self._connections: dict[int, _Connection] = {}
        self._stored: list[records_pb2.TaskRegistration] = []  # as last read from the backend
        self._snapshot = Snapshot({}, float("-inf"))
        self._dirty = False  # a connection came or went since the snapshot was built
        self._loading: asyncio.Future[Snapshot] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def stale_after(self) -> float:
        return STALE_AFTER_BEATS * self.beat_seconds

    # -- this replica's connections ------------------------------------------------------------

    def joined(self, session: WorkerSession) -> None:
        """Register what the worker's Hello declares (InvalidArgument when it cannot be kept);
        it counts on this replica at once, on the others once written."""
        infos = declared_tasks(session.hello.tasks, session.hello.task_names)
        if not infos:
            return  # a worker that names no task takes any: nothing to register
        registration = records_pb2.TaskRegistration(
            connection_id=uuid.uuid4().hex, worker_id=session.worker_id, language=session.hello.language,
            queues=session.queues, tasks=infos, server_id=self.server_id, seen_at=_stamp(self.clock()),
        )
        connection = _Connection(session, registration)
        self._connections[id(session)] = connection
        self._dirty = True
        self._spawn(self._write(connection))

    def left(self, session: WorkerSession) -> None:
        """Mark the worker's entry gone: its task names stay known, it is no longer live."""
        connection = self._connections.pop(id(session), None)
        if connection is None:
            return
        connection.registration.gone = True
        # Until the next read, the snapshot has it from this copy: gone, not live.
        gone = records_pb2.TaskRegistration()
        gone.CopyFrom(connection.registration)
        self._stored = [r for r in self._stored if r.connection_id != gone.connection_id] + [gone]
        self._dirty = True
        self._spawn(self._write(connection))

    async def _write(self, connection: _Connection) -> None:
        """Write the entry under its next generation, then drop the previous one."""
        async with connection.lock:
            registration = connection.registration
            if connection.written:
                registration.generation += 1
            registration.seen_at.CopyFrom(_stamp(self.clock()))
            member = member_name(registration)
            try:
                await self.backend.add_member(REGISTRY_GROUP, member, registration.SerializeToString(), keep=True)
                previous, connection.written = connection.written, member
                if previous and previous != member:
                    await self.backend.remove_member(REGISTRY_GROUP, previous)
            except Exception as exc:  # the next refresh writes it again; a leftover is pruned
                log.warning("writing the task registry entry of worker %s failed: %s: %s",
                            registration.worker_id, type(exc).__name__, exc)

    # -- reading ---------------------------------------------------------------------------------

    async def current(self) -> Snapshot:
        """The snapshot, read from the backend first if it never was."""
        if self._snapshot.loaded_at == float("-inf"):
            return await self.load()
        return self._view()

    def _view(self) -> Snapshot:
        """The snapshot, rebuilt (without a read) when connections came or went since."""
        if self._dirty:
            self._rebuild(self._snapshot.loaded_at)
        return self._snapshot

    async def load(self) -> Snapshot:
        """Read the whole registry (callers at the same moment share one read)."""
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._read())
            self._loading.add_done_callback(self._loaded)
        return await asyncio.shield(self._loading)

    def _loaded(self, future: asyncio.Future[Snapshot]) -> None:
        if self._loading is future:
            self._loading = None
        if not future.cancelled():
            future.exception()  # retrieved: a read whose callers all left does not warn

    async def _read(self) -> Snapshot:
        started = time.monotonic()
        members = await self.backend.members(REGISTRY_GROUP)
        stored = []
        for member, payload in members.items():
            registration = records_pb2.TaskRegistration()
            try:
                registration.ParseFromString(payload)
            except Exception:
                log.warning("task registry entry %s is unreadable; removing it", member)
                await self.backend.remove_member(REGISTRY_GROUP, member)
                continue
            stored.append(registration)
        self._stored = stored
        return self._rebuild(started)

    def _rebuild(self, loaded_at: float) -> Snapshot:
        """A snapshot from the entries last read, this replica's connections taking precedence."""
        now = self.clock()
        # connection id -> (its newest entry, live, when seen)
        newest: dict[str, tuple[records_pb2.TaskRegistration, bool, float]] = {}
        for registration in self._stored:
            held = newest.get(registration.connection_id)
            if held is None or held[0].generation < registration.generation:
                newest[registration.connection_id] = (
                    registration, self._live(registration, now), seconds_of(registration.seen_at)
                )
        for connection in self._connections.values():  # open on this replica: seen now
            session = connection.session
            live = not connection.registration.gone and not session.closed and not session.draining
            newest[connection.registration.connection_id] = (connection.registration, live, now)
        seen: dict[str, list[Seen]] = {}
        for registration, live, at in newest.values():
            for info in registration.tasks:
                seen.setdefault(info.name, []).append(Seen(info, registration, at, live))
        self._snapshot = Snapshot({name: KnownTask(name, tuple(s)) for name, s in seen.items()}, loaded_at)
        self._dirty = False
        return self._snapshot

    def _live(self, registration: records_pb2.TaskRegistration, now: float) -> bool:
        return not registration.gone and now - seconds_of(registration.seen_at) <= self.stale_after

    async def listed(self) -> list[admin_service_pb2.RegisteredTask]:
        """Every known task, by name, as read now."""
        snapshot = await self.load()
        return [snapshot.tasks[name].listed() for name in sorted(snapshot.tasks)]

    # -- upkeep ------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Rewrite this replica's live entries, read the registry, prune what is no longer needed."""
        for connection in list(self._connections.values()):
            if not connection.session.closed and not connection.session.draining:
                await self._write(connection)
        await self.load()
        await self._prune()

    async def _prune(self) -> None:
        """Remove entries that no reader needs: older generations of a connection, and gone or
        stale ones that are past the retention or whose every task name a live entry covers."""
        now = self.clock()
        newest: dict[str, int] = {}
        for registration in self._stored:
            newest[registration.connection_id] = max(newest.get(registration.connection_id, 0),
                                                     registration.generation)
        covered = {name for name, known in self._view().tasks.items() if any(s.live for s in known.seen)}
        doomed = [r for r in self._stored if r.generation < newest[r.connection_id] or self._unneeded(r, covered, now)]
        for registration in doomed[:PRUNE_BATCH]:
            await self.backend.remove_member(REGISTRY_GROUP, member_name(registration))
        if doomed:
            pruned = {id(r) for r in doomed[:PRUNE_BATCH]}
            self._stored = [r for r in self._stored if id(r) not in pruned]
            self._dirty = True

    def _unneeded(self, registration: records_pb2.TaskRegistration, covered: set[str], now: float) -> bool:
        """A gone or stale entry past the retention, or whose every task name a live one has."""
        if self._live(registration, now):
            return False
        expired = now - seconds_of(registration.seen_at) > self.retention_seconds
        return expired or all(info.name in covered for info in registration.tasks)

    async def run(self) -> None:
        """Refresh every heartbeat interval until cancelled."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("refreshing the task registry failed: %s: %s; retrying", type(exc).__name__, exc)
            await asyncio.sleep(self.beat_seconds)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coroutine)
        except RuntimeError:  # no loop (a synchronous caller): the next refresh writes it
            coroutine.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def written(self) -> None:
        """Wait for the writes that Hellos and leaving workers started."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        """Mark this replica's connections gone (best effort, bounded): their workers reconnect
        elsewhere, and meanwhile their tasks show as not live rather than live for a while."""
        for connection in list(self._connections.values()):
            connection.registration.gone = True
            self._spawn(self._write(connection))
        self._connections.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.written(), CLOSE_SECONDS)
