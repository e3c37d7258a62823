"""The SQLite backend's task index: table `task_index` in the backend's own file, written by the
backend's connection (one transaction per batch).

    task_index (task_id PRIMARY KEY, submitted (us), state, queue, name, expires_at)

with an index per filter, each ending in (submitted, task_id), so a page for one state, one
queue or one name is one ordered index range; expires_at is +inf while the task is live.
Expired rows are invisible at once and deleted about once a minute, from the writes. The
table is created on first use, so files from before it need no migration.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from conveyor_server.sqlite_db import SqliteDatabase, transaction

from .task_index import Found, IndexEntry, TaskQuery

_SWEEP_SECONDS = 60.0
# Above every code point: `prefix + _TOP` bounds the ids that start with `prefix`.
_TOP = "\U0010ffff"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS task_index (task_id TEXT PRIMARY KEY, submitted INTEGER NOT NULL,"
    " state INTEGER NOT NULL, queue TEXT NOT NULL, name TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS task_index_time ON task_index (submitted, task_id)",
    "CREATE INDEX IF NOT EXISTS task_index_state ON task_index (state, submitted, task_id)",
    "CREATE INDEX IF NOT EXISTS task_index_queue ON task_index (queue, submitted, task_id)",
    "CREATE INDEX IF NOT EXISTS task_index_name ON task_index (name, submitted, task_id)",
    "CREATE INDEX IF NOT EXISTS task_index_expiry ON task_index (expires_at)",
)
_UPSERT = """
INSERT INTO task_index (task_id, submitted, state, queue, name, expires_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, expires_at = excluded.expires_at
"""
_SWEEP = "DELETE FROM task_index WHERE expires_at <= ?"
_DROP = "DELETE FROM task_index WHERE task_id = ?"
# The task list: `where` is _where()'s conjunction of the query's filters (placeholders only),
# `order` ASC or DESC; the page size is the last parameter.
_FIND = (
    "SELECT task_id, state, queue, name, submitted FROM task_index WHERE {where}"
    " ORDER BY submitted {order}, task_id {order} LIMIT ?"
)


def _where(query: TaskQuery, now: float) -> tuple[str, list[Any]]:
    clauses: list[str] = ["expires_at > ?"]
    params: list[Any] = [now]
    if query.states:
        clauses.append(f"state IN ({', '.join('?' * len(query.states))})")
        params.extend(sorted(query.states))
    for column, value in (("queue", query.queue), ("name", query.name)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if query.id_prefix:
        clauses.append("task_id >= ? AND task_id < ?")
        params += [query.id_prefix, query.id_prefix + _TOP]
    if query.since_us is not None:
        clauses.append("submitted >= ?")
        params.append(query.since_us)
    if query.until_us is not None:
        clauses.append("submitted < ?")
        params.append(query.until_us)
    if query.after is not None:
        clauses.append(f"(submitted, task_id) {'>' if query.oldest_first else '<'} (?, ?)")
        params += [query.after.submitted_us, query.after.task_id]
    return " AND ".join(clauses), params


def _find(conn: sqlite3.Connection, query: TaskQuery) -> Found:
    where, params = _where(query, time.time())
    order = "ASC" if query.oldest_first else "DESC"
    rows = conn.execute(_FIND.format(where=where, order=order), [*params, query.limit + 1]).fetchall()
    entries = [IndexEntry(task_id, state, queue, name, submitted) for task_id, state, queue, name, submitted in rows]
    page = entries[: query.limit]
    return Found(page, page[-1].position if len(entries) > query.limit and page else None)


class SqliteTaskIndex:
    def __init__(self, db: SqliteDatabase, ttl_seconds: float) -> None:
        self._db = db
        self._ttl = ttl_seconds
        self._ready = False
        self._next_sweep = 0.0

    def _ensure(self, conn: sqlite3.Connection) -> None:
        if not self._ready:
            with transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
            self._ready = True

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        if not entries:
            return
        sweep = time.monotonic() >= self._next_sweep
        if sweep:
            self._next_sweep = time.monotonic() + _SWEEP_SECONDS

        def run(conn: sqlite3.Connection) -> None:
            self._ensure(conn)
            now = time.time()
            rows = [
                (e.task_id, e.submitted_us, e.state, e.queue, e.name, now + self._ttl if e.terminal else math.inf)
                for e in entries
            ]
            with transaction(conn):
                conn.executemany(_UPSERT, rows)
                if sweep:
                    conn.execute(_SWEEP, (now,))

        await self._db.run(run)

    async def find(self, query: TaskQuery) -> Found:
        def run(conn: sqlite3.Connection) -> Found:
            self._ensure(conn)
            return _find(conn, query)

        return await self._db.run(run)

    async def drop(self, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return

        def run(conn: sqlite3.Connection) -> None:
            self._ensure(conn)
            with transaction(conn):
                conn.executemany(_DROP, [(t,) for t in task_ids])

        await self._db.run(run)
