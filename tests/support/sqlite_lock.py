"""Lock a SQLite database file from outside, as another process's long write would: a connection of its
own holds `BEGIN EXCLUSIVE` until released, so every other writer waits (for its busy timeout) or fails
with "database is locked". In WAL mode readers still read.

    lock = SqliteWriteLock(path)
    lock.hold()        # returns once the lock is held (waits for a writer that holds it now)
    ...
    lock.release()     # idempotent

`hold` and `release` may run on different threads (a test's `asyncio.to_thread`).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

# How long hold() waits for the writers in flight to let go of the lock.
ACQUIRE_SECONDS = 30.0


class SqliteWriteLock:
    def __init__(self, path: Path, acquire_seconds: float = ACQUIRE_SECONDS) -> None:
        self.path = path
        self.acquire_seconds = acquire_seconds
        self._conn: sqlite3.Connection | None = None
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._conn is not None

    def hold(self) -> None:
        with self._guard:
            if self._conn is not None:
                return
            conn = sqlite3.connect(self.path, timeout=self.acquire_seconds, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("BEGIN EXCLUSIVE")
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def release(self) -> None:
        with self._guard:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.execute("ROLLBACK")
            conn.close()

    def __enter__(self) -> SqliteWriteLock:
        self.hold()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
