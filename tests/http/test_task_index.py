"""The task index on every engine that keeps one (memory, SQLite, Redis, MongoDB), and the
core's TaskIndexer over it: filters, pages, order, expiry, and repair of stale entries."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor_server.backends.base import Backend
from conveyor_server.backends.memory_task_index import MemoryTaskIndex
from conveyor_server.backends.task_index import IndexEntry, ListsTasks, TaskIndex, TaskQuery
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.records import TaskStates, new_record, transition
from conveyor_server.core.store import TaskStore
from conveyor_server.core.task_index import ListingUnsupported, TaskIndexer
from conveyor_server.engines import open_backend
from tests.http.conftest import own_prefix
from tests.support.processes import eventually

PENDING, STARTED, SUCCESS, FAILURE = (
    TaskStates.TASK_STATE_PENDING, TaskStates.TASK_STATE_STARTED, TaskStates.TASK_STATE_SUCCESS,
    TaskStates.TASK_STATE_FAILURE,
)
BASE_US = 1_700_000_000_000_000


@pytest.fixture
async def backend(listing_backend_url: str) -> AsyncIterator[Backend]:
    engine = open_backend(listing_backend_url, ttl_seconds=60)
    await engine.connect()
    yield engine
    await engine.close()


def index_of(backend: Backend) -> TaskIndex:
    assert isinstance(backend, ListsTasks)
    return backend.task_index()


def entries(count: int, tag: str) -> list[IndexEntry]:
    """`count` entries one second apart, alternating queues a/b, names x/y/z and states."""
    states = (PENDING, STARTED, SUCCESS, FAILURE)
    return [
        IndexEntry(f"{tag}-{i:03d}", states[i % 4], f"{tag}-q{'ab'[i % 2]}", f"{tag}-n{'xyz'[i % 3]}",
                   BASE_US + i * 1_000_000)
        for i in range(count)
    ]


async def all_pages(index: TaskIndex, query: TaskQuery) -> list[str]:
    """Every id the query finds, following cursors to the end."""
    seen: list[str] = []
    for _ in range(1_000):
        found = await index.find(query)
        seen += [e.task_id for e in found.entries]
        if found.next is None:
            return seen
        query = dataclasses.replace(query, after=found.next)
    raise AssertionError("the cursor never ended")


async def test_pages_newest_first_cover_every_entry_once(backend: Backend) -> None:
    tag = uuid.uuid4().hex[:8]
    index = index_of(backend)
    written = entries(23, tag)
    await index.write(written)
    ids = await all_pages(index, TaskQuery(queue=f"{tag}-qa", limit=4))
    assert ids == [e.task_id for e in reversed(written) if e.queue == f"{tag}-qa"]
    oldest = await all_pages(index, TaskQuery(name=f"{tag}-nx", limit=3, oldest_first=True))
    assert oldest == [e.task_id for e in written if e.name == f"{tag}-nx"]


async def test_filters_combine(backend: Backend) -> None:
    tag = uuid.uuid4().hex[:8]
    index = index_of(backend)
    written = entries(24, tag)
    await index.write(written)

    def expect(**filters: object) -> list[str]:
        query = TaskQuery(**filters)  # type: ignore[arg-type]
        return [e.task_id for e in reversed(written) if query.matches(e)]

    cases: list[dict[str, object]] = [
        {"states": frozenset({FAILURE}), "queue": f"{tag}-qb"},
        {"states": frozenset({SUCCESS, FAILURE}), "name": f"{tag}-ny"},
        {"queue": f"{tag}-qa", "name": f"{tag}-nz", "states": frozenset({PENDING})},
        {"id_prefix": f"{tag}-01"},
        {"queue": f"{tag}-qa", "since_us": BASE_US + 5_000_000, "until_us": BASE_US + 15_000_000},
    ]
    for filters in cases:
        found = await all_pages(index, TaskQuery(limit=5, **filters))  # type: ignore[arg-type]
        assert found == expect(**filters), filters


async def test_a_state_change_moves_the_entry(backend: Backend) -> None:
    tag = uuid.uuid4().hex[:8]
    index = index_of(backend)
    entry = IndexEntry(f"{tag}-1", STARTED, f"{tag}-q", f"{tag}-n", BASE_US)
    await index.write([entry])
    await index.write([IndexEntry(entry.task_id, SUCCESS, entry.queue, entry.name, entry.submitted_us)])
    assert await all_pages(index, TaskQuery(states=frozenset({STARTED}), queue=entry.queue)) == []
    assert await all_pages(index, TaskQuery(states=frozenset({SUCCESS}), queue=entry.queue)) == [entry.task_id]
    await index.drop([entry.task_id])
    assert await all_pages(index, TaskQuery(queue=entry.queue)) == []


async def test_terminal_entries_expire_live_ones_stay(listing_backend_url: str) -> None:
    engine = open_backend(listing_backend_url, ttl_seconds=0.5)
    await engine.connect()
    try:
        tag = uuid.uuid4().hex[:8]
        index = index_of(engine)
        done = IndexEntry(f"{tag}-done", SUCCESS, f"{tag}-q", "n", BASE_US)
        live = IndexEntry(f"{tag}-live", STARTED, f"{tag}-q", "n", BASE_US + 1)
        await index.write([done, live])
        assert await all_pages(index, TaskQuery(queue=f"{tag}-q")) == [live.task_id, done.task_id]
        await asyncio.sleep(1.0)  # past the TTL: checking that the entry is gone (no condition to wait on)
        await index.write([])  # a write trims what expired on engines that trim on writes
        assert await all_pages(index, TaskQuery(queue=f"{tag}-q")) == [live.task_id]
    finally:
        await engine.close()


# -- the core's indexer over the store ---------------------------------------------------------

def record(task_id: str, queue: str, name: str, seconds: int) -> records_pb2.TaskRecord:
    return new_record(task_pb2.Signature(id=task_id, name=name, queue=queue), at=Timestamp(seconds=seconds))


async def test_the_indexer_lists_what_the_store_wrote(backend: Backend) -> None:
    indexer = TaskIndexer.for_backend(backend)
    store = TaskStore(backend, write_hook=indexer.note)
    tag = uuid.uuid4().hex[:8]
    queue = f"{tag}-q"
    await store.create([record(f"{tag}-{i}", queue, "add", 1_700_000_000 + i) for i in range(5)])

    def finish(task_id: str, rec: records_pb2.TaskRecord) -> bool:
        transition(rec, SUCCESS)
        return True

    await store.update([f"{tag}-1", f"{tag}-3"], finish)
    await indexer.flush()
    page = await indexer.find(TaskQuery(queue=queue, states=frozenset({SUCCESS})))
    assert [r.result.task_id for r in page.records] == [f"{tag}-3", f"{tag}-1"]
    assert page.next_page_token == ""

    first = await indexer.find(TaskQuery(queue=queue, limit=2))
    assert [r.result.task_id for r in first.records] == [f"{tag}-4", f"{tag}-3"]
    rest = await indexer.find(TaskQuery(queue=queue, limit=10), first.next_page_token)
    assert [r.result.task_id for r in rest.records] == [f"{tag}-2", f"{tag}-1", f"{tag}-0"]
    await indexer.close()


async def test_a_stale_entry_is_skipped_and_repaired(backend: Backend) -> None:
    """An index write lost (a crash between the record's write and the flush) shows the record's
    real state, and the entry is written again from it."""
    store = TaskStore(backend)
    indexer = TaskIndexer.for_backend(backend)
    tag = uuid.uuid4().hex[:8]
    queue = f"{tag}-q"
    await store.create([record(f"{tag}-0", queue, "add", 1_700_000_000)])
    index = index_of(backend)
    # The index says STARTED; the record is PENDING (its STARTED write never reached the index).
    await index.write([IndexEntry(f"{tag}-0", STARTED, queue, "add", 1_700_000_000_000_000)])
    stale = await indexer.find(TaskQuery(queue=queue, states=frozenset({STARTED})))
    assert stale.records == []
    await indexer.flush()
    fixed = await indexer.find(TaskQuery(queue=queue, states=frozenset({PENDING})))
    assert [r.result.task_id for r in fixed.records] == [f"{tag}-0"]
    # An entry whose record is gone is dropped as it is met.
    await index.write([IndexEntry(f"{tag}-ghost", PENDING, queue, "add", 1_700_000_001_000_000)])
    assert [r.result.task_id for r in (await indexer.find(TaskQuery(queue=queue))).records] == [f"{tag}-0"]
    assert [e.task_id for e in (await index.find(TaskQuery(queue=queue))).entries] == [f"{tag}-0"]
    await indexer.close()


async def test_the_indexer_flushes_by_itself(backend: Backend) -> None:
    indexer = TaskIndexer.for_backend(backend)
    store = TaskStore(backend, write_hook=indexer.note)
    flushed: list[int] = []
    indexer.on_flush.append(flushed.append)
    tag = uuid.uuid4().hex[:8]
    await store.create([record(f"{tag}-0", f"{tag}-q", "add", 1_700_000_000)])
    await eventually(lambda: flushed, 10, "a background flush")
    page = await indexer.find(TaskQuery(queue=f"{tag}-q"))
    assert [r.result.task_id for r in page.records] == [f"{tag}-0"]
    await indexer.close()


async def test_bad_queries_are_invalid_arguments() -> None:
    backend = open_backend("memory://")
    indexer = TaskIndexer.for_backend(backend)
    with pytest.raises(InvalidArgument, match="page_token"):
        await indexer.find(TaskQuery(), "not a token!")
    with pytest.raises(InvalidArgument, match="states"):
        await indexer.find(TaskQuery(states=frozenset({42})))
    with pytest.raises(InvalidArgument, match="page_size"):
        await indexer.find(TaskQuery(limit=5_000))
    with pytest.raises(InvalidArgument, match="before"):
        await indexer.find(TaskQuery(since_us=2, until_us=1))


async def test_memcached_cannot_list_and_says_so(memcached_backend_url: str) -> None:
    backend = open_backend(own_prefix(memcached_backend_url))
    indexer = TaskIndexer.for_backend(backend)
    assert not indexer.enabled
    with pytest.raises(ListingUnsupported, match="the memcached backend keeps no task index"):
        await indexer.find(TaskQuery())


async def test_names_and_ids_keep_any_characters(backend: Backend) -> None:
    tag = uuid.uuid4().hex[:8]
    index = index_of(backend)
    odd = IndexEntry(f"{tag}-ü:1,2", FAILURE, f"{tag}-q", 'envoi "café" 名前\t;', BASE_US + 123_456_789)
    await index.write([odd])
    (found,) = (await index.find(TaskQuery(name=odd.name))).entries
    assert found == odd
    assert [e.task_id for e in (await index.find(TaskQuery(id_prefix=f"{tag}-ü"))).entries] == [odd.task_id]


class CountingIndex(MemoryTaskIndex):
    """The memory index, recording each entry written."""

    def __init__(self, ttl_seconds: float) -> None:
        super().__init__(ttl_seconds)
        self.written: list[tuple[str, int]] = []

    async def write(self, entries: Sequence[IndexEntry]) -> None:
        self.written.extend((e.task_id, e.state) for e in entries)
        await super().write(entries)


async def test_a_task_that_ends_within_the_hold_costs_one_index_write() -> None:
    """Writes of a live task wait HOLD_LIVE_SECONDS: a quick task's states reach the index as one
    entry, its last; a task still live after the hold is written as it stands."""
    backend = open_backend("memory://")
    index = CountingIndex(60)
    indexer = TaskIndexer(backend, index)
    store = TaskStore(backend, write_hook=indexer.note)
    written = index.written
    await store.create([record("quick", "q", "add", 1_700_000_000), record("slow", "q", "add", 1_700_000_001)])

    def finish(task_id: str, rec: records_pb2.TaskRecord) -> bool:
        transition(rec, TaskStates.TASK_STATE_STARTED)
        if task_id == "quick":
            transition(rec, SUCCESS)
        return True

    await store.update(["quick", "slow"], finish)
    await eventually(lambda: len(written) == 2, 10, "both entries written")
    assert sorted(written) == [("quick", SUCCESS), ("slow", STARTED)]
    await indexer.close()


async def test_a_whole_id_finds_its_task(backend: Backend) -> None:
    index = index_of(backend)
    task_id = str(uuid.uuid4())
    entry = IndexEntry(task_id, SUCCESS, "q", "n", BASE_US)
    await index.write([entry, IndexEntry(str(uuid.uuid4()), SUCCESS, "q", "n", BASE_US)])
    assert (await index.find(TaskQuery(id_prefix=task_id))).entries == [entry]
    assert (await index.find(TaskQuery(id_prefix=task_id, states=frozenset({FAILURE})))).entries == []
