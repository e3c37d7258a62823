"""A waiting GetResult follows other replicas' writes at once when they are what answers its
waits (replicas behind a load balancer, #21), and listens for its own replica's write first
while that is what answers them (one replica: no subscription for a quick task). A task that a
worker of this replica runs is recorded here: its wait listens here first whatever the share,
and does not count in it (waits for such tasks had taught a replica to sit out 20 ms on the few
tasks other replicas ran: p99 24.7 ms with two replicas)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor_server.app import Core
from conveyor_server.core import results
from conveyor_server.core.records import transition
from conveyor_server.core.results import FEED_AFTER_SECONDS, FEED_AT_ONCE_SHARE, FeedUse
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas
from tests.unit.test_durability import lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


def succeed(_: str, record: records_pb2.TaskRecord) -> bool:
    transition(record, result_pb2.TASK_STATE_SUCCESS)
    return True


async def wait_for_a_write_by(writer: Core, waiter: Core, task_id: str) -> None:
    """`waiter` waits for `task_id` while `writer` records its result; the wait must end with it."""
    await submit(writer, lone(task(task_id=task_id)))
    waiting = asyncio.create_task(waiter.reader.wait(task_id, 30))
    await asyncio.sleep(0)  # it read the record (pending)
    await writer.store.update([task_id], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == result_pb2.TASK_STATE_SUCCESS


def test_the_share_of_waits_answered_elsewhere_decides_the_delay() -> None:
    use = FeedUse()
    assert use.delay() == FEED_AFTER_SECONDS
    for _ in range(3):
        use.answered(elsewhere=True)
    assert use.share == pytest.approx(1 - 0.95**3)
    assert use.delay() == 0.0
    while use.share > FEED_AT_ONCE_SHARE:
        use.answered(elsewhere=False)
    assert use.delay() == FEED_AFTER_SECONDS


async def test_waits_answered_by_another_replica_make_the_next_follow_the_feed_at_once(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 0.0)  # these waits go to the feed at once
    for n in range(3):
        await wait_for_a_write_by(replicas.a, replicas.b, f"t{n}")
    assert replicas.b.reader.feed_use.share > FEED_AT_ONCE_SHARE
    assert replicas.a.reader.feed_use.share == 0.0, "replica a waited for nothing"

    # Listening for its own write first would now hold the wait for a minute.
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 60.0)
    await wait_for_a_write_by(replicas.a, replicas.b, "late")


async def test_waits_answered_here_make_the_next_listen_for_this_replicas_write_first(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicas.a.reader.feed_use.share = 0.5  # as if other replicas had answered half its waits
    n = 0
    while replicas.a.reader.feed_use.delay() == 0.0:
        await wait_for_a_write_by(replicas.a, replicas.a, f"t{n}")
        n += 1
    assert 10 < n < 40, f"{n} waits answered here to fall below the share"

    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 1.0)
    watches = replicas.backend.watches
    await submit(replicas.a, lone(task(task_id="quick")))
    waiting = asyncio.create_task(replicas.a.reader.wait("quick", 30))
    await asyncio.sleep(0)
    await replicas.a.store.update(["quick"], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == result_pb2.TASK_STATE_SUCCESS
    assert replicas.backend.watches == watches, "answered by this replica's write, with no subscription"


async def wait_for_a_task_running_on(core: Core, task_id: str, runs_for: float = 0.0) -> None:
    """`core` hands the task to one of its workers, waits for it, and records its result."""
    await submit(core, lone(task(task_id=task_id)))
    await lease_all(core)
    assert core.connections.dispatcher.running_here(task_id)
    waiting = asyncio.create_task(core.reader.wait(task_id, 30))
    await asyncio.sleep(runs_for)
    await core.store.update([task_id], succeed)
    assert (await asyncio.wait_for(waiting, 5)).state == result_pb2.TASK_STATE_SUCCESS


async def test_waits_for_tasks_running_here_do_not_teach_a_replica_to_sit_out_other_replicas_tasks(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicas.b.reader.feed_use.share = 0.5  # other replicas answered half its waits so far
    for n in range(40):  # enough to bring the share under FEED_AT_ONCE_SHARE, were they counted
        await wait_for_a_task_running_on(replicas.b, f"here{n}")
    assert replicas.b.reader.feed_use.share == 0.5

    # A task replica a runs: listening for b's own write first would hold the wait a minute.
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 60.0)
    await wait_for_a_write_by(replicas.a, replicas.b, "elsewhere")


async def test_a_wait_for_a_task_running_here_listens_here_first_whatever_the_share(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results, "FEED_AFTER_SECONDS", 1.0)
    replicas.a.reader.feed_use.share = 1.0  # every wait so far was answered elsewhere
    watches = replicas.backend.watches
    await wait_for_a_task_running_on(replicas.a, "here", runs_for=0.1)  # time to subscribe, were it to
    assert replicas.backend.watches == watches, "answered by this replica's write, with no subscription"
