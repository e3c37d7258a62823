"""A worker given every replica's address (gRPC's own address list, `ipv4:a,b`) delivers the result it holds
when its replica dies to the other replica, while the task's lease still holds: the task is recorded once, as
its first attempt, and never runs again. A task still running when its replica dies runs on under the other.

Replica A is frozen (SIGSTOP) while its worker's task ends, so the result is sent to A and never acked; then A
is killed. A worker that knew only A would keep the result for a server that is gone: nothing would record it,
and once the lease lapsed another replica would hand the task out again (the flaky chord callback that ran twice
in tests/faults/test_replica_kill.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Client, sig
from conveyor.v1 import result_pb2
from tests.chaos.conftest import FAST_RECOVERY
from tests.e2e.test_worker_reconnect import held_once_then_done, wait_started
from tests.faults.rig import code_env
from tests.support.processes import Proc, Server, WorkerProc, log_lines, replica_target, wait_for, wait_for_workers
from tests.support.proxy import TcpProxy
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LEASE_SECONDS = float(FAST_RECOVERY["CONVEYOR_LEASE_SECONDS"])
# Long enough for a lease nobody extends to lapse and lease recovery to hand its task out again.
PAST_RECOVERY_SECONDS = 2 * LEASE_SECONDS + 2 * float(FAST_RECOVERY["CONVEYOR_RECOVER_INTERVAL_SECONDS"])


@pytest.fixture(params=["redis", "sqlite"])
def engine_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One URL for broker and backend: a private Redis, or the embedded SQLite file both replicas share."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'conveyor.db'}"
        return
    with RedisServer(tmp_path / "redis") as redis:
        yield redis.url()


def start_replicas(tmp_path: Path, procs: list[Proc], engine_url: str,
                   grace_seconds: float | None = None) -> tuple[Server, Server]:
    """Replicas A and B on one engine (`grace_seconds`: their stream grace, if not FAST_RECOVERY's)."""
    env = {**FAST_RECOVERY, **code_env()}
    if grace_seconds is not None:
        env["CONVEYOR_STREAM_GRACE_SECONDS"] = str(grace_seconds)
    replicas = []
    for name in ("replica-a", "replica-b"):
        server = Server(tmp_path, engine_url, engine_url, env=env, name=name, cwd=tmp_path, wait=False)
        procs.append(server)
        server.wait_ready()
        replicas.append(server)
    return replicas[0], replicas[1]


def start_worker(tmp_path: Path, procs: list[Proc], a_address: str, replica_a: Server, replica_b: Server) -> WorkerProc:
    """A one-slot worker given both replicas, A first (reached at `a_address`), connected to A; it logs its runs
    to executions.log."""
    worker = WorkerProc(tmp_path, replica_target(a_address, replica_b.address), concurrency=1,
                        env={"CONVEYOR_TEST_LOG": str(tmp_path / "executions.log"), **code_env()})
    procs.append(worker)
    wait_for_workers(replica_a.address, 1)
    return worker


def start_rig(tmp_path: Path, procs: list[Proc], engine_url: str) -> tuple[Server, Server, WorkerProc]:
    """Replicas A and B, and a worker given both, connected to A."""
    replica_a, replica_b = start_replicas(tmp_path, procs, engine_url)
    return replica_a, replica_b, start_worker(tmp_path, procs, replica_a.address, replica_a, replica_b)


async def test_a_result_its_dead_replica_never_acked_is_recorded_by_the_other_once(
    tmp_path: Path, procs: list[Proc], engine_url: str
) -> None:
    replica_a, replica_b, worker = start_rig(tmp_path, procs, engine_url)
    executions = tmp_path / "executions.log"

    release = tmp_path / "release"
    async with Client(replica_b.address) as client:
        task_id = (await client.submit(sig("gate", str(release)))).task_id
        # STARTED, so A has written the lease into the record (RECEIVED goes out a moment after the assignment:
        # a result for a lease the record never showed is refused as stale, and the task runs again).
        await wait_started(client, task_id)

        replica_a.signal(signal.SIGSTOP)  # A takes the result into its socket but never answers it
        release.touch()
        wait_for(lambda: f"gate[{task_id}] succeeded" in worker.output(), 10, "the task ended on the worker")
        await asyncio.sleep(0.3)  # the result is sent (results go out at once when no other task runs)
        killed_at = time.monotonic()
        replica_a.kill9()

        result = await client.get_result(task_id, wait=LEASE_SECONDS)
        recorded_after = time.monotonic() - killed_at
        assert result.state == result_pb2.TASK_STATE_SUCCESS, (
            f"the result was not recorded within the lease ({LEASE_SECONDS} s) after A died: "
            f"{result_pb2.TaskState.Name(result.state)}\n{worker.output()[-3000:]}")
        assert recorded_after < LEASE_SECONDS
        assert result.attempts == 1

        # Past the lease and a recovery round: B took A's expired claim back, found the task ended and did
        # not hand it out again.
        await asyncio.sleep(LEASE_SECONDS + 2 * float(FAST_RECOVERY["CONVEYOR_RECOVER_INTERVAL_SECONDS"]) + 1)
        runs = log_lines(executions, f"gate {task_id}")
        assert len(runs) == 1, f"the task ran {len(runs)} times: {runs}"
        final = await client.get_result(task_id)
        assert final.attempts == 1 and final.state == result_pb2.TASK_STATE_SUCCESS


async def test_a_task_running_when_its_replica_dies_runs_on_once_under_the_other(
    tmp_path: Path, procs: list[Proc], engine_url: str
) -> None:
    """Replica A is killed while its worker runs a task longer than the lease. The worker reconnects to B and
    names the task; B takes the lease over from the task's record and extends it, so after two leases and
    recovery rounds the task has still been handed out once, and its result is its first attempt's. Without
    the takeover the lease lapses and the task runs a second time."""
    replica_a, replica_b, _ = start_rig(tmp_path, procs, engine_url)
    executions = tmp_path / "executions.log"

    release = tmp_path / "release"
    async with Client(replica_b.address) as client:
        task_id = (await client.submit(sig("gate", str(release)))).task_id
        await wait_started(client, task_id)
        replica_a.kill9()
        wait_for(lambda: "holding 1 tasks another replica handed out" in replica_b.output(), 10,
                 "B took the lease over")
        await asyncio.sleep(PAST_RECOVERY_SECONDS)
        await held_once_then_done(client, task_id, release, replica_b)
    assert len(log_lines(executions, f"gate {task_id}")) == 1


async def test_a_worker_cut_off_from_its_live_replica_takes_its_task_to_the_other_and_runs_it_once(
    tmp_path: Path, procs: list[Proc], engine_url: str
) -> None:
    """The worker's link to replica A is cut (A stays up and sees the stream end); the worker reconnects to B,
    which takes the running task's lease over. When A's grace for the lost stream ends, A finds the lease taken
    over and does not hand it back: the task runs on once. Without that check A returns the task to its queue
    while it runs, and it runs again.

    A's grace is the default 2 s, which the worker's reconnect (0.2 s backoff, then A refused, then B) falls
    well within; with FAST_RECOVERY's 0.5 s a slow reconnect reached B after A had handed the task back, and
    the task rightly ran again (tests/unit/test_takeover.py covers that order)."""
    replica_a, replica_b = start_replicas(tmp_path, procs, engine_url, grace_seconds=2.0)
    with TcpProxy("127.0.0.1", replica_a.port) as link_to_a:
        start_worker(tmp_path, procs, link_to_a.address, replica_a, replica_b)
        release = tmp_path / "release"
        async with Client(replica_b.address) as client:
            task_id = (await client.submit(sig("gate", str(release)))).task_id
            await wait_started(client, task_id)
            link_to_a.cut()  # A stays up; the worker can no longer reach it and moves on to B
            wait_for(lambda: "holding 1 tasks another replica handed out" in replica_b.output(), 10,
                     "B took the lease over")
            wait_for(lambda: "taken over by another replica" in replica_a.output(), 10,
                     "A saw its worker's lease taken over")
            await asyncio.sleep(PAST_RECOVERY_SECONDS)
            await held_once_then_done(client, task_id, release, replica_a)
    assert len(log_lines(tmp_path / "executions.log", f"gate {task_id}")) == 1
