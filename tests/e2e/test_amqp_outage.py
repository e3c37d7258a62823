"""RabbitMQ rides out its own outage: a private RabbitMQ node (tests/fixtures/rabbitmq_node.py) is the broker of a
`conveyor serve` (backend: a private Redis) with two workers; while ~1,000 tasks with explicit ids and a few chords
are submitted, the node is stopped (gracefully, or killed with SIGKILL) and started again (its AMQP port stays
closed for the 10-25 s a restart takes on the machines measured).

Checked, with the fault harness of tests/faults/ (its honest client resubmits a transient failure with the same
ids): every accepted task reaches SUCCESS, every chord callback ran exactly once, no client call got UNKNOWN (a
probe lists the queues, which needs the broker, throughout the outage: it gets UNAVAILABLE), no worker stream is
aborted, and work resumes within RESUME_SECONDS of the node answering again. The measurements are printed (run
with -s to see them).

A deleted queue is a loss RabbitMQ does not come back from: the task queue is deleted mid-load (its ready and
unacked messages with it) and the server declares it again on its next use. The tasks whose messages went with
it are republished by the server's repair of lost messages (a short `repair_after_seconds` here): every
accepted task still reaches SUCCESS and every chord callback runs exactly once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path

import aio_pika
import grpc
import pytest

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.faults.harness import Load, Rig, Run, Scenario, blocking, run_scenario
from tests.faults.load import ExecutionLog
from tests.faults.row import Row
from tests.faults.scenarios import republished_by_repair
from tests.fixtures.rabbitmq_node import RabbitNode
from tests.support.processes import Proc, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# From the node answering AMQP again to the first task a worker starts.
RESUME_SECONDS = 2.0
PROBE_EVERY_SECONDS = 0.1
# Submitted faster (~170 tasks/s) than the workers run them (2 x 4 slots, 0.1 s each: 80/s), so a backlog sits in
# RabbitMQ when it stops: the first tasks after the restart are there at once, and their start times the
# resumption. What is submitted while RabbitMQ is away is accepted into the outbox and published by the server's
# reconciler (after its grace), so the run ends some 10 s after the node is back.
LOAD = Load(tasks=1000, chords=5, members=10, task_seconds=0.1, submit_seconds=6.0, concurrency=4,
            stuck_after_seconds=90.0)
# The repair of lost messages acts after 3 s without a sign of life (the rig's servers heartbeat every 0.5 s).
QUICK_REPAIR_SECONDS = "3"
# A server's log line for a submission whose publish failed and is sent again (core/submission.py).
PUBLISH_RETRIED = re.compile(r"publishing submission ob-\w+ failed")


class RabbitRestart(Scenario):
    name = "rabbitmq-restart"

    def __init__(self, node: RabbitNode, how: str, at_fraction: float = 0.5) -> None:
        self.node = node
        self.how = how
        self.at_fraction = at_fraction
        verb = "stopped" if how == "stop" else "killed (SIGKILL)"
        self.description = f"the broker's own RabbitMQ node {verb} mid-load and started again"
        self.address = ""
        self.stopping_at = self.down_at = self.back_at = 0.0  # wall clock, as in the workers' log
        self.probe_codes: Counter[str] = Counter()
        self.probe_errors: list[str] = []
        self.probe_ok_at: list[float] = []
        # (worker id, connected at) of every worker stream before the outage and after it.
        self.streams_before: set[tuple[str, int]] = set()
        self.streams_after: set[tuple[str, int]] = set()

    def setup(self, rig: Rig) -> None:
        backend = rig.redis("backend-redis")
        server = rig.server(f"{self.node.url}?prefix={rig.prefix('q')}", backend.url(prefix=rig.prefix("r")))
        self.address = server.address
        for i in range(rig.load.workers):
            rig.worker(server.address, name=f"worker-{i}")
        rig.wait_for_workers(server.address, rig.load.workers)

    async def inject(self, run: Run) -> None:
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, 60, "load submitted")
        self.streams_before = await self._streams()
        run.fault_began(self.description)
        self.stopping_at = time.time()
        probing = asyncio.create_task(self._probe())
        try:
            await blocking(self.node.stop if self.how == "stop" else self.node.kill)
            self.down_at = time.time()
            await blocking(self.node.start)  # returns once the node answers AMQP
            self.back_at = time.time()
            run.fault_over()
            await asyncio.sleep(1.0)
            self.streams_after = await self._streams()
        finally:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
        run.notes.append(f"RabbitMQ stopped in {self.down_at - self.stopping_at:.1f} s, its port closed for "
                         f"{self.back_at - self.down_at:.1f} s; probe: {dict(self.probe_codes)}")

    async def _streams(self) -> set[tuple[str, int]]:
        async with grpc.aio.insecure_channel(self.address) as channel:
            reply = await admin_service_pb2_grpc.AdminServiceStub(channel).ListWorkers(
                admin_service_pb2.ListWorkersRequest(), timeout=5)
        return {(w.worker_id, w.connected_at.ToNanoseconds()) for w in reply.workers}

    async def _probe(self) -> None:
        """ListQueues asks the broker for each queue's counts: the client must get UNAVAILABLE, never UNKNOWN."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            while True:
                try:
                    await admin.ListQueues(admin_service_pb2.ListQueuesRequest(), timeout=5)
                    self.probe_codes["OK"] += 1
                    self.probe_ok_at.append(time.time())
                except grpc.aio.AioRpcError as exc:
                    self.probe_codes[exc.code().name] += 1
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        self.probe_errors.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(PROBE_EVERY_SECONDS)


def resumption(log_path: Path, scenario: RabbitRestart) -> tuple[float, int, int]:
    """(seconds from the node answering to the first task started after it, executions while it was stopping
    or down, executions in the second after it answered)."""
    runs = ExecutionLog(log_path).refresh()
    after = sorted(e.at for e in runs if e.at >= scenario.back_at)
    during = sum(1 for e in runs if scenario.stopping_at <= e.at < scenario.back_at)
    assert after, "no task ran after RabbitMQ came back"
    return after[0] - scenario.back_at, during, sum(1 for at in after if at < scenario.back_at + 1.0)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_rabbitmq_restart_mid_load_loses_nothing_and_work_resumes_within_2_s(
    rabbitmq_node: RabbitNode, tmp_path: Path, procs: list[Proc], how: str
) -> None:
    scenario = RabbitRestart(rabbitmq_node, how)
    row: Row = await run_scenario(scenario, tmp_path, LOAD, procs=procs)
    resumed, during, first_second = resumption(tmp_path / "executions.log", scenario)
    answered = min((at for at in scenario.probe_ok_at if at >= scenario.back_at), default=None)
    report = row.report()
    print(f"\n{scenario.description}\n{report}\nwork resumed {resumed:.2f} s after RabbitMQ answered again "
          f"({first_second} tasks started in the first second; {during} ran while it was stopping or down); "
          "the server answered ListQueues again after "
          + ("never" if answered is None else f"{answered - scenario.back_at:.2f} s"))

    assert row.fault_error == "", report
    assert row.submitted > 0 and row.refused == 0, report
    assert row.lost == 0 and row.stuck == 0, f"accepted tasks not SUCCESS:\n{report}"
    assert row.callbacks_fired == row.callbacks_expected > 0, f"chord callbacks never ran:\n{report}"
    assert row.callback_extra == 0, f"chord callbacks ran more than once:\n{report}"
    assert row.ok, report
    # Clients saw the outage as UNAVAILABLE (retry later), never as UNKNOWN (a bug).
    assert scenario.probe_errors == [], f"ListQueues got {scenario.probe_errors[:5]}\n{report}"
    assert scenario.probe_codes["UNAVAILABLE"] > 0, f"the probe never saw the outage: {scenario.probe_codes}"
    assert not [n for n in row.notes if n.startswith("client retries") and "UNKNOWN" in n], report
    # No worker stream was aborted: the same streams before and after.
    assert scenario.streams_before and scenario.streams_after == scenario.streams_before, report
    assert resumed <= RESUME_SECONDS, f"work resumed only {resumed:.2f} s after RabbitMQ was back\n{report}"


class RabbitQueueDeleted(Scenario):
    name = "rabbitmq-queue-deleted"
    description = "the task queue deleted in RabbitMQ mid-load, its ready and unacked messages with it"

    def __init__(self, node: RabbitNode, at_fraction: float = 0.5) -> None:
        self.node = node
        self.at_fraction = at_fraction
        self.queue_name = ""
        self.deleted = 0  # ready messages RabbitMQ dropped with the queue
        self.server: Server | None = None

    def setup(self, rig: Rig) -> None:
        backend = rig.redis("backend-redis")
        self.queue_name = f"{rig.prefix('q')}.q.{rig.queue}"  # the broker's `<prefix>.q.<queue>`
        self.server = rig.server(f"{self.node.url}?prefix={rig.prefix('q')}", backend.url(prefix=rig.prefix("r")))
        for i in range(rig.load.workers):
            rig.worker(self.server.address, name=f"worker-{i}")
        rig.wait_for_workers(self.server.address, rig.load.workers)

    async def inject(self, run: Run) -> None:
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, 60, "load submitted")
        run.fault_began(self.description)
        connection = await aio_pika.connect(self.node.url)
        try:
            channel = await connection.channel()
            deleted = await channel.queue_delete(self.queue_name)
            self.deleted = int(deleted.message_count or 0)
        finally:
            await connection.close()
        run.fault_over()
        run.notes.append(f"deleted {self.queue_name} with {self.deleted} ready messages")


async def test_a_rabbitmq_queue_deleted_mid_load_is_repaired_and_loses_nothing(
    rabbitmq_node: RabbitNode, tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_REPAIR_AFTER_SECONDS", QUICK_REPAIR_SECONDS)  # the rig's servers inherit it
    scenario = RabbitQueueDeleted(rabbitmq_node)
    row: Row = await run_scenario(scenario, tmp_path, LOAD, procs=procs)
    assert scenario.server is not None
    republished = republished_by_repair(scenario.server.output())
    report = row.report()
    print(f"\n{scenario.description}\n{report}\nthe repair republished {republished} tasks")

    assert row.fault_error == "", report
    assert scenario.deleted > 0, f"the queue was empty when deleted: the test proved nothing\n{report}"
    assert row.submitted > 0 and row.refused == 0, report
    assert row.lost == 0 and row.stuck == 0, f"accepted tasks not SUCCESS:\n{report}"
    assert row.callbacks_fired == row.callbacks_expected > 0, f"chord callbacks never ran:\n{report}"
    assert row.callback_extra == 0, f"chord callbacks ran more than once:\n{report}"
    # The deleted count is of messages, and a task may have had two: a publish that RabbitMQ
    # nacked is sent again whole (its batch), so the queue can hold copies of tasks whose first
    # message it took. The repair republishes tasks, once each.
    copies = LOAD.batch * len(PUBLISH_RETRIED.findall(scenario.server.output()))
    assert republished > 0 and republished >= scenario.deleted - copies, f"{report}\n{copies} copies allowed"
