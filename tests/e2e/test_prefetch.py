"""A worker holds `concurrency * prefetch` assignments but runs only `concurrency` at once; a
prefetched task starts (and is reported STARTED) when it gets a slot, and can be cancelled
while it waits for one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor import Client, Worker, state_name
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.support.wait import wait_for


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = ConveyorServer(Settings(port=0, broker_url="memory://", backend_url="memory://"))
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()


def test_the_window_is_concurrency_times_prefetch() -> None:
    assert Worker(concurrency=8).max_in_flight == 32
    assert Worker(concurrency=3, prefetch=1).max_in_flight == 3
    assert Worker(concurrency=3, max_in_flight=5).max_in_flight == 5
    worker = Worker(concurrency=2)
    worker.configure(concurrency=4, prefetch=2)
    assert worker.max_in_flight == 8
    with pytest.raises(ValueError, match="prefetch"):
        Worker(prefetch=0)


async def test_prefetched_tasks_wait_for_a_slot_and_can_be_cancelled_there(address: str) -> None:
    worker = Worker(address, concurrency=1, prefetch=3)
    release = asyncio.Event()
    running_now = 0
    most_at_once = 0

    @worker.task("hold")
    async def hold() -> str:
        nonlocal running_now, most_at_once
        running_now += 1
        most_at_once = max(most_at_once, running_now)
        try:
            await release.wait()
        finally:
            running_now -= 1
        return "done"

    run = asyncio.create_task(worker.run())
    try:
        async with Client(address) as client:
            first, second, third = [await client.submit("hold") for _ in range(3)]
            # All three are assigned to this one worker (window 3), but only the first runs.
            async def one_runs_two_wait() -> bool:
                states = [state_name((await client.get_result(t.task_id)).state) for t in (first, second, third)]
                return states == ["STARTED", "RECEIVED", "RECEIVED"]

            await wait_for(one_runs_two_wait, 10.0, "the first task STARTED and the two prefetched RECEIVED")

            assert third.task_id in await client.cancel(third.task_id)
            cancelled = await client.get_result(third.task_id, wait=10)
            assert state_name(cancelled.state) == "CANCELLED"
            assert "STARTED" not in [state_name(t.state) for t in cancelled.history]

            release.set()
            assert await client.result(first.task_id, wait=10) == "done"
            assert await client.result(second.task_id, wait=10) == "done"
            one, two = [await client.get_result(t.task_id) for t in (first, second)]
            assert _seconds(two.started_at) >= _seconds(one.finished_at), "the prefetched task ran after a slot freed"
            assert most_at_once == 1
    finally:
        worker.stop()
        await run
