"""A result recorded by one replica answers a wait on another at once (the backend's change
feed carries it): a client on replica A waiting for quick tasks that replica B's worker runs
gets each result within a moment, not when its wait runs out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conveyor import Client, sig
from tests.e2e.test_engines import FAST, unique_prefix
from tests.support.processes import Proc, Server, WorkerProc, wait_for_workers

pytestmark = pytest.mark.timeout(120)
TASKS = 20
# Far below the 30 s wait: a result that only a rescan or the wait's end finds fails this.
PROMPT_SECONDS = 5.0


async def test_a_wait_on_one_replica_sees_a_result_recorded_by_another(
    tmp_path: Path, procs: list[Proc], redis_broker_url: str, redis_backend_url: str
) -> None:
    broker, backend = unique_prefix(redis_broker_url), unique_prefix(redis_backend_url)
    replica_a = Server(tmp_path, broker, backend, env=FAST, name="replica-a")
    replica_b = Server(tmp_path, broker, backend, env=FAST, name="replica-b")
    procs.extend([replica_a, replica_b])
    procs.append(WorkerProc(tmp_path, replica_b.address, name="worker-b"))
    wait_for_workers(replica_b.address, 1)
    async with Client(replica_a.address) as client:
        for i in range(TASKS):
            started = time.monotonic()
            submitted = await client.submit(sig("add", i, 1))
            assert await client.result(submitted.task_id, wait=30) == i + 1
            took = time.monotonic() - started
            assert took < PROMPT_SECONDS, f"task {i}: the wait on replica A took {took:.1f} s"


async def test_many_waits_on_one_replica_see_results_recorded_by_another(
    tmp_path: Path, procs: list[Proc], redis_broker_url: str, redis_backend_url: str
) -> None:
    broker, backend = unique_prefix(redis_broker_url), unique_prefix(redis_backend_url)
    replica_a = Server(tmp_path, broker, backend, env=FAST, name="replica-a")
    replica_b = Server(tmp_path, broker, backend, env=FAST, name="replica-b")
    procs.extend([replica_a, replica_b])
    procs.append(WorkerProc(tmp_path, replica_b.address, name="worker-b"))
    wait_for_workers(replica_b.address, 1)
    async with Client(replica_a.address) as client:
        started = time.monotonic()
        submitted = await client.submit_batch(sig("add", i, 1) for i in range(TASKS))
        results = await asyncio.gather(*(client.result(s.task_id, wait=30) for s in submitted))
        took = time.monotonic() - started
    assert results == [i + 1 for i in range(TASKS)]
    assert took < PROMPT_SECONDS, f"the waits on replica A took {took:.1f} s"
