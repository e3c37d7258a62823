"""Operator commands end to end: servers, workers and the `conveyor` CLI as real processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2
from tests.support.processes import (
    Proc,
    Server,
    WorkerProc,
    log_lines,
    run_cli,
    wait_for,
    wait_for_workers,
)

# Schedulers look for due ticks five times a second, so a seconds cron is exact enough to count.
FAST_SCHEDULER = {"CONVEYOR_SCHEDULE_TICK_SECONDS": "0.2"}


def cli_json(address: str, *args: str) -> Any:
    return json.loads(run_cli(address, "-o", "json", *args))


def queue_info(address: str, name: str) -> dict[str, Any]:
    for queue in cli_json(address, "queues", "--all")["queues"]:  # idle queues too
        if queue["name"] == name:
            return dict(queue)
    return {}


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'conveyor.db'}"


@pytest.fixture
def server(tmp_path: Path, procs: list[Proc]) -> Server:
    url = sqlite_url(tmp_path)
    started = Server(tmp_path, url, url, env=FAST_SCHEDULER)
    procs.append(started)
    return started


async def states(client: Client, task_ids: list[str]) -> list[int]:
    return [(await client.get_result(task_id)).state for task_id in task_ids]


# -- pause / resume -----------------------------------------------------------------------------

async def test_a_paused_queue_keeps_its_tasks_until_resumed(
    tmp_path: Path, procs: list[Proc], server: Server
) -> None:
    procs.append(WorkerProc(tmp_path, server.address, queues=("paced",)))
    wait_for_workers(server.address, 1)
    assert cli_json(server.address, "pause", "paced") == {}
    async with Client(server.address) as client:
        ids = [(await client.submit(sig("add", i, 1).set(queue="paced"))).task_id for i in range(3)]
        await asyncio.sleep(2.5)  # longer than a fetch wait and a pause refresh
        assert await states(client, ids) == [result_pb2.TASK_STATE_PENDING] * 3
        info = queue_info(server.address, "paced")
        assert info["paused"] is True
        assert info["ready"] == 3

        assert cli_json(server.address, "resume", "paced") == {}
        results = [await client.get_result(task_id, wait=20) for task_id in ids]
        assert [r.state for r in results] == [result_pb2.TASK_STATE_SUCCESS] * 3
    assert queue_info(server.address, "paced")["paused"] is False
    # Resuming a queue that is not paused is fine.
    assert cli_json(server.address, "resume", "paced") == {}


async def test_a_pause_survives_a_server_restart(tmp_path: Path, procs: list[Proc], server: Server) -> None:
    run_cli(server.address, "pause", "later")
    assert queue_info(server.address, "later") == {  # shown though empty
        "name": "later", "ready": 0, "delayed": 0, "inFlight": 0, "paused": True, "unroutable": 0,
    }
    server.stop()
    server.restart()
    assert queue_info(server.address, "later")["paused"] is True
    procs.append(WorkerProc(tmp_path, server.address, queues=("later",)))
    wait_for_workers(server.address, 1)
    async with Client(server.address) as client:
        task_id = (await client.submit(sig("mul", 6, 7).set(queue="later"))).task_id
        await asyncio.sleep(2.5)
        assert (await client.get_result(task_id)).state == result_pb2.TASK_STATE_PENDING
        run_cli(server.address, "resume", "later")
        assert (await client.get_result(task_id, wait=20)).state == result_pb2.TASK_STATE_SUCCESS


def test_pause_refuses_a_bad_queue_name(server: Server) -> None:
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: invalid queue name 'no spaces'"):
        run_cli(server.address, "pause", "no spaces")


# -- queues, workers, inspect, purge ------------------------------------------------------------

async def test_queue_depths_and_worker_in_flight(tmp_path: Path, procs: list[Proc], server: Server) -> None:
    procs.append(WorkerProc(tmp_path, server.address, queues=("busy",), concurrency=2, prefetch=1))
    wait_for_workers(server.address, 1)
    async with Client(server.address) as client:
        ids = [(await client.submit(sig("sleep", 4).set(queue="busy"))).task_id for _ in range(5)]
        wait_for(lambda: queue_info(server.address, "busy").get("inFlight") == 2, 20, "two tasks leased")
        busy = queue_info(server.address, "busy")
        assert (busy["ready"], busy["inFlight"], busy["delayed"]) == (3, 2, 0)
        (worker,) = cli_json(server.address, "workers")["workers"]
        assert worker["queues"] == ["busy"]
        assert worker["maxInFlight"] == 2
        assert worker["inFlight"] == 2
        assert len(ids) == 5


async def test_inspect_a_task(tmp_path: Path, procs: list[Proc], server: Server) -> None:
    procs.append(WorkerProc(tmp_path, server.address))
    async with Client(server.address) as client:
        task_id = (await client.submit(sig("add", 2, 3))).task_id
        await client.get_result(task_id, wait=20)
    inspected = cli_json(server.address, "inspect", task_id)["result"]
    assert inspected["taskId"] == task_id
    assert inspected["name"] == "add"
    assert inspected["state"] == "SUCCESS"
    assert inspected["result"] == 5
    assert inspected["signature"]["args"] == [2, 3]
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        run_cli(server.address, "inspect", "no-such-task")


async def test_purge_a_queue(server: Server) -> None:
    async with Client(server.address) as client:
        for i in range(3):
            await client.submit(sig("add", i, i).set(queue="doomed"))
        await client.submit(sig("add", 1, 1).set(queue="kept"))
    assert cli_json(server.address, "purge", "doomed") == {"purged": 3}
    assert queue_info(server.address, "doomed")["ready"] == 0
    assert queue_info(server.address, "kept")["ready"] == 1


# -- schedules ----------------------------------------------------------------------------------

def fired_ticks(log: Path, name: str) -> list[int]:
    """Ticks whose task ran, from `stamp <name> cron-<name>-<tick> at=...` lines (in run order)."""
    return [int(line.split()[2].rsplit("-", 1)[1]) for line in log_lines(log, f"stamp {name} ")]


def test_a_schedule_fires_once_per_tick_across_two_replicas(tmp_path: Path, procs: list[Proc]) -> None:
    url = sqlite_url(tmp_path)
    one = Server(tmp_path, url, url, env=FAST_SCHEDULER, name="replica-1")
    procs.append(one)
    two = Server(tmp_path, url, url, env=FAST_SCHEDULER, name="replica-2")
    procs.append(two)
    log = tmp_path / "runs.log"
    procs.append(WorkerProc(tmp_path, one.address, env={"CONVEYOR_TEST_LOG": str(log)}))
    procs.append(WorkerProc(tmp_path, two.address, env={"CONVEYOR_TEST_LOG": str(log)}))
    wait_for_workers(one.address, 1)
    wait_for_workers(two.address, 1)

    created = cli_json(two.address, "schedule", "add", "every2", "*/2 * * * * *", "stamp", "every2")["schedule"]
    assert created["cron"] == "*/2 * * * * *"
    assert created["missedTicks"] == "SKIP"
    assert created["task"]["queue"] == "default"
    wait_for(lambda: len(fired_ticks(log, "every2")) >= 5, 30, "five ticks fired")

    listed = cli_json(one.address, "schedule", "list")["schedules"]
    assert [s["name"] for s in listed] == ["every2"]
    assert listed[0]["lastRunAt"]

    # Paused through one replica, it fires on neither; resumed through the other, it fires again.
    assert cli_json(one.address, "schedule", "pause", "every2")["schedule"]["paused"] is True
    time.sleep(1.0)  # a pass that read the schedule just before the pause may still fire once
    while_paused = len(fired_ticks(log, "every2"))
    time.sleep(4.0)
    assert len(fired_ticks(log, "every2")) == while_paused, "a paused schedule kept firing"
    assert "paused" in run_cli(two.address, "schedule", "list").split()
    assert not cli_json(two.address, "schedule", "resume", "every2")["schedule"].get("paused")
    wait_for(lambda: len(fired_ticks(log, "every2")) >= while_paused + 2, 15, "ticks fired after the resume")

    assert cli_json(one.address, "schedule", "delete", "every2") == {}
    time.sleep(1.0)  # a pass that read the schedule just before the delete may still fire once
    after_delete = fired_ticks(log, "every2")
    time.sleep(4.0)
    assert fired_ticks(log, "every2") == after_delete, "a deleted schedule kept firing"
    assert cli_json(two.address, "schedule", "list") == {"schedules": []}

    ticks = sorted(after_delete)
    assert len(set(ticks)) == len(ticks), f"a tick fired twice: {ticks}"
    assert all(tick % 2 == 0 for tick in ticks)
    before, after = ticks[:while_paused], ticks[while_paused:]
    for run in (before, after):  # every tick while running, none while paused
        assert [b - a for a, b in itertools.pairwise(run)] == [2] * (len(run) - 1), f"ticks missed: {ticks}"
    assert after[0] - before[-1] >= 4, f"ticks fired while it was paused: {ticks}"  # paused >= 4 s after settling


def test_schedule_cli_refuses_bad_input(server: Server) -> None:
    with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT: schedule\.cron '61 \* \* \* \*' is not a valid"):
        run_cli(server.address, "schedule", "add", "bad", "61 * * * *", "noop")
    with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT: schedule\.cron .*expected 5 fields"):
        run_cli(server.address, "schedule", "add", "bad", "* * *", "noop")
    with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT: schedule\.name"):
        run_cli(server.address, "schedule", "add", "no spaces", "* * * * *", "noop")
    with pytest.raises(RuntimeError, match="NOT_FOUND: no schedule named 'nope'"):
        run_cli(server.address, "schedule", "delete", "nope")
    assert cli_json(server.address, "schedule", "list") == {"schedules": []}


def test_schedule_add_replaces_and_keeps_options(server: Server) -> None:
    run_cli(server.address, "schedule", "add", "nightly", "0 3 * * *", "echo", "1", "x", "--kw", "k=2")
    replaced = cli_json(
        server.address, "schedule", "add", "nightly", "30 4 * * *", "echo", "--queue", "maint",
        "--missed", "run-once", "--priority", "5",
    )["schedule"]
    assert replaced["cron"] == "30 4 * * *"
    assert replaced["missedTicks"] == "RUN_ONCE"
    assert replaced["task"]["queue"] == "maint"
    assert replaced["task"]["priority"] == 5
    assert replaced["nextRunAt"].endswith("04:30:00Z")
    (listed,) = cli_json(server.address, "schedule", "list")["schedules"]
    assert listed == replaced


async def test_admin_service_schedules_over_grpc(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        schedule = admin_service_pb2.Schedule(name="hourly", cron="@hourly", task=sig("noop").to_proto())
        created = (await admin.CreateSchedule(admin_service_pb2.CreateScheduleRequest(schedule=schedule))).schedule
        assert created.next_run_at.seconds % 3600 == 0
        assert created.next_run_at.seconds > time.time()
        listed = (await admin.ListSchedules(admin_service_pb2.ListSchedulesRequest())).schedules
        assert list(listed) == [created]
        await admin.DeleteSchedule(admin_service_pb2.DeleteScheduleRequest(name="hourly"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.DeleteSchedule(admin_service_pb2.DeleteScheduleRequest(name="hourly"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
