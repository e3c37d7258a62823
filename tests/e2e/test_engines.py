"""The engine matrix end to end: real server and worker processes on every distributed broker and
backend (issues 5 and 6).

- Every distributed broker (redis, amqp, sqs) under two server replicas sharing it, with a worker
  on each replica: the tour (chain, chord, retry, ETA/countdown), and both replicas dispatching.
- Every networked backend (redis, mongodb, memcached) under two replicas sharing it: a chord's
  callback fires exactly once, and a watch on one replica sees results written through the other.
- Brokers pair with any backend: chain, chord and retry over representative (broker, backend) pairs.

Servers and workers are started once per engine (class-scoped fixtures), each with its own queue
and key prefix, and are stopped when the engine's tests are done.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conveyor import Client, RetryPolicy, chain, chord, group, sig, state_name
from tests.support.processes import SHOWN_ON_FAILURE, Proc, Server, WorkerProc, log_lines, wait_for_workers

pytestmark = pytest.mark.timeout(240)

# Quick recovery should a process die; leases long enough that a busy 2-core machine does not
# redeliver tasks that are still running (the tests count runs).
FAST = {
    "CONVEYOR_LEASE_SECONDS": "10",
    "CONVEYOR_HEARTBEAT_INTERVAL_SECONDS": "1",
    "CONVEYOR_STREAM_GRACE_SECONDS": "0.5",
    "CONVEYOR_RECOVER_INTERVAL_SECONDS": "0.5",
}
WAIT = 60.0
# After a result, how long to keep looking for a duplicate run.
SETTLE_SECONDS = 0.5

DISTRIBUTED_BROKERS = ["redis", "amqp", "sqs"]
NETWORKED_BACKENDS = ["redis", "mongodb", "memcached"]
PAIRS = [
    ("sqlite", "redis"),
    ("redis", "mongodb"),
    ("amqp", "memcached"),
    ("sqs", "redis"),
    ("redis", "sqlite"),
    ("amqp", "mongodb"),
    ("sqs", "memcached"),
]


def unique_prefix(url: str) -> str:
    """`url` with its `prefix` made unique, so no other test sees these queues and keys."""
    # '_' and hex digits are valid in every engine's names (SQS queues, Mongo collections, ...).
    suffix = f"_{uuid.uuid4().hex[:8]}"
    if re.search(r"[?&]prefix=", url):
        return re.sub(r"([?&]prefix=[^&]*)", lambda m: m.group(1) + suffix, url, count=1)
    return f"{url}{'&' if '?' in url else '?'}prefix=conveyor{suffix}"


def engine_url(request: pytest.FixtureRequest, kind: str, name: str, directory: Path) -> str:
    """A fresh URL for engine `name` ("broker" or "backend"); SQLite is a file in `directory`."""
    if name == "sqlite":
        return f"sqlite:///{directory / f'{kind}.db'}"
    session_url: str = request.getfixturevalue(f"{name}_{kind}_url")
    return unique_prefix(session_url)


@dataclass
class Cluster:
    """Server replicas over one broker and one backend, one worker connected to each."""

    servers: list[Server]
    workers: list[WorkerProc]
    log_file: Path

    @property
    def procs(self) -> list[Proc]:
        return [*self.servers, *self.workers]

    def lines(self, prefix: str) -> list[str]:
        return log_lines(self.log_file, prefix)


@contextmanager
def running_cluster(directory: Path, broker: str, backend: str, replicas: int) -> Iterator[Cluster]:
    """Start `replicas` servers and a worker per server; everything started is stopped on exit."""
    log_file = directory / "events.log"
    log_file.touch()
    started: list[Proc] = []
    try:
        servers: list[Server] = []
        for index in range(replicas):
            server = Server(directory, broker, backend, env=FAST, name=f"replica-{index}", wait=False)
            started.append(server)
            server.wait_ready()
            servers.append(server)
        workers: list[WorkerProc] = []
        for index, server in enumerate(servers):
            # No prefetch: one worker holding every task would hide the other replica's dispatch.
            worker = WorkerProc(directory, server.address, env={"CONVEYOR_TEST_LOG": str(log_file)},
                                name=f"worker-{index}", prefetch=1)
            started.append(worker)
            workers.append(worker)
        for server, worker in zip(servers, workers, strict=True):
            try:
                wait_for_workers(server.address, 1)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\nworker log:\n{worker.output()[-4000:]}") from exc
        yield Cluster(servers, workers, log_file)
    finally:
        # Workers first: a server waits for open worker streams when it stops.
        for proc in reversed(started):
            proc.stop()


@contextmanager
def logs_on_failure(cluster: Cluster) -> Iterator[None]:
    """Show the cluster's process logs when a test fails (see tests/e2e/conftest.py)."""
    SHOWN_ON_FAILURE[:] = cluster.procs
    try:
        yield
    finally:
        SHOWN_ON_FAILURE.clear()


# -- the tour, shared by the classes below -----------------------------------------------------------

async def check_chain(submit: Client, read: Client) -> None:
    submitted = await submit.submit(chain(sig("add", 1, 2), sig("mul", 10), sig("add", 5)))
    assert await read.result(submitted.task_id, wait=WAIT) == 35


async def check_chord(submit: Client, read: Client, cluster: Cluster, size: int) -> set[str]:
    """A chord of `size` members: the callback runs once, with the results in member order.
    Returns the pids of the workers that ran its members."""
    before = set(cluster.lines("member "))
    submitted = await submit.submit(chord([sig("member", i) for i in range(size)], sig("collect")))
    assert await read.result(submitted.task_id, wait=WAIT) == [i * i for i in range(size)]
    await asyncio.sleep(SETTLE_SECONDS)
    assert len(cluster.lines(f"collect {submitted.task_id}")) == 1, "the callback ran exactly once"
    return {line.split("pid=")[1] for line in cluster.lines("member ") if line not in before}


async def check_retry(submit: Client, read: Client, cluster: Cluster) -> None:
    """`flaky` fails on attempt 1 and succeeds on attempt 2, 0.2 s later (fixed backoff)."""
    policy = RetryPolicy(max_attempts=3, backoff="fixed", initial=0.2)
    submitted = await submit.submit(sig("flaky", 2).set(retry=policy))
    assert await read.result(submitted.task_id, wait=WAIT) == 2
    await asyncio.sleep(SETTLE_SECONDS)
    runs = cluster.lines(f"flaky {submitted.task_id} ")
    attempts = [int(re.findall(r"attempt=(\d+)", line)[0]) for line in runs]
    assert attempts == [1, 2], runs
    first, second = (float(re.findall(r"at=([\d.]+)", line)[0]) for line in runs)
    assert second - first >= 0.2 - 0.02, f"attempt 2 ran {second - first:.3f} s after attempt 1"
    result = await read.get_result(submitted.task_id)
    assert state_name(result.state) == "SUCCESS"


async def check_delays(submit: Client, read: Client, cluster: Cluster, seconds: float = 1.5) -> None:
    """A countdown and an ETA: each runs once, no earlier than asked (and not much later)."""
    label = uuid.uuid4().hex[:8]
    before = time.time()
    by_countdown = await submit.submit(sig("stamp", f"countdown-{label}").set(countdown=seconds))
    by_eta = await read.submit(sig("stamp", f"eta-{label}").set(eta=datetime.now(UTC) + timedelta(seconds=seconds)))
    ran = await asyncio.gather(read.result(by_countdown.task_id, wait=WAIT), submit.result(by_eta.task_id, wait=WAIT))
    for what, ran_at in zip(("countdown", "eta"), ran, strict=True):
        assert ran_at >= before + seconds - 0.02, f"the {what} task ran {before + seconds - ran_at:.3f} s early"
        assert ran_at < before + seconds + 10, f"the {what} task ran {ran_at - before - seconds:.3f} s late"
    await asyncio.sleep(SETTLE_SECONDS)
    assert len(cluster.lines(f"stamp countdown-{label} ")) == 1, "the countdown task ran exactly once"
    assert len(cluster.lines(f"stamp eta-{label} ")) == 1, "the ETA task ran exactly once"


# -- issue 5: every distributed broker under two replicas --------------------------------------------

@pytest.fixture(scope="class", params=DISTRIBUTED_BROKERS)
def broker_replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp(f"broker-{request.param}")
    broker = engine_url(request, "broker", request.param, directory)
    # The backend is a SQLite file both replicas share: the broker is what varies.
    backend = engine_url(request, "backend", "sqlite", directory)
    with running_cluster(directory, broker, backend, replicas=2) as cluster:
        yield cluster


class TestBrokerReplicas:
    """Two replicas share a distributed broker (and a backend); a worker on each replica."""

    @pytest.fixture
    async def clients(self, broker_replicas: Cluster) -> AsyncIterator[tuple[Client, Client]]:
        first, second = broker_replicas.servers
        with logs_on_failure(broker_replicas):
            async with Client(first.address) as a, Client(second.address) as b:
                yield a, b

    async def test_chain(self, clients: tuple[Client, Client]) -> None:
        a, b = clients
        await check_chain(a, b)
        await check_chain(b, a)

    async def test_chord_of_20_fires_once_in_member_order(
        self, broker_replicas: Cluster, clients: tuple[Client, Client]
    ) -> None:
        a, b = clients
        await check_chord(a, b, broker_replicas, size=20)

    async def test_retry_succeeds_on_the_second_attempt(
        self, broker_replicas: Cluster, clients: tuple[Client, Client]
    ) -> None:
        a, b = clients
        await check_retry(a, b, broker_replicas)

    async def test_countdown_and_eta_run_once_and_not_early(
        self, broker_replicas: Cluster, clients: tuple[Client, Client]
    ) -> None:
        a, b = clients
        await check_delays(a, b, broker_replicas)

    async def test_both_replicas_dispatch_from_the_shared_queue(
        self, broker_replicas: Cluster, clients: tuple[Client, Client]
    ) -> None:
        # 12 tasks of 0.5 s with a window of 4 per worker: one worker alone would need 1.5 s,
        # so the other replica has a second or more to take some.
        a, b = clients
        submitted = await a.submit(group(sig("chaos", i, 0.5) for i in range(12)))
        results = await asyncio.gather(*(b.result(task_id, wait=WAIT) for task_id in submitted.task_ids))
        assert results == list(range(12))
        runs = [line for line in broker_replicas.lines("chaos ") if line.split()[1] in submitted.task_ids]
        assert len(runs) == 12, "each task ran once"
        pids = {line.split("pid=")[1] for line in runs}
        assert pids == {str(worker.pid) for worker in broker_replicas.workers}, "workers of both replicas ran tasks"


# -- issue 6: every networked backend (and the SQLite default, one file) under two replicas -----------

@pytest.fixture(scope="class", params=["sqlite", *NETWORKED_BACKENDS])
def backend_replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp(f"backend-{request.param}")
    # The broker is a SQLite file both replicas share: the backend is what varies.
    broker = engine_url(request, "broker", "sqlite", directory)
    backend = engine_url(request, "backend", request.param, directory)
    with running_cluster(directory, broker, backend, replicas=2) as cluster:
        yield cluster


class TestBackendReplicas:
    """Two replicas share a backend (a networked one, or the SQLite default's file) and a broker;
    a worker on each replica."""

    async def test_chord_of_30_fires_once_and_a_watch_on_the_other_replica_sees_it(
        self, backend_replicas: Cluster
    ) -> None:
        first, second = backend_replicas.servers
        with logs_on_failure(backend_replicas):
            async with Client(first.address) as a, Client(second.address) as b:
                size = 30
                submitted = await a.submit(chord([sig("member", i) for i in range(size)], sig("collect")))

                async def watch_on_b() -> set[str]:
                    events = [e async for e in b.watch(workflow_id=submitted.workflow_id)]
                    return {e.task_id for e in events if state_name(e.state) == "SUCCESS"}

                finished, result = await asyncio.gather(watch_on_b(), b.result(submitted.task_id, wait=WAIT))
                assert result == [i * i for i in range(size)]
                assert finished == set(submitted.task_ids), "the watch saw every task finish"
                await asyncio.sleep(SETTLE_SECONDS)
                assert len(backend_replicas.lines(f"collect {submitted.task_id}")) == 1
                # The same chord again, submitted and read the other way round.
                await check_chord(b, a, backend_replicas, size=size)

    async def test_a_unique_task_submitted_through_both_replicas_runs_once(self, backend_replicas: Cluster) -> None:
        first, second = backend_replicas.servers
        label = f"unique-{time.monotonic_ns()}"
        task = sig("nap", label, 2.0).set(unique_for=60)
        with logs_on_failure(backend_replicas):
            async with Client(first.address) as a, Client(second.address) as b:
                answers = await asyncio.gather(*(client.submit(task) for client in (a, b, a, b)))
                assert len({s.task_id for s in answers}) == 1, f"one task for four submits: {answers}"
                assert await b.result(answers[0].task_id, wait=WAIT) == label
                again = await b.submit(task)  # it ended: the key is free
                assert again.task_id != answers[0].task_id
                assert await a.result(again.task_id, wait=WAIT) == label
                assert len(backend_replicas.lines(f"nap-start {label} ")) == 2


# -- issue 6: any broker with any backend -------------------------------------------------------------

@pytest.fixture(scope="class", params=PAIRS, ids=[f"{broker}-{backend}" for broker, backend in PAIRS])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    broker_name, backend_name = request.param
    directory = tmp_path_factory.mktemp(f"pair-{broker_name}-{backend_name}")
    broker = engine_url(request, "broker", broker_name, directory)
    backend = engine_url(request, "backend", backend_name, directory)
    with running_cluster(directory, broker, backend, replicas=1) as cluster:
        yield cluster


class TestBrokerBackendPairs:
    """One server and one worker per (broker, backend) pair."""

    @pytest.fixture
    async def client(self, pair: Cluster) -> AsyncIterator[Client]:
        with logs_on_failure(pair):
            async with Client(pair.servers[0].address) as connected:
                yield connected

    async def test_chain(self, client: Client) -> None:
        await check_chain(client, client)

    async def test_chord(self, pair: Cluster, client: Client) -> None:
        await check_chord(client, client, pair, size=10)

    async def test_retry(self, pair: Cluster, client: Client) -> None:
        await check_retry(client, client, pair)
