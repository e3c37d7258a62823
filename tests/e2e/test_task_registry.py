"""The typed task registry end to end (issue #15, item 2): real servers, a Python worker (schemas
from its type hints, tests/e2e/py_tasks.py) and a Node worker (schemas given as options,
tests/e2e/node_typed_tasks.js) as OS processes.

- SQLite default: `conveyor tasks` lists both workers' tasks; strict submits (the request's
  `strict` flag) refuse an unknown name and bad args with INVALID_ARGUMENT naming the field, on
  the unary call and on the client's session stream alike; a json_value that is not JSON is
  refused without strict; a worker that leaves leaves its tasks known but not live.
- Redis, two replicas with `strict_tasks` on: each replica sees the other's workers; a chain
  across them passes the checks and runs; a replica killed with -9 leaves its worker's tasks
  known but not live on the other within three heartbeats.

Needs `node` and workers/node/node_modules, as tests/e2e/test_node.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chain, sig, state_name
from conveyor.call_stream import CallStream
from conveyor.client import to_request
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, task_pb2, task_service_pb2, task_service_pb2_grpc
from tests.e2e.conftest import StartReplicas
from tests.e2e.test_node import NODE, pytestmark
from tests.support.processes import REPO, Proc, Server, WorkerProc, eventually, run_cli, wait_for_workers

__all__ = ["pytestmark"]  # skipped without node, as tests/e2e/test_node.py
WAIT = 60.0


class TypedNodeWorker(Proc):
    """`node tests/e2e/node_typed_tasks.js`: node.scale with a schema, node.untyped without."""

    def __init__(self, log_dir: Path, address: str) -> None:
        assert NODE is not None
        script = REPO / "tests" / "e2e" / "node_typed_tasks.js"
        super().__init__([NODE, str(script), "--address", address], log_dir / f"node-typed-{time.monotonic_ns()}.log")


def listed(address: str) -> dict[str, admin_service_pb2.RegisteredTask]:
    with grpc.insecure_channel(address) as channel:
        reply = admin_service_pb2_grpc.AdminServiceStub(channel).ListRegisteredTasks(
            admin_service_pb2.ListRegisteredTasksRequest(), timeout=10
        )
    return {task.name: task for task in reply.tasks}


def live(address: str, *names: str) -> bool:
    tasks = listed(address)
    return all(name in tasks and tasks[name].worker_ids for name in names)


@pytest.fixture
async def stub(sqlite_server: Server) -> AsyncIterator[task_service_pb2_grpc.TaskServiceAsyncStub]:
    async with grpc.aio.insecure_channel(sqlite_server.address) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


async def refused(stub: task_service_pb2_grpc.TaskServiceAsyncStub, request: task_service_pb2.SubmitRequest) -> str:
    """The details of the INVALID_ARGUMENT the unary Submit answers `request` with."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Submit(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return str(error.value.details())


def strict(canvas: object) -> task_service_pb2.SubmitRequest:
    request = to_request(canvas)  # type: ignore[arg-type]
    request.strict = True
    return request


async def test_tasks_are_listed_and_strict_submits_refuse_unknown_names_and_bad_args(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client,
    stub: task_service_pb2_grpc.TaskServiceAsyncStub,
) -> None:
    address = sqlite_server.address
    py_worker = WorkerProc(tmp_path, address, module="tests.e2e.py_tasks", name="py-worker")
    procs.extend([py_worker, TypedNodeWorker(tmp_path, address)])
    wait_for_workers(address, 2)
    await eventually(lambda: live(address, "py.add", "py.collect", "node.scale", "node.untyped"), 20,
                     "both workers' tasks listed as live")

    table = run_cli(address, "tasks").splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert table[0].split()[:3] == ["NAME", "LIVE", "QUEUES"]
    assert rows["py.add"].split()[1:6] == ["1", "default", "python", "now", "typed"]
    assert rows["node.scale"].split()[1:6] == ["1", "default", "node", "now", "typed"]
    assert rows["node.scale"].endswith("Multiplies a number by an integer factor.")
    assert rows["node.untyped"].split()[5] == "-"
    assert rows["py.collect"].endswith("A chord callback: returns the member results it was given, and their types.")
    as_json = {t["name"]: t for t in json.loads(run_cli(address, "tasks", "--json"))["tasks"]}
    schema = json.loads(as_json["py.add"]["callSchema"])
    assert schema["properties"]["args"]["prefixItems"] == [{"type": "integer"}, {"type": "integer"}]

    # Refused by the unary call and by the client's session, with the field named.
    assert await refused(stub, strict(sig("py.nope", 1))) == (
        "request.task: no worker has registered task 'py.nope' (a strict submit needs one)"
    )
    assert await refused(stub, strict(sig("py.add", 1, "abc"))) == (
        "request.task.args[1]: 'abc' is not of type 'integer' (task 'py.add')"
    )
    assert await refused(stub, strict(sig("node.scale", 2.5, 1.5))) == (
        "request.task.args[1]: 1.5 is not of type 'integer' (task 'node.scale')"
    )
    assert await refused(stub, strict(chain(sig("py.add", 1, 2), sig("node.scale", "ten")))) == (
        "request.workflow.chain[1].args[0]: 'ten' is not of type 'integer' (task 'node.scale')"
    )
    session = CallStream(stub, ())
    with pytest.raises(grpc.aio.AioRpcError) as on_session:
        await session.call(task_service_pb2.SessionRequest(submit=strict(sig("py.add", y="x"))))
    await session.close()
    assert on_session.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert on_session.value.details() == "request.task.kwargs: 'x' is a required property (task 'py.add')"
    not_json = task_pb2.Signature(name="py.echo", args=[task_pb2.Value(json_value="[1,")])
    assert (await refused(stub, task_service_pb2.SubmitRequest(task=not_json))).startswith(
        "request.task.args[0]: json_value is not valid JSON"
    ), "refused in every mode"

    # What matches runs; a chain step gets the previous result as its first arg.
    accepted = await stub.Submit(strict(chain(sig("py.add", 1, 2), sig("node.scale", 10), sig("node.untyped", "x"))))
    assert await client.result(accepted.task_id, wait=WAIT) == [30, "x"]

    # A worker that leaves: its tasks stay known (strict submits still pass, and wait), not live.
    py_worker.stop()
    await eventually(lambda: not listed(address)["py.add"].worker_ids, 20, "py.add no longer live")
    waiting = await stub.Submit(strict(sig("py.add", 2, 3)))
    assert state_name((await client.get_result(waiting.task_id)).state) == "PENDING"


async def test_two_replicas_on_redis_share_the_registry_and_check_every_submit(
    tmp_path: Path, procs: list[Proc], redis_replicas: StartReplicas
) -> None:
    replicas = first, second = redis_replicas({"CONVEYOR_STRICT_TASKS": "true"})
    procs.append(WorkerProc(tmp_path, first.address, module="tests.e2e.py_tasks", name="py-worker"))
    procs.append(TypedNodeWorker(tmp_path, second.address))
    wait_for_workers(first.address, 1)
    wait_for_workers(second.address, 1)
    for server in replicas:
        await eventually(lambda s=server: live(s.address, "py.add", "node.scale"), 20,  # type: ignore[misc]
                         f"both workers' tasks live on {server.address}")

    async with Client(second.address) as client, grpc.aio.insecure_channel(first.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        # strict_tasks: every submit is checked, without the request's flag.
        assert await refused(stub, to_request(sig("py.nope"))) == (
            "request.task: no worker has registered task 'py.nope' (a strict submit needs one)"
        )
        assert await refused(stub, to_request(sig("node.scale", 1, 2, 3))) == (
            "request.task.args: Expected at most 2 items but found 1 extra: 3 (task 'node.scale')"
        )
        submitted = await client.submit(chain(sig("py.add", 1, 2), sig("node.scale", 10), sig("py.add", 5)))
        assert await client.result(submitted.task_id, wait=WAIT) == 35

        # Replica 0 dies with the Python worker's stream: nobody rewrites its entry, which goes stale.
        first.kill9()
        await eventually(lambda: not listed(second.address)["py.add"].worker_ids, 30,
                         "py.add no longer live on the surviving replica")
        assert listed(second.address)["node.scale"].worker_ids, "the surviving replica's worker is still live"
        waiting = await client.submit(sig("py.add", 2, 3))  # still known: accepted, and it waits
        assert state_name((await client.get_result(waiting.task_id)).state) == "PENDING"
