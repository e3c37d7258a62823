"""The task index: what a backend keeps so that tasks can be listed (AdminService.ListTasks, the
dashboard) without reading every record.

An index holds one small `IndexEntry` per task (state, queue, name, submission time) and answers
a `TaskQuery` with entries in submission order, newest first (or oldest first), a page at a
time. It is a hint, never the truth: the core (core/task_index.py) writes it in the background
from the records it writes, reads the records of what it finds, and repairs entries that turn
out stale. Engines that can list expose `task_index()` (the `ListsTasks` protocol); one that
cannot (Memcached: no ordered structure, no scan) simply lacks it.

Semantics every index keeps:
- write() upserts entries by task id (the last write wins); an entry of a terminal state
  expires `ttl_seconds` after that write (as its record does), a live one never does.
- find() returns, in order, the entries that match every filter, strictly after the query's
  cursor, at most `limit`, and the cursor to resume from (None: nothing more). An engine may
  stop early (to bound one call's work) and return fewer with a cursor; it never skips one.
- drop() forgets entries (their records are gone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# States that end a task (conveyor.v1.TaskState SUCCESS, FAILURE, CANCELLED, EXPIRED): their entries expire.
TERMINAL_STATES = frozenset({5, 6, 7, 8})


# Not frozen: one is made for each record the server writes, and a frozen dataclass's __init__
# costs several times more (object.__setattr__ per field). Treat it as immutable.
@dataclass(slots=True)
class IndexEntry:
    task_id: str
    state: int
    queue: str
    name: str
    # Submission time, integer microseconds since the epoch: exact as a Redis score or a double.
    submitted_us: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def position(self) -> Cursor:
        return Cursor(self.submitted_us, self.task_id)


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A place in the index's order: (submission time, task id)."""

    submitted_us: int
    task_id: str


@dataclass(frozen=True, slots=True)
class TaskQuery:
    # Any of these states (empty: every state).
    states: frozenset[int] = frozenset()
    queue: str = ""
    name: str = ""
    id_prefix: str = ""
    # Submitted at or after / before (exclusive) these times, in microseconds (None: open).
    since_us: int | None = None
    until_us: int | None = None
    limit: int = 50
    # Strictly past this place in the order (None: from the start).
    after: Cursor | None = None
    oldest_first: bool = False

    def matches(self, entry: IndexEntry) -> bool:
        """Every filter but the cursor."""
        return (
            (not self.states or entry.state in self.states)
            and (not self.queue or entry.queue == self.queue)
            and (not self.name or entry.name == self.name)
            and entry.task_id.startswith(self.id_prefix)
            and (self.since_us is None or entry.submitted_us >= self.since_us)
            and (self.until_us is None or entry.submitted_us < self.until_us)
        )

    def beyond(self, entry: IndexEntry) -> bool:
        """True when the entry comes after the cursor in the query's order."""
        if self.after is None:
            return True
        return entry.position > self.after if self.oldest_first else entry.position < self.after


@dataclass(frozen=True, slots=True)
class Found:
    entries: list[IndexEntry]
    # Resume from here; None when the index holds nothing more that matches.
    next: Cursor | None


class TaskIndex(Protocol):
    async def write(self, entries: Sequence[IndexEntry]) -> None:
        """Upsert entries (terminal ones start their expiry now)."""

    async def find(self, query: TaskQuery) -> Found:
        """Matching entries in the query's order, after its cursor, at most `limit`."""

    async def drop(self, task_ids: Sequence[str]) -> None:
        """Forget these entries (missing ones are ignored)."""


@runtime_checkable
class ListsTasks(Protocol):
    """A backend that keeps a task index."""

    def task_index(self) -> TaskIndex: ...


def ordered(entries: list[IndexEntry], query: TaskQuery) -> Found:
    """The page of `entries` (all matching candidates, any order) that `query` asks for."""
    chosen = sorted((e for e in entries if query.beyond(e)), key=lambda e: e.position, reverse=not query.oldest_first)
    page = chosen[: query.limit]
    more = len(chosen) > query.limit
    return Found(page, page[-1].position if more and page else None)
