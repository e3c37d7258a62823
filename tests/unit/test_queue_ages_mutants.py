"""core/queue_ages.py on the memory engines: a task's wait counts from its publication when it
has one, a wait of exactly the limit is not past it, tasks that no longer wait do not use up the
page budget, and the search reads only tasks submitted early enough to be past the limit."""

from __future__ import annotations

import pytest

from conveyor_server.backends.task_index import TaskQuery
from conveyor_server.core.queue_ages import MAX_PAGES, PAGE, QueueAges, ready_at
from conveyor_server.core.records import TaskStates, transition
from conveyor_server.core.task_index import TaskPage
from tests.unit.test_admission import SUBMITTED, Clock, Index, index, waiting

__all__ = ["index"]  # the fixture (a task index on the memory backend), used by name


def published_at(queue: str, task_id: str, submitted: float, published: float):  # type: ignore[no-untyped-def]
    record = waiting(queue, task_id, at=submitted)
    record.enqueued_at.FromNanoseconds(int(published * 1e9))
    return record


def test_a_published_task_is_ready_from_its_publication_not_its_submission() -> None:
    assert ready_at(published_at("q", "late", SUBMITTED, SUBMITTED + 7)) == SUBMITTED + 7


async def test_a_task_published_after_its_submission_has_waited_since_its_publication(index: Index) -> None:
    await index.add(published_at(index.queue, "late", SUBMITTED, SUBMITTED + 20))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 60)).waited_past(index.queue, 30) == 40.0
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 60)).waited_past(index.queue, 45) is None


async def test_a_task_ready_for_exactly_the_limit_is_not_past_it(index: Index) -> None:
    # Submitted before the limit's edge, so the search reaches it, but published on the edge.
    await index.add(published_at(index.queue, "edge", SUBMITTED - 5, SUBMITTED))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 30)).waited_past(index.queue, 30) is None
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 31)).waited_past(index.queue, 30) == 31.0


async def test_finished_tasks_ahead_of_a_waiting_one_do_not_use_up_the_page_budget(index: Index) -> None:
    finished = []
    for i in range(PAGE * MAX_PAGES):
        record = waiting(index.queue, f"done{i:04d}", at=SUBMITTED + i / 1000)
        transition(record, TaskStates.TASK_STATE_SUCCESS)
        finished.append(record)
    await index.add(*finished, waiting(index.queue, "waiting", at=SUBMITTED + 1))
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 61)).waited_past(index.queue, 10) == 60.0


async def test_tasks_submitted_within_the_limit_are_not_read(index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    # More young waiting tasks than the page budget covers: none could have waited past the limit.
    await index.add(*(waiting(index.queue, f"young{i:04d}", at=SUBMITTED + i / 1000) for i in range(PAGE * MAX_PAGES)))
    found, read = index.indexer.find, []

    async def counted(query: TaskQuery, page_token: str = "") -> TaskPage:
        page = await found(query, page_token)
        read.append(len(page.records))
        return page

    monkeypatch.setattr(index.indexer, "find", counted)
    assert await QueueAges(index.indexer, Clock(SUBMITTED + 5)).waited_past(index.queue, 10) is None
    assert read == [0]
