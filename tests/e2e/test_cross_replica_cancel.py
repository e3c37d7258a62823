"""A cancel made through one replica reaches a worker of another at once: a task that worker
holds prefetched, waiting for a slot, is dropped there and never starts. The heartbeat, the
backstop that would also carry the cancel, is set far beyond the test's length, so only the
replicas' cancel notices (core/cancel_notices.py) can pass this."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from conveyor import Client, Worker, state_name
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.e2e.test_engines import unique_prefix
from tests.support.wait import wait_for

pytestmark = pytest.mark.timeout(60)
NO_HEARTBEAT_SECONDS = 120.0


@pytest.fixture
async def replicas(redis_broker_url: str, redis_backend_url: str) -> AsyncIterator[tuple[str, str]]:
    broker, backend = unique_prefix(redis_broker_url), unique_prefix(redis_backend_url)
    settings = Settings(port=0, http_port=0, broker_url=broker, backend_url=backend,
                        lease_seconds=3 * NO_HEARTBEAT_SECONDS, heartbeat_interval_seconds=NO_HEARTBEAT_SECONDS)
    a, b = ConveyorServer(settings), ConveyorServer(settings)
    ports = [await a.start(), await b.start()]
    try:
        yield f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    finally:
        await b.stop()
        await a.stop()


async def test_a_cancel_through_another_replica_drops_a_prefetched_task_before_it_starts(
    replicas: tuple[str, str],
) -> None:
    address_a, address_b = replicas
    worker = Worker(address_a, concurrency=1, prefetch=3)
    release = asyncio.Event()
    ran: list[str] = []

    @worker.task("hold")
    async def hold(label: str) -> str:
        ran.append(label)
        await release.wait()
        return label

    run = asyncio.create_task(worker.run())
    try:
        async with Client(address_a) as client_a, Client(address_b) as client_b:
            first, second, third = [await client_a.submit("hold", label) for label in ("first", "second", "third")]

            async def one_runs_two_wait() -> bool:
                states = [state_name((await client_a.get_result(t.task_id)).state) for t in (first, second, third)]
                return states == ["STARTED", "RECEIVED", "RECEIVED"]

            # RECEIVED is stored: replica B sees the task held by a worker (not queued) and must tell replica A.
            await wait_for(one_runs_two_wait, 10.0, "the first task STARTED and the two prefetched RECEIVED")

            assert third.task_id in await client_b.cancel(third.task_id)
            # "At once" with a margin: far below the heartbeat, far above a notice's few milliseconds.
            await asyncio.sleep(1.0)
            release.set()
            assert await client_a.result(first.task_id, wait=10) == "first"
            assert await client_a.result(second.task_id, wait=10) == "second"
            cancelled = await client_b.get_result(third.task_id, wait=10)
            assert state_name(cancelled.state) == "CANCELLED"
            # A moment in which the worker, had it kept the task, would have started it.
            await asyncio.sleep(0.5)
            assert ran == ["first", "second"], "the cancelled task started on replica A's worker"
            assert "STARTED" not in [state_name(t.state) for t in cancelled.history]
    finally:
        worker.stop()
        await run
