"""The `conveyor` operator commands for dead letters, purges and queues, as users run them: the
real binary against a real server (SQLite) with one worker on the default queue. Other queues
have no worker, so their tasks wait there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.cli import Ran, conveyor, sqlite_server_with_worker
from tests.support.processes import REPO, Server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server (SQLite) with one worker on the default queue, shared by this module's tests."""
    yield from sqlite_server_with_worker(tmp_path_factory.mktemp("cli-admin"))


def dead_letter(server: Server, message: str) -> str:
    """The id of a task that failed for good, once it is on the dead-letter list."""
    ran = conveyor("submit", "fail", message, "--wait", "30", address=server.address)
    assert ran.code == 1, ran.err
    task_id = ran.lines[0]
    wait_for(lambda: task_id in conveyor("dead", "list", address=server.address).out, 20, "the dead letter")
    return task_id


def refused(ran: Ran, code: str) -> str:
    """The one-line refusal of a command that exited 1 with the gRPC status `code`."""
    assert ran.code == 1, (ran.out, ran.err)
    assert len(ran.err.splitlines()) == 1 and ran.err.startswith(f"conveyor: {code}: "), ran.err
    return ran.err.removeprefix(f"conveyor: {code}: ").strip()


def queue_rows(server: Server, *flags: str) -> dict[str, list[str]]:
    ran = conveyor("queues", *flags, address=server.address)
    assert ran.code == 0, ran.err
    return {row.split()[0]: row.split()[1:] for row in ran.lines[1:]}


def test_dead_replay_replays_only_dead_letters_and_each_one_once(server: Server) -> None:
    dead_id = dead_letter(server, "replay-me")
    ok = conveyor("submit", "add", "1", "2", "--wait", "30", address=server.address)
    ok_id = ok.lines[0]

    unknown = refused(conveyor("dead", "replay", "no-such-task", address=server.address), "NOT_FOUND")
    assert unknown == "no task with id 'no-such-task' (unknown, or its record expired): nothing replayed"
    not_dead = refused(conveyor("dead", "replay", dead_id, ok_id, address=server.address), "FAILED_PRECONDITION")
    assert not_dead.startswith(f"task '{ok_id}' is SUCCESS, not a dead letter")
    assert dead_id in conveyor("dead", "list", address=server.address).out, "a refused replay replays nothing"

    first = conveyor("dead", "replay", dead_id, address=server.address)
    assert first.code == 0, first.err
    header, new_id = first.lines
    assert header == "replayed 1 dead letters as new tasks:" and new_id != dead_id
    again = conveyor("-o", "json", "dead", "replay", dead_id, address=server.address)
    assert (again.code, json.loads(again.out)) == (0, {"taskIds": [new_id]}), "the first replay's task, no other"
    replayed = conveyor("get", new_id, "--wait", "30", address=server.address)
    assert replayed.code == 1 and replayed.err.endswith("ended FAILURE: ValueError: replay-me\n"), "the same call"
    assert dead_id not in conveyor("dead", "list", address=server.address).out


def test_dead_delete_takes_a_dead_letter_off_the_list(server: Server) -> None:
    dead_id = dead_letter(server, "delete-me")
    deleted = conveyor("dead", "delete", dead_id, address=server.address)
    assert (deleted.code, deleted.out) == (0, f"deleted dead letter {dead_id}\n"), deleted.err
    assert dead_id not in conveyor("dead", "list", address=server.address).out
    again = refused(conveyor("dead", "delete", dead_id, address=server.address), "FAILED_PRECONDITION")
    assert again.startswith(f"task '{dead_id}' is not a dead letter")
    refused(conveyor("dead", "replay", dead_id, address=server.address), "FAILED_PRECONDITION")
    assert "no task with id 'nope'" in refused(conveyor("dead", "delete", "nope", address=server.address), "NOT_FOUND")


def test_a_purge_ends_a_wait_and_a_cancelled_task_is_not_counted_as_ready(server: Server) -> None:
    ids = [conveyor("submit", "add", "1", str(i), "--queue", "held", address=server.address).out.strip()
           for i in range(3)]
    argv = [sys.executable, "-m", "conveyor_server.cli", "get", ids[0], "--wait", "60", "--address", server.address]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as waiting:
        assert conveyor("cancel", ids[2], address=server.address).out == f"{ids[2]}\n"
        assert queue_rows(server)["held"][:2] == ["2", "0"], "ready: the two tasks not cancelled"
        assert conveyor("purge", "held", address=server.address).code == 0
        out, err = waiting.communicate(timeout=20)  # long before its 60 s
    assert waiting.returncode == 1, (out, err)
    assert err.startswith(f"conveyor: task {ids[0]} ended CANCELLED: Purged: dropped from queue 'held'"), err


def test_queues_lists_active_ones_unless_all_and_queue_delete_removes_an_empty_one(server: Server) -> None:
    assert conveyor("submit", "add", "1", "1", "--queue", "idle-q", address=server.address).code == 0
    assert conveyor("purge", "idle-q", address=server.address).code == 0
    active = queue_rows(server)
    assert "default" in active, "a worker serves it"
    assert "idle-q" not in active, "known to the broker, but empty and served by no worker"
    assert queue_rows(server, "--all")["idle-q"] == ["0", "0", "0", "0", "no"]

    deleted = conveyor("queue", "delete", "idle-q", address=server.address)
    assert (deleted.code, deleted.out) == (0, "deleted queue idle-q\n"), deleted.err
    assert "idle-q" not in queue_rows(server, "--all")
    gone = refused(conveyor("queue", "delete", "idle-q", address=server.address), "NOT_FOUND")
    assert gone == "no queue named 'idle-q'"

    task_id = conveyor("submit", "add", "2", "2", "--queue", "full-q", address=server.address).out.strip()
    full = refused(conveyor("queue", "delete", "full-q", address=server.address), "FAILED_PRECONDITION")
    assert full.startswith("queue 'full-q' is not empty (1 ready, 0 delayed, 0 in flight): not deleted")
    forced = conveyor("queue", "delete", "full-q", "--force", address=server.address)
    assert (forced.code, forced.out) == (0, "deleted queue full-q (purged 1 tasks first)\n"), forced.err
    assert "full-q" not in queue_rows(server, "--all")
    ended = conveyor("get", task_id, address=server.address)
    assert ended.code == 1 and "ended CANCELLED: Purged" in ended.err
