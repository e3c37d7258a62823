"""Chaos: the server is killed with SIGKILL while 1,000 tasks run, then started again on the
same engines; nothing accepted is lost and every outcome is recorded once.

Leases held by the dead server come back through the broker (lease expiry, unacked redelivery,
visibility timeout); results that workers finished meanwhile are reported again on reconnect.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conveyor import Client, sig
from tests.chaos.checks import assert_each_succeeded_once, started_count
from tests.chaos.conftest import FAST_RECOVERY
from tests.support.processes import Proc, Server, WorkerProc, eventually, wait_for_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TASKS = 1000
TASK_SECONDS = 0.03

# (broker engine, backend engine) pairs the test runs on. Each name resolves to the fixture
# `<engine>_broker_url` / `<engine>_backend_url` (tests/fixtures/*_services.py; the sqlite ones
# are below: a file in the test's own directory). To cover an engine, add its pair here.
ENGINE_PAIRS = [
    ("sqlite", "sqlite"),
    ("redis", "redis"),
    ("amqp", "sqlite"),
    ("sqs", "redis"),
]


@pytest.fixture
def sqlite_broker_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
def sqlite_backend_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'backend.db'}"


@pytest.fixture(params=ENGINE_PAIRS, ids=[f"{broker}-{backend}" for broker, backend in ENGINE_PAIRS])
def engine_urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker URL, backend URL) of one pair in ENGINE_PAIRS."""
    broker, backend = request.param
    broker_url: str = request.getfixturevalue(f"{broker}_broker_url")
    backend_url: str = request.getfixturevalue(f"{backend}_backend_url")
    return broker_url, backend_url


async def test_kill_9_the_server_mid_run_and_restart_it(
    tmp_path: Path, procs: list[Proc], log_file: Path, engine_urls: tuple[str, str]
) -> None:
    broker_url, backend_url = engine_urls
    # Shared engines (a Redis, a RabbitMQ) may hold other tests' queues: use one of our own.
    queue = f"chaos-{uuid.uuid4().hex[:12]}"
    server = Server(tmp_path, broker_url, backend_url, env=FAST_RECOVERY)
    procs.append(server)
    env = {"CONVEYOR_TEST_LOG": str(log_file)}
    procs.extend(
        WorkerProc(tmp_path, server.address, queues=[queue], concurrency=8, env=env, name=f"worker-{i}")
        for i in range(3)
    )
    wait_for_workers(server.address, 3)
    async with Client(server.address) as client:
        submitted = await client.submit_batch(
            sig("chaos", i, TASK_SECONDS).set(queue=queue) for i in range(TASKS)
        )
    await eventually(lambda: started_count(log_file) >= TASKS // 3, 60, "a third of the tasks started")
    server.kill9()
    assert started_count(log_file) < TASKS, "the kill came too late to hit the run"

    server.restart()
    async with Client(server.address) as client:
        counts = await assert_each_succeeded_once(client, [s.task_id for s in submitted], log_file)
    assert sum(counts.values()) == TASKS, "every task ran"
    print(f"runs per task: {dict(sorted(counts.items()))}")
