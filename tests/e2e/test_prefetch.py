"""A worker holds `concurrency * prefetch` assignments but runs only `concurrency` at once; a
prefetched task starts (and is reported STARTED) when it gets a slot, and can be cancelled
while it waits for one. With prefetch left to the worker, its window deepens while tasks end
quickly and falls back to four per slot as soon as one runs long (conveyor.window)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor import Client, Worker, sig, state_name
from conveyor.window import FLOOR_PREFETCH, MAX_PREFETCH
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from conveyor_server.core.sessions import WorkerSession
from tests.support.wait import wait_for


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


@pytest.fixture
async def server() -> AsyncIterator[ConveyorServer]:
    server = ConveyorServer(Settings(port=0, broker_url="memory://", backend_url="memory://", http_port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def address(server: ConveyorServer) -> str:
    return f"127.0.0.1:{server.port}"


def test_the_window_is_concurrency_times_prefetch() -> None:
    assert Worker(concurrency=8).max_in_flight == 32
    assert Worker(concurrency=3, prefetch=1).max_in_flight == 3
    assert Worker(concurrency=3, max_in_flight=5).max_in_flight == 5
    worker = Worker(concurrency=2)
    worker.configure(concurrency=4, prefetch=2)
    assert worker.max_in_flight == 8
    with pytest.raises(ValueError, match="prefetch"):
        Worker(prefetch=0)


def _session(server: ConveyorServer) -> WorkerSession:
    (session,) = server.core.registry.sessions.values()
    return session


async def test_a_window_left_to_the_worker_deepens_for_quick_tasks_and_not_behind_a_long_one(
    server: ConveyorServer, address: str
) -> None:
    worker = Worker(address, concurrency=1)
    release = asyncio.Event()

    @worker.task("quick")
    def quick() -> None:
        return None

    @worker.task("hold")
    async def hold() -> None:
        await release.wait()

    run = asyncio.create_task(worker.run())
    try:
        async with Client(address) as client:
            # Quick tasks, then a long one among them: the worker reaches it with a deep window.
            quick_ones = await client.submit_batch(sig("quick") for _ in range(2_000))
            long = await client.submit("hold")
            behind = await client.submit_batch(sig("quick") for _ in range(300))
            session = _session(server)

            async def long_one_runs_at_the_floor() -> bool:
                started = state_name((await client.get_result(long.task_id)).state) == "STARTED"
                return started and session.window == FLOOR_PREFETCH
            await wait_for(long_one_runs_at_the_floor, 30.0, "the long task STARTED and the window back at the floor")
            assert session.high_water > 2 * FLOOR_PREFETCH, "the quick tasks deepened the window, and it was used"
            held = session.in_flight
            await asyncio.sleep(0.3)
            # Those it held when the long task began wait behind it; no more come, and the rest
            # stay in the queue for any worker.
            assert session.in_flight == held <= MAX_PREFETCH
            states = [state_name((await client.get_result(t.task_id)).state) for t in behind]
            assert states.count("PENDING") >= len(behind) - MAX_PREFETCH
            release.set()
            for item in [*quick_ones, long, *behind]:
                assert state_name((await client.get_result(item.task_id, wait=30)).state) == "SUCCESS"
    finally:
        release.set()
        worker.stop()
        await run


async def test_a_set_prefetch_keeps_the_window_fixed(server: ConveyorServer, address: str) -> None:
    worker = Worker(address, concurrency=1, prefetch=2)

    @worker.task("quick")
    def quick() -> None:
        return None

    run = asyncio.create_task(worker.run())
    try:
        async with Client(address) as client:
            submitted = await client.submit_batch(sig("quick") for _ in range(1_000))
            for item in submitted:
                assert state_name((await client.get_result(item.task_id, wait=30)).state) == "SUCCESS"
        session = _session(server)
        assert (session.window, session.high_water) == (2, 2)
    finally:
        worker.stop()
        await run


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
