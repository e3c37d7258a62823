"""Repair of lost messages, end to end: a `conveyor serve` on Redis (a key prefix of its own for the
broker and one for the backend) and workers as real processes.

- Mid-load, the broker's keys for the queue are deleted (only this test's prefix, as a flushed or
  restarted Redis without its data would lose them): the ready, delayed and leased messages are
  gone while their tasks stay PENDING or RECEIVED. The server's reconciler (a short
  `repair_after_seconds` here) republishes them: every accepted task ends SUCCESS with one
  terminal transition, and each chord callback runs exactly once.
- `conveyor repair --dry-run` (the CLI as its own process) lists what a flushed queue lost without
  changing anything, and leaves a backlog alone; `conveyor repair` then republishes it, and a
  worker started afterwards runs every task once.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor import Client, chord, group, sig, state_name
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2
from tests.fixtures.broker_services import drop_redis_prefix, ensure_redis, with_prefix
from tests.support.processes import (
    RUN_ID,
    Proc,
    Server,
    WorkerProc,
    eventually,
    log_lines,
    run_cli,
    wait_for_workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

QUEUE = "default"
TASKS = 600
# 2 workers x 4 slots at 0.05 s a task: a few seconds of backlog for the flush to meet.
TASK_SECONDS = 0.05
CONCURRENCY = 4
CHORDS = 3
MEMBERS = 10
# The repair looks for tasks with no sign of life for 3 s (heartbeats every 0.5 s renew leases).
QUICK_REPAIR = {"CONVEYOR_REPAIR_AFTER_SECONDS": "3", "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "0.5",
                "CONVEYOR_RECONCILE_INTERVAL_SECONDS": "0.5"}
# The reconciler's own repair stays out of the way: only `conveyor repair` acts.
MANUAL_REPAIR = {"CONVEYOR_REPAIR_AFTER_SECONDS": "3600"}
FINISH_SECONDS = 90.0
# Late duplicates (a callback run twice) would show up within this long.
SETTLE_SECONDS = 2.0
TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}
REPAIRED = re.compile(r"repair of lost messages: republished (\d+) tasks")


@pytest.fixture
def prefix(procs: list[Proc]) -> Iterator[str]:
    """Redis key prefix of this test (broker: `<prefix>-q`, backend: `<prefix>-r`); dropped afterwards."""
    chosen = f"{RUN_ID}-rep{uuid.uuid4().hex[:6]}"
    yield chosen
    for proc in reversed(procs):  # first, or a server still running writes keys after the drop
        proc.stop()
    drop_redis_prefix(ensure_redis(), chosen)


def start_server(tmp_path: Path, procs: list[Proc], prefix: str, env: dict[str, str]) -> Server:
    redis = ensure_redis()
    server = Server(tmp_path, with_prefix(redis, f"{prefix}-q"), with_prefix(redis, f"{prefix}-r"), env=env,
                    wait=False)
    procs.append(server)
    server.wait_ready()
    return server


def start_workers(tmp_path: Path, procs: list[Proc], server: Server, log_file: Path, count: int) -> None:
    procs.extend(WorkerProc(tmp_path, server.address, concurrency=CONCURRENCY, env={"CONVEYOR_TEST_LOG": str(log_file)},
                            name=f"worker-{i}") for i in range(count))
    wait_for_workers(server.address, count)


def flush_queue(prefix: str) -> int:
    """Delete every broker key of the queue (its messages, leases, delays); returns how many."""
    return drop_redis_prefix(ensure_redis(), f"{prefix}-q:{{{QUEUE}}}")


async def submit_load(client: Client, prefix: str, tasks: int, chords: int) -> tuple[list[str], list[str]]:
    """`tasks` lone tasks and `chords` chords of MEMBERS members, all with ids chosen here; returns
    (every task id, the chord callback ids)."""
    lone = [f"{prefix}-t{i}" for i in range(tasks)]
    for offset in range(0, tasks, 100):
        await client.submit_batch(sig("chaos", i, TASK_SECONDS).set(id=lone[i])
                                  for i in range(offset, min(offset + 100, tasks)))
    members: list[str] = []
    callbacks: list[str] = []
    for c in range(chords):
        ids = [f"{prefix}-c{c}m{j}" for j in range(MEMBERS)]
        callback = f"{prefix}-c{c}cb"
        await client.submit(chord(group(sig("chaos", 1000 + j, TASK_SECONDS).set(id=m) for j, m in enumerate(ids)),
                                  sig("collect").set(id=callback)))
        members += ids
        callbacks.append(callback)
    return lone + members + callbacks, callbacks


async def results(client: Client, task_ids: Sequence[str]) -> list[result_pb2.TaskResult]:
    found: list[result_pb2.TaskResult] = []
    for offset in range(0, len(task_ids), 100):
        found += await asyncio.gather(*(client.get_result(t) for t in task_ids[offset:offset + 100]))
    return found


async def all_succeed(client: Client, task_ids: Sequence[str], seconds: float) -> list[result_pb2.TaskResult]:
    deadline = time.monotonic() + seconds
    while True:
        found = await results(client, task_ids)
        states = Counter(state_name(r.state) for r in found)
        if states == Counter({"SUCCESS": len(task_ids)}):
            return found
        assert time.monotonic() < deadline, f"not all SUCCESS after {seconds:.0f} s: {dict(states)}"
        await asyncio.sleep(0.5)


def executions(log_file: Path, kind: str) -> Counter[str]:
    """Runs per task id of the workload's `chaos` or `collect` tasks."""
    return Counter(line.split(" ")[1] for line in log_lines(log_file, f"{kind} "))


async def test_a_queue_flushed_from_redis_mid_load_is_repaired_and_every_task_ends_once(
    tmp_path: Path, procs: list[Proc], prefix: str
) -> None:
    log_file = tmp_path / "events.log"
    log_file.touch()
    server = start_server(tmp_path, procs, prefix, QUICK_REPAIR)
    start_workers(tmp_path, procs, server, log_file, 2)

    async with Client(server.address) as client:
        task_ids, callbacks = await submit_load(client, prefix, TASKS, CHORDS)
        await eventually(lambda: sum(executions(log_file, "chaos").values()) >= TASKS // 4, 60,
                         "a quarter of the tasks ran")
        dropped = await asyncio.to_thread(flush_queue, prefix)
        ran_by_then = sum(executions(log_file, "chaos").values())
        assert dropped > 0 and ran_by_then < TASKS, "the flush came too late to hit the load"
        later, _ = await submit_load(client, f"{prefix}-after", 20, 0)

        final = await all_succeed(client, task_ids + later, FINISH_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)
        final = await results(client, task_ids + later)

    republished = sum(int(n) for n in REPAIRED.findall(server.output()))
    runs = executions(log_file, "chaos")
    collected = executions(log_file, "collect")
    print(f"flushed {dropped} broker keys after {ran_by_then} of {TASKS} tasks ran; the repair republished "
          f"{republished}; runs per task {dict(sorted(Counter(runs.values()).items()))}; "
          f"chord callback runs {dict(Counter(collected.values()))}")
    assert Counter(state_name(r.state) for r in final) == Counter({"SUCCESS": len(task_ids) + len(later)})
    ended_twice = [r.task_id for r in final if sum(t.state in TERMINAL for t in r.history) != 1]
    assert ended_twice == [], f"tasks with more than one terminal transition: {ended_twice[:5]}"
    assert republished > 0, "the flush lost no queued message: the test proved nothing about repair"
    assert collected == Counter({callback: 1 for callback in callbacks}), f"chord callback runs: {collected}"
    assert not [t for t in task_ids if t not in runs and t not in callbacks], "a task ended without running"
    assert "Traceback" not in server.output()


def dry_run_checked(address: str) -> int:
    """How many live tasks `RepairTasks` (dry run, any age) looks at now."""
    with grpc.insecure_channel(address) as channel:
        reply = admin_service_pb2_grpc.AdminServiceStub(channel).RepairTasks(
            admin_service_pb2.RepairTasksRequest(older_than=Duration(), dry_run=True), timeout=10)
    return reply.checked


async def test_conveyor_repair_lists_then_republishes_what_a_flushed_queue_lost(
    tmp_path: Path, procs: list[Proc], prefix: str
) -> None:
    log_file = tmp_path / "events.log"
    log_file.touch()
    server = start_server(tmp_path, procs, prefix, MANUAL_REPAIR)
    async with Client(server.address) as client:
        task_ids, callbacks = await submit_load(client, prefix, 40, 1)
    queued = len(task_ids) - len(callbacks)  # a chord's callback is published only once its members end
    await eventually(lambda: dry_run_checked(server.address) == queued, 20, "the submitted tasks in the index")

    backlog = await asyncio.to_thread(run_cli, server.address, "repair", "--older-than", "0s", "--dry-run")
    assert backlog.splitlines() == [
        f"would republish 0 tasks ({queued} live tasks checked, {queued} still queued) "
        "(--force republishes those too)"
    ], "every message is still in its queue: nothing looks lost"

    assert await asyncio.to_thread(flush_queue, prefix) > 0
    listed = (await asyncio.to_thread(run_cli, server.address, "repair", "--older-than", "0s", "--dry-run"))
    lines = listed.splitlines()
    assert lines[-1] == f"would republish {queued} tasks ({queued} live tasks checked)"
    assert sorted(line.split()[0] for line in lines[:-1]) == sorted(set(task_ids) - set(callbacks))
    assert {tuple(line.split()[1:4]) for line in lines[:-1]} == {("chaos", QUEUE, "PENDING")}
    assert dry_run_checked(server.address) == queued, "the dry run changed nothing"

    repaired = await asyncio.to_thread(run_cli, server.address, "repair", "--older-than", "0s", "--queue", QUEUE)
    assert repaired.splitlines()[-1] == f"republished {queued} tasks ({queued} live tasks checked)"

    start_workers(tmp_path, procs, server, log_file, 1)
    async with Client(server.address) as client:
        await all_succeed(client, task_ids, FINISH_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)
    assert executions(log_file, "chaos") == Counter({t: 1 for t in task_ids if t not in callbacks})
    assert executions(log_file, "collect") == Counter({callback: 1 for callback in callbacks})
