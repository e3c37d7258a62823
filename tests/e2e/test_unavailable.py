"""An engine out of reach is UNAVAILABLE, never UNKNOWN, and the SDK rides it out: a server
whose Redis backend sits behind a test-controlled TCP proxy loses it for a few seconds; a raw
call in the outage is refused with UNAVAILABLE and a retry hint, and the SDK's submit() started
in the outage succeeds once Redis is back, and its task runs. A submit whose answer was lost
is retried and recognised by its client-side ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from conveyor import Client, Submitted, chain, chord, group, sig
from conveyor.canvas import Canvas
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from tests.support.processes import Proc, Server, WorkerProc, wait_for_workers
from tests.support.proxy import TcpProxy

# The bar: the SDK carries a submit through a 10 s outage without an error.
OUTAGE_SECONDS = 10.0


@pytest.fixture
def server(tmp_path: Path, procs: list[Proc], redis_url: str, redis_proxy: TcpProxy) -> Server:
    """The broker is a local SQLite file; the backend is Redis through the proxy."""
    backend = urlsplit(redis_url)._replace(netloc=redis_proxy.address).geturl()
    db = tmp_path / "broker.db"
    started = Server(tmp_path, f"sqlite:///{db}", backend, wait=False)
    procs.append(started)
    started.wait_ready()
    procs.append(WorkerProc(tmp_path, started.address))
    wait_for_workers(started.address, 1)
    return started


def _add(x: int, y: int) -> task_service_pb2.SubmitRequest:
    signature = task_pb2.Signature(name="add", args=[task_pb2.Value(int_value=x), task_pb2.Value(int_value=y)])
    return task_service_pb2.SubmitRequest(task=signature)


async def test_a_call_during_a_backend_outage_is_unavailable_with_a_retry_hint(
    server: Server, redis_proxy: TcpProxy
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        before = await stub.Submit(_add(1, 1), timeout=10)
        redis_proxy.cut()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as submit:
                await stub.Submit(_add(2, 2), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await stub.GetResult(task_service_pb2.GetResultRequest(task_id=before.task_id), timeout=10)
            async with Client(server.address, max_retry_seconds=0) as no_retries:  # the Session stream
                with pytest.raises(grpc.aio.AioRpcError) as session:
                    await no_retries.submit("add", 3, 3)
        finally:
            redis_proxy.restore()

    for refused in (submit.value, read.value, session.value):
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        assert (refused.details() or "").startswith("the broker/backend is unreachable: redis.exceptions.")
    hints = {key: value for key, value in submit.value.trailing_metadata() or ()}
    assert hints["retry-after-ms"] == "1000"
    assert "grpc-status-details-bin" in hints  # google.rpc.Status with RetryInfo


async def test_a_submit_started_during_a_backend_outage_succeeds_after_it_and_runs(
    server: Server, redis_proxy: TcpProxy
) -> None:
    async with Client(server.address) as client:
        before = await client.submit("add", 1, 1)
        assert await client.result(before.task_id, wait=30) == 2
        redis_proxy.cut()
        cut_at = time.monotonic()
        try:
            submitting = asyncio.create_task(client.submit("add", 20, 22))
            reading = asyncio.create_task(client.get_result(before.task_id))
            await asyncio.sleep(OUTAGE_SECONDS)
            assert not submitting.done(), "the submit should still be retrying during the outage"
            assert not reading.done(), "the read should still be retrying during the outage"
        finally:
            redis_proxy.restore()

        submitted = await asyncio.wait_for(submitting, 30)
        assert (await asyncio.wait_for(reading, 30)).task_id == before.task_id

        assert time.monotonic() - cut_at >= OUTAGE_SECONDS
        assert await client.result(submitted.task_id, wait=30) == 42


class _LosesFirstAnswer:
    """Delivers a session call to the server, and the first time reports it lost (UNAVAILABLE),
    as a stream that broke just after the server had answered would."""

    def __init__(self, call: Callable[[task_service_pb2.SessionRequest], Awaitable[task_service_pb2.SessionResponse]]):
        self._call = call
        self.lost: list[task_service_pb2.SessionResponse] = []

    async def __call__(self, request: task_service_pb2.SessionRequest) -> task_service_pb2.SessionResponse:
        response = await self._call(request)
        if not self.lost:
            self.lost.append(response)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "the answer was lost"
            )
        return response


@pytest.mark.parametrize("target", [
    sig("add", 1, 2),
    chain(sig("add", 1, 2), sig("mul", 10)),
    chord(group(sig("add", i, i) for i in range(3)), sig("tsum")),
    group(sig("noop"), sig("noop")),
], ids=["task", "chain", "chord", "group"])
async def test_a_submit_whose_answer_was_lost_is_retried_and_answered_as_its_first_try(
    client: Client, monkeypatch: pytest.MonkeyPatch, target: Canvas
) -> None:
    losing = _LosesFirstAnswer(client._calls.call)
    monkeypatch.setattr(client._calls, "call", losing)

    submitted = await client.submit(target)

    (first,) = (lost.submit for lost in losing.lost)
    assert submitted == Submitted(first.task_id, first.workflow_id, tuple(first.task_ids))


async def test_a_task_id_that_is_taken_on_the_first_try_is_still_refused(client: Client) -> None:
    await client.submit(sig("add", 1, 2).set(id="taken"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.submit(sig("add", 1, 2).set(id="taken"))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
