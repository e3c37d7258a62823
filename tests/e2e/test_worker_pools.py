"""Worker pools end to end: a server and `conveyor worker` processes, tasks that misbehave on
purpose (busy loops past their limit, sys.exit, os._exit, KeyboardInterrupt, a custom
BaseException), what each task sees of itself, how `conveyor worker` finds its Worker, and what
the worker logs. The tasks are tests/e2e/pool_tasks.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client, SyncClient, Worker, sig, state_name
from conveyor.v1 import result_pb2
from tests.e2e import pool_tasks
from tests.support.processes import REPO, Proc, Server, wait_for, wait_for_workers

MODULE = "tests.e2e.pool_tasks"


def pool_worker(tmp_path: Path, address: str, pool: str, *flags: str, concurrency: int = 1,
                log_json: bool = False) -> Proc:
    """`conveyor worker tests.e2e.pool_tasks --pool POOL`, connected before it returns."""
    argv = [sys.executable, "-m", "conveyor_server.cli", "--address", address, *(["--log-json"] if log_json else []),
            "worker", MODULE, "--pool", pool, "--concurrency", str(concurrency), *flags]
    worker = Proc(argv, tmp_path / f"worker-{pool}-{time.monotonic_ns()}.log")
    wait_for_workers(address, 1)
    return worker


async def ended(client: Client, task_id: str, wait: float = 60) -> result_pb2.TaskResult:
    result = await client.get_result(task_id, wait=wait)
    assert state_name(result.state) in ("SUCCESS", "FAILURE", "CANCELLED"), state_name(result.state)
    return result


async def test_a_hard_limit_stops_a_busy_task_in_the_processes_pool_and_its_slot_serves_at_once(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    procs.append(pool_worker(tmp_path, sqlite_server.address, "processes", concurrency=1))
    effect = tmp_path / "effect"
    began = time.monotonic()
    spinning = await client.submit(sig("pool.spin_then_write", str(effect), 6.0).set(time_limit=1))
    result = await ended(client, spinning.task_id)
    assert state_name(result.state) == "FAILURE" and result.error.type == "TimeLimitExceeded"
    # One slot: the next task can only run now if the busy loop was stopped, not merely reported.
    quick = await client.submit("pool.add", 2, 3)
    assert await client.result(quick.task_id, wait=30) == 5
    assert time.monotonic() - began < 6.0, "the quick task waited for the busy loop to end"
    await asyncio.sleep(max(0.0, 6.5 - (time.monotonic() - began)))
    assert not effect.exists(), "the task's side effect happened after its hard limit"


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_the_soft_limit_reaches_the_task_as_an_exception_it_can_catch(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, pool: str
) -> None:
    procs.append(pool_worker(tmp_path, sqlite_server.address, pool))
    submitted = await client.submit(sig("pool.catch_soft_limit", 20.0).set(time_limit=10, soft_time_limit=0.5))
    assert await client.result(submitted.task_id, wait=30) == "cleaned up"


async def test_the_async_pool_delivers_the_soft_limit_at_the_await(sqlite_server: Server, client: Client) -> None:
    worker = Worker(sqlite_server.address, pool="async", concurrency=4)
    for name, function in pool_tasks.worker.tasks.items():
        if name.startswith("pool.async_"):
            worker.task(name)(function)
    running = asyncio.create_task(worker.run())
    try:
        soft = await client.submit(sig("pool.async_catch_soft_limit", 20.0).set(time_limit=10, soft_time_limit=0.3))
        assert await client.result(soft.task_id, wait=30) == "cleaned up"
        poison = await client.submit("pool.async_sys_exit", 3)
        assert (await ended(client, poison.task_id)).error.type == "SystemExit"
        assert await client.result((await client.submit("pool.async_add", 1, 2)).task_id, wait=30) == 3
    finally:
        worker.stop()
        await running


POISON = [
    ("pool.sys_exit", (3,), "SystemExit"),
    ("pool.keyboard_interrupt", (), "KeyboardInterrupt"),
    ("pool.custom_base_exception", (), "CustomStop"),
]


@pytest.mark.parametrize("pool", ["threads", "processes"])
async def test_poison_tasks_fail_and_the_worker_serves_on(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, pool: str
) -> None:
    worker = pool_worker(tmp_path, sqlite_server.address, pool, concurrency=2)
    procs.append(worker)
    poison = list(POISON)
    if pool == "processes":  # in the threads pool os._exit ends the worker itself: nothing can catch it
        poison.append(("pool.hard_exit", (7,), "WorkerLost"))
    for name, args, kind in poison:
        submitted = await client.submit(name, *args)
        result = await ended(client, submitted.task_id)
        assert (state_name(result.state), result.error.type) == ("FAILURE", kind), name
        assert result.attempts == 1
    assert worker.alive()
    assert await client.result((await client.submit("pool.add", 20, 22)).task_id, wait=30) == 42


async def test_a_task_sees_its_ids_limits_and_headers(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    procs.append(pool_worker(tmp_path, sqlite_server.address, "processes", concurrency=2))
    submitted = await client.submit(sig("pool.context").set(
        priority=7, time_limit=30, soft_time_limit=20, queue="default", headers={"tenant": "acme"}
    ))
    seen: dict[str, Any] = await client.result(submitted.task_id, wait=30)
    assert seen == {
        "task_id": submitted.task_id, "workflow_id": "", "parent_id": "", "attempt": 1, "deliveries": 1,
        "priority": 7, "time_limit": 30.0, "soft_time_limit": 20.0, "queue": "default",
        "headers": {"tenant": "acme"},
    }
    # A task submitted from inside a task has it as its parent.
    parent = await client.submit("pool.submit_child", sqlite_server.address)
    child_id = await client.result(parent.task_id, wait=30)
    assert (await client.result(child_id, wait=30))["parent_id"] == parent.task_id


def _cli_worker(cwd: Path, address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor_server.cli", "--address", address, "worker", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_conveyor_worker_finds_an_app_and_says_clearly_when_there_is_no_worker(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server
) -> None:
    (tmp_path / "celery_style.py").write_text(
        "from conveyor import Worker\napp = Worker(concurrency=1)\n\n"
        "@app.task('style.double')\ndef double(x: int) -> int:\n    return 2 * x\n"
    )
    (tmp_path / "wrong_kind.py").write_text("worker = 'not a worker'\n")
    worker = Proc([sys.executable, "-m", "conveyor_server.cli", "--address", sqlite_server.address, "worker",
                   "celery_style"], tmp_path / "app-worker.log", cwd=tmp_path)
    procs.append(worker)
    wait_for_workers(sqlite_server.address, 1)
    with SyncClient(sqlite_server.address) as client:
        assert client.result(client.submit("style.double", 21).task_id, wait=30) == 42

    for args, message in [
        (("celery_style", "--attr", "missing"), "conveyor: celery_style has no attribute 'missing'\n"),
        (("wrong_kind",), "conveyor: wrong_kind.worker is a str, not a conveyor.Worker\n"),
        (("no_such_module",), "conveyor: cannot import no_such_module: No module named 'no_such_module'\n"),
    ]:
        done = _cli_worker(tmp_path, sqlite_server.address, *args)
        assert (done.returncode, done.stderr) == (2, message)


@pytest.mark.parametrize("log_json", [False, True], ids=["text", "json"])
async def test_the_worker_logs_a_banner_and_each_task(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, log_json: bool
) -> None:
    worker = pool_worker(tmp_path, sqlite_server.address, "processes", "--prefetch", "2", concurrency=2,
                         log_json=log_json)
    procs.append(worker)
    ok = await client.submit("pool.add", 1, 2)
    failing = await client.submit("pool.fail", "on purpose")
    retried = await client.submit("pool.retry_once")
    for submitted in (ok, failing, retried):
        await ended(client, submitted.task_id)

    def messages() -> list[str]:
        lines = worker.output().splitlines()
        if not log_json:
            return lines
        return [json.loads(line)["msg"] for line in lines if line.startswith("{")]

    wait_for(lambda: any(f"pool.retry_once[{retried.task_id}] succeeded" in m for m in messages()), 30,
             "the retried task's success in the log")
    text = "\n".join(messages())
    banner = next(m for m in messages() if "conveyor worker" in m and "starting" in m)
    for part in (f"server {sqlite_server.address}", "queues [default]", "pool processes (2 child processes",
                 "concurrency 2", "prefetch 2 (window 4)", "pool.add, pool.async_add"):
        assert part in banner, part
    assert f"task pool.add[{ok.task_id}] received" in text
    assert f"task pool.add[{ok.task_id}] succeeded in " in text and " ms" in text
    failed = text[text.index(f"task pool.fail[{failing.task_id}] failed in"):]  # the line, then its traceback
    assert failed.index("ValueError: on purpose") < failed.index("Traceback (most recent call last)")
    assert 'raise ValueError(message)' in failed
    assert f"task pool.retry_once[{retried.task_id}] retried in 0.2 s: not yet" in text
