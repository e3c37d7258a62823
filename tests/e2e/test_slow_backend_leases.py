"""A backend that answers slowly holds up the worker's reports, not its leases: while the server
waits on the engine for one of a worker's reports, the heartbeats behind it wait in the stream,
so the server extends that worker's leases itself. Before, a results write held up for longer
than a lease let the leases of every task the worker held lapse, and another worker ran them a
second time.

The backend is a real Redis behind a test-controlled TCP proxy that delays every chunk; the
broker is SQLite (untouched by the proxy). Worker A holds six slow tasks; worker B is idle beside
it; then the backend slows down for longer than a lease. Every task must run exactly once."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conveyor import Client, Worker, sig, state_name
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.support.proxy import TcpProxy
from tests.support.wait import wait_for

LEASE_SECONDS = 2.0
TASKS = 6
# Each chunk either way waits this long: a backend round trip takes twice that, a results write
# (a read, then a compare-and-set) four times, so the server handles one report for longer
# than a lease.
DELAY_SECONDS = 0.8


@pytest.fixture
async def server(tmp_path: Path, redis_url: str, redis_proxy: TcpProxy) -> AsyncIterator[ConveyorServer]:
    settings = Settings(
        port=0, broker_url=f"sqlite:///{tmp_path / 'broker.db'}",
        backend_url=urlsplit(redis_url)._replace(netloc=redis_proxy.address).geturl(),
        lease_seconds=LEASE_SECONDS, heartbeat_interval_seconds=0.25, recover_interval_seconds=0.25, http_port=0,
    )
    server = ConveyorServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_slow_backend_does_not_let_a_workers_leases_lapse(
    server: ConveyorServer, redis_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor_server.core.lease_recovery")
    address = f"127.0.0.1:{server.port}"
    runs: Counter[int] = Counter()

    def worker(prefetch: int) -> Worker:
        made = Worker(address, concurrency=1, prefetch=prefetch)

        @made.task("slow")
        async def slow(n: int) -> int:
            runs[n] += 1
            await asyncio.sleep(0.4)
            return n

        return made

    holder, idle = worker(TASKS), worker(1)
    running = [asyncio.create_task(holder.run())]
    try:
        async with Client(address) as client:
            submitted = await client.submit_batch(sig("slow", n) for n in range(TASKS))

            async def all_held() -> bool:
                states = [state_name((await client.get_result(t.task_id)).state) for t in submitted]
                return all(state in ("RECEIVED", "STARTED") for state in states)
            await wait_for(all_held, 10.0, "the first worker holding every task")

            running.append(asyncio.create_task(idle.run()))

            async def both_connected() -> bool:
                return len(server.core.registry.sessions) == 2
            await wait_for(both_connected, 10.0, "the second worker connected")

            redis_proxy.delay(DELAY_SECONDS)
            await asyncio.sleep(3 * LEASE_SECONDS)
            redis_proxy.delay(0.0)

            for item in submitted:
                assert state_name((await client.get_result(item.task_id, wait=60)).state) == "SUCCESS"
        assert runs == Counter(range(TASKS)), "each task ran exactly once"
        # Dispatch sometimes drops the returned copies as duplicates; the lapse itself must not happen.
        lapsed = [r.getMessage() for r in caplog.records if "expired leases" in r.getMessage()]
        assert lapsed == [], "no lease of the live worker lapsed"
    finally:
        redis_proxy.delay(0.0)
        holder.stop()
        idle.stop()
        await asyncio.gather(*running)

