"""core/dead_letters.py over two replicas sharing memory engines: the same dead letter replayed
on both at once creates one task and both answer its id, and the lookup of an id on the list
starts at the id's place, reading one bounded page."""

from __future__ import annotations

import asyncio

import pytest

from conveyor_server.core.dead_letters import MEMBER_PAGE, replay_id
from conveyor_server.core.outbox import OUTBOX_GROUP
from conveyor_server.core.records import DEAD_LETTERS_GROUP
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_all
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_a_dead_letter_replayed_on_two_replicas_at_once_creates_one_task(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="dead")))
    await run_all(replicas.a, fail={"dead"})
    # Both replays look for the replay task, find none, and only then submit: one submission wins.
    replicas.backend.meet_on_add(OUTBOX_GROUP, 2)
    first, second = await asyncio.gather(replicas.a.admin.dead.replay(["dead"]), replicas.b.admin.dead.replay(["dead"]))
    assert first == second == [replay_id("dead")]
    assert "dead" not in await replicas.backend.members(DEAD_LETTERS_GROUP)
    stored = await replicas.a.store.get(replay_id("dead"))
    assert stored is not None and stored.result.signature.name == "noop"


@pytest.mark.parametrize("task_id, on_list", [("k5", True), ("k6", False)])
async def test_a_lookup_starts_at_the_ids_place_and_reads_one_page(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch, task_id: str, on_list: bool,
) -> None:
    backend = replicas.backend
    names = [f"a{i:03}" for i in range(2 * MEMBER_PAGE)] + ["k5"] + [f"z{i:03}" for i in range(2 * MEMBER_PAGE)]
    await backend.add_members(DEAD_LETTERS_GROUP, dict.fromkeys(names, b""))
    read, members = [], backend.members

    async def counted(group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        page = await members(group, after, limit)
        read.append(len(page))
        return page

    monkeypatch.setattr(backend, "members", counted)
    assert await replicas.a.admin.dead.listed(task_id) is on_list
    assert read == [MEMBER_PAGE]
