"""SQLite broker: one WAL-mode file, durable across restarts, shareable by several processes."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any, Self

from ..sqlite_db import SqliteDatabase, sqlite_path, transaction
from ._wakeups import Wakeups, fetch_unless_drained
from .base import Delivery, OutgoingMessage, QueueStats

# How often a waiting fetch looks for work made ready by other processes; work published by
# this process wakes it at once.
_POLL_SECONDS = 0.03

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    priority INTEGER NOT NULL,
    -- Due time of a delayed message; NULL once due, so ready rows sit in one ordered index and
    -- fetch never scans past delayed ones.
    available_at REAL,
    lease_until REAL,
    receipt TEXT,
    delivery_count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, seq)
    WHERE available_at IS NULL AND receipt IS NULL;
CREATE INDEX IF NOT EXISTS messages_delayed ON messages (queue, available_at) WHERE available_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_leased ON messages (lease_until) WHERE lease_until IS NOT NULL;
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY) WITHOUT ROWID;
COMMIT;
"""

_HAS_WORK = """
SELECT EXISTS (SELECT 1 FROM messages WHERE queue = :queue AND available_at IS NULL AND receipt IS NULL)
    OR EXISTS (SELECT 1 FROM messages WHERE queue = :queue AND available_at <= :now)
    OR EXISTS (SELECT 1 FROM messages WHERE lease_until <= :now AND queue = :queue)
"""
_PROMOTE_DUE = "UPDATE messages SET available_at = NULL WHERE queue = :queue AND available_at <= :now"
_RETURN_EXPIRED = """
UPDATE messages SET receipt = NULL, lease_until = NULL, delivery_count = delivery_count + 1
WHERE lease_until <= :now
"""
# The receipt embeds seq (for an indexed lookup) and a token fresh per lease, so an ack or nack
# from an earlier lease of the same row matches nothing.
_LEASE = """
UPDATE messages SET receipt = seq || '-' || :token, lease_until = :until
WHERE seq IN (
    SELECT seq FROM messages WHERE queue = :queue AND available_at IS NULL AND receipt IS NULL
    ORDER BY priority DESC, seq LIMIT :limit
)
RETURNING priority, seq, id, body, receipt, delivery_count
"""
_STATS = """
SELECT
    (SELECT COUNT(*) FROM messages WHERE queue = :queue AND available_at IS NULL AND receipt IS NULL),
    (SELECT COUNT(*) FROM messages WHERE queue = :queue AND available_at <= :now),
    (SELECT COUNT(*) FROM messages WHERE queue = :queue AND available_at > :now),
    (SELECT COUNT(*) FROM messages WHERE lease_until IS NOT NULL AND queue = :queue)
"""

_ADD_QUEUE = "INSERT OR IGNORE INTO queues (name) VALUES (?)"
_PUBLISH = "INSERT INTO messages (id, queue, body, priority, available_at, delivery_count) VALUES (?, ?, ?, ?, ?, 1)"
_PURGE_READY = "DELETE FROM messages WHERE queue = ? AND available_at IS NULL AND receipt IS NULL RETURNING id"
_PURGE_DELAYED = "DELETE FROM messages WHERE queue = ? AND available_at IS NOT NULL RETURNING id"
_QUEUE_HOLDS_ANY = "SELECT EXISTS (SELECT 1 FROM messages WHERE queue = ?)"
_DROP_QUEUE = "DELETE FROM queues WHERE name = ?"
# A delivery is settled only under its receipt: a lease that lapsed and went to another worker is not.
_ACK = "DELETE FROM messages WHERE seq = ? AND receipt = ?"
_NACK = (
    "UPDATE messages SET receipt = NULL, lease_until = NULL, available_at = ?,"
    " delivery_count = delivery_count + 1 WHERE seq = ? AND receipt = ?"
)
_EXTEND = "UPDATE messages SET lease_until = ? WHERE seq = ? AND receipt = ?"
_QUEUE_IDS = "SELECT id FROM messages WHERE queue = ?"
_QUEUE_NAMES = "SELECT name FROM queues ORDER BY name"



def _receipt_key(receipt: str) -> tuple[int, str] | None:
    seq, _, token = receipt.partition("-")
    return (int(seq), receipt) if seq.isdigit() and token else None


def _receipt_keys(deliveries: Sequence[Delivery]) -> list[tuple[int, str]]:
    # A receipt this engine never issued cannot hold a live lease: acting on it is a no-op.
    return [key for key in map(_receipt_key, (d.receipt for d in deliveries)) if key is not None]


def _publish(conn: sqlite3.Connection, queue: str, messages: Sequence[OutgoingMessage]) -> None:
    with transaction(conn):
        now = time.time()
        conn.execute(_ADD_QUEUE, (queue,))
        conn.executemany(
            _PUBLISH,
            [
                (m.message_id, queue, m.body, m.priority, now + m.delay if m.delay > 0 else None)
                for m in messages
            ],
        )


def _lease(conn: sqlite3.Connection, queue: str, limit: int, lease_seconds: float) -> list[Delivery]:
    # A plain read first, so idle pollers in many processes do not contend for the write lock.
    if not conn.execute(_HAS_WORK, {"queue": queue, "now": time.time()}).fetchone()[0]:
        return []
    with transaction(conn):
        now = time.time()
        conn.execute(_PROMOTE_DUE, {"queue": queue, "now": now})
        conn.execute(_RETURN_EXPIRED + " AND queue = :queue", {"queue": queue, "now": now})
        params = {"token": uuid.uuid4().hex, "until": now + lease_seconds, "queue": queue, "limit": limit}
        rows = conn.execute(_LEASE, params).fetchall()
    rows.sort(key=lambda row: (-row[0], row[1]))  # RETURNING order is unspecified
    return [Delivery(row[2], row[3], queue, row[4], row[5]) for row in rows]


def _execute_many(conn: sqlite3.Connection, sql: str, params: Sequence[Sequence[Any]]) -> None:
    with transaction(conn):
        conn.executemany(sql, params)


def _recover(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute(_RETURN_EXPIRED + " RETURNING queue", {"now": time.time()})]


def _stats(conn: sqlite3.Connection, queue: str) -> QueueStats:
    ready, due, delayed, in_flight = conn.execute(_STATS, {"queue": queue, "now": time.time()}).fetchone()
    return QueueStats(ready=ready + due, delayed=delayed, in_flight=in_flight)


def _purge(conn: sqlite3.Connection, queue: str) -> list[str]:
    with transaction(conn):
        ready = conn.execute(_PURGE_READY, (queue,)).fetchall()
        delayed = conn.execute(_PURGE_DELAYED, (queue,)).fetchall()
    return [row[0] for row in ready + delayed]


def _delete_queue(conn: sqlite3.Connection, queue: str) -> bool:
    with transaction(conn):
        if conn.execute(_QUEUE_HOLDS_ANY, (queue,)).fetchone()[0]:
            return False
        conn.execute(_DROP_QUEUE, (queue,))
    return True


class SqliteBroker:
    def __init__(self, path: str) -> None:
        self._db = SqliteDatabase(path, _SCHEMA)
        # Woken when this process makes messages ready in a queue: its waiting fetches look at once.
        self._arrivals = Wakeups()

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(sqlite_path(url))

    def portable_receipts(self) -> bool:
        """A receipt is the row's seq and its lease's token, both in the shared file."""
        return True

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()
        self._arrivals.wake_all()

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        await self._db.run(lambda conn: _publish(conn, queue, messages))
        if any(m.delay <= 0 for m in messages):
            self._arrivals.wake(queue)

    async def fetch(
        self, queue: str, max_messages: int, lease_seconds: float, wait_seconds: float = 0.0
    ) -> list[Delivery]:
        if max_messages <= 0:
            return []

        async def attempt() -> tuple[list[Delivery], float]:
            taken = await self._db.run(lambda conn: _lease(conn, queue, max_messages, lease_seconds))
            return taken, _POLL_SECONDS

        return await fetch_unless_drained(
            self._arrivals, queue, max_messages, attempt, wait_seconds, stopped=lambda: self._db.closed
        )

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        keys = _receipt_keys(deliveries)
        if keys:
            await self._db.run(lambda conn: _execute_many(conn, _ACK, keys))

    async def nack(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        keys = _receipt_keys(deliveries)
        if not keys:
            return
        available_at = time.time() + delay if delay > 0 else None
        await self._db.run(lambda conn: _execute_many(conn, _NACK, [(available_at, *key) for key in keys]))
        if delay <= 0:
            for queue in {d.queue for d in deliveries}:
                self._arrivals.wake(queue)

    async def extend(self, deliveries: Sequence[Delivery], lease_seconds: float) -> None:
        keys = _receipt_keys(deliveries)
        if not keys:
            return
        until = time.time() + lease_seconds
        await self._db.run(lambda conn: _execute_many(conn, _EXTEND, [(until, *key) for key in keys]))

    async def recover_expired(self) -> int:
        queues = await self._db.run(_recover)
        for queue in set(queues):
            self._arrivals.wake(queue)
        return len(queues)

    async def stats(self, queue: str) -> QueueStats:
        return await self._db.run(lambda conn: _stats(conn, queue))

    async def holding(self, queue: str, message_ids: Sequence[str]) -> set[str] | None:
        # One pass over the queue's rows rather than an index on ids that every publish would pay for.
        wanted = set(message_ids)
        return await self._db.run(
            lambda conn: {row[0] for row in conn.execute(_QUEUE_IDS, (queue,)) if row[0] in wanted})

    async def queues(self) -> list[str]:
        return await self._db.run(lambda conn: [row[0] for row in conn.execute(_QUEUE_NAMES)])

    async def delete_queue(self, queue: str) -> bool:
        return await self._db.run(lambda conn: _delete_queue(conn, queue))

    async def purge(self, queue: str) -> list[str]:
        return await self._db.run(lambda conn: _purge(conn, queue))
