"""Listing tasks (AdminService.ListTasks, the dashboard) through the backend's task index.

Writing is off the task's path: the store calls `note()` with every record it writes, which
only keeps the record's entry in a dict (a later write of the same task replaces it); a
background flush writes the batch every FLUSH_SECONDS in one engine call. A live task's entry
waits HOLD_LIVE_SECONDS first: most tasks end within it, and then only their final state is
written, so a task costs one index write however many states it went through (a longer one,
two or three). The list therefore shows a new task within about a second and a half. A server
that dies within that moment leaves those entries stale or missing (as the publish index does,
core/publish_index.py) until a later write of the task, or a read, repairs them.

Reading treats the index as a hint: `find()` finds entries, reads their records, and returns
only records that really match the query; an entry whose record is gone (expired) is dropped
from the index, and one whose record moved on (a lost write) is noted again, so the index
repairs itself as it is read. A page may hold fewer tasks than asked for while the next page
token is set: the engines bound each scan (Redis) and stale entries are skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor.values import micros_of, seconds_of

from ..backends.base import Backend
from ..backends.task_index import TERMINAL_STATES, Cursor, IndexEntry, ListsTasks, TaskIndex, TaskQuery
from ..background import stop_tasks
from .clock import SYSTEM_CLOCK, Clock
from .errors import InvalidArgument
from .page_tokens import decode_place, encode_place
from .store import load_records

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
HOLD_LIVE_SECONDS = 1.0
FLUSH_AT_ENTRIES = 5_000
RETRY_MAX_SECONDS = 2.0
# Past this many unwritten entries (a long backend outage) new notes are dropped.
MAX_PENDING = 500_000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1_000
# Engine calls and time one list() may spend filling a page before it answers with a token.
MAX_FIND_ROUNDS = 8
FILL_BUDGET_SECONDS = 0.2
STATES = frozenset(result_pb2.TaskState.values()) - {result_pb2.TASK_STATE_UNSPECIFIED}
# A noted entry: state, queue, name, submitted (us), first noted (monotonic). A tuple: this is
# made for every record the server writes.
Noted = tuple[int, str, str, int, float]


class ListingUnsupported(Exception):
    """The backend keeps no task index (Memcached), or listing was turned off; UNIMPLEMENTED."""


@dataclass(frozen=True, slots=True)
class TaskPage:
    records: list[records_pb2.TaskRecord]
    next_page_token: str


def entry_of(record: records_pb2.TaskRecord) -> IndexEntry:
    result = record.result
    return IndexEntry(result.task_id, result.state, result.queue, result.name, micros_of(result.submitted_at))


def encode_token(cursor: Cursor | None) -> str:
    return "" if cursor is None else encode_place(cursor.submitted_us, cursor.task_id)


def decode_token(token: str) -> Cursor | None:
    return Cursor(*decode_place(token)) if token else None


def check_query(query: TaskQuery) -> TaskQuery:
    """The query with its page size settled; InvalidArgument for a bad filter."""
    unknown = query.states - STATES
    if unknown:
        raise InvalidArgument(f"unknown task states {sorted(unknown)}; states are 1 (PENDING) to 7 (CANCELLED)")
    if query.limit < 0 or query.limit > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 (the default, {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}")
    if query.since_us is not None and query.until_us is not None and query.since_us >= query.until_us:
        raise InvalidArgument("submitted_after must be before submitted_before")
    return dataclasses.replace(query, limit=query.limit or DEFAULT_PAGE_SIZE)


class TaskIndexer:
    """Keeps the task index (the store's write hook: build it first, then the store with
    `write_hook=indexer.note`) and lists tasks through it, reading their records from `backend`."""

    def __init__(self, backend: Backend, index: TaskIndex | None, unsupported: str = "", *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.backend = backend
        self.index = index
        # Times how long a live entry has been held (its monotonic clock).
        self.clock = clock
        # Why listing is off, for the UNIMPLEMENTED message (when index is None).
        self.unsupported = unsupported or "this backend cannot list tasks"
        # Noted entries of live tasks in the order first noted (so the ones held long enough are
        # a prefix), and of ended tasks (due at once): a flush takes what is due without
        # scanning everything that waits.
        self._live: dict[str, Noted] = {}
        self._ended: dict[str, Noted] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._dropped = 0
        # Called after each flush with how many entries it wrote (live views of the task list).
        self.on_flush: list[Callable[[int], None]] = []

    @classmethod
    def for_backend(cls, backend: Backend, enabled: bool = True, *, clock: Clock = SYSTEM_CLOCK) -> TaskIndexer:
        if not enabled:
            return cls(backend, None, "task listing is turned off (setting task_index: false)")
        if isinstance(backend, ListsTasks):
            return cls(backend, backend.task_index(), clock=clock)
        engine = type(backend).__name__.removesuffix("Backend").lower()
        return cls(backend, None, f"the {engine} backend keeps no task index, so it cannot list tasks (SQLite, Redis, "
                                "MongoDB and memory can; InspectTask still reads a task by its id)")

    @property
    def enabled(self) -> bool:
        return self.index is not None

    # -- writing (the store's hook) ---------------------------------------------------------

    def note(self, record: records_pb2.TaskRecord) -> None:
        """Remember the record's entry; written by a later flush."""
        if self.index is None:
            return
        result = record.result
        task_id = result.task_id
        state = result.state
        held = self._live.get(task_id) or self._ended.get(task_id)
        if held is not None:
            if held[0] == state:
                return  # noted as it is (a write that did not change the state)
            # A task's queue, name and submission time never change: only its state is read again.
            self._keep(task_id, (state, held[1], held[2], held[3], held[4]))
        elif len(self._live) + len(self._ended) >= MAX_PENDING:
            self._dropped += 1
            return
        else:
            noted_at = self.clock.monotonic()
            self._keep(task_id, (state, result.queue, result.name, micros_of(result.submitted_at), noted_at))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _keep(self, task_id: str, noted: Noted) -> None:
        """File the entry as ended or live (a live one keeps its place: it was first noted then)."""
        if noted[0] in TERMINAL_STATES:
            self._live.pop(task_id, None)
            self._ended[task_id] = noted
        else:
            self._ended.pop(task_id, None)
            self._live[task_id] = noted

    def _take_due(self, everything: bool) -> dict[str, Noted]:
        """The noted entries to write now: ended tasks', and live ones held long enough."""
        due, self._ended = self._ended, {}
        if everything:
            due.update(self._live)
            self._live = {}
            return due
        held_since = self.clock.monotonic() - HOLD_LIVE_SECONDS
        held_long: list[str] = []
        for task_id, noted in self._live.items():
            if noted[4] > held_since:
                break  # the rest were noted later still
            held_long.append(task_id)
        for task_id in held_long:
            due[task_id] = self._live.pop(task_id)
        return due

    async def flush(self, everything: bool = True) -> int:
        """Write what was noted (everything, or what is due); raises when the engine fails (the
        entries are kept)."""
        if self.index is None:
            return 0
        async with self._writing:
            taken = self._take_due(everything)
            if not taken:
                return 0
            try:
                await self.index.write([IndexEntry(t, n[0], n[1], n[2], n[3]) for t, n in taken.items()])
            except BaseException:
                for task_id, noted in taken.items():
                    if task_id not in self._live and task_id not in self._ended:  # a newer note wins
                        self._keep(task_id, noted)
                raise
        if self._dropped:
            log.warning("the task index fell behind (the backend is away?): %d updates left out", self._dropped)
            self._dropped = 0
        for listener in self.on_flush:
            listener(len(taken))
        return len(taken)

    async def _flush_soon(self) -> None:
        delay = FLUSH_SECONDS
        try:
            while self._live or self._ended:
                # Many ended entries go at once; otherwise (and after a failure) wait a tick, also
                # when many live ones wait: they become due with time only.
                if delay > FLUSH_SECONDS or len(self._ended) < FLUSH_AT_ENTRIES:
                    await asyncio.sleep(delay)
                try:
                    await self.flush(everything=False)
                    delay = FLUSH_SECONDS
                except Exception as exc:
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
                    log.warning("writing the task index failed (%s: %s); retrying in %.1f s",
                                type(exc).__name__, exc, delay)
        finally:
            self._flusher = None

    async def close(self) -> None:
        """Write what is left (best effort: the server is stopping)."""
        await stop_tasks(self._flusher)
        try:
            await self.flush()
        except Exception as exc:
            log.warning("the task index lost %d updates at shutdown (%s: %s)", len(self._live) + len(self._ended),
                        type(exc).__name__, exc)

    # -- reading ----------------------------------------------------------------------------

    def _require(self) -> TaskIndex:
        if self.index is None:
            raise ListingUnsupported(self.unsupported)
        return self.index

    async def find(self, query: TaskQuery, page_token: str = "") -> TaskPage:
        """A page of tasks matching `query`, in its order, with the token of the next page
        ("" at the end)."""
        index = self._require()
        query = dataclasses.replace(check_query(query), after=decode_token(page_token))
        wanted = query.limit
        records: list[records_pb2.TaskRecord] = []
        deadline = time.monotonic() + FILL_BUDGET_SECONDS
        for _ in range(MAX_FIND_ROUNDS):
            found = await index.find(dataclasses.replace(query, limit=wanted - len(records)))
            records.extend(await self._verified(found.entries, query))
            if found.next is None:
                return TaskPage(records, "")
            query = dataclasses.replace(query, after=found.next)
            if len(records) >= wanted or time.monotonic() > deadline:
                break
        return TaskPage(records, encode_token(query.after))

    async def _verified(self, entries: list[IndexEntry], query: TaskQuery) -> list[records_pb2.TaskRecord]:
        """The records of `entries` that really match; the index repaired where it was wrong."""
        if not entries:
            return []
        loaded = await load_records(self.backend, [e.task_id for e in entries])
        matching, gone = [], []
        for entry in entries:
            found = loaded.get(entry.task_id)
            if found is None:
                gone.append(entry.task_id)
                continue
            actual = entry_of(found.record)
            if actual != entry:
                self.note(found.record)
            if query.matches(actual):
                matching.append(found.record)
        if gone:
            await index_drop(self._require(), gone)
        return matching

    async def oldest_age(self, queue: str, states: frozenset[int], now: float | None = None) -> float | None:
        """Seconds since the oldest task of `queue` in `states` was submitted (None: there is none)."""
        page = await self.find(TaskQuery(states=states, queue=queue, limit=1, oldest_first=True))
        if not page.records:
            return None
        submitted = page.records[0].result.submitted_at
        return max(0.0, (now or time.time()) - seconds_of(submitted))


async def index_drop(index: TaskIndex, task_ids: list[str]) -> None:
    """Forget entries whose records expired; a failure only leaves them for the next read."""
    try:
        await index.drop(task_ids)
    except Exception as exc:
        log.debug("dropping %d stale task index entries failed: %s", len(task_ids), exc)
