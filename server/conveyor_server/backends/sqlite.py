"""SQLite result store: one WAL-mode file, durable across restarts, shareable by several processes.

Tables: `records` (key, data, version, expires_at), `claims` (key, expires_at), `groups` (grp,
size, expires_at) and `group_members` (grp, member, payload; primary key (grp, member), so a
page of a group is one index range). A kept row has expires_at = +inf, which every "live"
filter and the sweep already treat as never. A group keeps its member count in its `groups`
row, updated in the same transaction as the member, so add_member() costs the same at 10 or
10 million members; add_members() writes a chunk of members in one transaction (executemany).
A file from before `groups` existed is migrated once, at connect().
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Hashable, Mapping, Sequence
from typing import Self

from conveyor_server.sqlite_db import SqliteDatabase, sqlite_path, transaction

from . import _tokens
from ._common import DerivedWrites, member_chunks
from ._watch import Feed, PollFeed, WatchHub
from .base import DEFAULT_TTL_SECONDS, Changes, GroupMember, Update, Versioned
from .sqlite_task_index import SqliteTaskIndex

# How often watches look for writes by other connections (other processes, or a broker on the
# same file); writes through this backend wake them at once.
_POLL_SECONDS = 0.05
# Expired rows are invisible at once; this is how often they are actually deleted.
_SWEEP_SECONDS = 60.0
# expires_at of a kept row.
_KEEP = math.inf

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    version INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at);
CREATE TABLE IF NOT EXISTS groups (grp TEXT PRIMARY KEY, size INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS groups_expiry ON groups (expires_at);
CREATE TABLE IF NOT EXISTS group_members (
    grp TEXT NOT NULL,
    member TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (grp, member)
);
CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS claims_expiry ON claims (expires_at);
COMMIT;
"""

# An expired row counts as absent: the upsert then replaces it as if new.
_INSERT = """
INSERT INTO records (key, data, version, expires_at) VALUES (:key, :data, 1, :expires)
ON CONFLICT (key) DO UPDATE SET data = excluded.data, version = 1, expires_at = excluded.expires_at
WHERE records.expires_at <= :now
"""
_COMPARE_AND_SET = """
UPDATE records SET data = :data, version = version + 1, expires_at = :expires
WHERE key = :key AND version = :version AND expires_at > :now
"""
_CLAIM = """
INSERT INTO claims (key, expires_at) VALUES (:key, :expires)
ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE claims.expires_at <= :now
"""
# json_each takes any number of keys in one bound parameter.
_GET = """
SELECT key, data, version FROM records
WHERE key IN (SELECT value FROM json_each(:keys)) AND expires_at > :now
"""
_STAMPS = """
SELECT key, version, expires_at FROM records
WHERE key IN (SELECT value FROM json_each(:keys)) AND expires_at > :now
"""
# Members expire with their group (one expires_at in `groups`), so a long-running group never
# loses its early members.
_SWEEP = (
    "DELETE FROM records WHERE expires_at <= :now",
    "DELETE FROM claims WHERE expires_at <= :now",
    "DELETE FROM group_members WHERE grp IN (SELECT grp FROM groups WHERE expires_at <= :now)",
    "DELETE FROM groups WHERE expires_at <= :now",
)
# expire(): only live rows, so an expired row that is not swept yet stays expired.
_EXPIRE = {
    "records": "UPDATE records SET expires_at = :expires"
    " WHERE key IN (SELECT value FROM json_each(:names)) AND expires_at > :now",
    "groups": "UPDATE groups SET expires_at = :expires"
    " WHERE grp IN (SELECT value FROM json_each(:names)) AND expires_at > :now",
    "claims": "UPDATE claims SET expires_at = :expires"
    " WHERE key IN (SELECT value FROM json_each(:names)) AND expires_at > :now",
}
# A page of a group; the primary key (grp, member) serves it as one range, in BINARY (UTF-8
# byte, hence code point) order. LIMIT -1 means no limit.
_PAGE = "SELECT member, payload FROM group_members WHERE grp = :grp {} ORDER BY member LIMIT :limit"
_PAGE_FIRST = _PAGE.format("")
_PAGE_AFTER = _PAGE.format("AND member > :after")
# Groups: a group row holds its size and expiry; its members are rows of group_members.
_GROUP_SIZE = "SELECT size, expires_at FROM groups WHERE grp = ?"
_GROUP_EXPIRY = "SELECT expires_at FROM groups WHERE grp = ?"
_CLEAR_GROUP = "DELETE FROM group_members WHERE grp = ?"
# The first payload wins; rowcount sums the rows added.
_ADD_MEMBER = "INSERT INTO group_members (grp, member, payload) VALUES (?, ?, ?) ON CONFLICT (grp, member) DO NOTHING"
_PUT_GROUP = (
    "INSERT INTO groups (grp, size, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (grp) DO UPDATE SET size = excluded.size, expires_at = excluded.expires_at"
)
_REMOVE_MEMBER = "DELETE FROM group_members WHERE grp = ? AND member = ?"
_SHRINK_GROUP = "UPDATE groups SET size = size - ? WHERE grp = ?"
# Moving groups out of the old `members` table (each row carrying its group's expiry).
_HAS_OLD_MEMBERS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'members'"
_MOVE_OLD_GROUPS = (
    "INSERT OR IGNORE INTO groups (grp, size, expires_at)"
    " SELECT grp, COUNT(*), MAX(expires_at) FROM members GROUP BY grp"
)
_MOVE_OLD_MEMBERS = (
    "INSERT OR IGNORE INTO group_members (grp, member, payload) SELECT grp, member, payload FROM members"
)
_DROP_OLD_MEMBERS = "DROP TABLE members"
# Token buckets (take_tokens).
_TOKEN_SWEEP = "DELETE FROM token_buckets WHERE full_at <= ?"
_TOKEN_READ = "SELECT tokens, updated FROM token_buckets WHERE bucket = ?"

def _expires_at(now: float, ttl: float, keep: bool) -> float:
    return _KEEP if keep else now + ttl


def _has_old_members(conn: sqlite3.Connection) -> bool:
    return conn.execute(_HAS_OLD_MEMBERS).fetchone() is not None


def _migrate(conn: sqlite3.Connection) -> None:
    """Move groups from the old `members` table (each row carrying the group's expiry)."""
    if not _has_old_members(conn):
        return  # the usual case: no write lock taken
    with transaction(conn):
        if not _has_old_members(conn):
            return  # another process migrated it first
        conn.execute(_MOVE_OLD_GROUPS)
        conn.execute(_MOVE_OLD_MEMBERS)
        conn.execute(_DROP_OLD_MEMBERS)


def _insert(conn: sqlite3.Connection, records: Mapping[str, bytes], ttl: float, keep: bool) -> list[str]:
    with transaction(conn):
        now = time.time()
        existing: list[str] = []
        for key, data in records.items():
            params = {"key": key, "data": data, "expires": _expires_at(now, ttl, keep), "now": now}
            if conn.execute(_INSERT, params).rowcount == 0:
                existing.append(key)
        return existing


def _get(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, Versioned]:
    rows = conn.execute(_GET, {"keys": json.dumps(list(keys)), "now": time.time()})
    return {key: Versioned(data, version) for key, data, version in rows}


def _compare_and_set(conn: sqlite3.Connection, updates: Sequence[Update], ttl: float) -> list[bool]:
    with transaction(conn):
        now = time.time()
        applied: list[bool] = []
        for u in updates:
            params = {
                "key": u.key, "version": u.expected_version, "data": u.data,
                "expires": _expires_at(now, ttl, u.keep), "now": now,
            }
            applied.append(conn.execute(_COMPARE_AND_SET, params).rowcount == 1)
        return applied


def _claim(conn: sqlite3.Connection, key: str, ttl: float, keep: bool) -> bool:
    now = time.time()
    # One statement, so atomic across connections and processes without a transaction.
    return conn.execute(_CLAIM, {"key": key, "expires": _expires_at(now, ttl, keep), "now": now}).rowcount == 1


def _add_members(conn: sqlite3.Connection, group: str, members: Mapping[str, bytes], ttl: float, keep: bool) -> int:
    with transaction(conn):
        now = time.time()
        row = conn.execute(_GROUP_SIZE, (group,)).fetchone()
        size = 0
        if row is not None and row[1] <= now:
            # Expired but not swept yet: it starts again empty (a one-off cost).
            conn.execute(_CLEAR_GROUP, (group,))
        elif row is not None:
            size = row[0]
        # The first payload wins; the write still sets the group's expiry. rowcount sums the rows.
        rows = [(group, member, payload) for member, payload in members.items()]
        added = conn.executemany(_ADD_MEMBER, rows).rowcount
        size += added
        conn.execute(_PUT_GROUP, (group, size, _expires_at(now, ttl, keep)))
        return size


def _remove_members(conn: sqlite3.Connection, group: str, members: Sequence[str]) -> None:
    with transaction(conn):
        rows = [(group, member) for member in members]
        gone = conn.executemany(_REMOVE_MEMBER, rows).rowcount
        if gone:
            conn.execute(_SHRINK_GROUP, (gone, group))


def _members(conn: sqlite3.Connection, group: str, after: str, limit: int) -> dict[str, bytes]:
    # One read transaction, so the group cannot expire (and be swept) between the two reads.
    conn.execute("BEGIN")
    try:
        row = conn.execute(_GROUP_EXPIRY, (group,)).fetchone()
        if row is None or row[0] <= time.time():
            return {}
        params = {"grp": group, "after": after, "limit": limit if limit > 0 else -1}
        rows = conn.execute(_PAGE_AFTER if after else _PAGE_FIRST, params)
        return {member: payload for member, payload in rows}
    finally:
        conn.execute("COMMIT")


def _expire(conn: sqlite3.Connection, names: Mapping[str, Sequence[str]], ttl: float) -> None:
    with transaction(conn):
        now = time.time()
        for table, keys in names.items():
            if keys:
                conn.execute(_EXPIRE[table], {"names": json.dumps(list(keys)), "expires": now + ttl, "now": now})


def _sweep(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        now = time.time()
        for sql in _SWEEP:
            conn.execute(sql, {"now": now})


def _data_version(conn: sqlite3.Connection) -> int:
    # It changes when any *other* connection commits; writes through this backend wake the feed.
    (version,) = conn.execute("PRAGMA data_version").fetchone()
    return int(version)


def _stamps(conn: sqlite3.Connection, keys: Collection[str]) -> dict[str, Hashable]:
    # (version, expires_at): every write moves expires_at, so this also tells a re-created record apart.
    rows = conn.execute(_STAMPS, {"keys": json.dumps(list(keys)), "now": time.time()})
    return {key: (version, expires_at) for key, version, expires_at in rows}


class SqliteBackend(DerivedWrites):
    def __init__(self, path: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._db = SqliteDatabase(path, _SCHEMA)
        self._ttl = ttl_seconds
        self._next_sweep = 0.0
        # Watches compare each key's (version, expiry) stamp, read only when another connection
        # committed or this backend wrote a watched key.
        self._feed = PollFeed(self._read_stamps, "sqlite", _POLL_SECONDS, moved=self._moved)
        self._data_version: int | None = None
        self._watches = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        return cls(sqlite_path(url), ttl_seconds)

    async def connect(self) -> None:
        await self._db.open()
        await self._db.run(_migrate)

    async def close(self) -> None:
        await self._watches.close()
        await self._db.close()

    async def _open_feed(self) -> Feed:
        return self._feed

    async def _read_stamps(self, keys: list[str]) -> dict[str, Hashable]:
        return await self._db.run(functools.partial(_stamps, keys=keys))

    async def _moved(self, woken: bool) -> bool:
        version = await self._db.run(_data_version)
        moved = woken or version != self._data_version
        self._data_version = version
        return moved

    async def _after_write(self, keys: Collection[str] = ()) -> None:
        self._feed.wake(keys)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + _SWEEP_SECONDS
            await self._db.run(_sweep)

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        if not records:
            return []
        existing = await self._db.run(lambda conn: _insert(conn, records, self._ttl, keep))
        await self._after_write(records.keys() - set(existing))
        return existing

    async def insert_after(self, member: GroupMember, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        def write(conn: sqlite3.Connection) -> list[str]:
            with transaction(conn):  # one commit: the member and the records together
                _add_members(conn, member.group, {member.name: member.payload}, self._ttl, member.keep)
                return _insert(conn, records, self._ttl, keep)

        existing = await self._db.run(write)
        await self._after_write(records.keys() - set(existing))
        return existing

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        if not keys:
            return {}
        return await self._db.run(lambda conn: _get(conn, keys))

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        if not updates:
            return []
        applied = await self._db.run(lambda conn: _compare_and_set(conn, updates, self._ttl))
        await self._after_write({u.key for u, ok in zip(updates, applied, strict=True) if ok})
        return applied

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        count = 0
        for names in member_chunks(members):
            chunk = {name: members[name] for name in names}
            count = await self._db.run(
                functools.partial(_add_members, group=group, members=chunk, ttl=self._ttl, keep=keep)
            )
            await self._after_write()
        return count

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        return await self._db.run(lambda conn: _members(conn, group, after, limit))

    async def remove_member(self, group: str, member: str) -> None:
        await self.remove_members(group, [member])

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        for chunk in member_chunks(members):
            await self._db.run(functools.partial(_remove_members, group=group, members=chunk))

    async def claim(self, key: str, keep: bool = False) -> bool:
        won = await self._db.run(lambda conn: _claim(conn, key, self._ttl, keep))
        await self._after_write()
        return won

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        if not (records or groups or claims):
            return
        names = {"records": records, "groups": groups, "claims": claims}
        await self._db.run(lambda conn: _expire(conn, names, self._ttl))
        await self._after_write()

    async def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        if self._db.closed:
            return
        async for changed in self._watches.watch(keys):
            yield changed

    # -- token buckets (rate limits) ------------------------------------------------------

    # Created on first use (files from before rate limits need no migration). A bucket row is
    # deleted once it would be full again (`full_at`): then it reads as full anyway.
    _TOKEN_TABLE = (
        "CREATE TABLE IF NOT EXISTS token_buckets"
        " (bucket TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL, full_at REAL NOT NULL)"
    )
    _TOKEN_WRITE = (
        "INSERT INTO token_buckets (bucket, tokens, updated, full_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (bucket) DO UPDATE SET tokens = excluded.tokens, updated = excluded.updated,"
        " full_at = excluded.full_at"
    )
    _token_table_ready: bool = False
    _token_sweep_at: float = 0.0

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        _tokens.check_bucket(rate_per_second, burst, wanted)
        create, sweep = not self._token_table_ready, time.monotonic() >= self._token_sweep_at
        if sweep:
            self._token_sweep_at = time.monotonic() + _SWEEP_SECONDS
        taken = await self._db.run(
            lambda conn: self._take_tokens(conn, bucket, rate_per_second, burst, wanted, create, sweep)
        )
        self._token_table_ready = True
        return taken

    @classmethod
    def _take_tokens(
        cls, conn: sqlite3.Connection, bucket: str, rate: float, burst: float, wanted: int, create: bool, sweep: bool,
    ) -> tuple[int, float]:
        if create:
            conn.execute(cls._TOKEN_TABLE)
        # One IMMEDIATE transaction: the read, the refill and the write are one step for every
        # process on the file.
        with transaction(conn):
            now = time.time()
            if sweep:
                conn.execute(_TOKEN_SWEEP, (now,))
            row = conn.execute(_TOKEN_READ, (bucket,)).fetchone()
            tokens = burst if row is None else _tokens.refill(row[0], row[1], now, rate, burst)
            taken = _tokens.take(tokens, wanted, rate)
            conn.execute(cls._TOKEN_WRITE, (bucket, taken.left, now, now + _tokens.full_after(rate, burst)))
        return taken.granted, taken.wait

    # -- task index (listing tasks: backends/sqlite_task_index.py) -------------------------

    def task_index(self) -> SqliteTaskIndex:
        return SqliteTaskIndex(self._db, self._ttl)
