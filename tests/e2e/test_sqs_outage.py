"""SQS as the broker when things go wrong, end to end: a server and workers as real processes on
moto (in a process of its own, on a port of its own) and a Redis backend (a prefix of its own).

- The SQS endpoint goes away mid-load and comes back empty (a restarted moto loses its queues, as
  a deleted queue or a region failover would): while it is away, calls that need the broker are
  UNAVAILABLE, never UNKNOWN, and submits are still accepted (published later); once it is back,
  the server creates its queues again and work resumes within 2 s (what it accepted during the
  outage runs), and new submits run. Tasks whose messages vanished with the old queues are republished by the
  server's repair of lost messages (a short `repair_after_seconds` here): every accepted task
  ends SUCCESS, each chord callback runs exactly once, none is lost; the test prints how many
  the repair republished.
- A worker is killed with SIGKILL: the server gives its tasks back when its stream drops (after
  the stream grace), so they are dispatched again within seconds, not after a 30 s lease.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chord, group, sig, state_name
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    result_pb2,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.faults.scenarios import republished_by_repair
from tests.fixtures.broker_services import drop_redis_prefix, ensure_redis, with_prefix
from tests.fixtures.moto_process import QUICK_REPAIR_ENV, MotoProcess
from tests.support.processes import (
    RUN_ID,
    Proc,
    Server,
    WorkerProc,
    eventually,
    log_lines,
    wait_for,
    wait_for_workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TASKS = 500
TASK_SECONDS = 0.02
CHORDS = 3
MEMBERS = 10
OUTAGE_SECONDS = 10.0  # the endpoint away this long (issue #22: 10 s)
# From the endpoint's return (queues gone) to the first task that succeeded after it: issue #22's bar.
# A failed fetch is retried after a jittered backoff capped at 0.5 s (it was a fixed 0.5 s pause, and a
# loaded CI run once took 2.4 s); measured 0.7-1.0 s, also with other tests running beside.
RESUME_SECONDS = 2.0
# How long the tasks submitted around the outage may take to finish.
FINISH_SECONDS = 60.0
# How long the repair may take to bring back what the lost queues held.
REPAIR_SECONDS = 90.0
# Late duplicates (a callback run twice) would show up within this long.
SETTLE_SECONDS = 2.0
TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}

@pytest.fixture
def prefix(procs: list[Proc]) -> Iterator[str]:
    """SQS queue and Redis key prefix of this test; its Redis keys are dropped afterwards."""
    chosen = f"{RUN_ID}-sqo{uuid.uuid4().hex[:6]}"
    yield chosen
    for proc in reversed(procs):  # first, or a server still running writes keys after the drop
        proc.stop()
    drop_redis_prefix(ensure_redis(), chosen)


@pytest.fixture
def moto(tmp_path: Path, procs: list[Proc]) -> MotoProcess:
    started = MotoProcess(tmp_path, procs)
    started.start()
    return started


class Calls:
    """Raw gRPC calls whose status codes the test collects (the SDK would retry UNAVAILABLE)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self.codes: Counter[str] = Counter()
        self.accepted: list[str] = []
        self.slowest = 0.0  # seconds, of a call that failed

    async def submit(self, task_id: str) -> None:
        signature = task_pb2.Signature(id=task_id, name="add", args=[task_pb2.Value(int_value=1),
                                                                     task_pb2.Value(int_value=2)])
        try:
            await self.tasks.Submit(task_service_pb2.SubmitRequest(task=signature), timeout=15)
        except grpc.aio.AioRpcError as refused:
            self.codes[f"submit {refused.code().name}"] += 1
        else:
            self.codes["submit OK"] += 1
            self.accepted.append(task_id)

    async def list_queues(self) -> None:
        started = time.monotonic()
        try:
            await self.admin.ListQueues(admin_service_pb2.ListQueuesRequest(), timeout=15)
        except grpc.aio.AioRpcError as refused:
            self.codes[f"list_queues {refused.code().name}"] += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
        else:
            self.codes["list_queues OK"] += 1


async def states(client: Client, task_ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for offset in range(0, len(task_ids), 100):
        chunk = task_ids[offset:offset + 100]
        results = await asyncio.gather(*(client.get_result(task_id) for task_id in chunk))
        found.update((task_id, state_name(result.state)) for task_id, result in zip(chunk, results, strict=True))
    return found


async def first_success(client: Client, task_ids: list[str], since: float, seconds: float) -> float:
    """Seconds from `since` (monotonic) until one of `task_ids` has succeeded."""
    while time.monotonic() - since < seconds:
        if "SUCCESS" in (await states(client, task_ids)).values():
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    raise AssertionError(f"none of {len(task_ids)} tasks succeeded within {seconds} s of the endpoint's return")


async def all_succeed(client: Client, task_ids: list[str], seconds: float) -> None:
    async def succeeded() -> bool:
        return set((await states(client, task_ids)).values()) == {"SUCCESS"}

    deadline = time.monotonic() + seconds
    while not await succeeded():
        assert time.monotonic() < deadline, f"not all SUCCESS: {Counter((await states(client, task_ids)).values())}"
        await asyncio.sleep(0.5)


async def test_sqs_queues_lost_in_an_outage_are_created_again_and_work_resumes(
    tmp_path: Path, procs: list[Proc], moto: MotoProcess, prefix: str
) -> None:
    log_file = tmp_path / "events.log"
    log_file.touch()
    server = Server(tmp_path, moto.broker_url(prefix), with_prefix(ensure_redis(), prefix), env=QUICK_REPAIR_ENV,
                    wait=False)
    procs.append(server)
    server.wait_ready()
    procs.extend(WorkerProc(tmp_path, server.address, concurrency=8, env={"CONVEYOR_TEST_LOG": str(log_file)},
                            name=f"worker-{i}") for i in range(2))
    wait_for_workers(server.address, 2)

    async with Client(server.address) as client, grpc.aio.insecure_channel(server.address) as channel:
        calls = Calls(channel)
        task_ids = [f"{prefix}-t{i}" for i in range(TASKS)]
        for offset in range(0, TASKS, 100):
            await client.submit_batch(sig("chaos", i, TASK_SECONDS).set(id=task_ids[i])
                                      for i in range(offset, min(offset + 100, TASKS)))
        chords = [await client.submit(chord(group(sig("member", j) for j in range(MEMBERS)), sig("collect")))
                  for _ in range(CHORDS)]
        await eventually(lambda: len(log_lines(log_file, "chaos ")) >= TASKS // 4, 60, "a quarter of the tasks ran")
        assert len(log_lines(log_file, "chaos ")) < TASKS, "the outage came too late to hit the load"

        queues = moto.queue_names(prefix)
        assert len(queues) == 4, queues  # three priority bands and the delay queue
        moto.kill()
        outage_began = time.monotonic()
        during = [f"{prefix}-during{i}" for i in range(5)]
        for task_id in during:
            await calls.submit(task_id)
            await calls.list_queues()
        ran_by_then = len(log_lines(log_file, "chaos "))
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_began)))
        moto.start()  # on the same port, with no queues: it answers from here on
        back = time.monotonic()

        # The server finds its queues gone, creates them again (bands and delay queue), publishes what it
        # accepted meanwhile, and work resumes within seconds.
        assert calls.accepted, "no submit was accepted during the outage: nothing shows when work resumes"
        resumed = await first_success(client, calls.accepted, back, RESUME_SECONDS * 5)
        after = [f"{prefix}-after{i}" for i in range(20)]
        for task_id in after:
            await calls.submit(task_id)
        await eventually(lambda: moto.queue_names(prefix) == queues, 30, f"the SQS queues {queues} created again")
        await all_succeed(client, after, FINISH_SECONDS)
        await all_succeed(client, calls.accepted, FINISH_SECONDS)  # accepted in the outage: published now
        await calls.list_queues()

        # What the lost queues held is republished by the repair of lost messages.
        callback_ids = [c.task_id for c in chords]
        await all_succeed(client, task_ids + callback_ids, REPAIR_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)
        final = await states(client, task_ids)
        callbacks = await states(client, callback_ids)

    summary = Counter(final.values())
    republished = republished_by_repair(server.output())
    collected = Counter(line.split(" ")[1] for line in log_lines(log_file, "collect "))
    runs = Counter(Counter(line.split(" ")[1] for line in log_lines(log_file, "chaos ")).values())
    print(f"outage {OUTAGE_SECONDS:.0f} s after {ran_by_then} of {TASKS} tasks ran; work resumed {resumed:.2f} s "
          f"after the endpoint's return; calls: {dict(calls.codes)} "
          f"(failed within {calls.slowest:.1f} s); "
          f"tasks accepted before it now {dict(summary)} ({republished} republished by the repair; runs per "
          f"task {dict(sorted(runs.items()))}); "
          f"chord callbacks {dict(Counter(callbacks.values()))}, runs {dict(Counter(collected.values()))}; "
          f"SQS queues {moto.queue_names(prefix)}")
    assert not [code for code in calls.codes if code.endswith("UNKNOWN")], calls.codes
    # During the outage: what needs the broker now is UNAVAILABLE; a submit is accepted or UNAVAILABLE.
    assert calls.codes["list_queues UNAVAILABLE"] == len(during), calls.codes
    assert calls.slowest < 5, f"a call took {calls.slowest:.1f} s to fail: an unreachable endpoint must fail fast"
    assert calls.codes["submit OK"] + calls.codes["submit UNAVAILABLE"] == len(during) + len(after), calls.codes
    assert summary == Counter({"SUCCESS": TASKS}), f"lost: {summary}"
    assert republished > 0, "the outage lost no queued message: the test proved nothing about repair"
    assert resumed <= RESUME_SECONDS, f"work resumed {resumed:.2f} s after the endpoint came back"
    assert collected == Counter({task_id: 1 for task_id in callback_ids}), f"chord callback runs: {collected}"
    assert "creating them again" in server.output()
    assert "Traceback" not in server.output()


def worker_id(worker: WorkerProc) -> str:
    found = re.search(r"connected to \S+ \(replica \S+\) as (\S+)", worker.output())
    assert found, worker.output()
    return found.group(1)


async def test_sqs_a_killed_workers_tasks_are_dispatched_again_within_seconds(
    tmp_path: Path, procs: list[Proc], moto: MotoProcess, prefix: str
) -> None:
    # The server's defaults: a 30 s lease, heartbeats every 5 s, a 2 s grace after a stream drops.
    server = Server(tmp_path, moto.broker_url(prefix), with_prefix(ensure_redis(), prefix), wait=False)
    procs.append(server)
    server.wait_ready()
    log_file = tmp_path / "events.log"
    log_file.touch()
    workers = [WorkerProc(tmp_path, server.address, concurrency=4, prefetch=2,
                          env={"CONVEYOR_TEST_LOG": str(log_file)}, name=f"worker-{i}") for i in range(3)]
    procs.extend(workers)
    wait_for_workers(server.address, 3)
    victim = workers[0]
    wait_for(lambda: "connected to" in victim.output(), 20, "the victim's id in its log")
    victim_id = worker_id(victim)

    async with Client(server.address) as client:
        submitted = await client.submit_batch(sig("chaos", i, 0.5) for i in range(120))
        task_ids = [s.task_id for s in submitted]
        await eventually(lambda: sum(f"pid={victim.pid}" in line for line in log_lines(log_file, "chaos ")) >= 4,
                         60, "the victim is running tasks")
        victim.kill9()
        killed_at = time.time()
        await all_succeed(client, task_ids, 120)
        results = await asyncio.gather(*(client.get_result(task_id) for task_id in task_ids))

    back: list[float] = []
    for result in results:
        received = [(t.at.seconds + t.at.nanos / 1e9, t.worker_id) for t in result.history
                    if t.state == result_pb2.TASK_STATE_RECEIVED]
        if any(worker == victim_id for _, worker in received):
            again = [at for at, worker in received if worker != victim_id and at > killed_at]
            if again:
                back.append(min(again) - killed_at)
        terminal = [t for t in result.history if t.state in TERMINAL]
        assert len(terminal) == 1, f"{result.task_id}: {len(terminal)} terminal transitions"
    runs = Counter(Counter(line.split(" ")[1] for line in log_lines(log_file, "chaos ")).values())
    print(f"{len(back)} tasks the killed worker held were dispatched again after: median "
          f"{statistics.median(back):.1f} s, max {max(back):.1f} s; runs per task {dict(sorted(runs.items()))}")
    assert back, "the victim held no task when it was killed"
    # Given back when its stream dropped (2 s grace), not when a 30 s lease ran out.
    assert statistics.median(back) < 8, back
    assert max(back) < 20, back
