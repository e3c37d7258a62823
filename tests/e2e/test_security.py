"""Auth per role, worker queue restrictions, TLS and mTLS, exposure checks, rate and size limits,
metrics and structured logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor import Client, ResourceExhausted, Worker, sig
from conveyor.tls import channel_credentials
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, task_pb2, worker_service_pb2, worker_service_pb2_grpc
from conveyor_server.app import ConveyorServer
from conveyor_server.config import ConfigError, Limits, Security, Settings, Token
from conveyor_server.logs import JsonFormatter
from tests.support.certs import make_pki
from tests.support.processes import free_port, run_cli

SECRETS = {"client": "c-secret", "worker": "w-secret", "admin": "a-secret"}


def token(role: str, queues: tuple[str, ...] = ()) -> Token:
    return Token(f"{role}-token", role, hashlib.sha256(SECRETS[role].encode()).hexdigest(), queues)


def memory_settings(**changes: object) -> Settings:
    return Settings(port=0, http_port=0, broker_url="memory://", backend_url="memory://").replace(**changes)


@pytest.fixture
async def secured() -> AsyncIterator[str]:
    tokens = (token("client"), token("worker", ("default",)), token("admin"))
    server = ConveyorServer(memory_settings(security=Security(tokens=tokens)))
    port = await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop()


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.details(), "every refusal says why"
    code: grpc.StatusCode = raised.value.code()
    return code


async def test_tokens_authenticate_and_roles_authorize(secured: str) -> None:
    async with Client(secured, token="") as anonymous:
        assert await _code(anonymous.submit("add", 1, 2)) == grpc.StatusCode.UNAUTHENTICATED
    async with Client(secured, token="wrong") as stranger:
        assert await _code(stranger.submit("add", 1, 2)) == grpc.StatusCode.UNAUTHENTICATED
    async with Client(secured, token=SECRETS["worker"]) as worker_as_client:
        assert await _code(worker_as_client.submit("add", 1, 2)) == grpc.StatusCode.PERMISSION_DENIED
    async with Client(secured, token=SECRETS["client"]) as client:
        submitted = await client.submit("add", 1, 2)
        assert submitted.task_id
    async with grpc.aio.insecure_channel(secured) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        request = admin_service_pb2.ListQueuesRequest()
        for secret, expected in ((SECRETS["client"], grpc.StatusCode.PERMISSION_DENIED),
                                 (SECRETS["worker"], grpc.StatusCode.PERMISSION_DENIED)):
            metadata = (("authorization", f"Bearer {secret}"),)
            assert await _code(admin.ListQueues(request, metadata=metadata)) == expected
        listed = await admin.ListQueues(request, metadata=(("authorization", f"Bearer {SECRETS['admin']}"),))
        assert [q.name for q in listed.queues] == ["default"]
        # Probes stay open.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_worker_tokens_are_limited_to_their_queues(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        hello = worker_service_pb2.ConnectRequest(hello=worker_service_pb2.Hello(queues=["payroll"], max_in_flight=1))
        call = stub.Connect(iter([hello]), metadata=(("authorization", f"Bearer {SECRETS['worker']}"),))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "payroll" in (raised.value.details() or "")
    worker = Worker(secured, queues=["default"], token=SECRETS["worker"])

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    running = asyncio.create_task(worker.run())
    try:
        async with Client(secured, token=SECRETS["client"]) as client:
            submitted = await client.submit("add", 20, 22)
            assert await client.result(submitted.task_id, wait=10) == 42
    finally:
        worker.stop()
        await running


async def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = Security(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    server = ConveyorServer(memory_settings(security=tls))
    port = await server.start()
    try:
        async with Client(f"localhost:{port}", credentials=channel_credentials(str(pki.ca))) as client:
            assert (await client.submit("add", 1, 2)).task_id
        async with Client(f"localhost:{port}", max_retry_seconds=0) as plaintext:  # refused: no retries
            assert await _code(plaintext.submit("add", 1, 2)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()

    mutual = Security(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                      tls_client_ca_file=str(pki.ca))
    server = ConveyorServer(memory_settings(security=mutual))
    port = await server.start()
    try:
        anonymous = channel_credentials(str(pki.ca))
        async with Client(f"localhost:{port}", credentials=anonymous, max_retry_seconds=0) as client:
            assert await _code(client.submit("add", 1, 2)) == grpc.StatusCode.UNAVAILABLE
        with_cert = channel_credentials(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        async with Client(f"localhost:{port}", credentials=with_cert) as client:
            assert (await client.submit("add", 1, 2)).task_id
    finally:
        await server.stop()


async def test_a_public_address_needs_auth_or_an_explicit_opt_out() -> None:
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without authentication"):
        ConveyorServer(memory_settings(host="0.0.0.0"))
    ConveyorServer(memory_settings(host="0.0.0.0", security=Security(allow_public_without_auth=True)))
    ConveyorServer(memory_settings(host="0.0.0.0", security=Security(tokens=(token("admin"),))))
    ConveyorServer(memory_settings(host="::1"))
    with pytest.raises(ConfigError, match="needs both"):
        ConveyorServer(memory_settings(security=Security(tls_cert_file="x.pem")))


async def test_submit_rate_and_message_size_limits() -> None:
    limits = Limits(max_message_bytes=64 * 1024)
    server = ConveyorServer(memory_settings(
        limits=limits, security=Security(submit_rate_per_second=5, submit_burst=5)
    ))
    port = await server.start()
    try:
        # No retries: this client would otherwise wait out the refusal's retry hint.
        async with Client(f"127.0.0.1:{port}", max_retry_seconds=0) as client:
            await client.submit_batch(sig("noop") for _ in range(5))
            with pytest.raises(ResourceExhausted) as raised:
                await client.submit("noop")
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "5 tasks/s" in (raised.value.details() or "")
            assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 0.2
            await asyncio.sleep(0.5)  # the bucket refills at 5/s
            await client.submit("noop")
            huge = task_pb2.Signature(name="noop", args=[task_pb2.Value(bytes_value=b"x" * 100_000)])
            assert await _code(client.submit(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop()


async def test_prometheus_metrics() -> None:
    metrics_port = free_port()
    server = ConveyorServer(memory_settings(metrics_port=metrics_port))
    port = await server.start()
    worker = Worker(f"127.0.0.1:{port}", concurrency=2)

    @worker.task("double")
    def double(x: int) -> int:
        return 2 * x

    @worker.task("broken")
    def broken() -> None:
        raise ValueError("no")

    running = asyncio.create_task(worker.run())
    try:
        async with Client(f"127.0.0.1:{port}") as client:
            done = [await client.submit("double", i) for i in range(3)]
            failed = await client.submit("broken")
            chained = await client.submit(sig("double", 1) | sig("double"))  # a workflow's tasks count too
            for item in [*done, failed, chained]:
                await client.get_result(item.task_id, wait=10)
        await server.core.metrics.refresh(server.core.broker, server.core.registry)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        worker.stop()
        await running
        await server.stop()
    assert 'conveyor_tasks_submitted_total{queue="default"} 6.0' in text
    assert 'conveyor_task_outcomes_total{name="double",state="success"} 5.0' in text
    assert 'conveyor_task_outcomes_total{name="broken",state="failure"} 1.0' in text
    assert 'conveyor_task_latency_seconds_count{name="double"} 5.0' in text
    assert 'conveyor_task_runtime_seconds_count{name="broken"} 1.0' in text
    assert 'conveyor_queue_depth{kind="ready",queue="default"} 0.0' in text
    assert "conveyor_workers 1.0" in text


def test_json_logs_are_one_object_per_line() -> None:
    record = logging.LogRecord("conveyor", logging.WARNING, __file__, 1, "lease of %s expired", ("t1",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning"
    assert entry["msg"] == "lease of t1 expired"
    assert entry["ts"].endswith("Z")


async def test_the_cli_speaks_mtls_with_a_token(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    security = Security(
        tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key), tls_client_ca_file=str(pki.ca),
        tokens=(token("client"),),
    )
    server = ConveyorServer(memory_settings(security=security))
    port = await server.start()
    address = f"localhost:{port}"
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    try:
        task_id = (await asyncio.to_thread(
            run_cli, address, *flags, "--token", SECRETS["client"], "submit", "add", "1", "2"
        )).strip()
        printed = await asyncio.to_thread(
            run_cli, address, *flags, "--token", SECRETS["client"], "-o", "json", "get", task_id
        )
        assert json.loads(printed)["taskId"] == task_id
        with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
            await asyncio.to_thread(run_cli, address, *flags, "get", task_id)
    finally:
        await server.stop()
