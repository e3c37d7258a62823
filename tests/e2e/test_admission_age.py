"""Issue #15 item 6, the age half, through real gRPC servers (one in process on the SQLite
default, and two `conveyor serve` replicas sharing Redis, each test using both): once the
oldest ready task of a queue has waited past its max_age_seconds, submits to that queue get
RESOURCE_EXHAUSTED with a RetryInfo hint; the SDK backs off and retries within its budget, and
succeeds once a worker drains the queue."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from conveyor import Client, Worker, sig
from conveyor.errors import ResourceExhausted
from conveyor_server.app import ConveyorServer
from conveyor_server.config import QueueLimit, Settings
from tests.e2e.conftest import StartReplicas
from tests.e2e.test_admission_and_scopes import retry_delay_of

pytestmark = pytest.mark.timeout(120)
QUEUE = "aged"
MAX_AGE = 2.0
# The task index shows a task about 1.5 s after it is written, and ages are read every 0.5 s.
NOTICED_WITHIN = MAX_AGE + 8.0


@pytest.fixture(params=["sqlite", "redis"])
async def aged(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """Two addresses of servers whose queue QUEUE has a max_age_seconds of MAX_AGE: the same
    in-process SQLite server twice, or two replicas sharing Redis."""
    if request.param == "redis":
        start: StartReplicas = request.getfixturevalue("redis_replicas")
        first, second = start({"CONVEYOR_QUEUE_LIMITS": json.dumps({QUEUE: {"max_age_seconds": MAX_AGE}})})
        yield first.address, second.address
        return
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    server = ConveyorServer(Settings(port=0, http_port=0, broker_url=url, backend_url=url,
                                     queue_limits={QUEUE: QueueLimit(max_age_seconds=MAX_AGE)}))
    port = await server.start()
    yield f"127.0.0.1:{port}", f"127.0.0.1:{port}"
    await server.stop()


async def first_refusal(client: Client, since: float) -> grpc.aio.AioRpcError:
    """Submits to QUEUE until one is refused; fails when none is within NOTICED_WITHIN of `since`."""
    while time.monotonic() - since < NOTICED_WITHIN:
        try:
            await client.submit_batch([sig("add", 1, 1).set(queue=QUEUE)])  # unary: RetryInfo in its status
        except grpc.aio.AioRpcError as error:
            return error
        await asyncio.sleep(0.2)
    raise AssertionError(f"no submit to {QUEUE!r} was refused within {NOTICED_WITHIN} s")


def adder(address: str) -> Worker:
    worker = Worker(address, queues=[QUEUE], concurrency=2)

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    return worker


async def test_a_queue_whose_oldest_task_waited_past_max_age_refuses_then_admits_once_drained(
    aged: tuple[str, str],
) -> None:
    first, second = aged
    async with Client(first, max_retry_seconds=0) as client, Client(second, max_retry_seconds=0) as other:
        started = time.monotonic()
        await client.submit(sig("add", 0, 1).set(queue=QUEUE))  # nobody runs QUEUE yet: it ages
        refused = await first_refusal(other, started)  # the other replica sees the age too
        assert time.monotonic() - started >= MAX_AGE, "refused before any task was that old"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"past its max_age_seconds of {MAX_AGE:g}" in (refused.details() or "")
        assert retry_delay_of(refused) == 1.0
        with pytest.raises(ResourceExhausted) as again:  # a call on the session stream: the same hint
            await client.submit(sig("add", 9, 9).set(queue=QUEUE))
        assert again.value.retry_after == 1.0
        await client.submit(sig("add", 1, 1).set(queue="other"))  # other queues are not limited

    # Within a short budget the SDK retries, then gives up with the refusal.
    async with Client(second, max_retry_seconds=1.5) as short:
        began = time.monotonic()
        with pytest.raises(ResourceExhausted):
            await short.submit(sig("add", 9, 9).set(queue=QUEUE))
        assert time.monotonic() - began >= 1.0, "the SDK gave up without retrying"

    # With a budget long enough, it rides the refusal out: a worker (of the other replica) drains the queue.
    worker = adder(first)
    async with Client(second, max_retry_seconds=30) as patient:
        submitting = asyncio.create_task(patient.submit(sig("add", 20, 22).set(queue=QUEUE)))
        await asyncio.sleep(1.5)
        assert not submitting.done(), "admitted while the queue was still past its max_age"
        running = asyncio.create_task(worker.run())
        try:
            submitted = await asyncio.wait_for(submitting, 30)
            assert await patient.result(submitted.task_id, wait=20) == 42
        finally:
            worker.stop()
            await running
