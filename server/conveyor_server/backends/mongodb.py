"""MongoDB result store (pymongo's asyncio client).

Collections `{prefix}_records`, `{prefix}_groups` and `{prefix}_claims`, one document per
key. Every document carries `exp` (epoch milliseconds, used by every filter, because a TTL
monitor deletes only about once a minute) and `expires_at` (a Date for the TTL index that
eventually deletes it).

- records: {_id: key, data, version, exp, expires_at}; compare-and-set is one
  update_one({_id, version: expected}) with $inc, atomic per document.
- groups: {_id: group, m: {member: payload}, n: count, ...}; a member is added by one
  find_one_and_update whose filter requires the member to be absent, so the first payload
  wins and `n` moves with it.
- claims: {_id: key, ...}; insert_one, a duplicate key means someone else won.

watch() uses one change stream per backend (filtered locally by key) and falls back to
polling versions where the server has no change streams (a standalone mongod). Tested
against nx-27017 too: it ignores maxAwaitTimeMS, so an idle getMore returns at once; the
stream reader then sleeps between getMores instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Collection, Hashable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import quote, unquote

from bson import Binary
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from ._common import compare_and_set_per_key, split_prefix
from ._watch import POLL_SECONDS, Feed, PollFeed, Registry, Watcher, WatchHub
from .base import DEFAULT_TTL_SECONDS, Update, Versioned

log = logging.getLogger(__name__)

Doc = dict[str, Any]
DUPLICATE_KEY = 11000
MAX_AWAIT_MS = 1000
# Keys per find(): keeps $in lists and replies small.
_CHUNK = 1000
_WATCHED_OPS = ["insert", "update", "replace"]


def _collection_base(prefix: str) -> str:
    """Letters, digits and '_' only: nx-27017 cannot track changes on other names."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", prefix) or "conveyor"
    return base if re.match(r"[A-Za-z_]", base) else f"c{base}"


def _member_field(member: str) -> str:
    """A field name for any member string ('.' and '$' are special in field paths)."""
    return "k" + quote(member, safe="").replace(".", "%2E")


def _member_name(field: str) -> str:
    return unquote(field[1:])


def _chunks(keys: Sequence[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(keys))
    return [unique[start : start + _CHUNK] for start in range(0, len(unique), _CHUNK)]


class _StreamFeed:
    """One change stream on the records collection, fanned out to watchers by key."""

    def __init__(self, records: AsyncCollection[Doc], stream: AsyncChangeStream[Doc]) -> None:
        self._records = records
        self._stream = stream
        self._registry = Registry()
        self._task = asyncio.create_task(self._run(), name="conveyor-mongo-watch")

    @staticmethod
    async def open(records: AsyncCollection[Doc]) -> AsyncChangeStream[Doc]:
        pipeline: list[Doc] = [
            {"$match": {"operationType": {"$in": _WATCHED_OPS}}},
            {"$project": {"documentKey": 1, "operationType": 1}},
        ]
        return await records.watch(pipeline, max_await_time_ms=MAX_AWAIT_MS)

    async def add(self, watcher: Watcher) -> None:
        # The stream is already open, so every write after this point reaches the watcher.
        self._registry.add(watcher)

    async def remove(self, watcher: Watcher) -> None:
        self._registry.remove(watcher)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(PyMongoError):
            await self._stream.close()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                change = await self._stream.try_next()
            except PyMongoError as exc:
                log.warning("mongodb change stream failed (%s); reopening", exc)
                await self._reopen()
                continue
            if change is not None:
                self._registry.dispatch(change["documentKey"]["_id"])
            elif time.monotonic() - started < MAX_AWAIT_MS / 2000:
                # The server did not wait for changes (nx-27017): poll instead of spinning.
                await asyncio.sleep(POLL_SECONDS)

    async def _reopen(self) -> None:
        with contextlib.suppress(PyMongoError):
            await self._stream.close()
        while True:
            try:
                self._stream = await self.open(self._records)
                break
            except PyMongoError as exc:
                log.warning("mongodb change stream reopen failed (%s)", exc)
                await asyncio.sleep(1.0)
        # Changes made while the stream was down were not seen.
        self._registry.dispatch_all()


class MongoBackend:
    def __init__(self, url: str, prefix: str = "conveyor", ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._url = url
        self._base = _collection_base(prefix)
        self._ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._client: AsyncMongoClient[Doc] | None = None
        self._hub = WatchHub(self._open_feed)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """mongodb://host:port/dbname?prefix=name (default database and prefix "conveyor")."""
        clean, prefix = split_prefix(url)
        return cls(clean, prefix, ttl_seconds)

    async def connect(self) -> None:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(self._url, tz_aware=True)
        database = client.get_default_database("conveyor")
        self._records = database[f"{self._base}_records"]
        self._groups = database[f"{self._base}_groups"]
        self._claims = database[f"{self._base}_claims"]
        try:
            await database.command("ping")
            for collection in (self._records, self._groups, self._claims):
                await collection.create_index("expires_at", expireAfterSeconds=0)
        except BaseException:
            await client.close()
            raise
        self._client = client

    async def close(self) -> None:
        await self._hub.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _expiry(self) -> Doc:
        """Fields that keep a document alive for the TTL from now."""
        now_ms = int(time.time() * 1000)
        exp = now_ms + self._ttl_ms
        return {"exp": exp, "expires_at": datetime.fromtimestamp(exp / 1000, UTC)}

    @staticmethod
    def _live() -> Doc:
        return {"exp": {"$gt": int(time.time() * 1000)}}

    @staticmethod
    def _dead() -> Doc:
        return {"exp": {"$lte": int(time.time() * 1000)}}

    async def insert(self, records: Mapping[str, bytes]) -> list[str]:
        keys = list(records)
        clashes = await self._insert_new(keys, records)
        if clashes:
            # A clash with an expired document the TTL monitor has not removed yet is no clash.
            purged = await self._records.delete_many({"_id": {"$in": clashes}, **self._dead()})
            if purged.deleted_count:
                clashes = await self._insert_new(clashes, records)
        return clashes

    async def _insert_new(self, keys: list[str], records: Mapping[str, bytes]) -> list[str]:
        """insert_many(ordered=False); returns the keys that hit a duplicate _id."""
        if not keys:
            return []  # insert_many refuses an empty list
        expiry = self._expiry()
        docs = [{"_id": key, "data": Binary(records[key]), "version": 1, **expiry} for key in keys]
        try:
            await self._records.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors: list[Doc] = exc.details.get("writeErrors", [])
            if exc.details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            return [keys[int(error["index"])] for error in errors]
        return []

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        found: dict[str, Versioned] = {}
        for chunk in _chunks(keys):
            cursor = self._records.find({"_id": {"$in": chunk}, **self._live()}, {"data": 1, "version": 1})
            async for doc in cursor:
                found[doc["_id"]] = Versioned(bytes(doc["data"]), int(doc["version"]))
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        # update_one per record, concurrently: a bulk_write reports only totals, not which
        # update matched. Updates of one key run in order, as the protocol requires.
        return await compare_and_set_per_key(updates, self._compare_and_set_one)

    async def _compare_and_set_one(self, update: Update) -> bool:
        result = await self._records.update_one(
            {"_id": update.key, "version": update.expected_version, **self._live()},
            {"$set": {"data": Binary(update.data), **self._expiry()}, "$inc": {"version": 1}},
        )
        return result.matched_count == 1

    async def add_member(self, group: str, member: str, payload: bytes) -> int:
        field = f"m.{_member_field(member)}"
        for _ in range(5):
            expiry = self._expiry()
            try:
                # Matches only a live group without this member; otherwise upserts, which
                # clashes on _id when the group exists (nx-27017 returns None instead).
                doc = await self._groups.find_one_and_update(
                    {"_id": group, field: {"$exists": False}, **self._live()},
                    {"$set": {field: Binary(payload), **expiry}, "$inc": {"n": 1}},
                    projection={"n": 1},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                doc = None
            if doc is None:
                # Already a member (the first payload stays): only refresh the expiry.
                doc = await self._groups.find_one_and_update(
                    {"_id": group, field: {"$exists": True}, **self._live()},
                    {"$set": expiry},
                    projection={"n": 1},
                    return_document=ReturnDocument.AFTER,
                )
            if doc is not None:
                return int(doc["n"])
            # Neither matched: the group has expired but is still stored (or changed between
            # the two calls). Drop it if expired and try again.
            await self._groups.delete_one({"_id": group, **self._dead()})
        raise RuntimeError(f"could not add member {member!r} to group {group!r}")

    async def members(self, group: str) -> dict[str, bytes]:
        doc = await self._groups.find_one({"_id": group, **self._live()}, {"m": 1})
        if doc is None:
            return {}
        stored: Doc = doc.get("m", {})
        return {_member_name(field): bytes(payload) for field, payload in stored.items()}

    async def remove_member(self, group: str, member: str) -> None:
        field = f"m.{_member_field(member)}"
        await self._groups.update_one(
            {"_id": group, field: {"$exists": True}}, {"$unset": {field: ""}, "$inc": {"n": -1}}
        )

    async def claim(self, key: str) -> bool:
        for _ in range(2):
            try:
                await self._claims.insert_one({"_id": key, **self._expiry()})
                return True
            except DuplicateKeyError:
                purged = await self._claims.delete_one({"_id": key, **self._dead()})
                if not purged.deleted_count:
                    return False
        return False

    async def _versions(self, keys: list[str]) -> dict[str, Hashable]:
        """(version, exp) changes on every write, including a re-insert after expiry."""
        found: dict[str, Hashable] = {}
        for chunk in _chunks(keys):
            cursor = self._records.find({"_id": {"$in": chunk}, **self._live()}, {"version": 1, "exp": 1})
            async for doc in cursor:
                found[doc["_id"]] = (doc["version"], doc["exp"])
        return found

    async def _open_feed(self) -> Feed:
        """Detect once (per feed) whether the server has change streams."""
        try:
            stream = await _StreamFeed.open(self._records)
        except OperationFailure as exc:
            log.info("mongodb change streams unavailable (%s); polling instead", exc)
            return PollFeed(self._versions, "mongodb")
        return _StreamFeed(self._records, stream)

    def watch(self, keys: Collection[str]) -> AsyncIterator[set[str]]:
        return self._hub.watch(keys)
