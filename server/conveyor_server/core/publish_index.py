"""The index of what was published, by time bucket: where the repair of lost messages
(core/repair.py) finds live tasks without scanning the records.

Layout (backend groups, all written with keep=True):
- `published:<start>:<seconds>`: one bucket per `seconds`-long span starting at epoch second
  `start` (zero-padded, so names sort by time). Each member is a PublishedTasks payload: the
  task ids of one or more publish calls, by queue. A publish of tasks that may not run before
  some time (an ETA) goes into the bucket of that time, so it is not looked at before then.
- `published-buckets`: the registry of buckets, one member per bucket name; read a page at a
  time, oldest first, it tells the repair which buckets are old enough to look at.

Writes are off the publisher's path: `note()` only buffers; a background flush writes one
member per bucket at most every FLUSH_SECONDS (one more write registers a bucket the first
time this process uses it). So a publish call costs at most one backend write, and under load
many calls share one. A server that dies within that moment leaves those tasks out of the
index: they are published, but would not be repaired if their broker lost them as well.

A bucket is processed only once it ended `repair_after` ago; writers only write into the
current bucket or a later one, so none writes into a bucket being processed (as long as the
replicas' clocks agree within repair_after). A processed bucket is expired and leaves the
registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from conveyor.internal.v1 import records_pb2

from ..backends.base import Backend
from ..background import stop_tasks

log = logging.getLogger(__name__)

BUCKET_PREFIX = "published:"
REGISTRY = "published-buckets"
# Notes are written at most this often (and at once past FLUSH_AT_IDS buffered task ids).
FLUSH_SECONDS = 0.1
FLUSH_AT_IDS = 5_000
# A failed flush is tried again with this backoff (first, cap), keeping the notes.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
# Past this many buffered ids (a long backend outage) the oldest notes are dropped.
MAX_BUFFERED_IDS = 1_000_000
# Members read per backend call; registry entries too, but a pass usually stops at the first
# bucket not due yet, so the registry is read in small pages.
PAGE = 1_000
REGISTRY_PAGE = 64
# Bucket names this process remembers having registered.
REGISTERED_MEMORY = 4_096
# Bucket length: a quarter of repair_after, between these bounds.
MIN_BUCKET_SECONDS = 1
MAX_BUCKET_SECONDS = 300

ByQueue = Mapping[str, Sequence[str]]


def bucket_seconds_for(repair_after: float) -> int:
    return max(MIN_BUCKET_SECONDS, min(MAX_BUCKET_SECONDS, int(repair_after // 4)))


@dataclass(frozen=True, slots=True, order=True)
class Bucket:
    start: int
    seconds: int

    @property
    def name(self) -> str:
        return f"{BUCKET_PREFIX}{self.start:012d}:{self.seconds}"

    @property
    def end(self) -> int:
        return self.start + self.seconds

    @classmethod
    def at(cls, when: float, seconds: int) -> Bucket:
        return cls(int(when // seconds) * seconds, seconds)

    @classmethod
    def parse(cls, name: str) -> Bucket | None:
        start, _, seconds = name.removeprefix(BUCKET_PREFIX).partition(":")
        try:
            return cls(int(start), int(seconds)) if name.startswith(BUCKET_PREFIX) and int(seconds) > 0 else None
        except ValueError:
            return None


def encode(by_queue: ByQueue) -> bytes:
    return records_pb2.PublishedTasks(queues=[
        records_pb2.QueueTasks(queue=queue, task_ids=list(ids)) for queue, ids in by_queue.items() if ids
    ]).SerializeToString()


def decode(payload: bytes) -> Iterable[tuple[str, str]]:
    """(task id, queue) pairs of one member."""
    entry = records_pb2.PublishedTasks()
    entry.ParseFromString(payload)
    return ((task_id, tasks.queue) for tasks in entry.queues for task_id in tasks.task_ids)


class PublishIndex:
    def __init__(self, backend: Backend, bucket_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.bucket_seconds = bucket_seconds
        self.clock = clock
        self._buffer: dict[Bucket, dict[str, list[str]]] = {}
        self._buffered = 0
        self._registered: OrderedDict[str, None] = OrderedDict()
        self._writing = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    # -- writing ------------------------------------------------------------------------

    def note(self, by_queue: ByQueue, delay: float = 0.0) -> None:
        """Remember published tasks (by queue) that may run `delay` seconds from now on;
        written in the background."""
        bucket = Bucket.at(self.clock() + max(delay, 0.0), self.bucket_seconds)
        queues = self._buffer.setdefault(bucket, defaultdict(list))
        for queue, ids in by_queue.items():
            queues[queue].extend(ids)
            self._buffered += len(ids)
        if self._buffered > MAX_BUFFERED_IDS:
            dropped = self._buffer.pop(min(self._buffer))
            self._buffered -= sum(len(ids) for ids in dropped.values())
            log.warning("the publish index is too far behind (the backend is away?): %d tasks left out of it",
                        sum(len(ids) for ids in dropped.values()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def add(self, bucket: Bucket, by_queue: ByQueue) -> None:
        """Write one member into `bucket` now."""
        await self._register(bucket)
        await self.backend.add_member(bucket.name, f"n-{uuid.uuid4().hex}", encode(by_queue), keep=True)

    async def flush(self) -> None:
        """Write everything noted so far (raises when the backend fails; the notes are kept)."""
        async with self._writing:
            taken, self._buffer, self._buffered = self._buffer, {}, 0
            try:
                for bucket in sorted(taken):
                    await self.add(bucket, taken[bucket])
                    del taken[bucket]
            except BaseException:
                self._keep(taken)
                raise

    def _keep(self, notes: dict[Bucket, dict[str, list[str]]]) -> None:
        for bucket, queues in notes.items():
            mine = self._buffer.setdefault(bucket, defaultdict(list))
            for queue, ids in queues.items():
                mine[queue].extend(ids)
                self._buffered += len(ids)

    async def _flush_soon(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while self._buffer:
            if self._buffered < FLUSH_AT_IDS:
                await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
                delay = RETRY_FIRST_SECONDS
            except Exception as exc:
                log.warning("writing the publish index failed (%s: %s); retrying in %.1f s",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _register(self, bucket: Bucket) -> None:
        if bucket.name in self._registered:
            return
        await self.backend.add_member(REGISTRY, bucket.name, b"", keep=True)
        self._registered[bucket.name] = None
        if len(self._registered) > REGISTERED_MEMORY:
            self._registered.popitem(last=False)

    async def close(self) -> None:
        """Write what is left (best effort: the server is stopping)."""
        await stop_tasks(self._flusher)
        try:
            await self.flush()
        except Exception as exc:
            log.warning("the publish index lost %d notes at shutdown (%s: %s)", self._buffered,
                        type(exc).__name__, exc)

    # -- reading ------------------------------------------------------------------------

    async def buckets_until(self, until: float, limit: int = 0, begun: bool = False) -> list[Bucket]:
        """Buckets that ended by `until` (epoch seconds), or with `begun` that began by then,
        oldest first, at most `limit` (0: all)."""
        found: list[Bucket] = []
        after = ""
        while page := await self.backend.members(REGISTRY, after=after, limit=REGISTRY_PAGE):
            for name in sorted(page):
                bucket = Bucket.parse(name)
                if bucket is None:
                    continue
                if bucket.start > until:
                    return found
                if bucket.end <= until or begun:
                    found.append(bucket)
                    if len(found) == limit:
                        return found
            after = max(page)
        return found

    async def tasks(self, buckets: Sequence[Bucket]) -> dict[str, str]:
        """Task id -> queue, of every member of these buckets."""
        found: dict[str, str] = {}
        async for part in self.task_parts(buckets, 0):
            found.update(part)
        return found

    async def task_parts(self, buckets: Sequence[Bucket], ids: int) -> AsyncIterator[dict[str, str]]:
        """The same, in parts of about `ids` task ids each (whole members; 0: one part), so a
        reader of a bucket of a million tasks holds a part at a time, not the bucket."""
        found: dict[str, str] = {}
        for bucket in buckets:
            after = ""
            while page := await self.backend.members(bucket.name, after=after, limit=PAGE):
                for name in sorted(page):
                    found.update(decode(page[name]))
                    if ids and len(found) >= ids:
                        yield found
                        found = {}
                after = max(page)
        if found:
            yield found

    async def retire(self, buckets: Sequence[Bucket]) -> None:
        """Processed: the groups start their TTL, then leave the registry (in this order, so a
        crash in between leaves a bucket processed twice rather than kept forever)."""
        if not buckets:
            return
        await self.backend.expire(groups=[bucket.name for bucket in buckets])
        for bucket in buckets:
            await self.backend.remove_member(REGISTRY, bucket.name)
            self._registered.pop(bucket.name, None)
