"""Listing tasks through the index (core/task_index.py): the query's bounds and errors, page
tokens, and find() treating the index as a hint that it repairs as it reads (memory engines)."""

from __future__ import annotations

import dataclasses

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor_server.backends.memcached import MemcachedBackend
from conveyor_server.backends.memory_task_index import MemoryTaskIndex
from conveyor_server.backends.task_index import Cursor, IndexEntry, TaskQuery
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.records import TaskStates, new_record, task_key, transition
from conveyor_server.core.task_index import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ListingUnsupported,
    TaskIndexer,
    check_query,
    decode_token,
    encode_token,
    entry_of,
)
from conveyor_server.engines import open_backend

# -- the query ----------------------------------------------------------------------------------


def test_page_size_zero_means_the_default_and_the_maximum_is_allowed() -> None:
    assert check_query(TaskQuery(limit=0)).limit == DEFAULT_PAGE_SIZE
    assert check_query(TaskQuery(limit=1)).limit == 1
    assert check_query(TaskQuery(limit=MAX_PAGE_SIZE)).limit == MAX_PAGE_SIZE


@pytest.mark.parametrize("limit", [-1, MAX_PAGE_SIZE + 1])
def test_a_page_size_out_of_bounds_is_refused_naming_the_bounds(limit: int) -> None:
    with pytest.raises(InvalidArgument, match=f"page_size must be between 0 .* and {MAX_PAGE_SIZE}"):
        check_query(TaskQuery(limit=limit))


def test_an_unknown_state_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown task states \[0, 99\]"):
        check_query(TaskQuery(states=frozenset({0, 99, TaskStates.TASK_STATE_SUCCESS})))
    assert check_query(TaskQuery(states=frozenset({TaskStates.TASK_STATE_SUCCESS}))).states == {
        TaskStates.TASK_STATE_SUCCESS}


def test_a_time_window_must_be_open_from_before_its_end() -> None:
    for since, until in [(10, 10), (11, 10)]:
        with pytest.raises(InvalidArgument, match=r"^submitted_after must be before submitted_before$"):
            check_query(TaskQuery(since_us=since, until_us=until))
    assert check_query(TaskQuery(since_us=9, until_us=10)).since_us == 9
    assert check_query(TaskQuery(since_us=10)).until_us is None  # open-ended windows are fine
    assert check_query(TaskQuery(until_us=10)).since_us is None


# -- page tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("task_id", ["t", "tt", "ttt", "a:b:c", "wf-1.err", "ünï"])
def test_a_page_token_gives_back_its_place(task_id: str) -> None:
    cursor = Cursor(1_700_000_000_123_456, task_id)
    token = encode_token(cursor)
    assert "=" not in token  # padding is stripped, and put back when read
    assert decode_token(token) == cursor


def test_no_place_is_the_empty_token_and_a_foreign_token_is_refused() -> None:
    assert encode_token(None) == ""
    assert decode_token("") is None
    for foreign in ["not base64!", "bm90IGEgbnVtYmVy", "/w"]:  # "not a number", a lone 0xff byte
        with pytest.raises(InvalidArgument, match="page_token is not one this server gave out"):
            decode_token(foreign)


def test_an_entry_keeps_the_submission_time_in_microseconds() -> None:
    record = new_record(task_pb2.Signature(id="t-1", name="add", queue="q"))
    record.result.submitted_at.seconds = 1_700_000_000
    record.result.submitted_at.nanos = 123_456_789
    assert entry_of(record) == IndexEntry("t-1", TaskStates.TASK_STATE_PENDING, "q", "add",
                                          1_700_000_000_123_456)


# -- find(): the index is a hint ----------------------------------------------------------------

def stored(task_id: str, state: int, submitted: int) -> records_pb2.TaskRecord:
    record = new_record(task_pb2.Signature(id=task_id, name="add", queue="q"))
    record.result.submitted_at.seconds = submitted
    record.result.submitted_at.nanos = 0
    if state != TaskStates.TASK_STATE_PENDING:
        transition(record, state)  # type: ignore[arg-type]
    return record


async def listing(
    records: list[records_pb2.TaskRecord], entries: list[IndexEntry] | None = None,
) -> tuple[TaskIndexer, MemoryTaskIndex]:
    """An indexer on memory engines: `records` stored, its index holding `entries` (default: theirs)."""
    backend = open_backend("memory://")
    index = MemoryTaskIndex(60)
    await backend.insert({task_key(r.result.task_id): r.SerializeToString() for r in records})
    await index.write([entry_of(r) for r in records] if entries is None else entries)
    return TaskIndexer(backend, index), index


async def test_find_returns_what_the_records_say_and_repairs_the_index_it_read() -> None:
    current = stored("current", TaskStates.TASK_STATE_SUCCESS, 100)
    moved_on = stored("moved-on", TaskStates.TASK_STATE_SUCCESS, 101)  # its SUCCESS write to the index was lost
    stale_entry = dataclasses.replace(entry_of(moved_on), state=TaskStates.TASK_STATE_PENDING)
    expired = IndexEntry("expired", TaskStates.TASK_STATE_SUCCESS, "q", "add", 102 * 1_000_000)  # no record left
    indexer, index = await listing([current, moved_on], [entry_of(current), stale_entry, expired])

    succeeded = await indexer.find(TaskQuery(states=frozenset({TaskStates.TASK_STATE_SUCCESS})))
    assert [r.result.task_id for r in succeeded.records] == ["current"]  # the index says moved-on is pending
    assert succeeded.next_page_token == ""
    pending = await indexer.find(TaskQuery(states=frozenset({TaskStates.TASK_STATE_PENDING})))
    assert [r.result.task_id for r in pending.records] == []  # its record says it is not

    # The entry of the expired record is gone; the moved one is noted again, and written by a flush.
    assert await indexer.flush() == 1
    everything = await index.find(TaskQuery(limit=10))
    assert sorted((e.task_id, e.state) for e in everything.entries) == [
        ("current", TaskStates.TASK_STATE_SUCCESS), ("moved-on", TaskStates.TASK_STATE_SUCCESS)]
    await indexer.close()


async def test_find_pages_through_with_tokens_in_submission_order() -> None:
    indexer, _ = await listing([stored(f"t-{n}", TaskStates.TASK_STATE_PENDING, 100 + n) for n in range(5)])

    seen, token = [], ""
    for _ in range(5):
        page = await indexer.find(TaskQuery(limit=2, oldest_first=True), token)
        seen.append([r.result.task_id for r in page.records])
        token = page.next_page_token
        if not token:
            break
    assert seen == [["t-0", "t-1"], ["t-2", "t-3"], ["t-4"]]
    assert await indexer.oldest_age("q", frozenset({TaskStates.TASK_STATE_PENDING}), now=200.0) == 100.0
    assert await indexer.oldest_age("other", frozenset({TaskStates.TASK_STATE_PENDING})) is None
    await indexer.close()


async def test_a_backend_without_an_index_says_why_it_cannot_list() -> None:
    indexer = TaskIndexer.for_backend(open_backend("memory://"), enabled=False)
    assert not indexer.enabled
    with pytest.raises(ListingUnsupported, match=r"^task listing is turned off \(setting task_index: false\)$"):
        await indexer.find(TaskQuery())
    await indexer.close()



async def test_oldest_age_counts_only_the_asked_states_and_never_goes_below_zero() -> None:
    indexer, _ = await listing([stored("done-long-ago", TaskStates.TASK_STATE_SUCCESS, 50),
                                stored("waiting", TaskStates.TASK_STATE_PENDING, 120),
                                stored("running", TaskStates.TASK_STATE_STARTED, 150)])

    waiting = frozenset({TaskStates.TASK_STATE_PENDING})
    assert await indexer.oldest_age("q", waiting, now=200.0) == 80.0
    assert await indexer.oldest_age("q", waiting | {TaskStates.TASK_STATE_STARTED}, now=200.0) == 80.0
    assert await indexer.oldest_age("q", frozenset({TaskStates.TASK_STATE_STARTED}), now=200.0) == 50.0
    assert await indexer.oldest_age("q", waiting, now=100.0) == 0.0  # a clock behind the submitter's
    await indexer.close()


async def test_find_reads_on_past_entries_that_no_longer_match_to_fill_the_page() -> None:
    ended = [stored(f"ended-{n}", TaskStates.TASK_STATE_SUCCESS, 100 + n) for n in range(3)]
    waiting = [stored(f"waiting-{n}", TaskStates.TASK_STATE_PENDING, 110 + n) for n in range(3)]
    # The index lost the ended tasks' last writes: it still lists them as pending, and first.
    stale = [dataclasses.replace(entry_of(r), state=TaskStates.TASK_STATE_PENDING) for r in ended]
    indexer, _ = await listing(ended + waiting, stale + [entry_of(r) for r in waiting])

    query = TaskQuery(states=frozenset({TaskStates.TASK_STATE_PENDING}), limit=2, oldest_first=True)
    first = await indexer.find(query)
    assert [r.result.task_id for r in first.records] == ["waiting-0", "waiting-1"]
    rest = await indexer.find(query, first.next_page_token)
    assert [r.result.task_id for r in rest.records] == ["waiting-2"]
    assert rest.next_page_token == ""
    await indexer.close()


async def test_a_backend_that_keeps_no_index_names_itself_and_the_backends_that_can() -> None:
    indexer = TaskIndexer.for_backend(MemcachedBackend.from_url("memcached://127.0.0.1:1"))
    assert not indexer.enabled
    with pytest.raises(ListingUnsupported, match=r"^the memcached backend keeps no task index, so it cannot "
                                                  r"list tasks \(SQLite, Redis, MongoDB and memory can; "):
        await indexer.find(TaskQuery())
    assert TaskIndexer.for_backend(open_backend("memory://")).enabled
    assert TaskIndexer(open_backend("memory://"), None).unsupported == "this backend cannot list tasks"
