"""MongoDB result store (pymongo's asyncio client).

Collections `{prefix}_records`, `{prefix}_claims`, `{prefix}_groups` and `{prefix}_members`.
A record or claim that expires carries `exp` (epoch milliseconds, used by every filter,
because a TTL monitor deletes only about once a minute) and `expires_at` (a Date for the TTL
index that eventually deletes it); a kept one has neither, so the TTL monitor never touches
it and every "live" filter accepts it.

- records: {_id: key, data, version[, exp, expires_at]}; compare-and-set is one
  update_one({_id, version: expected}) with $inc, atomic per document.
- claims: {_id: key[, exp, expires_at]}; insert_one, a duplicate key means someone else won.
- groups: one small document per group, {_id: group, gen, n, h[, exp]}, and one document per
  member in `members`, {g: group, gen, m: name, i: slot, p: payload}, with unique indexes on
  (g, gen, m) and (g, gen, i). `gen` is new each time a group is created, so the members of
  an expired group never leak into its successor.

Exact counts without transactions: each member takes the next slot `i` (n + 1); the unique
index lets only one member have a slot, so slots are dense, 1..N, whatever races between
replicas. `n` in the group document is the slot count as far as it has been confirmed; anyone
who finds slot n + 1 taken moves `n` on ($max), so a replica that died between inserting its
member and moving `n` leaves nothing wrong behind: the next add (or a retry of the same add)
moves it on. A removal turns the member's document into a hole: its `m` becomes the next hole
number (an int, claimed through the same unique index; names are strings, so the two never
meet) and `h` counts holes the same way. The count is n - h, read from the group document
that the add's final update returns, so an add costs three round trips (read the group,
insert, update) at any group size. Replicas race only for the next slot; within a process
adds (and removals) to one group take turns, so they do not race each other. A removal
counts once `h` moves: if its replica dies in between, the member is already out of
members() but still counted until the group's next removal or duplicate add.
Batches take a chunk of members per round trip: add_members() inserts them at slots n + 1,
n + 2, ... in one ordered insert_many (it stops at the first clash, so the taken slots stay
dense) and moves `n` once; remove_members() numbers their holes h + 1, h + 2, ... the same
way in one ordered bulk write. A member another replica removed between the read and its
update takes no number there, and leaves no gap: that replica's hole took a number above h.
Group documents expire by `exp` only (no TTL index): each backend sweeps expired groups and
their members about once a minute, from its writes.

watch() uses one change stream per backend (filtered locally by key) and falls back to
polling versions where the server has no change streams (a standalone mongod). Tested
against nx-27017 too: it ignores maxAwaitTimeMS, so an idle getMore returns at once; the
stream reader then sleeps between getMores instead of spinning. A stream that breaks (the
server restarted, or stopped answering) is reopened with jittered exponential backoff, and
every watcher is told that all its keys may have changed.

An unreachable or frozen server fails a call within seconds, so clients get UNAVAILABLE while
it is away (pymongo's own defaults wait 30 s for a server and forever for a reply): the client
gets `CLIENT_TIMEOUTS_MS` unless the URL's query sets those options itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Collection, Hashable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import unquote

from bson import Binary
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from ..background import stop_tasks
from ..backoff import Backoff
from ..engine_urls import DEFAULT_PREFIX, EngineUrl, split_prefix
from . import _tokens
from ._common import DerivedWrites, KeyedLocks, compare_and_set_per_key, member_chunks
from ._watch import POLL_SECONDS, Feed, PollFeed, Registry, Watcher, WatchHub
from .base import DEFAULT_TTL_SECONDS, Changes, Update, Versioned
from .mongodb_task_index import MongoTaskIndex

log = logging.getLogger(__name__)

Doc = dict[str, Any]
DUPLICATE_KEY = 11000
MAX_AWAIT_MS = 1000
# Keys per find(): keeps $in lists and replies small.
_CHUNK = 1000
_WATCHED_OPS = ["insert", "update", "replace"]
# How often a backend deletes expired groups and their members.
_SWEEP_SECONDS = 60.0
# A race for a slot is only lost to a replica that won one, so this is never reached in practice.
_MAX_RACES = 10_000
# pymongo's defaults wait 30 s for a reachable server, 20 s for a connection and forever for a reply, so a
# call to a server that went away hung past any client's deadline. These fail it within seconds (below a
# client's deadline: it gets UNAVAILABLE and retries). A call waits 1 s for a server that is known to be
# down (pymongo checks it every 0.5 s meanwhile, so calls resume within a second of its return), 5 s for
# a connection and its handshake (the monitor's check too: a server slow under load is not marked down),
# and 5 s for a reply (a frozen server).
CLIENT_TIMEOUTS_MS = {"serverSelectionTimeoutMS": 1000, "connectTimeoutMS": 5000, "socketTimeoutMS": 5000}


def _collection_base(prefix: str) -> str:
    """Letters, digits and '_' only: nx-27017 cannot track changes on other names."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", prefix) or DEFAULT_PREFIX
    return base if re.match(r"[A-Za-z_]", base) else f"c{base}"


def _legacy_member_name(field: str) -> str:
    """A member's name from a field of the old one-document-per-group layout."""
    return unquote(field[1:])


def client_timeouts(url: str) -> dict[str, Any]:
    """CLIENT_TIMEOUTS_MS less the options the URL sets (option names are case-insensitive)."""
    given = EngineUrl(url).given()
    return {name: ms for name, ms in CLIENT_TIMEOUTS_MS.items() if name.lower() not in given}


def _chunks(keys: Sequence[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(keys))
    return [unique[start : start + _CHUNK] for start in range(0, len(unique), _CHUNK)]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _live(conditions: Doc) -> Doc:
    """Filter: `conditions`, on a document that is kept (no `exp`) or not expired yet.

    An explicit $and: nx-27017 ignores the other fields of a write's filter next to a top-level $or.
    For writes only: nx-27017 runs a find() with this filter as a scan of the whole collection (some
    40 us a document, so 100 ms a read at a few thousand records), so reads select by `_id` alone
    and check `_is_live` on what comes back.
    """
    return {"$and": [conditions, {"$or": [{"exp": {"$exists": False}}, {"exp": {"$gt": _now_ms()}}]}]}


def _dead() -> Doc:
    return {"exp": {"$lte": _now_ms()}}


def _is_live(doc: Doc) -> bool:
    exp = doc.get("exp")
    return exp is None or int(exp) > _now_ms()


def _duplicates(exc: BulkWriteError) -> list[Doc]:
    """The write errors of a bulk write that failed on duplicate keys only; re-raises it otherwise."""
    errors: list[Doc] = exc.details.get("writeErrors", [])
    if exc.details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in errors):
        raise exc
    return errors


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
        await stop_tasks(self._task)
        with contextlib.suppress(PyMongoError):
            await self._stream.close()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                change = await self._stream.try_next()
            except Exception as exc:  # whatever broke the stream, the feed must go on: reopen it
                log.warning("mongodb change stream failed (%s: %s); reopening", type(exc).__name__, exc)
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
        backoff = Backoff()
        while True:
            try:
                self._stream = await self.open(self._records)
                break
            except Exception as exc:
                delay = backoff.next()
                log.warning("mongodb change stream reopen failed (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
        # Changes made while the stream was down were not seen.
        self._registry.dispatch_all()



class MongoBackend(DerivedWrites):
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._url = url
        self._base = _collection_base(prefix)
        self._ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._client: AsyncMongoClient[Doc] | None = None
        self._hub = WatchHub(self._open_feed)
        self._locks = KeyedLocks()
        self._next_sweep = 0.0
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Self:
        """mongodb://host:port/dbname?prefix=name (default database and prefix "conveyor")."""
        clean, prefix = split_prefix(url)
        return cls(clean, prefix, ttl_seconds)

    async def connect(self) -> None:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(self._url, tz_aware=True, **client_timeouts(self._url))
        database = client.get_default_database("conveyor")
        self._records = database[f"{self._base}_records"]
        self._groups = database[f"{self._base}_groups"]
        self._members = database[f"{self._base}_members"]
        self._claims = database[f"{self._base}_claims"]
        try:
            await database.command("ping")
            for collection in (self._records, self._claims):
                await collection.create_index("expires_at", expireAfterSeconds=0)
            await self._groups.create_index("exp")
            for field in ("m", "i"):
                keys = [("g", ASCENDING), ("gen", ASCENDING), (field, ASCENDING)]
                await self._members.create_index(keys, unique=True)
            async for legacy in self._groups.find({"m": {"$exists": True}}):
                await self._migrate_group(legacy)
        except BaseException:
            await client.close()
            raise
        self._client = client

    async def close(self) -> None:
        await self._hub.close()
        await stop_tasks(self._sweeper)
        self._sweeper = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _expiry(self) -> Doc:
        """Fields that make a document expire the TTL from now."""
        exp = _now_ms() + self._ttl_ms
        return {"exp": exp, "expires_at": datetime.fromtimestamp(exp / 1000, UTC)}

    def _expiry_update(self, keep: bool, update: Doc) -> Doc:
        """`update` plus the operators that keep the document, or make it expire the TTL from now."""
        if keep:
            return {**update, "$unset": {"exp": "", "expires_at": ""}}
        return {**update, "$set": {**update.get("$set", {}), **self._expiry()}}

    # -- records and claims --------------------------------------------------------------

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        keys = list(records)
        clashes = await self._insert_new(keys, records, keep)
        if clashes:
            # A clash with an expired document the TTL monitor has not removed yet is no clash.
            purged = await self._records.delete_many({"_id": {"$in": clashes}, **_dead()})
            if purged.deleted_count:
                clashes = await self._insert_new(clashes, records, keep)
        return clashes

    async def _insert_new(self, keys: list[str], records: Mapping[str, bytes], keep: bool) -> list[str]:
        """insert_many(ordered=False); returns the keys that hit a duplicate _id."""
        if not keys:
            return []  # insert_many refuses an empty list
        expiry = {} if keep else self._expiry()
        docs = [{"_id": key, "data": Binary(records[key]), "version": 1, **expiry} for key in keys]
        try:
            await self._records.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            return [keys[int(error["index"])] for error in _duplicates(exc)]
        return []

    async def get(self, keys: Sequence[str]) -> dict[str, Versioned]:
        found: dict[str, Versioned] = {}
        for chunk in _chunks(keys):
            async for doc in self._records.find({"_id": {"$in": chunk}}, {"data": 1, "version": 1, "exp": 1}):
                if _is_live(doc):
                    found[doc["_id"]] = Versioned(bytes(doc["data"]), int(doc["version"]))
        return found

    async def compare_and_set(self, updates: Sequence[Update]) -> list[bool]:
        # update_one per record, concurrently: a bulk_write reports only totals, not which
        # update matched. Updates of one key run in order, as the protocol requires.
        return await compare_and_set_per_key(updates, self._compare_and_set_one)

    async def _compare_and_set_one(self, update: Update) -> bool:
        change = {"$set": {"data": Binary(update.data)}, "$inc": {"version": 1}}
        result = await self._records.update_one(
            _live({"_id": update.key, "version": update.expected_version}),
            self._expiry_update(update.keep, change),
        )
        return result.matched_count == 1

    async def claim(self, key: str, keep: bool = False) -> bool:
        for _ in range(2):
            try:
                await self._claims.insert_one({"_id": key, **({} if keep else self._expiry())})
                return True
            except DuplicateKeyError:
                purged = await self._claims.delete_one({"_id": key, **_dead()})
                if not purged.deleted_count:
                    return False
        return False

    async def expire(self, records: Sequence[str] = (), groups: Sequence[str] = (), claims: Sequence[str] = ()) -> None:
        expiry = self._expiry()
        for collection, keys, fields in (
            (self._records, records, expiry),
            (self._claims, claims, expiry),
            (self._groups, groups, {"exp": expiry["exp"]}),
        ):
            for chunk in _chunks(keys):
                await collection.update_many(_live({"_id": {"$in": chunk}}), {"$set": fields})
        if groups:
            self._maybe_sweep()

    # -- groups --------------------------------------------------------------------------

    async def add_members(self, group: str, members: Mapping[str, bytes], keep: bool = False) -> int:
        count = 0
        for chunk in member_chunks(members):
            async with self._locks.hold(f"add:{group}"):
                count = await self._add_chunk(group, {name: members[name] for name in chunk}, keep)
        return count

    async def _add_chunk(self, group: str, members: Mapping[str, bytes], keep: bool) -> int:
        pending, last_gen = members, ""
        for _ in range(_MAX_RACES):
            doc = await self._open_group(group, keep)
            gen: str = doc["gen"]
            if gen != last_gen:
                pending, last_gen = members, gen  # a new group: every member goes in (again)
            n = int(doc["n"])
            docs = [
                {"g": group, "gen": gen, "m": name, "i": n + slot, "p": Binary(payload)}
                for slot, (name, payload) in enumerate(pending.items(), 1)
            ]
            try:
                await self._members.insert_many(docs, ordered=True)
            except BulkWriteError as exc:
                _duplicates(exc)
                # Another replica took a slot, or a member was already in (its first payload
                # stays): move `n` past every taken slot (ours too, and one whose adder may have
                # died before moving it), then go on with the members still out.
                await self._settle(group, gen, None)
                present = await self._present(group, gen, pending)
                pending = {name: payload for name, payload in pending.items() if name not in present}
                if not pending:
                    return await self._settle(group, gen, keep)
                continue
            self._maybe_sweep()
            settled = await self._groups.find_one_and_update(
                {"_id": group, "gen": gen},
                self._group_expiry_update(keep, {"$max": {"n": n + len(docs)}}),
                projection={"n": 1, "h": 1},
                return_document=ReturnDocument.AFTER,
            )
            if settled is not None:
                return int(settled["n"]) - int(settled["h"])
            # The group expired and was swept under us: start again in a new one.
            await self._members.delete_many({"g": group, "gen": gen})
        raise RuntimeError(f"mongodb group {group!r}: too many concurrent writers")

    async def _present(self, group: str, gen: str, names: Collection[str]) -> set[str]:
        """Which of `names` are members of this generation of the group."""
        found = self._members.find({"g": group, "gen": gen, "m": {"$in": list(names)}}, {"m": 1})
        return {doc["m"] async for doc in found}

    def _group_expiry_update(self, keep: bool, update: Doc) -> Doc:
        if keep:
            return {**update, "$unset": {"exp": ""}}
        return {**update, "$set": {"exp": _now_ms() + self._ttl_ms}}

    async def _open_group(self, group: str, keep: bool) -> Doc:
        """The live group document, created (in a new generation) when there is none."""
        for _ in range(_MAX_RACES):
            doc = await self._groups.find_one({"_id": group})
            if doc is not None and "m" in doc:
                await self._migrate_group(doc)
                continue
            if doc is not None and _is_live(doc):
                return doc
            if doc is not None:
                await self._drop_group(group, doc["gen"])
            new: Doc = {"_id": group, "gen": uuid.uuid4().hex, "n": 0, "h": 0}
            if not keep:
                new["exp"] = _now_ms() + self._ttl_ms
            try:
                await self._groups.insert_one(new)
                return new
            except DuplicateKeyError:
                continue  # another replica created it first
        raise RuntimeError(f"mongodb group {group!r}: too many concurrent writers")

    async def _settle(self, group: str, gen: str, keep: bool | None) -> int:
        """Move `n` and `h` past every taken slot and hole; set the expiry unless keep is None.

        Returns the count (n - h), or 0 if the group is gone.
        """
        doc = await self._groups.find_one({"_id": group, "gen": gen}, {"n": 1, "h": 1})
        if doc is None:
            return 0
        n, h = int(doc["n"]), int(doc["h"])
        while True:
            found = await self._members.find(
                {"$and": [{"g": group, "gen": gen}, {"$or": [{"i": n + 1}, {"m": h + 1}]}]}, {"i": 1, "m": 1}
            ).to_list()
            more_n = any(d.get("i") == n + 1 for d in found)
            more_h = any(isinstance(d.get("m"), int) and d["m"] == h + 1 for d in found)
            if not (more_n or more_h):
                break
            n, h = n + more_n, h + more_h
        update: Doc = {"$max": {"n": n, "h": h}}
        if keep is not None:
            update = self._group_expiry_update(keep, update)
        settled = await self._groups.find_one_and_update(
            {"_id": group, "gen": gen}, update, projection={"n": 1, "h": 1}, return_document=ReturnDocument.AFTER
        )
        return 0 if settled is None else int(settled["n"]) - int(settled["h"])

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        doc = await self._groups.find_one({"_id": group}, {"gen": 1, "m": 1, "exp": 1})
        if doc is None or not _is_live(doc):
            return {}
        if "m" in doc:
            await self._migrate_group(doc)
            return await self.members(group, after, limit)
        # {"$gt": name} (or {"$gte": ""}) matches strings only: holes (int names) stay out.
        names = {"$gt": after} if after else {"$gte": ""}
        cursor = self._members.find({"g": group, "gen": doc["gen"], "m": names}, {"m": 1, "p": 1}).sort("m", 1)
        if limit > 0:
            cursor = cursor.limit(limit)
        return {found["m"]: bytes(found["p"]) async for found in cursor}

    async def remove_member(self, group: str, member: str) -> None:
        await self.remove_members(group, [member])

    async def remove_members(self, group: str, members: Collection[str]) -> None:
        for chunk in member_chunks(members):
            async with self._locks.hold(f"remove:{group}"):
                await self._remove_chunk(group, chunk)

    async def _remove_chunk(self, group: str, names: list[str]) -> None:
        for _ in range(_MAX_RACES):
            doc = await self._groups.find_one({"_id": group}, {"gen": 1, "h": 1, "m": 1, "exp": 1})
            if doc is None or not _is_live(doc):
                return
            if "m" in doc:
                await self._migrate_group(doc)
                continue
            gen, h = doc["gen"], int(doc["h"])
            present = await self._present(group, gen, names)
            holes = [
                UpdateOne({"g": group, "gen": gen, "m": name}, {"$set": {"m": h + number}, "$unset": {"p": ""}})
                for number, name in enumerate((name for name in names if name in present), 1)
            ]
            if not holes:
                return
            try:
                await self._members.bulk_write(holes, ordered=True)
            except BulkWriteError as exc:
                _duplicates(exc)
                # Another replica took a hole number (the updates before it ran): move `h` past
                # every number taken, then go on with the members still in.
                await self._settle(group, gen, None)
                continue
            # Every number up to h + len(holes) is taken now, also where a member had gone by its
            # update (matching nothing): the replica that removed it took a number above h for it.
            await self._groups.update_one({"_id": group, "gen": gen}, {"$max": {"h": h + len(holes)}})
            return
        raise RuntimeError(f"mongodb group {group!r}: too many concurrent writers")

    async def _drop_group(self, group: str, gen: str) -> None:
        """Delete an expired group's members, then the group document (if still that one)."""
        await self._members.delete_many({"g": group, "gen": gen})
        await self._groups.delete_one({"_id": group, "gen": gen, **_dead()})

    def _maybe_sweep(self) -> None:
        if time.monotonic() < self._next_sweep or (self._sweeper is not None and not self._sweeper.done()):
            return
        self._next_sweep = time.monotonic() + _SWEEP_SECONDS
        self._sweeper = asyncio.create_task(self._sweep(), name="conveyor-mongo-sweep")

    async def _sweep(self) -> None:
        try:
            async for doc in self._groups.find(_dead(), {"gen": 1}).limit(_CHUNK):
                if "gen" in doc:
                    await self._drop_group(doc["_id"], doc["gen"])
        except PyMongoError as exc:
            log.warning("mongodb group sweep failed (%s); trying again later", exc)

    async def _migrate_group(self, legacy: Doc) -> None:
        """Turn a group of the old layout ({_id, m: {field: payload}, n, exp, expires_at}) into
        member documents. Idempotent; when replicas race, one conversion wins."""
        stored: Doc = legacy.get("m", {})
        gen = uuid.uuid4().hex
        names = sorted((_legacy_member_name(field), payload) for field, payload in stored.items())
        docs = [
            {"g": legacy["_id"], "gen": gen, "m": name, "i": slot, "p": payload}
            for slot, (name, payload) in enumerate(names, 1)
        ]
        for start in range(0, len(docs), _CHUNK):
            await self._members.insert_many(docs[start : start + _CHUNK], ordered=False)
        converted = await self._groups.update_one(
            {"_id": legacy["_id"], "m": {"$exists": True}},
            {"$set": {"gen": gen, "n": len(docs), "h": 0}, "$unset": {"m": "", "expires_at": ""}},
        )
        if not converted.matched_count:
            await self._members.delete_many({"g": legacy["_id"], "gen": gen})

    # -- watch ---------------------------------------------------------------------------

    async def _versions(self, keys: list[str]) -> dict[str, Hashable]:
        """(version, exp) changes on every write, including a re-insert after expiry."""
        found: dict[str, Hashable] = {}
        for chunk in _chunks(keys):
            async for doc in self._records.find({"_id": {"$in": chunk}}, {"version": 1, "exp": 1}):
                if _is_live(doc):
                    found[doc["_id"]] = (doc["version"], doc.get("exp"))
        return found

    async def _open_feed(self) -> Feed:
        """Detect once (per feed) whether the server has change streams."""
        try:
            stream = await _StreamFeed.open(self._records)
        except OperationFailure as exc:
            log.info("mongodb change streams unavailable (%s); polling instead", exc)
            return PollFeed(self._versions, "mongodb")
        return _StreamFeed(self._records, stream)

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        return self._hub.watch(keys)

    # -- token buckets (rate limits) ------------------------------------------------------

    _token_index_ready: bool = False

    async def take_tokens(self, bucket: str, rate_per_second: float, burst: float, wanted: int) -> tuple[int, float]:
        """Collection `{prefix}_buckets`: {_id: bucket, t: tokens, u: when counted (wall clock),
        v: version, expires_at}, changed by a compare-and-set loop on `v` (an insert for a new
        bucket). A document expires (TTL index) once the bucket would be full again."""
        _tokens.check_bucket(rate_per_second, burst, wanted)
        buckets: AsyncCollection[Doc] = self._records.database[f"{self._base}_buckets"]
        if not self._token_index_ready:
            await buckets.create_index("expires_at", expireAfterSeconds=0)
            self._token_index_ready = True
        full_after = _tokens.full_after(rate_per_second, burst)
        for _ in range(_MAX_RACES):
            doc = await buckets.find_one({"_id": bucket})
            now = time.time()
            tokens = burst if doc is None else _tokens.refill(float(doc["t"]), float(doc["u"]), now, rate_per_second,
                                                              burst)
            taken = _tokens.take(tokens, wanted, rate_per_second)
            state = {"t": taken.left, "u": now, "expires_at": datetime.fromtimestamp(now + full_after, UTC)}
            if doc is None:
                try:
                    await buckets.insert_one({"_id": bucket, "v": 1, **state})
                except DuplicateKeyError:
                    continue  # another replica made it first: take from its state
                return taken.granted, taken.wait
            written = await buckets.update_one({"_id": bucket, "v": doc["v"]}, {"$set": state, "$inc": {"v": 1}})
            if written.matched_count:
                return taken.granted, taken.wait
            # Another replica took tokens first: count again from its state.
        raise RuntimeError(f"mongodb token bucket {bucket!r}: too many concurrent writers")

    # -- task index (listing tasks: backends/mongodb_task_index.py) ------------------------

    def task_index(self) -> MongoTaskIndex:
        return MongoTaskIndex(lambda: self._records.database, self._base, self._ttl_ms / 1000)
