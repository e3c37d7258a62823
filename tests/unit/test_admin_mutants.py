"""Operator actions: the edges mutation testing found unpinned (the server id a worker listing
names, purged tasks ended in batches, replay of one queue's dead letters and of more than a
listing's default size)."""

from __future__ import annotations

import pytest

from conveyor.v1 import task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.config import Settings
from conveyor_server.core import admin
from tests.unit.replicas import Replicas, quick_repairs, replicas, run_all, run_ready
from tests.unit.test_durability import QUEUE, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_workers_are_listed_with_the_configured_server_id(replicas: Replicas) -> None:
    core = Core.build(Settings(server_id="srv-x"), broker=replicas.broker, backend=replicas.backend)
    core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    [info] = core.admin.workers()
    assert info.server_id == "srv-x"


async def test_a_purge_ends_its_tasks_batch_by_batch(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "PURGE_END_BATCH", 2)
    await submit(replicas.a, *(lone(task(task_id=f"p{i}")) for i in range(5)))
    batches: list[list[str]] = []
    end_purged = replicas.a.canceller.end_purged

    async def spy(task_ids: list[str], queue: str) -> list[str]:
        batches.append(list(task_ids))
        return await end_purged(task_ids, queue)

    monkeypatch.setattr(replicas.a.canceller, "end_purged", spy)
    assert await replicas.a.admin.purge(QUEUE) == 5
    assert batches == [["p0", "p1"], ["p2", "p3"], ["p4"]]


async def test_a_replay_of_one_queues_dead_letters_leaves_the_other_queues(replicas: Replicas) -> None:
    elsewhere = task_pb2.Signature(name="noop", id="there", queue="other")
    await submit(replicas.a, lone(task(task_id="here")), lone(elsewhere))
    await run_ready(replicas.a, fail={"here"})
    claimed = await replicas.a.broker.fetch("other", 10, 30.0)
    dispatcher = replicas.a.connections.dispatcher
    claim = await dispatcher.claim(claimed, "w1", 0.0)
    await dispatcher.record(claim.leases, "w1", claim.read)
    [lease] = claim.leases
    await replicas.a.connections.recorder.record(
        [
            worker_service_pb2.TaskOutcome(
                task_id="there", lease_token=lease.token, outcome=worker_service_pb2.OUTCOME_FAILURE
            )
        ],
        "w1",
    )
    assert len(await replicas.a.admin.replay([], QUEUE)) == 1
    assert [r.task_id for r in await replicas.a.admin.dead_letters("", 0)] == ["there"]


async def test_a_replay_of_every_dead_letter_takes_more_than_a_listings_default(replicas: Replicas) -> None:
    count = admin.DEFAULT_LIST_LIMIT + 1
    await submit(replicas.a, *(lone(task(task_id=f"d{i}")) for i in range(count)))
    await run_all(replicas.a, fail={f"d{i}" for i in range(count)})
    assert len(await replicas.a.admin.replay([], "")) == count
    assert await replicas.a.admin.dead_letters("", 0) == []
