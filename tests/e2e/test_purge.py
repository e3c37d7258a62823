"""Purging a queue ends its tasks: CANCELLED with error type "Purged", so waits on them return,
and chords and error callbacks that depend on them move on (server and workers as processes)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chord, sig
from conveyor.errors import TaskFailed
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2
from tests.support.processes import Proc, Server, WorkerProc, eventually, log_lines, wait_for_workers

pytestmark = pytest.mark.timeout(180)

WAIT = 30.0


async def purge(address: str, queue: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        reply = await admin.PurgeQueue(admin_service_pb2.PurgeQueueRequest(queue=queue))
        return reply.purged


def assert_purged(result: result_pb2.TaskResult, queue: str) -> None:
    assert result.state == result_pb2.TASK_STATE_CANCELLED, result
    assert result.error.type == "Purged"
    assert repr(queue) in result.error.message
    assert result.finished_at.seconds > 0


async def test_purged_tasks_end_cancelled_and_waits_on_them_return(sqlite_server: Server, client: Client) -> None:
    ready = [(await client.submit(sig("add", i, i).set(queue="doomed"))).task_id for i in range(2)]
    delayed = (await client.submit(sig("add", 9, 9).set(queue="doomed", countdown=600))).task_id
    kept = (await client.submit(sig("add", 1, 1).set(queue="kept"))).task_id
    waits = [asyncio.create_task(client.get_result(task_id, wait=60)) for task_id in [*ready, delayed]]
    await asyncio.sleep(0.5)
    assert not any(wait.done() for wait in waits), "no worker: nothing may have ended yet"

    assert await purge(sqlite_server.address, "doomed") == 3

    # The waits return (long before their 60 s), with the purge as the outcome.
    for result in await asyncio.wait_for(asyncio.gather(*waits), 10):
        assert_purged(result, "doomed")
    with pytest.raises(TaskFailed) as failed:
        await client.result(ready[0], wait=5)
    assert (failed.value.state, failed.value.error_type) == ("CANCELLED", "Purged")
    # Another queue is untouched, and a second purge finds nothing and changes nothing.
    assert (await client.get_result(kept)).state == result_pb2.TASK_STATE_PENDING
    assert await purge(sqlite_server.address, "doomed") == 0
    again = await client.get_result(ready[1])
    assert_purged(again, "doomed")
    assert [entry.state for entry in again.history] == [result_pb2.TASK_STATE_PENDING, result_pb2.TASK_STATE_CANCELLED]


async def test_a_chord_whose_member_was_purged_fails_its_callback(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client
) -> None:
    log = tmp_path / "events.log"
    log.touch()
    procs.append(WorkerProc(tmp_path, sqlite_server.address, env={"CONVEYOR_TEST_LOG": str(log)}))
    wait_for_workers(sqlite_server.address, 1)
    # The worker serves "default" only: the member on "doomed" waits there until the purge.
    members = [sig("member", 1), sig("member", 2).set(queue="doomed"), sig("member", 3)]
    submitted = await client.submit(chord(members, sig("collect").link_error(sig("record_error"))))
    waiting = asyncio.create_task(client.result(submitted.task_id, wait=60))
    await eventually(lambda: len(log_lines(log, "member ")) == 2, WAIT, "the two reachable members ran")
    await asyncio.sleep(0.5)
    assert not waiting.done(), "the chord must wait for its purged member"

    assert await purge(sqlite_server.address, "doomed") == 1

    with pytest.raises(TaskFailed) as failed:
        await asyncio.wait_for(waiting, WAIT)
    assert failed.value.error_type == "ChordMemberFailed"
    assert "Purged" in failed.value.message
    await eventually(lambda: log_lines(log, "error ChordMemberFailed"), WAIT, "the error callback ran")
    assert not log_lines(log, "collect "), "the callback of a failed chord must not run"


@pytest.mark.parametrize("engine", ["redis", "amqp", "sqs"])
async def test_purge_ends_ready_and_delayed_tasks_on_every_broker(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path, procs: list[Proc]
) -> None:
    broker_url: str = request.getfixturevalue(f"{engine}_broker_url")
    backend = f"sqlite:///{tmp_path / 'results.db'}"
    server = Server(tmp_path, broker_url, backend)
    procs.append(server)
    queue = f"doomed_{uuid.uuid4().hex[:8]}"
    async with Client(server.address) as client:
        ready = [(await client.submit(sig("add", i, i).set(queue=queue))).task_id for i in range(3)]
        delayed = (await client.submit(sig("add", 9, 9).set(queue=queue, countdown=600))).task_id

        assert await purge(server.address, queue) == 4

        for task_id in [*ready, delayed]:
            assert_purged(await client.get_result(task_id), queue)
