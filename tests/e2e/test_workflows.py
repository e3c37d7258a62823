"""Workflow acceptance with real worker processes: chains, chords, failures, nesting, replicas."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chain, chord, group, si, sig, state_name
from conveyor.errors import TaskFailed
from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc, workflow_pb2
from tests.support.processes import Proc, Server, WorkerProc, eventually, settled, wait_for_workers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.log"
    path.touch()
    return path


def lines(log_file: Path, prefix: str) -> list[str]:
    return [line for line in log_file.read_text().splitlines() if line.startswith(prefix)]


@pytest.fixture
def workers(tmp_path: Path, procs: list[Proc], sqlite_server: Server, log_file: Path) -> list[WorkerProc]:
    started = [
        WorkerProc(tmp_path, sqlite_server.address, env={"CONVEYOR_TEST_LOG": str(log_file)}) for _ in range(3)
    ]
    procs.extend(started)
    wait_for_workers(sqlite_server.address, len(started))
    return started


async def test_chain_passes_results_and_immutable_steps_ignore_them(workers: list[WorkerProc], client: Client) -> None:
    submitted = await client.submit(chain(sig("add", 1, 2), sig("mul", 10), sig("add", 5)))
    assert await client.result(submitted.task_id, wait=30) == 35
    immutable = await client.submit(chain(sig("add", 1, 2), si("add", 10, 20)))
    assert await client.result(immutable.task_id, wait=30) == 30


async def test_chord_of_50_across_3_workers_fires_once_in_member_order(
    workers: list[WorkerProc], client: Client, log_file: Path
) -> None:
    submitted = await client.submit(chord([sig("member", i) for i in range(50)], sig("collect")))
    assert await client.result(submitted.task_id, wait=60) == [i * i for i in range(50)]
    assert len(await settled(lambda: lines(log_file, "collect"))) == 1  # and stays so
    pids = {line.split("pid=")[1] for line in lines(log_file, "member")}
    assert len(pids) >= 2, "members should spread over the workers"


async def test_chord_fires_once_when_results_are_reported_twice_or_a_worker_dies(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, log_file: Path
) -> None:
    env = {"CONVEYOR_TEST_LOG": str(log_file)}
    raw = [sys.executable, "-m", "tests.e2e.raw_worker", sqlite_server.address]
    # Members go to the raw workers; the callback to its own queue, served by a normal worker.
    callback = sig("collect").set(queue="callbacks")
    submitted = await client.submit(chord([sig("member", i) for i in range(50)], callback))
    dying = Proc([*raw, "die-after", "5"], tmp_path / "raw-dying.log", env)
    procs.append(dying)
    dying.popen.wait(30)
    assert dying.popen.returncode == 9
    procs.append(Proc([*raw, "duplicate"], tmp_path / "raw-duplicate.log", env))
    procs.append(WorkerProc(tmp_path, sqlite_server.address, queues=["callbacks"], env=env))

    assert await client.result(submitted.task_id, wait=60) == [i * i for i in range(50)]
    assert len(await settled(lambda: lines(log_file, "collect"))) == 1  # and stays so
    assert any("ACK_STATUS_ALREADY_DONE" in line for line in lines(log_file, "ack")), "duplicates were refused"
    assert lines(log_file, "member") and any("raw=die-after" in line for line in lines(log_file, "member"))


async def test_chord_failure_policies_and_error_callbacks(
    workers: list[WorkerProc], client: Client, log_file: Path
) -> None:
    members = [sig("member", 1), sig("fail", "member two broke"), sig("member", 3)]
    failing = await client.submit(chord(members, sig("collect").link_error(sig("record_error"))))
    with pytest.raises(TaskFailed) as failed:
        await client.result(failing.task_id, wait=30)
    assert failed.value.error_type == "ChordMemberFailed"
    assert "member two broke" in failed.value.message
    await eventually(lambda: lines(log_file, "error ChordMemberFailed"), 20.0, "the chord's error callback ran")

    continuing = await client.submit(chord(members, sig("collect"), failure_policy="continue"))
    partial = await client.result(continuing.task_id, wait=30)
    assert partial[0] == 1
    assert partial[2] == 9
    assert partial[1] == {"error": {"type": "ValueError", "message": "member two broke"}}


async def test_on_error_callbacks_of_a_task_and_a_chain(
    workers: list[WorkerProc], client: Client, log_file: Path
) -> None:
    task = await client.submit(sig("fail", "lone failure").link_error(sig("record_error")))
    with pytest.raises(TaskFailed, match="lone failure"):
        await client.result(task.task_id, wait=30)
    flow = chain(sig("add", 1, 2), si("fail", "step two failed"), sig("add", 5)).link_error(sig("record_error"))
    submitted = await client.submit(flow)
    await eventually(lambda: lines(log_file, "error ValueError step two failed"), 20.0, "the chain's error callback")
    assert lines(log_file, "error ValueError lone failure")
    tree = await client.get_workflow(submitted.workflow_id)
    states = [state_name(step.state) for step in tree.root.children]
    assert states == ["SUCCESS", "FAILURE", "CANCELLED"]
    success = await client.submit(sig("add", 2, 2).link(sig("mul", 10)))
    assert await client.result(success.task_id, wait=30) == 4
    assert await client.result(f"{success.task_id}.ok0", wait=30) == 40


async def test_nested_canvases(workers: list[WorkerProc], client: Client) -> None:
    flow = chain(sig("add", 1, 2), group(sig("mul", 10), sig("mul", 100)), sig("tsum"))
    assert await client.result((await client.submit(flow)).task_id, wait=30) == 330
    nested_chord = chord(group(chain(sig("add", 1, 1), sig("mul", 3)), sig("add", 2, 2)), sig("tsum"))
    assert await client.result((await client.submit(nested_chord)).task_id, wait=30) == 10
    empty = chord([], sig("collect"))
    assert await client.result((await client.submit(empty)).task_id, wait=30) == []
    chord_in_chain = chain(chord([sig("member", 2), sig("member", 3)], sig("tsum")), sig("mul", 2))
    assert await client.result((await client.submit(chord_in_chain)).task_id, wait=30) == 26


async def test_watch_a_workflow_and_read_its_tree(workers: list[WorkerProc], client: Client) -> None:
    submitted = await client.submit(chain(sig("add", 1, 2), group(sig("mul", 2), sig("mul", 3))))
    events = [e async for e in client.watch(workflow_id=submitted.workflow_id)]
    finished = {e.task_id for e in events if state_name(e.state) == "SUCCESS"}
    assert finished == set(submitted.task_ids)
    tree = await client.get_workflow(submitted.workflow_id)
    assert tree.root.kind == "chain"
    assert [c.kind for c in tree.root.children] == ["task", "group"]
    assert state_name(tree.root.state) == "SUCCESS"
    assert tree.root.children[1].children[1].task.result.int_value == 9


async def test_workflow_limits_are_invalid_argument(sqlite_server: Server, client: Client) -> None:
    deep = sig("leaf").to_workflow()
    for _ in range(40):
        deep = workflow_pb2.Workflow(chain=workflow_pb2.Chain(steps=[deep]))
    with pytest.raises(ValueError, match="nests more than 32 levels deep"):
        await client.submit(deep)  # the SDK refuses it itself
    # Callbacks count toward the limits too: 60 levels of them, or 50,000 on one task.
    nested = task_pb2.Signature(name="leaf")
    innermost = nested
    for _ in range(60):
        innermost = innermost.on_success.add(name="cb")
    many = task_pb2.Signature(name="leaf", on_success=[task_pb2.Signature(name="cb") for _ in range(50_000)])
    refused = [
        (task_service_pb2.SubmitRequest(workflow=deep), "deeper than the limit of 32 (max_workflow_depth"),
        (task_service_pb2.SubmitRequest(task=nested), "deeper than the limit of 32 (max_workflow_depth"),
        (task_service_pb2.SubmitRequest(task=many), "50001 tasks, over the limit of 10000 (max_workflow_tasks"),
    ]
    async with grpc.aio.insecure_channel(sqlite_server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)  # past the SDK's own check
        for request, limit in refused:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Submit(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert limit in (raised.value.details() or "")


async def test_two_replicas_over_one_store_fire_a_chord_once(
    tmp_path: Path, procs: list[Proc], log_file: Path
) -> None:
    db = tmp_path / "shared.db"
    first = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", name="replica-a")
    second = Server(tmp_path, f"sqlite:///{db}", f"sqlite:///{db}", name="replica-b")
    procs.extend([first, second])
    env = {"CONVEYOR_TEST_LOG": str(log_file)}
    procs.append(WorkerProc(tmp_path, first.address, env=env, name="worker-a"))
    procs.append(WorkerProc(tmp_path, second.address, env=env, name="worker-b"))
    wait_for_workers(first.address, 1)
    wait_for_workers(second.address, 1)
    async with Client(first.address) as client_a, Client(second.address) as client_b:
        # Members last 0.1 s, so one replica's worker cannot drain the queue before the other's pump looks.
        members = [sig("member", i, seconds=0.1) for i in range(40)]
        submitted = await client_a.submit(chord(members, sig("collect")))
        # The result is readable through either replica.
        assert await client_b.result(submitted.task_id, wait=60) == [i * i for i in range(40)]
    assert len(await settled(lambda: lines(log_file, "collect"))) == 1  # and stays so
    pids = {line.split("pid=")[1] for line in lines(log_file, "member")}
    assert len(pids) == 2, "members finished on workers of both replicas"

