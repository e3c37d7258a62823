"""A waiting GetResult follows other replicas' writes at once when they are what answers its
waits (replicas behind a load balancer, #21), and listens for its own replica's write first
while that is what answers them (one replica: no subscription for a quick task)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor_server.app import Core
from conveyor_server.core import results
from conveyor_server.core.records import transition
from conveyor_server.core.results import FEED_AFTER_SECONDS, FEED_AT_ONCE_SHARE, FeedUse
from tests.unit.replicas import Replicas, quick_repairs, replicas
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
