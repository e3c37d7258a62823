"""Issue #15 items 6 and 7, through a real gRPC server (in process on memory engines, a
`conveyor serve` on its SQLite default, and two `conveyor serve` replicas sharing Redis; each
test runs on all three): a queue past its max_depth
refuses submits with RESOURCE_EXHAUSTED and a RetryInfo hint (and the SDK rides it out within
its retry budget once workers drain the queue); a client token scoped to queues submits to,
reads and cancels only tasks of those queues."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from conveyor import Client, Worker, chain, sig
from conveyor_server.app import ConveyorServer
from conveyor_server.config import ConfigError, QueueLimit, Security, Settings, Token, load_settings
from tests.e2e.conftest import StartReplicas
from tests.support.processes import Proc, Server

pytestmark = pytest.mark.timeout(120)
ENGINES = ["memory", "sqlite", "redis"]
DEPTH = 5
SECRETS = {"payroll": "p-secret", "any": "a-secret"}


def settings(**changes: object) -> Settings:
    return Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://").replace(**changes)


async def two_addresses(
    request: pytest.FixtureRequest, configured: Settings, env: Mapping[str, str]
) -> AsyncIterator[tuple[str, str]]:
    """One in-process server on memory engines with `configured` (its address twice), one
    `conveyor serve` on the SQLite default (its address twice), or two replicas sharing Redis,
    these with the same settings given as `env`."""
    if request.param == "sqlite":
        # No engine flags: the embedded SQLite default, its file in this test's folder.
        folder: Path = request.getfixturevalue("tmp_path")
        procs: list[Proc] = request.getfixturevalue("procs")
        process = Server(folder, env=dict(env), cwd=folder, wait=False)
        procs.append(process)  # stopped even if it never gets ready
        process.wait_ready()
        yield process.address, process.address
        return
    if request.param == "redis":
        start: StartReplicas = request.getfixturevalue("redis_replicas")
        first, second = start(env)
        yield first.address, second.address
        return
    server = ConveyorServer(configured)
    port = await server.start()
    yield f"127.0.0.1:{port}", f"127.0.0.1:{port}"
    await server.stop()


@pytest.fixture(params=ENGINES)
async def limited(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    configured = settings(queue_limits={"small": QueueLimit(max_depth=DEPTH)})
    env = {"CONVEYOR_QUEUE_LIMITS": json.dumps({"small": {"max_depth": DEPTH}})}
    async for addresses in two_addresses(request, configured, env):
        yield addresses


def retry_delay_of(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay in the error's google.rpc.Status details."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), "a RetryInfo detail"
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.RetryInfo()
    assert [detail.Unpack(info) for detail in status.details if detail.Is(info.DESCRIPTOR)] == [True]
    seconds: float = info.retry_delay.ToTimedelta().total_seconds()
    return seconds


async def test_a_full_queue_refuses_with_retry_info_and_admits_after_draining(limited: tuple[str, str]) -> None:
    first, second = limited
    async with Client(first, max_retry_seconds=0) as client, Client(second, max_retry_seconds=0) as other:
        for i in range(DEPTH):
            await client.submit(sig("add", i, 1).set(queue="small"))
        await asyncio.sleep(0.6)  # the server reads queue depths at most every 0.5 s
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a unary call: RetryInfo in its status
            await other.submit_batch([sig("add", 9, 9).set(queue="small")])  # the depth is the broker's
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"holds {DEPTH} ready tasks, at its max_depth of {DEPTH}" in (refused.value.details() or "")
        assert retry_delay_of(refused.value) == 1.0
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a call on the session stream: the same hint
            await client.submit(sig("add", 9, 9).set(queue="small"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(refused.value.trailing_metadata() or ())["retry-after-ms"] == "1000"
        # Other queues are not limited.
        await other.submit(sig("add", 1, 1).set(queue="other"))

    # A client that retries rides it out: a worker (of the other replica) drains the queue meanwhile.
    worker = Worker(second, queues=["small"], concurrency=2)

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    async with Client(first, max_retry_seconds=20) as client:
        running = asyncio.create_task(worker.run())
        try:
            submitted = await client.submit(sig("add", 20, 22).set(queue="small"))
            assert await client.result(submitted.task_id, wait=20) == 42
        finally:
            worker.stop()
            await running


def test_queue_limits_come_from_the_environment_and_bad_ones_are_refused() -> None:
    loaded = load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"max_depth": 100}}'})
    assert loaded.queue_limits == {"emails": QueueLimit(max_depth=100)}
    with pytest.raises(ConfigError, match="max_depth must be 0"):
        load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"max_depth": -1}}'})
    with pytest.raises(ConfigError, match="unknown setting 'depth'"):
        load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"depth": 1}}'})
    aged = load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"max_age_seconds": 300}}'})
    assert aged.queue_limits == {"emails": QueueLimit(max_age_seconds=300.0)}
    with pytest.raises(ConfigError, match="max_age_seconds must be 0"):
        load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"max_age_seconds": -1}}'})
    with pytest.raises(ConfigError, match="expects float"):
        load_settings(environ={"CONVEYOR_QUEUE_LIMITS": '{"emails": {"max_age_seconds": "5m"}}'})


def token(name: str, role: str, queues: tuple[str, ...]) -> Token:
    return Token(name, role, hashlib.sha256(SECRETS[name].encode()).hexdigest(), queues)


@pytest.fixture(params=ENGINES)
async def scoped(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    tokens = (token("payroll", "client", ("payroll",)), token("any", "client", ()))
    as_json = [{"name": t.name, "role": t.role, "sha256": t.sha256, "queues": list(t.queues)} for t in tokens]
    env = {"CONVEYOR_SECURITY__TOKENS": json.dumps(as_json)}
    async for addresses in two_addresses(request, settings(security=Security(tokens=tokens)), env):
        yield addresses


async def _denied(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return raised.value.details() or ""


async def test_a_client_token_scoped_to_queues_uses_only_those(scoped: tuple[str, str]) -> None:
    first, second = scoped
    async with Client(first, token=SECRETS["any"]) as anyone, Client(second, token=SECRETS["payroll"]) as payroll:
        other = await anyone.submit(sig("add", 1, 2))  # on "default"
        keyed = await anyone.submit(sig("add", 1, 2).set(idempotency_key="order-42"))  # on "default"
        other_flow = await anyone.submit(chain(sig("add", 1, 2), sig("add", 3)))
        mine = await payroll.submit(sig("add", 1, 2).set(queue="payroll"))
        assert (await payroll.get_result(mine.task_id)).queue == "payroll"
        assert await payroll.cancel(mine.task_id) == [mine.task_id]

        message = await _denied(payroll.submit(sig("add", 1, 2)))
        assert "may submit only to queues ['payroll']" in message and "['default']" in message
        # A callback or a workflow step on another queue is refused too.
        await _denied(payroll.submit(sig("add", 1, 2).set(queue="payroll").link(sig("add", 3))))
        await _denied(payroll.submit(chain(sig("add", 1).set(queue="payroll"), sig("add", 3))))
        # A repeat of another queue's idempotency key does not reveal that task, whatever queue it names.
        for queue in ("default", "payroll"):
            repeat = sig("add", 1, 2).set(queue=queue, idempotency_key="order-42")
            assert keyed.task_id not in await _denied(payroll.submit(repeat))
        assert "is on queue 'default'" in await _denied(payroll.get_result(other.task_id))
        await _denied(payroll.cancel(other.task_id))
        await _denied(payroll.cancel(other_flow.workflow_id))
        await _denied(payroll.get_workflow(other_flow.workflow_id))
        with pytest.raises(grpc.aio.AioRpcError) as watched:
            async for _ in payroll.watch([other.task_id]):
                pass
        assert watched.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An unscoped client token still reaches everything.
        assert (await anyone.get_result(mine.task_id)).queue == "payroll"
