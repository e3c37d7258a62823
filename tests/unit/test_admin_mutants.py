"""Operator actions: the edges mutation testing found unpinned (the server id a worker listing
names, purged tasks ended in batches, replay of one queue's dead letters, of more than a
listing's default size, of at most 10,000 at once and of one forgotten meanwhile, resubmit,
forgetting dead letters, running a schedule now, the checks, queue and force of a repair by
hand, no task registry, deleting a rate limit, listing tasks)."""

from __future__ import annotations

import math
import time

import pytest

from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.backends.task_index import TaskQuery
from conveyor_server.config import Settings
from conveyor_server.core import admin
from conveyor_server.core.dead_letters import replay_id
from conveyor_server.core.errors import InvalidArgument, NotFound
from conveyor_server.core.limits.spec import rate_limit
from conveyor_server.core.records import DEAD_LETTERS_GROUP, new_record, transition
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



async def a_forced_dry_run(replicas: Replicas, queue: str = "", force: bool = True) -> list[str]:
    """What a dry-run repair by hand of tasks silent for 0 s (or more) would republish."""
    await replicas.a.repairer.index.flush()
    report = await replicas.a.admin.repair(0.0, queue, dry_run=True, force=force)
    return sorted(r.record.result.task_id for r in report.repaired)


async def test_a_repair_by_hand_of_0_s_is_allowed_and_force_takes_tasks_whose_messages_are_held(
    replicas: Replicas,
) -> None:
    await submit(replicas.a, lone(task(task_id="held")))
    assert await a_forced_dry_run(replicas, force=False) == [], "its message is in the queue: not lost"
    assert await a_forced_dry_run(replicas) == ["held"], "forced: republished whatever the broker holds"


async def test_a_repair_by_hand_of_one_queue_leaves_the_other_queues(replicas: Replicas) -> None:
    elsewhere = task_pb2.Signature(name="noop", id="there", queue="other")
    await submit(replicas.a, lone(task(task_id="here")), lone(elsewhere))
    assert await a_forced_dry_run(replicas, queue="other") == ["there"]
    assert await a_forced_dry_run(replicas) == ["here", "there"]


async def test_a_repair_by_hand_without_an_age_says_exactly_what_is_missing(replicas: Replicas) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await replicas.a.admin.repair(None, "", dry_run=True, force=False)
    assert str(refused.value) == "older_than is required: how long a task must show no sign of life, e.g. 600s"


async def test_a_replay_of_every_dead_letter_replays_each_listed_one_though_another_forgot_it_meanwhile(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(replicas.a, lone(task(task_id="g1")), lone(task(task_id="g2")))
    await run_all(replicas.a, fail={"g1", "g2"})
    listing = replicas.a.admin.dead_letters

    async def listed_then_forgotten(queue: str, limit: int) -> list[result_pb2.TaskResult]:
        found = await listing(queue, limit)
        await replicas.b.admin.forget_dead_letters(["g1"])  # another operator, between listing and replay
        return found

    monkeypatch.setattr(replicas.a.admin, "dead_letters", listed_then_forgotten)
    assert sorted(await replicas.a.admin.replay([], "")) == sorted([replay_id("g1"), replay_id("g2")])
    assert await replicas.a.admin.dead_letters("", 0) == []


async def test_a_replay_of_every_dead_letter_takes_at_most_ten_thousand_at_once(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 10_001
    failed = []
    for i in range(count):
        record = new_record(task(task_id=f"x{i:05}"), enqueued=False)
        transition(record, result_pb2.TASK_STATE_FAILURE)
        failed.append(record)
    await replicas.a.store.create(failed)
    await replicas.backend.add_members(DEAD_LETTERS_GROUP, {r.result.task_id: QUEUE.encode() for r in failed})
    taken: list[int] = []

    async def replay(task_ids: list[str], checked: bool = False) -> list[str]:
        taken.append(len(task_ids))
        return []

    monkeypatch.setattr(replicas.a.admin.dead, "replay", replay)
    await replicas.a.admin.replay([], "")
    assert taken == [10_000]


async def test_without_a_task_registry_no_tasks_are_registered_and_queues_are_still_listed(
    replicas: Replicas,
) -> None:
    core = replicas.a
    bare = admin.Admin(
        broker=core.broker, store=core.store, registry=core.registry, reader=core.reader, submitter=core.submitter,
        server_id="s", pauses=core.admin.pauses, schedules=core.admin.schedules, canceller=core.canceller,
        repairer=core.repairer,
    )
    await submit(core, lone(task(task_id="t1")))
    assert await bare.registered_tasks() == []
    assert [info.name for info in await bare.queues()] == [QUEUE]


async def test_a_rate_limit_deleted_by_hand_is_gone_and_the_others_stay(replicas: Replicas) -> None:
    await replicas.a.admin.set_rate_limit(rate_limit("charge", "20/m"))
    await replicas.a.admin.set_rate_limit(rate_limit("send", "5/s"))
    await replicas.a.admin.delete_rate_limit("charge")
    assert [limit.name for limit in await replicas.b.admin.list_rate_limits()] == ["send"]


async def test_tasks_are_listed_a_page_at_a_time_through_the_index(replicas: Replicas) -> None:
    await submit(replicas.a, *(lone(task(task_id=f"l{i}")) for i in range(3)),
                 lone(task_pb2.Signature(name="other", id="m0", queue=QUEUE)))
    await replicas.a.admin.indexer.flush()
    first = await replicas.a.admin.list_tasks(TaskQuery(name="noop", limit=2, oldest_first=True))
    assert [r.result.task_id for r in first.records] == ["l0", "l1"] and first.next_page_token
    rest = await replicas.a.admin.list_tasks(TaskQuery(name="noop", limit=2, oldest_first=True), first.next_page_token)
    assert ([r.result.task_id for r in rest.records], rest.next_page_token) == (["l2"], "")
