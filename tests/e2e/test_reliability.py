"""Reliability acceptance (issue #4): leases, retries and backoff, ETA, cancellation, time limits,
idempotency keys, dead letters and graceful drain, with real server and worker processes.

Misbehaving workers (one that drops its stream, one that hangs, one that never reports) speak
the raw protocol from the test's own event loop (RawWorker below).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import json
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import pytest

from conveyor import Client, RetryPolicy, chain, group, sig, state_name
from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    result_pb2,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from conveyor.values import to_value
from tests.support.processes import (
    Proc,
    Server,
    WorkerProc,
    connected_workers,
    eventually,
    log_lines,
    run_cli,
    wait_for_workers,
)

pytestmark = pytest.mark.timeout(120)

# Short leases and graces, so that faults recover within a second or two.
FAST = {
    "CONVEYOR_LEASE_SECONDS": "2",
    "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "0.5",
    "CONVEYOR_STREAM_GRACE_SECONDS": "0.3",
    "CONVEYOR_RECOVER_INTERVAL_SECONDS": "0.3",
}
# How much later than its due time a delayed attempt may start (dispatch and a worker's pickup).
LATENESS = 0.6
# Clock granularity between the worker's time.time() and the delays the server computes.
EARLY = 0.02
TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED}


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.log"
    path.touch()
    return path


@pytest.fixture
def server(tmp_path: Path, procs: list[Proc]) -> Server:
    db = tmp_path / "conveyor.db"
    started = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", env=FAST, wait=False)
    procs.append(started)
    started.wait_ready()
    return started


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with Client(server.address) as c:
        yield c


StartWorker = Callable[..., WorkerProc]


@pytest.fixture
def start_worker(tmp_path: Path, procs: list[Proc], server: Server, log_file: Path) -> StartWorker:
    """Starts a `tests.e2e.workload` worker process and waits until the server sees it."""

    def start(queues: Sequence[str] = ("default",), concurrency: int = 4, drain_seconds: float = 30.0) -> WorkerProc:
        connected = len(_admin_call(server.address, "ListWorkers").workers)
        worker = WorkerProc(tmp_path, server.address, queues=queues, concurrency=concurrency,
                            env={"CONVEYOR_TEST_LOG": str(log_file), "CONVEYOR_TEST_DRAIN_SECONDS": str(drain_seconds)})
        procs.append(worker)
        wait_for_workers(server.address, connected + 1)
        return worker

    return start


def _admin_call(address: str, method: str, request: object = None) -> admin_service_pb2.ListWorkersResponse:
    with grpc.insecure_channel(address) as channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        reply: admin_service_pb2.ListWorkersResponse = getattr(stub, method)(
            request or admin_service_pb2.ListWorkersRequest(), timeout=10
        )
        return reply


def terminal_states(result: result_pb2.TaskResult) -> list[str]:
    return [state_name(t.state) for t in result.history if t.state in TERMINAL]


# -- a worker speaking the raw protocol ---------------------------------------------------------

class RawWorker:
    """One WorkerService.Connect stream driven by hand: the test decides what is sent and when.

    It sends no heartbeats unless `heartbeat` is set, and never runs anything by itself.
    """

    def __init__(self, address: str, queue: str, window: int = 1, heartbeat: float = 0.0) -> None:
        self.address = address
        self.hello = worker_service_pb2.Hello(language="python-raw", queues=[queue], max_in_flight=window)
        self.heartbeat = heartbeat
        self.worker_id = ""
        self._inbox: defaultdict[str, asyncio.Queue[worker_service_pb2.ConnectResponse]] = defaultdict(asyncio.Queue)
        self._outbox: asyncio.Queue[worker_service_pb2.ConnectRequest | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel = grpc.aio.insecure_channel(address)

    async def __aenter__(self) -> RawWorker:
        stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self._outbox.put_nowait(worker_service_pb2.ConnectRequest(hello=self.hello))
        self._call = stub.Connect(self._requests())
        self._tasks.append(asyncio.create_task(self._read()))
        self.worker_id = (await self.next("welcome")).welcome.worker_id
        if self.heartbeat:
            self._tasks.append(asyncio.create_task(self._beat()))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Drop the stream without a goodbye (as a crashed or disconnected worker would)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._call.cancel()
        await self._channel.close()

    async def _requests(self) -> AsyncIterator[worker_service_pb2.ConnectRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def _read(self) -> None:
        try:
            async for message in self._call:
                self._inbox[message.WhichOneof("message") or ""].put_nowait(message)
        except grpc.aio.AioRpcError:
            return

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.send(worker_service_pb2.ConnectRequest(heartbeat=worker_service_pb2.Heartbeat()))

    def send(self, message: worker_service_pb2.ConnectRequest) -> None:
        self._outbox.put_nowait(message)

    async def next(self, kind: str, within: float = 15.0) -> worker_service_pb2.ConnectResponse:
        """The next server message of one kind (welcome, assignments, acks, cancel, drain)."""
        return await asyncio.wait_for(self._inbox[kind].get(), within)

    async def assignment(self, within: float = 15.0) -> worker_service_pb2.Assignment:
        (item,) = (await self.next("assignments", within)).assignments.items
        return item

    async def report(
        self, outcomes: Sequence[worker_service_pb2.TaskOutcome]
    ) -> dict[str, worker_service_pb2.AckStatus.ValueType]:
        """Send results in one message; returns the server's ack status per task id."""
        self.send(worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=outcomes)))
        statuses: dict[str, worker_service_pb2.AckStatus.ValueType] = {}
        while len(statuses) < len(outcomes):
            statuses.update((ack.task_id, ack.status) for ack in (await self.next("acks")).acks.acks)
        return statuses


def success(assignment: worker_service_pb2.Assignment, value: object) -> worker_service_pb2.TaskOutcome:
    return worker_service_pb2.TaskOutcome(task_id=assignment.task.id, lease_token=assignment.lease_token,
                         outcome=worker_service_pb2.OUTCOME_SUCCESS, result=to_value(value))


# -- leases -----------------------------------------------------------------------------------

async def test_a_result_under_a_stale_lease_is_refused(server: Server, client: Client) -> None:
    submitted = await client.submit(sig("add", 2, 3).set(queue="raw"))
    async with RawWorker(server.address, "raw") as first:
        held = await first.assignment()
    # The first worker's stream dropped: after the grace (0.3 s), well before its lease would
    # expire (2 s), the server puts its task back in the queue.
    async with RawWorker(server.address, "raw", heartbeat=0.5) as second:
        again = await second.assignment(within=1.5)
        assert again.task.id == submitted.task_id
        assert again.lease_token != held.lease_token
        assert again.attempt == held.attempt == 1, "a requeue after a lost stream is not a retry"
        # The first worker reconnects and reports what it finished under its old lease.
        async with RawWorker(server.address, "nothing-here", heartbeat=0.5) as reconnected:
            refused = await reconnected.report([success(held, 99)])
            assert refused == {submitted.task_id: worker_service_pb2.ACK_STATUS_STALE_LEASE}
            assert state_name((await client.get_result(submitted.task_id)).state) in {"RECEIVED", "STARTED"}

            assert await second.report([success(again, 5)]) == {
                submitted.task_id: worker_service_pb2.ACK_STATUS_ACCEPTED
            }
            late = await reconnected.report([success(held, 99)])
            assert late == {submitted.task_id: worker_service_pb2.ACK_STATUS_ALREADY_DONE}
    result = await client.get_result(submitted.task_id)
    assert result.result.int_value == 5
    assert terminal_states(result) == ["SUCCESS"]


async def test_a_hung_worker_is_drained_and_its_lease_expires(
    server: Server, client: Client, start_worker: StartWorker
) -> None:
    async with RawWorker(server.address, "hang") as hung:  # no heartbeats, no results
        submitted = await client.submit(sig("nap", "hung", 0).set(queue="hang"))
        held = await hung.assignment()
        start_worker(queues=["hang"])
        result = await client.get_result(submitted.task_id, wait=20)
        assert state_name(result.state) == "SUCCESS"
        assert result.worker_id != hung.worker_id, "the broker brought the task back for another worker"
        drain = await hung.next("drain")
        assert "heartbeat" in drain.drain.reason
        assert await hung.report([success(held, "late")]) == {
            submitted.task_id: worker_service_pb2.ACK_STATUS_ALREADY_DONE
        }
    assert terminal_states(await client.get_result(submitted.task_id)) == ["SUCCESS"]


# -- time limits --------------------------------------------------------------------------------

async def test_the_server_fails_an_attempt_its_worker_does_not_stop(server: Server, client: Client) -> None:
    # This worker starts the task and keeps its lease alive with heartbeats but never reports a
    # result: the server gives up on the attempt once it runs past its time limit (plus the
    # server's grace) and cancels it.
    async with RawWorker(server.address, "stuck", heartbeat=0.2) as stuck:
        submitted = await client.submit(sig("nap", "stuck", 60).set(queue="stuck", time_limit=0.5))
        held = await stuck.assignment()
        stuck.send(worker_service_pb2.ConnectRequest(started=worker_service_pb2.Started(tasks=[
            worker_service_pb2.LeaseRef(task_id=held.task.id, lease_token=held.lease_token)
        ])))
        result = await client.get_result(submitted.task_id, wait=20)
        assert state_name(result.state) == "FAILURE"
        assert result.error.type == "TimeLimitExceeded"
        assert "did not stop it" in result.error.message
        assert submitted.task_id in (await stuck.next("cancel")).cancel.task_ids
        assert await stuck.report([success(held, "late")]) == {
            submitted.task_id: worker_service_pb2.ACK_STATUS_ALREADY_DONE
        }


async def test_the_worker_runtime_enforces_time_limits(
    client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker()
    limited = await client.submit_batch([
        sig("nap", "limit-async", 30).set(time_limit=0.5),
        sig("nap_sync", "limit-sync", 30).set(time_limit=0.5),
    ])
    for submitted in limited:
        result = await client.get_result(submitted.task_id, wait=20)
        assert state_name(result.state) == "FAILURE"
        assert result.error.type == "TimeLimitExceeded"
        assert "ran longer than its time limit of 0.5 s" in result.error.message, "stopped by the worker"
    # The coroutine was cancelled and the thread saw its flag: neither ran on to its end.
    await eventually(lambda: len(log_lines(log_file, "nap-cancelled limit")) == 2, 10, "both tasks stopped")
    assert not log_lines(log_file, "nap-end")


# -- retries ------------------------------------------------------------------------------------

def attempt_times(log_file: Path, prefix: str, task_id: str) -> list[float]:
    return [float(line.rsplit("at=", 1)[1]) for line in log_lines(log_file, f"{prefix} {task_id} ")]


def gaps(times: Sequence[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


BACKOFFS: dict[str, tuple[RetryPolicy, list[float]]] = {
    "exponential": (RetryPolicy(max_attempts=4, backoff="exponential", initial=0.2), [0.2, 0.4, 0.8]),
    "fibonacci": (RetryPolicy(max_attempts=4, backoff="fibonacci", initial=0.2), [0.2, 0.2, 0.4]),
    "fixed": (RetryPolicy(max_attempts=4, backoff="fixed", initial=0.3), [0.3, 0.3, 0.3]),
    "capped": (RetryPolicy(max_attempts=4, backoff="exponential", initial=0.2, max=0.3), [0.2, 0.3, 0.3]),
}


async def test_backoff_delays_follow_each_policy(client: Client, start_worker: StartWorker, log_file: Path) -> None:
    start_worker(concurrency=8)
    jittered = RetryPolicy(max_attempts=4, backoff="fixed", initial=0.4, jitter=0.5)
    kinds = [*BACKOFFS, "jitter"]
    policies = [BACKOFFS[k][0] for k in BACKOFFS] + [jittered]
    submitted = await client.submit_batch(sig("flaky", 4).set(retry=policy) for policy in policies)
    for kind, item in zip(kinds, submitted, strict=True):
        result = await client.get_result(item.task_id, wait=30)
        assert state_name(result.state) == "SUCCESS", kind
        assert result.result.int_value == 4, "the task saw its attempt number"
        assert result.attempts == 4
        retries = [t for t in result.history if t.state == result_pb2.TASK_STATE_RETRY]
        assert [t.error.message for t in retries] == [f"attempt {n} fails" for n in (1, 2, 3)], kind
        assert [t.attempt for t in retries] == [1, 2, 3]
        measured = gaps(attempt_times(log_file, "flaky", item.task_id))
        expected = BACKOFFS[kind][1] if kind in BACKOFFS else [0.4] * 3
        spread = 0.5 if kind == "jitter" else 0.0
        for gap, delay in zip(measured, expected, strict=True):
            low, high = delay * (1 - spread) - EARLY, delay * (1 + spread) + LATENESS
            assert low <= gap <= high, f"{kind}: waited {gap:.3f} s between attempts, expected {delay} s"


async def test_explicit_retry_delay_wins_and_stops_at_max_attempts(
    client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker()
    # The policy's own backoff would wait 5 s; the delay the task asks for is used instead.
    bounded = await client.submit(sig("retry_in", 0.3).set(retry=RetryPolicy(max_attempts=3, initial=5.0)))
    # Without a policy a task that keeps asking to retry still stops (after 3 attempts).
    unbounded = await client.submit(sig("retry_in", 0.05))
    for submitted in (bounded, unbounded):
        result = await client.get_result(submitted.task_id, wait=30)
        assert state_name(result.state) == "FAILURE"
        assert result.error.type == "MaxRetriesExceeded"
        assert result.attempts == 3
        assert [state_name(t.state) for t in result.history if t.error.type] == ["RETRY", "RETRY", "FAILURE"]
        assert len(attempt_times(log_file, "retry_in", submitted.task_id)) == 3
    for gap in gaps(attempt_times(log_file, "retry_in", bounded.task_id)):
        assert 0.3 - EARLY <= gap <= 0.3 + LATENESS


# -- ETA and countdown --------------------------------------------------------------------------

async def test_eta_and_countdown_run_after_their_time_and_once(
    server: Server, client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker()
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    submitted_at = time.time()
    eta_task, countdown_task, far_task = await client.submit_batch([
        sig("stamp", "eta").set(eta=eta),
        sig("stamp", "countdown").set(countdown=1.0),
        sig("stamp", "far").set(countdown=3600.0),
    ])
    assert state_name((await client.get_result(eta_task.task_id)).state) == "PENDING"
    ran_at = await client.result(eta_task.task_id, wait=20)
    assert eta.timestamp() - EARLY <= ran_at <= eta.timestamp() + LATENESS
    assert submitted_at + 1.0 - EARLY <= await client.result(countdown_task.task_id, wait=20)
    await asyncio.sleep(1.0)  # a duplicate run would have shown by now
    assert len(log_lines(log_file, "stamp eta")) == 1
    assert len(log_lines(log_file, "stamp countdown")) == 1

    # An hour's delay waits in the broker (not in a worker or in server memory), and can be cancelled.
    (queue,) = [q for q in _admin_queues(server.address) if q.name == "default"]
    assert (queue.delayed, queue.ready, queue.in_flight) == (1, 0, 0)
    assert state_name((await client.get_result(far_task.task_id)).state) == "PENDING"
    assert await client.cancel(far_task.task_id) == [far_task.task_id]
    assert not log_lines(log_file, "stamp far")


def _admin_queues(address: str) -> list[admin_service_pb2.QueueInfo]:
    with grpc.insecure_channel(address) as channel:
        stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        return list(stub.ListQueues(admin_service_pb2.ListQueuesRequest(), timeout=10).queues)


DELAYED_TASKS = 10_000


async def test_ten_thousand_delayed_tasks_come_due_in_batches_and_run_once(server: Server, client: Client) -> None:
    """10,000 tasks with the same delay come due together: they reach the worker in batches (not
    one by one), each exactly once. The time they take is measured by bench/delayed.py."""
    delay = 1.0
    started = time.monotonic()
    submitted = await client.submit_batch(sig("noop").set(countdown=delay) for _ in range(DELAYED_TASKS))
    wanted = {s.task_id for s in submitted}
    async with RawWorker(server.address, "default", window=1000) as raw:
        received: list[str] = []
        batches: list[int] = []
        accepted = 0
        first_at = 0.0
        while accepted < DELAYED_TASKS:
            items = (await raw.next("assignments", 60)).assignments.items
            first_at = first_at or time.monotonic()
            received.extend(item.task.id for item in items)
            batches.append(len(items))
            statuses = await raw.report([success(item, None) for item in items])
            accepted += sum(status == worker_service_pb2.ACK_STATUS_ACCEPTED for status in statuses.values())
    assert first_at - started >= delay - EARLY, "nothing ran before its countdown"
    assert len(received) == DELAYED_TASKS, "each delayed task was delivered exactly once"
    assert set(received) == wanted
    assert len(batches) <= DELAYED_TASKS // 10, f"{len(batches)} assignment messages: due tasks come in batches"
    for task_id in list(wanted)[:50]:
        assert terminal_states(await client.get_result(task_id)) == ["SUCCESS"]


# -- cancellation -------------------------------------------------------------------------------

async def test_a_cancelled_queued_task_never_starts_even_after_a_restart(
    server: Server, start_worker: StartWorker, log_file: Path
) -> None:
    async with Client(server.address) as client:
        queued = await client.submit(sig("nap", "queued", 0).set(queue="later"))
        assert await client.cancel(queued.task_id) == [queued.task_id]
    server.stop()
    server.restart()  # the cancellation is stored, not held in the server's memory
    start_worker(queues=["later"])
    async with Client(server.address) as client:
        marker = await client.submit(sig("nap", "marker", 0).set(queue="later"))
        assert await client.result(marker.task_id, wait=20) == "marker"
        result = await client.get_result(queued.task_id)
    assert terminal_states(result) == ["CANCELLED"]
    assert log_lines(log_file, "nap-start marker")
    assert not log_lines(log_file, "nap-start queued"), "the cancelled task was dropped when it came up"


async def test_cancel_stops_running_async_and_sync_tasks(
    client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker(concurrency=2)
    running = await client.submit_batch([sig("nap", "run-async", 60), sig("nap_sync", "run-sync", 60)])
    await eventually(lambda: len(log_lines(log_file, "nap-start run-")) == 2, 20, "both tasks started")
    for submitted in running:
        assert await client.cancel(submitted.task_id) == [submitted.task_id]
    # The Cancel reached the worker: the coroutine was cancelled, the thread saw its flag.
    await eventually(lambda: len(log_lines(log_file, "nap-cancelled run-")) == 2, 10, "both tasks stopped")
    for submitted in running:
        assert terminal_states(await client.get_result(submitted.task_id)) == ["CANCELLED"]
    # Both of the worker's slots are free again.
    after = await client.submit_batch([sig("nap", "after-1", 0), sig("nap_sync", "after-2", 0)])
    assert [await client.result(s.task_id, wait=20) for s in after] == ["after-1", "after-2"]
    assert not log_lines(log_file, "nap-end run-")


async def test_cancel_a_workflow_stops_its_running_steps_and_skips_the_rest(
    client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker(concurrency=2)
    flow = chain(group(sig("nap", "wf-a", 60), sig("nap_sync", "wf-b", 60)), sig("nap", "wf-next", 0))
    submitted = await client.submit(flow)
    await eventually(lambda: len(log_lines(log_file, "nap-start wf-")) == 2, 20, "the group started")
    assert sorted(await client.cancel(submitted.workflow_id)) == sorted(submitted.task_ids)
    await eventually(lambda: len(log_lines(log_file, "nap-cancelled wf-")) == 2, 10, "the group stopped")
    for task_id in submitted.task_ids:
        assert terminal_states(await client.get_result(task_id)) == ["CANCELLED"]
    assert state_name((await client.get_workflow(submitted.workflow_id)).root.state) == "CANCELLED"
    await asyncio.sleep(0.5)
    assert not log_lines(log_file, "nap-start wf-next")


# -- idempotency keys -------------------------------------------------------------------------

async def test_an_idempotency_key_returns_the_first_task(
    client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    start_worker()
    first = await client.submit(sig("nap", "order-1", 0).set(idempotency_key="order-1"))
    again = await client.submit(sig("nap", "order-1", 0).set(idempotency_key="order-1"))
    assert again.task_id == first.task_id
    assert await client.result(first.task_id, wait=20) == "order-1"
    after_done = await client.submit(sig("nap", "order-1", 0).set(idempotency_key="order-1"))
    assert after_done.task_id == first.task_id
    # Twice in one batch: one task.
    pair = await client.submit_batch([sig("nap", "order-2", 0).set(idempotency_key="order-2")] * 2)
    assert pair[0].task_id == pair[1].task_id
    other = await client.submit(sig("nap", "order-3", 0).set(idempotency_key="order-3"))
    assert other.task_id not in {first.task_id, pair[0].task_id}
    for submitted in (pair[0], other):
        await client.result(submitted.task_id, wait=20)
    await asyncio.sleep(0.5)
    for label in ("order-1", "order-2", "order-3"):
        assert len(log_lines(log_file, f"nap-start {label} ")) == 1, f"{label} ran once"


# -- dead letters -------------------------------------------------------------------------------

async def test_dead_letters_are_listed_and_replayed_through_admin_and_cli(
    tmp_path: Path, server: Server, client: Client, start_worker: StartWorker
) -> None:
    start_worker(queues=["fragile"])
    fix = tmp_path / "fixed"
    retried = await client.submit(
        sig("fragile", str(fix)).set(queue="fragile", retry=RetryPolicy(max_attempts=2, initial=0.1))
    )
    once = await client.submit(sig("fragile", str(fix)).set(queue="fragile"))
    for submitted, attempts in ((retried, 2), (once, 1)):
        result = await client.get_result(submitted.task_id, wait=20)
        assert state_name(result.state) == "FAILURE"
        assert result.error.type == "FileNotFoundError"
        assert result.attempts == attempts

    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        listed = await admin.ListDeadLetters(admin_service_pb2.ListDeadLettersRequest(queue="fragile"))
        assert {t.task_id for t in listed.tasks} == {retried.task_id, once.task_id}
        assert all(t.error.type == "FileNotFoundError" for t in listed.tasks)
        by_cli = json.loads(run_cli(server.address, "-o", "json", "dead", "list", "--queue", "fragile"))
        assert {t["taskId"] for t in by_cli["tasks"]} == {retried.task_id, once.task_id}

        fix.touch()  # the cause is fixed: replays succeed
        replayed_json = run_cli(server.address, "-o", "json", "dead", "replay", retried.task_id)
        (replayed_by_cli,) = json.loads(replayed_json)["taskIds"]
        assert replayed_by_cli not in {retried.task_id, once.task_id}
        assert await client.result(replayed_by_cli, wait=20) == "fixed"
        replayed = await admin.ReplayDeadLetters(admin_service_pb2.ReplayDeadLettersRequest(queue="fragile"))
        (replayed_by_admin,) = replayed.task_ids
        assert await client.result(replayed_by_admin, wait=20) == "fixed"

        remaining = await admin.ListDeadLetters(admin_service_pb2.ListDeadLettersRequest(queue="fragile"))
        assert list(remaining.tasks) == []
        assert json.loads(run_cli(server.address, "-o", "json", "dead", "list"))["tasks"] == []


# -- graceful drain -----------------------------------------------------------------------------

async def test_sigterm_drains_a_worker(client: Client, start_worker: StartWorker, log_file: Path) -> None:
    # Three tasks run and a fourth slot is free: the server is waiting for work to fill it.
    draining = start_worker(concurrency=4)
    in_flight = await client.submit_batch(sig("nap", f"drain-{i}", 1.5) for i in range(3))
    await eventually(lambda: len(log_lines(log_file, "nap-start drain-")) == 3, 20, "three tasks started")
    draining.signal(signal.SIGTERM)
    later = await client.submit_batch(sig("nap", f"later-{i}", 0) for i in range(3))
    assert draining.popen.wait(20) == 0, "the worker exits cleanly once its tasks are done"
    for submitted in in_flight:
        assert terminal_states(await client.get_result(submitted.task_id)) == ["SUCCESS"]
    assert not log_lines(log_file, "nap-start later-"), "a draining worker takes no new tasks"

    fresh = start_worker()
    assert [await client.result(s.task_id, wait=20) for s in later] == [f"later-{i}" for i in range(3)]
    pid = f"pid={draining.pid}"
    assert all(line.endswith(pid) for line in log_lines(log_file, "nap-end drain-"))
    assert len(log_lines(log_file, "nap-start drain-")) == 3, "no in-flight task ran again"
    assert all(line.endswith(f"pid={fresh.pid}") for line in log_lines(log_file, "nap-start later-"))


async def test_a_sync_task_past_the_drain_timeout_is_handed_back_and_the_worker_exits_without_it(
    server: Server, client: Client, start_worker: StartWorker, log_file: Path
) -> None:
    # "chaos" sleeps in a pool thread and never checks for a stop, which a thread cannot be
    # forced to: the worker hands the task back and exits, leaving the thread behind.
    draining = start_worker(concurrency=1, drain_seconds=0.5)
    stuck = await client.submit(sig("chaos", 0, 120))
    runs = functools.partial(log_lines, log_file, f"chaos {stuck.task_id} ")
    await eventually(lambda: len(runs()) == 1, 20, "the task started")
    signalled = time.monotonic()
    draining.signal(signal.SIGTERM)
    assert draining.popen.wait(20) == 0
    assert time.monotonic() - signalled < 10, "the worker did not wait for the thread it could not stop"
    # The drained worker's session may outlive it by the stream grace: let it end first, so the
    # next worker is the only one the server lists.
    await eventually(lambda: connected_workers(server.address) == 0, 30, "the drained worker's session ended")
    fresh = start_worker()
    await eventually(lambda: len(runs()) == 2, 30, "the task ran again")
    assert runs()[0].endswith(f"pid={draining.pid}") and runs()[1].endswith(f"pid={fresh.pid}")
    assert (await client.get_result(stuck.task_id)).state not in TERMINAL
