"""The Python SDK as users hold it: submit handles, SyncClient mirroring Client, the SDK's own
errors, task states as an enum and the environment defaults, against an in-process server
(memory engines) and worker."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator

import grpc
import pytest

from conveyor import (
    CallRetry,
    Client,
    ConveyorError,
    InvalidArgument,
    State,
    Submitted,
    SyncClient,
    TaskFailed,
    TaskNotFound,
    Worker,
    chain,
    sig,
    state_name,
)
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from tests.support.processes import until


@pytest.fixture
async def address() -> AsyncIterator[str]:
    # No dashboard (http_port=0): its uvicorn loop ticks every 0.1 s, so stopping it takes that long.
    server = ConveyorServer(Settings(port=0, broker_url="memory://", backend_url="memory://", http_port=0))
    port = await server.start()
    worker = Worker(f"127.0.0.1:{port}", concurrency=4)

    @worker.task("add")
    def add(x: int, y: int) -> int:
        return x + y

    @worker.task("fail")
    def fail() -> None:
        raise ValueError("boom")

    running = asyncio.create_task(worker.run())
    # Connected, so its task names are registered: a strict submit of "add" would be refused
    # before (seen when test_strict_tasks_refuses_an_unregistered_name ran first).
    await until(server.core.admin.workers, what="the worker connected")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        worker.stop()
        await running
        await server.stop()


async def test_submit_returns_a_handle(address: str) -> None:
    async with Client(address) as client:
        submitted = await client.submit("add", 2, 3)
        assert submitted.task_id and submitted.workflow_id == ""
        assert await submitted.result(timeout=20) == 5
        assert await submitted.state() is State.SUCCESS
        assert [State(e.state) for e in [e async for e in submitted.watch()]][-1] is State.SUCCESS
        assert await submitted.cancel() == []  # finished: nothing left to cancel

        workflow = await client.submit(chain(sig("add", 1, 2), sig("add", 10)))
        assert workflow.workflow_id
        assert await workflow.result(timeout=20) == 13
        assert {e.task_id async for e in workflow.watch()} == set(workflow.task_ids)

        slow = await client.submit(sig("add", 1, 1).set(countdown=3600))
        assert await slow.state() is State.PENDING
        assert await slow.cancel() == [slow.task_id]
        assert (await slow.state()).done


async def test_handles_compare_by_ids_and_hand_made_ones_say_how_to_use_them(address: str) -> None:
    async with Client(address) as client:
        submitted = await client.submit("add", 1, 1)
        assert submitted == Submitted(submitted.task_id, "", submitted.task_ids)
        assert await client.result(Submitted(submitted.task_id, "", ()), wait=20) == 2
    with pytest.raises(RuntimeError, match="made by hand"):
        await Submitted("x", "", ()).result()


async def test_errors_are_the_sdks_and_still_grpc_errors(address: str) -> None:
    async with Client(address) as client:
        with pytest.raises(TaskNotFound) as missing:
            await client.cancel("no-such-task")
        assert isinstance(missing.value, ConveyorError)
        assert isinstance(missing.value, grpc.aio.AioRpcError)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InvalidArgument):
            await client.submit(sig("add").set(queue="no spaces"))
        with pytest.raises(TaskFailed, match="ValueError: boom") as failed:
            await (await client.submit("fail")).result(timeout=20)
        assert failed.value.state == "FAILURE"


async def test_strict_tasks_refuses_an_unregistered_name(address: str) -> None:
    async with Client(address, strict_tasks=True) as strict:
        await strict.submit("add", 1, 1)
        with pytest.raises(ConveyorError) as refused:
            await strict.submit("no_such_task")
        assert isinstance(refused.value, grpc.aio.AioRpcError)
    async with Client(address) as lenient:
        assert (await lenient.submit("no_such_task")).task_id


async def test_the_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("CONVEYOR_ADDRESS", address)
    async with Client() as client:
        assert client.address == address
        assert await (await client.submit("add", 4, 4)).result(timeout=20) == 8


def test_states_are_an_enum_that_keeps_the_wire_numbers() -> None:
    assert int(State.SUCCESS) == 5 and State(7) is State.CANCELLED
    assert state_name(State.FAILURE) == "FAILURE"
    assert [s.name for s in State if s.done] == ["SUCCESS", "FAILURE", "CANCELLED", "EXPIRED"]


def _public(kind: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(kind) if not name.startswith("_")}


def test_sync_client_mirrors_client() -> None:
    assert _public(SyncClient) - {"address"} == _public(Client)  # Client's address is an instance attribute
    for name in _public(SyncClient) - {"address"}:
        sync_parameters = list(inspect.signature(getattr(SyncClient, name)).parameters)
        assert sync_parameters == list(inspect.signature(getattr(Client, name)).parameters), name


async def test_sync_client_handles(address: str) -> None:
    def use() -> None:
        with SyncClient(address) as client:
            submitted = client.submit("add", 20, 22)
            assert submitted.result(timeout=20) == 42
            assert client.result(submitted) == 42
            assert submitted.state() is State.SUCCESS
            assert [State(e.state) for e in submitted.watch()][-1] is State.SUCCESS
            assert submitted.cancel() == []
            with pytest.raises(TaskNotFound):
                client.get_result("no-such-task")

    await asyncio.to_thread(use)


def test_call_retries_double_from_a_tenth_of_a_second_up_to_one_second_with_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = CallRetry()
    monkeypatch.setattr(random, "random", lambda: 0.0)  # no jitter taken off
    assert [policy.backoff(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.backoff(3, asked=2.5) == 2.5, "the server's hint wins when longer"
    monkeypatch.setattr(random, "random", lambda: 1.0)  # the most jitter takes off half
    assert policy.backoff(10) == 0.5
