"""Limits that legal tasks must not trip over, with a server and real workers: time limits
count from the moment a task starts (not from its delivery), large tasks are delivered however
they are batched, oversized ones are refused at submit with the reason, and a worker whose
connection was healthy reconnects quickly after each later break."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import grpc
import pytest

from conveyor import Client, Worker, sig
from tests.e2e import pool_tasks
from tests.support.processes import Proc, Server, wait_for_workers

MODULE = "tests.e2e.pool_tasks"


def pool_worker(tmp_path: Path, address: str, pool: str, concurrency: int, prefetch: int) -> Proc:
    argv = [sys.executable, "-m", "conveyor_server.cli", "--address", address, "worker", MODULE, "--pool", pool,
            "--concurrency", str(concurrency), "--prefetch", str(prefetch)]
    worker = Proc(argv, tmp_path / f"worker-{pool}-{time.monotonic_ns()}.log")
    wait_for_workers(address, 1)
    return worker


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_a_task_prefetched_behind_a_long_one_gets_its_whole_time_limit(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, pool: str
) -> None:
    procs.append(pool_worker(tmp_path, sqlite_server.address, pool, concurrency=1, prefetch=4))
    long = await client.submit("pool.sleep_then_write", str(tmp_path / "long"), 5.0)
    short = await client.submit(sig("pool.sleep_then_write", str(tmp_path / "short"), 0.1).set(time_limit=3))
    assert await client.result(short.task_id, wait=60) == "wrote"  # held 5 s, ran 0.1 s: within its 3 s
    assert await client.result(long.task_id, wait=60) == "wrote"


async def test_in_the_threads_pool_a_task_behind_one_past_its_limit_is_not_failed_for_the_wait(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    """A thread runs on past its hard limit and keeps its slot; the next task starts (and its
    limit begins) only when the slot is really free."""
    procs.append(pool_worker(tmp_path, sqlite_server.address, "threads", concurrency=1, prefetch=4))
    stuck = await client.submit(sig("pool.sleep_then_write", str(tmp_path / "stuck"), 4.0).set(time_limit=1))
    quick = await client.submit(sig("pool.add", 1, 2).set(time_limit=2))
    assert (await client.get_result(stuck.task_id, wait=60)).error.type == "TimeLimitExceeded"
    assert await client.result(quick.task_id, wait=60) == 3


async def test_eight_tasks_of_900_kib_are_delivered_together(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    """8 x 900 KiB in one Assignments message is over gRPC's default 4 MiB receive limit: the
    worker announces, and accepts, more."""
    payload = b"x" * (900 * 1024)
    submitted = await client.submit_batch(sig("pool.size", payload) for _ in range(8))
    # Submitted before the worker connects, so that its first assignment batch holds all of them.
    procs.append(pool_worker(tmp_path, sqlite_server.address, "threads", concurrency=8, prefetch=1))
    assert [await client.result(s.task_id, wait=60) for s in submitted] == [len(payload)] * 8


async def test_oversized_tasks_are_refused_at_submit_with_the_reason(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as headers:
        await client.submit(sig("pool.add", 1, 2).set(headers={"big": "x" * (10 * 2**20)}))
    assert headers.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert headers.value.details() == "request.task: headers are 10.0 MiB, over the 64 KiB limit"

    near_limit = b"x" * (1000 * 1024)  # each under the args limit; together over the whole-task limit
    with pytest.raises(grpc.aio.AioRpcError) as whole:
        await client.submit(sig("pool.size", near_limit).link(sig("pool.size", near_limit)))
    assert whole.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(whole.value.details()).endswith(
        "the whole task (args, headers and callbacks) is 2.0 MiB, over the 1.1 MiB limit"
    )

    with pytest.raises(grpc.aio.AioRpcError) as limits:
        await client.submit(sig("pool.add", 1, 2).set(time_limit=5, soft_time_limit=5))
    assert limits.value.details() == (
        "request.task: soft_time_limit (5 s) must be below time_limit (5 s), which stops the task"
    )


async def test_reconnect_backoff_starts_over_after_a_healthy_connection(
    sqlite_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    worker = Worker(sqlite_server.address, concurrency=1)
    worker.task("pool.add")(pool_tasks.add)
    running = asyncio.create_task(worker.run())

    def delays() -> list[str]:
        return [r.getMessage().rsplit("reconnecting in ", 1)[1] for r in caplog.records
                if "reconnecting in" in r.getMessage()]

    async def until(condition: object, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"{what}; delays so far {delays()}"
            await asyncio.sleep(0.05)

    def connections() -> int:
        return sum("connected to" in r.getMessage() for r in caplog.records)

    try:
        await until(lambda: connections() == 1, "the first connection")
        for round_ in range(2):
            sqlite_server.kill9()
            before = len(delays())
            # Down long enough for the backoff to grow past its start while the server is away.
            await until(lambda before=before: len(delays()) >= before + 4, "backoff while the server is down")
            assert delays()[before:before + 4] == ["0.2 s", "0.4 s", "0.8 s", "1.6 s"], round_
            await asyncio.to_thread(sqlite_server.restart)
            await until(lambda round_=round_: connections() == round_ + 2, "reconnecting to the restarted server")
    finally:
        worker.stop()
        await running


async def test_a_worker_with_grpcs_default_limit_gets_the_eight_in_messages_that_fit(sqlite_server: Server,
                                                                                      client: Client) -> None:
    """The server cuts Assignments to the worker's announced limit: a worker that accepts only
    gRPC's default 4 MiB still gets all eight 900 KiB tasks (in at least two messages)."""
    payload = b"x" * (900 * 1024)
    submitted = await client.submit_batch(sig("size", payload) for _ in range(8))
    worker = Worker(sqlite_server.address, concurrency=8, prefetch=1, max_receive_bytes=4 * 1024 * 1024)

    @worker.task("size")
    def size(data: bytes) -> int:
        return len(data)

    running = asyncio.create_task(worker.run())
    try:
        results = [await client.result(s.task_id, wait=60) for s in submitted]
    finally:
        worker.stop()
        await running
    assert results == [len(payload)] * 8
