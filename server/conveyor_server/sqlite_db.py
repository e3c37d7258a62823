"""The SQLite file both SQLite engines (broker and backend) open: its path from the engine URL,
one connection on a worker thread of its own, and write transactions."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import unquote

from .engine_urls import EngineUrl

T = TypeVar("T")


def sqlite_path(url: str) -> str:
    """`sqlite:///relative/file.db` -> `relative/file.db`; `sqlite:////abs/file.db` -> `/abs/file.db`."""
    parts = EngineUrl(url).parts
    if parts.scheme != "sqlite" or parts.netloc or len(parts.path) < 2:
        raise ValueError(f"expected sqlite:///relative/path or sqlite:////absolute/path, got {url!r}")
    return unquote(parts.path[1:])


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    if conn.in_transaction:  # nested: part of the enclosing transaction, which commits it
        yield
        return
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then writes
    # fails with SQLITE_BUSY (without waiting) when another process wrote in between.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteDatabase:
    """One connection used only by one worker thread, so SQLite never blocks the event loop."""

    def __init__(self, path: str, schema: str) -> None:
        self._path = path
        self._schema = schema
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, transactions only where we BEGIN them.
        # timeout: wait up to 30 s for another process's write lock (busy_timeout).
        conn = sqlite3.connect(self._path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL survives a process crash; only a power loss may drop the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(self._schema)
        return conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-sqlite")
        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"SQLite database {self._path!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            return
        self._conn = self._executor = None
        # Work queued before close still runs: the executor is FIFO.
        await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown()
