"""Replaying and deleting dead letters (core/dead_letters.py): the refusals a client sees, with
the reason and metadata its rich error carries, and the list lookup across pages."""

from __future__ import annotations

import pytest

from conveyor_server.core import dead_letters
from conveyor_server.core.dead_letters import state_name
from conveyor_server.core.errors import FailedPrecondition, InvalidArgument, NotFound
from conveyor_server.core.records import DEAD_LETTERS_GROUP, TaskStates
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_all
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_an_unknown_id_is_not_found_with_its_reason_and_id(replicas: Replicas) -> None:
    unknown = r"^no task with id 'ghost' \(unknown, or its record expired\)"
    with pytest.raises(NotFound, match=unknown + ": nothing replayed$") as replaying:
        await replicas.a.admin.dead.replay(["ghost"])
    with pytest.raises(NotFound, match=unknown + "$") as deleting:
        await replicas.a.admin.dead.delete("ghost")
    for raised in (replaying.value, deleting.value):
        assert raised.reason == "TASK_NOT_FOUND" and raised.metadata == {"task_id": "ghost"}


async def test_an_empty_id_is_refused(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument, match=r"^task_ids holds an empty id$"):
        await replicas.a.admin.dead.replay([""])
    with pytest.raises(InvalidArgument, match=r"^task_id is required: the id of the dead letter to delete$"):
        await replicas.a.admin.dead.delete("")


async def test_a_task_that_did_not_fail_is_not_a_dead_letter_and_nothing_changes(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="dead")))
    await run_all(replicas.a, fail={"dead"})
    await submit(replicas.a, lone(task(task_id="queued")))
    with pytest.raises(FailedPrecondition, match=(
            r"^task 'queued' is PENDING, not a dead letter: only a task that failed for good can be replayed; "
            r"nothing replayed$")):
        await replicas.a.admin.dead.replay(["dead", "queued"])
    assert "dead" in await replicas.backend.members(DEAD_LETTERS_GROUP)  # the refusal replayed nothing
    with pytest.raises(FailedPrecondition, match=r"^task 'queued' is PENDING, not a dead letter$"):
        await replicas.a.admin.dead.delete("queued")


async def test_a_failed_task_taken_off_the_list_is_no_dead_letter_any_more(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="gone")))
    await run_all(replicas.a, fail={"gone"})
    await replicas.a.admin.dead.delete("gone")
    with pytest.raises(FailedPrecondition, match=r"^task 'gone' failed but is not a dead letter .*: nothing replayed$"):
        await replicas.b.admin.dead.replay(["gone"])
    with pytest.raises(FailedPrecondition, match="is not a dead letter \\(any more\\)"):
        await replicas.b.admin.dead.delete("gone")


async def test_the_list_is_searched_across_pages_around_similar_names(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dead_letters, "MEMBER_PAGE", 2)
    for name in ["d1", "d10", "d11", "d12", "d14", "d16", "e"]:
        await replicas.backend.add_member(DEAD_LETTERS_GROUP, name, b"default")
    for name in ["d1", "d11", "d16", "e"]:
        assert await replicas.a.admin.dead.listed(name), name
    for name in ["d", "d13", "d15", "d2", "f", "a"]:
        assert not await replicas.a.admin.dead.listed(name), name


def test_states_are_named_without_their_prefix_and_unknown_ones_by_number() -> None:
    assert state_name(TaskStates.TASK_STATE_RETRY) == "RETRY"
    assert state_name(99) == "99"
