"""The MongoDB backend's task index: collection `{prefix}_task_index`.

    {_id: task id, s: state, q: queue, n: name, t: submitted (us)[, exp (ms), expires_at]}

with an index per filter, each ending in `t`, so a page for one state, queue or name is one
ordered index range. A terminal entry carries `exp` (used by every read) and `expires_at`
(a TTL index deletes it eventually), like the backend's records; a live one has neither. The
indexes are created on first use. Each batch is one unordered bulk_write of upserts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from .task_index import Found, IndexEntry, TaskQuery

Doc = dict[str, Any]
_FIELDS = ("s", "q", "n")


def _filter(query: TaskQuery, now_ms: int) -> Doc:
    # An explicit $and: nx-27017 mishandles fields next to a top-level $or.
    clauses: list[Doc] = [{"$or": [{"exp": {"$exists": False}}, {"exp": {"$gt": now_ms}}]}]
    if query.states:
        clauses.append({"s": {"$in": sorted(query.states)}})
    if query.queue:
        clauses.append({"q": query.queue})
    if query.name:
        clauses.append({"n": query.name})
    if query.id_prefix:
        clauses.append({"_id": {"$gte": query.id_prefix, "$lt": query.id_prefix + "\U0010ffff"}})
    if query.since_us is not None:
        clauses.append({"t": {"$gte": query.since_us}})
    if query.until_us is not None:
        clauses.append({"t": {"$lt": query.until_us}})
    if query.after is not None:
        past = "$gt" if query.oldest_first else "$lt"
        at, task_id = query.after.submitted_us, query.after.task_id
        clauses.append({"$or": [{"t": {past: at}}, {"$and": [{"t": at}, {"_id": {past: task_id}}]}]})
    return {"$and": clauses}


class MongoTaskIndex:
    def __init__(self, database: Callable[[], AsyncDatabase[Doc]], base: str, ttl_seconds: float) -> None:
        self._database = database
        self._name = f"{base}_task_index"
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._ready = False

    async def _collection(self) -> AsyncCollection[Doc]:
        collection = self._database()[self._name]
        if not self._ready:
            await collection.create_index("expires_at", expireAfterSeconds=0)
            # Not (…, t, _id): nx-27017 cannot index `_id` in a compound index; ties in `t` are rare.
            await collection.create_index("t")
            for field in _FIELDS:
                await collection.create_index([(field, ASCENDING), ("t", ASCENDING)])
            self._ready = True
        return collection

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        if not entries:
            return
        collection = await self._collection()
        exp = int(time.time() * 1000) + self._ttl_ms
        expiring = {"exp": exp, "expires_at": datetime.fromtimestamp(exp / 1000, UTC)}
        operations = []
        for e in entries:
            update: Doc = {"$setOnInsert": {"q": e.queue, "n": e.name, "t": e.submitted_us}}
            if e.terminal:
                update["$set"] = {"s": e.state, **expiring}
            else:
                update["$set"] = {"s": e.state}
                update["$unset"] = {"exp": "", "expires_at": ""}
            operations.append(UpdateOne({"_id": e.task_id}, update, upsert=True))
        await collection.bulk_write(operations, ordered=False)

    async def find(self, query: TaskQuery) -> Found:
        collection = await self._collection()
        order = ASCENDING if query.oldest_first else DESCENDING
        cursor = collection.find(_filter(query, int(time.time() * 1000)), {"s": 1, "q": 1, "n": 1, "t": 1})
        docs = await cursor.sort([("t", order), ("_id", order)]).limit(query.limit + 1).to_list()
        entries = [IndexEntry(d["_id"], int(d["s"]), d["q"], d["n"], int(d["t"])) for d in docs]
        page = entries[: query.limit]
        return Found(page, page[-1].position if len(entries) > query.limit and page else None)

    async def drop(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            await (await self._collection()).delete_many({"_id": {"$in": list(task_ids)}})
