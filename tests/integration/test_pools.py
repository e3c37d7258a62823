"""The execution pools on their own, without a server: each gets calls as the worker hands them
over and is checked for when tasks start, how they end, and what a hard limit, a soft limit, a
cancel or a dying child does to them and to the slot they held. The processes pool runs real
child processes (tests/e2e/pool_tasks.py holds the tasks they import)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor.context import TaskContext
from conveyor.errors import SoftTimeLimitExceeded
from conveyor.execution import Ending
from conveyor.pools.base import Pool, PoolKind, TaskCall, make_pool
from conveyor.pools.coroutines import SOFT_LIMIT, SoftLimited
from conveyor.pools.processes import TERMINATE_GRACE_SECONDS, WATCH_SECONDS
from conveyor.v1 import task_pb2, worker_service_pb2
from conveyor.values import from_value, to_value
from tests.e2e import pool_tasks

TASKS = dict(pool_tasks.worker.tasks)
# Generous: the machine running the tests may be busy.
SLACK = 5.0


def call(name: str, *args: Any, time_limit: float = 0.0, soft_time_limit: float = 0.0,
         started: Callable[[], None] = lambda: None) -> TaskCall:
    assignment = worker_service_pb2.Assignment(attempt=1, lease_token="lease", deliveries=1)
    task = assignment.task
    task.id, task.name = f"{name}-{time.monotonic_ns()}", name
    task.args.extend(to_value(a) for a in args)
    if time_limit:
        task.time_limit.FromNanoseconds(int(time_limit * 1e9))
    if soft_time_limit:
        task.soft_time_limit.FromNanoseconds(int(soft_time_limit * 1e9))
    return TaskCall(assignment, TaskContext.of(assignment), TASKS[name], started)


def outcome(ending: Ending | None) -> str:
    assert ending is not None
    return worker_service_pb2.Outcome.Name(ending.outcome).removeprefix("OUTCOME_")  # type: ignore[arg-type]


def error_type(ending: Ending | None) -> str:
    assert ending is not None and ending.error is not None
    return ending.error.type


def value(ending: Ending | None) -> Any:
    assert ending is not None and ending.result is not None, ending
    return from_value(ending.result)


async def started_pool(kind: PoolKind, concurrency: int, tasks: dict[str, Any] = TASKS, **options: Any) -> Pool:
    pool = make_pool(kind, concurrency, tasks, **options)
    await pool.start()
    return pool


@pytest.fixture
async def processes() -> AsyncIterator[Pool]:
    pool = await started_pool("processes", 1)
    yield pool
    await pool.close()


@pytest.fixture
async def threads() -> AsyncIterator[Pool]:
    pool = await started_pool("threads", 1)
    yield pool
    await pool.close()


async def wait_until(condition: Callable[[], bool], seconds: float = SLACK) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- the processes pool ---------------------------------------------------------------------------


async def test_a_hard_limit_kills_a_busy_loop_and_a_new_child_takes_the_slot_at_once(
    processes: Pool, tmp_path: Path
) -> None:
    effect = tmp_path / "effect"
    first_pid = value(await processes.run(call("pool.pid")))
    began = time.monotonic()
    ending = await processes.run(call("pool.spin_then_write", str(effect), 3.0, time_limit=0.5))
    assert outcome(ending) == "FAILURE" and error_type(ending) == "TimeLimitExceeded"
    assert 0.5 <= time.monotonic() - began < 0.5 + WATCH_SECONDS + SLACK
    # The only slot runs the next task right away, in a fresh child.
    quick_began = time.monotonic()
    assert value(await processes.run(call("pool.pid"))) != first_pid
    assert time.monotonic() - quick_began < SLACK
    await asyncio.sleep(3.5 - (time.monotonic() - began))
    assert not effect.exists(), "the task ran on past its hard limit"


async def test_a_soft_limit_is_an_exception_the_task_catches_before_the_hard_limit(processes: Pool) -> None:
    ending = await processes.run(call("pool.catch_soft_limit", 10.0, time_limit=8, soft_time_limit=0.3))
    assert value(ending) == "cleaned up"
    ending = await processes.run(call("pool.async_catch_soft_limit", 10.0, time_limit=8, soft_time_limit=0.3))
    assert value(ending) == "cleaned up"


async def test_the_limits_count_from_the_start_not_from_the_handover(processes: Pool, tmp_path: Path) -> None:
    busy = asyncio.create_task(processes.run(call("pool.sleep_then_write", str(tmp_path / "a"), 1.5)))
    await asyncio.sleep(0.1)
    waited = await processes.run(call("pool.add", 1, 2, time_limit=1.0))  # waits 1.4 s for the one slot
    assert value(waited) == 3
    assert value(await busy) == "wrote"


@pytest.mark.parametrize(("name", "args", "kind"), [
    ("pool.sys_exit", (3,), "SystemExit"),
    ("pool.keyboard_interrupt", (), "KeyboardInterrupt"),
    ("pool.custom_base_exception", (), "CustomStop"),
    ("pool.async_sys_exit", (4,), "SystemExit"),
])
async def test_a_base_exception_fails_the_task_and_the_child_serves_on(
    processes: Pool, name: str, args: tuple[Any, ...], kind: str
) -> None:
    pid = value(await processes.run(call("pool.pid")))
    ending = await processes.run(call(name, *args))
    assert outcome(ending) == "FAILURE" and error_type(ending) == kind
    assert value(await processes.run(call("pool.pid"))) == pid


async def test_a_child_that_exits_mid_task_fails_it_with_worker_lost(processes: Pool) -> None:
    ending = await processes.run(call("pool.hard_exit", 7))
    assert outcome(ending) == "FAILURE" and error_type(ending) == "WorkerLost"
    assert ending is not None and ending.error is not None and "exited with code 7" in ending.error.message
    assert value(await processes.run(call("pool.add", 2, 2))) == 4


async def test_cancel_stops_the_running_child_and_skips_a_queued_task(tmp_path: Path) -> None:
    pool = await started_pool("processes", 1)
    try:
        running = call("pool.sleep_then_write", str(tmp_path / "running"), 2.0)
        queued = call("pool.sleep_then_write", str(tmp_path / "queued"), 0.0)
        # Two at once for one child: both go to it in one batch, the second waits behind the first.
        first, second = (asyncio.create_task(pool.run(c)) for c in (running, queued))
        await asyncio.sleep(0.5)
        pool.cancel(queued.task_id)
        pool.cancel(running.task_id)
        assert outcome(await first) == "CANCELLED" and outcome(await second) == "CANCELLED"
        assert value(await pool.run(call("pool.add", 1, 1))) == 2
        await asyncio.sleep(2.0)
        assert not (tmp_path / "running").exists() and not (tmp_path / "queued").exists()
    finally:
        await pool.close()


async def test_a_task_is_reported_started_when_its_child_starts_it(processes: Pool, tmp_path: Path) -> None:
    started: list[float] = []
    task = call("pool.sleep_then_write", str(tmp_path / "x"), 0.5, started=lambda: started.append(time.monotonic()))
    running = asyncio.create_task(processes.run(task))
    await wait_until(lambda: bool(started))
    assert value(await running) == "wrote"


async def test_children_are_replaced_after_max_tasks_and_past_max_memory() -> None:
    pool = await started_pool("processes", 1, max_tasks_per_child=2)
    try:
        pids = [value(await pool.run(call("pool.pid"))) for _ in range(5)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    finally:
        await pool.close()
    pool = await started_pool("processes", 1, max_memory_per_child=200 * 2**20)
    try:
        grown = value(await pool.run(call("pool.grow", 300)))
        assert value(await pool.run(call("pool.pid"))) != grown
    finally:
        await pool.close()


async def test_a_task_that_swallows_the_stop_is_killed_after_the_grace(processes: Pool, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    ending = await processes.run(call("pool.stubborn", str(pid_file), time_limit=0.3))
    assert error_type(ending) == "TimeLimitExceeded"
    assert value(await processes.run(call("pool.add", 1, 1))) == 2  # a new child, at once
    stubborn = int(pid_file.read_text())
    await wait_until(lambda: not _alive(stubborn), TERMINATE_GRACE_SECONDS + SLACK)


async def test_quick_tasks_go_to_a_child_in_batches_and_long_ones_are_spread() -> None:
    pool = await started_pool("processes", 4)
    try:
        for _ in range(20):  # learn that pool.pid is quick
            await pool.run(call("pool.pid"))
        quick = await asyncio.gather(*(pool.run(call("pool.pid")) for _ in range(16)))
        # Spread evenly they would run in 4 children; batched, in one (two when the machine is
        # so busy that a task of microseconds measures a hundred).
        assert len({value(e) for e in quick}) <= 2, "16 quick tasks arrived together: batched"
        began = time.monotonic()
        slow = await asyncio.gather(*(pool.run(call("pool.sleep_then_write", "/dev/null", 0.5)) for _ in range(4)))
        assert [value(e) for e in slow] == ["wrote"] * 4
        assert time.monotonic() - began < 1.5, "tasks of a name not seen yet are spread, one per child"
    finally:
        await pool.close()


async def test_a_child_that_cannot_start_is_started_again_after_a_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "parent_only_tasks.py").write_text(
        f"import os\nif os.getpid() != {os.getpid()}:\n    raise ImportError('not in a child process')\n\n"
        "def one() -> int:\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("parent_only_tasks")
    monkeypatch.setitem(sys.modules, "parent_only_tasks", module)  # removed again after the test
    pool = make_pool("processes", 1, {"one": module.one})
    await pool.start()
    try:
        assignment = worker_service_pb2.Assignment(attempt=1, task=task_pb2.Signature(id="t1", name="one"))
        running = asyncio.create_task(pool.run(TaskCall(assignment, TaskContext.of(assignment), module.one,
                                                        lambda: None)))
        await wait_until(lambda: caplog.text.count("before it was ready") >= 2, 2 * SLACK)
        assert "starting another in 0.5 s" in caplog.text and "starting another in 1 s" in caplog.text
        assert not running.done()
    finally:
        await pool.close()
    assert await running is None


async def test_a_task_defined_inside_a_function_is_refused_with_the_reason() -> None:
    def local() -> None:
        return None

    pool = make_pool("processes", 1, {"local": local})
    with pytest.raises(ValueError, match="top level of a module"):
        await pool.start()


async def test_drain_hands_back_what_has_not_started(tmp_path: Path) -> None:
    pool = await started_pool("processes", 1)
    try:
        running = asyncio.create_task(pool.run(call("pool.sleep_then_write", str(tmp_path / "a"), 0.5)))
        waiting = [asyncio.create_task(pool.run(call("pool.add", i, i))) for i in range(3)]
        await asyncio.sleep(0.2)
        pool.drain()
        assert value(await running) == "wrote"
        assert [await t for t in waiting] == [None, None, None]
    finally:
        await pool.close()


async def test_progress_from_a_child_reaches_the_task_context(processes: Pool) -> None:
    reported: list[Any] = []
    task = call("pool.progress")
    task.context._report = reported.append
    assert value(await processes.run(task)) == "ok"
    assert reported == [{"step": 1}]


async def test_closing_the_pool_ends_its_children() -> None:
    pool = await started_pool("processes", 2)
    pids = {value(await pool.run(call("pool.pid"))) for _ in range(4)}
    await pool.close()
    for pid in pids:
        await wait_until(lambda pid=pid: not _alive(pid), TERMINATE_GRACE_SECONDS + SLACK)  # type: ignore[misc]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the threads pool -----------------------------------------------------------------------------


async def test_threads_report_the_hard_limit_but_keep_the_slot_until_the_code_returns(
    threads: Pool, tmp_path: Path
) -> None:
    """What the threads pool honestly can do: the limit is reported on time, the thread runs on."""
    effect = tmp_path / "effect"
    began = time.monotonic()
    ending = await threads.run(call("pool.sleep_then_write", str(effect), 1.0, time_limit=0.3))
    assert outcome(ending) == "FAILURE" and error_type(ending) == "TimeLimitExceeded"
    assert time.monotonic() - began < 1.0
    # The one slot is still taken: the next task starts only when the sleeping thread returns,
    # and its own limit counts from then, so it is not failed for the wait.
    assert value(await threads.run(call("pool.add", 2, 3, time_limit=0.5))) == 5
    assert time.monotonic() - began >= 1.0
    assert effect.exists()


async def test_threads_raise_the_soft_limit_at_check_cancelled(threads: Pool) -> None:
    ending = await threads.run(call("pool.catch_soft_limit", 10.0, time_limit=8, soft_time_limit=0.2))
    assert value(ending) == "cleaned up"


@pytest.mark.parametrize(("name", "args", "kind"), [
    ("pool.sys_exit", (3,), "SystemExit"),
    ("pool.keyboard_interrupt", (), "KeyboardInterrupt"),
    ("pool.custom_base_exception", (), "CustomStop"),
    ("pool.async_sys_exit", (4,), "SystemExit"),
])
async def test_threads_turn_a_base_exception_into_a_failure(
    threads: Pool, name: str, args: tuple[Any, ...], kind: str
) -> None:
    ending = await threads.run(call(name, *args))
    assert outcome(ending) == "FAILURE" and error_type(ending) == kind
    assert value(await threads.run(call("pool.add", 1, 2))) == 3


async def test_a_cancel_while_waiting_for_a_slot_means_it_never_starts(threads: Pool, tmp_path: Path) -> None:
    busy = asyncio.create_task(threads.run(call("pool.sleep_then_write", str(tmp_path / "a"), 0.3)))
    waiting = call("pool.sleep_then_write", str(tmp_path / "b"), 0.0)
    pending = asyncio.create_task(threads.run(waiting))
    await asyncio.sleep(0.05)
    threads.cancel(waiting.task_id)
    assert outcome(await pending) == "CANCELLED"
    await busy
    await asyncio.sleep(0.1)
    assert not (tmp_path / "b").exists()


# -- the async pool -------------------------------------------------------------------------------


async def test_the_async_pool_stops_coroutines_at_their_limits(tmp_path: Path) -> None:
    coroutines = {name: function for name, function in TASKS.items() if name.startswith("pool.async_")}
    pool = await started_pool("async", 2, coroutines)
    try:
        ending = await pool.run(call("pool.async_catch_soft_limit", 10.0, time_limit=5, soft_time_limit=0.2))
        assert value(ending) == "cleaned up"
        effect = tmp_path / "effect"
        ending = await pool.run(call("pool.async_sleep_then_write", str(effect), 1.0, time_limit=0.2))
        assert error_type(ending) == "TimeLimitExceeded"
        await asyncio.sleep(1.0)
        assert not effect.exists()
    finally:
        await pool.close()


async def test_the_async_pool_refuses_sync_tasks() -> None:
    with pytest.raises(ValueError, match="only `async def` tasks"):
        await started_pool("async", 1)


async def test_a_soft_limit_leaves_the_tasks_own_timeouts_working() -> None:
    """The soft-limit cancellation is withdrawn, so asyncio.timeout() inside the task still works."""

    async def task() -> str:
        with contextlib.suppress(SoftTimeLimitExceeded):
            await asyncio.sleep(10)
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return "own timeout still fires"
        return "no timeout"

    work = asyncio.create_task(_await(SoftLimited(task(), 0.1)))
    await asyncio.sleep(0.05)
    work.cancel(SOFT_LIMIT)
    assert await work == "own timeout still fires"
    other = asyncio.create_task(_await(SoftLimited(asyncio.sleep(10), None)))
    await asyncio.sleep(0.01)
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


async def _await(awaitable: Any) -> Any:
    return await awaitable
