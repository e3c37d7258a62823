"""Operator actions: the edges mutation testing found unpinned (the server id a worker listing
names, purged tasks ended in batches, replay of one queue's dead letters and of more than a
listing's default size, resubmit, forgetting dead letters, running a schedule now, the checks
of a repair by hand)."""

from __future__ import annotations

import math
import time

import pytest

from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.config import Settings
from conveyor_server.core import admin
from conveyor_server.core.errors import InvalidArgument, NotFound
from conveyor_server.core.records import DEAD_LETTERS_GROUP
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


async def test_dead_letters_are_paged_oldest_first_through_every_one_once(replicas: Replicas) -> None:
    await submit(replicas.a, *(lone(task(task_id=f"p{i}")) for i in range(7)))
    await run_all(replicas.a, fail={f"p{i}" for i in range(7)})
    everything = [r.task_id for r in await replicas.a.admin.dead_letters("", 0)]
    assert sorted(everything) == [f"p{i}" for i in range(7)]
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page, token = await replicas.b.admin.dead_letter_page("", 3, token)  # the token works on any replica
        seen += [r.task_id for r in page]
        pages += 1
        if not token:
            break
    assert (seen, pages) == (everything, 3), "oldest first, each once, the last page says it is the last"
    assert await replicas.a.admin.dead_letter_page("", 7) == (
        await replicas.a.admin.dead_letters("", 7), ""), "a page that holds the rest has no next token"
    with pytest.raises(InvalidArgument, match="page_token is not one this server gave out"):
        await replicas.a.admin.dead_letter_page("", 3, "not a token!")


# -- resubmit, forget, run a schedule now, repair's arguments ----------------------------------------


async def test_a_resubmit_sends_each_known_call_again_with_a_fresh_id_and_no_timing(replicas: Replicas) -> None:
    call = task(task_id="r1", idempotency_key="key-1", args=[task_pb2.Value(int_value=7)])
    call.countdown.seconds = 30
    await submit(replicas.a, lone(call))
    delayed = task(task_id="r2")
    delayed.eta.seconds = int(time.time()) + 3_600
    await submit(replicas.a, lone(delayed))
    await replicas.a.store.backend.add_member(DEAD_LETTERS_GROUP, "r1", QUEUE.encode())

    new_ids = await replicas.b.admin.resubmit(["r1", "unknown", "r2"])

    assert len(new_ids) == 2 and not {"r1", "r2"} & set(new_ids)
    first, second = [await replicas.a.store.get(task_id) for task_id in new_ids]
    assert first is not None and second is not None
    assert first.result.signature.args[0].int_value == 7 and first.result.name == "noop"
    assert not first.result.signature.idempotency_key
    assert not first.result.signature.HasField("countdown") and not second.result.signature.HasField("eta")
    assert "r1" not in await replicas.backend.members(DEAD_LETTERS_GROUP)
    assert set((await run_ready(replicas.a)).keys()) >= set(new_ids)  # both ready now


async def test_a_resubmit_of_only_unknown_ids_submits_nothing(replicas: Replicas) -> None:
    assert await replicas.a.admin.resubmit(["nope", "neither"]) == []


async def test_forgetting_dead_letters_takes_them_off_the_list_only(replicas: Replicas) -> None:
    await submit(replicas.a, *(lone(task(task_id=f"f{i}")) for i in range(3)))
    await run_all(replicas.a, fail={"f0", "f1", "f2"})
    await replicas.a.admin.forget_dead_letters(["f0", "f2", "f0", "not-listed"])
    assert [r.task_id for r in await replicas.b.admin.dead_letters("", 0)] == ["f1"]
    assert (await replicas.b.admin.inspect("f0")).state == result_pb2.TASK_STATE_FAILURE  # the record stays


async def test_a_schedule_run_now_submits_its_task_once_under_a_new_id(replicas: Replicas) -> None:
    schedule = admin_service_pb2.Schedule(name="nightly", cron="0 3 * * *", task=task("report"))
    await replicas.a.admin.schedules.create(schedule)
    task_id = await replicas.b.admin.run_schedule_now("nightly")
    record = await replicas.a.store.get(task_id)
    assert record is not None and record.result.name == "report" and task_id
    assert record.result.state == result_pb2.TASK_STATE_PENDING
    assert await replicas.b.admin.run_schedule_now("nightly") != task_id  # each run is a task of its own
    with pytest.raises(NotFound, match="no schedule named 'weekly'"):
        await replicas.a.admin.run_schedule_now("weekly")


@pytest.mark.parametrize(("older_than", "queue", "message"), [
    (None, "", "older_than is required"),
    (-1.0, "", "older_than must be a duration of 0 s or more, got -1 s"),
    (math.inf, "", "older_than must be a duration of 0 s or more"),
    (60.0, "bad queue", "queue"),
])
async def test_a_repair_by_hand_checks_its_arguments(
    replicas: Replicas, older_than: float | None, queue: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await replicas.a.admin.repair(older_than, queue, dry_run=True, force=False)

