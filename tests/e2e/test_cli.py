"""The `conveyor` command as users run it: the real binary against a real server and worker,
checking what it prints and its exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import __version__
from tests.support.cli import conveyor, sqlite_server_with_worker
from tests.support.processes import REPO, Server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server (SQLite) with one worker on the default queue, shared by this module's tests."""
    yield from sqlite_server_with_worker(tmp_path_factory.mktemp("cli"))


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[Server]:
    """A server with no worker and nothing stored."""
    url = f"sqlite:///{tmp_path / 'idle.db'}"
    started = Server(tmp_path, url, url)
    try:
        yield started
    finally:
        started.stop()


def test_version() -> None:
    ran = conveyor("--version")
    assert (ran.code, ran.out.strip()) == (0, f"conveyor {__version__}")


def test_submit_wait_prints_the_id_then_the_value_and_exits_0(server: Server) -> None:
    ran = conveyor("submit", "add", "2", "3", "--wait", "30", address=server.address)
    assert ran.code == 0, ran.err
    task_id, value = ran.lines
    assert value == "5"
    got = conveyor("get", task_id, "--wait", "5", address=server.address)
    assert (got.code, got.out) == (0, "5\n")


def test_json_output_is_plain_values(server: Server) -> None:
    ran = conveyor("submit", "echo", '{"a": [1, 2]}', "-o", "json", "--wait", "30", address=server.address)
    assert ran.code == 0, ran.err
    task_id, body = ran.out.split("\n", 1)
    record = json.loads(body)
    assert record["taskId"] == task_id
    assert record["state"] == "SUCCESS"
    assert record["attempts"] == 1
    assert record["result"] == {"args": [{"a": [1, 2]}], "kwargs": {}}  # echo returns its call
    assert record["workflowId"] == ""  # zero values are present


def test_a_failed_task_exits_1_with_one_line(server: Server) -> None:
    ran = conveyor("submit", "fail", "--kw", "message=nope", "--wait", "30", address=server.address)
    assert ran.code == 1
    (task_id,) = ran.lines
    assert ran.err.strip() == f"conveyor: task {task_id} ended FAILURE: ValueError: nope"
    assert conveyor("get", task_id, address=server.address).code == 1


def test_a_wait_that_times_out_exits_2(server: Server) -> None:
    ran = conveyor("submit", "sleep", "20", "--wait", "0.5", address=server.address)
    assert ran.code == 2
    (task_id,) = ran.lines
    assert ran.err.startswith(f"conveyor: task {task_id} is still ")
    assert conveyor("cancel", task_id, address=server.address).code == 0


def test_submit_options_reach_the_task(server: Server) -> None:
    options = ["--countdown", "3600", "--queue", "later", "--priority", "7", "--header", "team=ops",
               "--time-limit", "9", "--retries", "4", "--backoff", "fixed", "--idempotency-key", "once"]
    first = conveyor("submit", "add", "1", "1", *options, address=server.address)
    again = conveyor("submit", "add", "1", "1", *options, address=server.address)
    assert first.code == again.code == 0, first.err + again.err
    assert first.out == again.out  # the idempotency key returned the first task
    record = json.loads(conveyor("inspect", first.out.strip(), "-o", "json", address=server.address).out)["result"]
    signature = record["signature"]
    assert (record["state"], record["queue"]) == ("PENDING", "later")
    assert (signature["priority"], signature["headers"], signature["timeLimit"]) == (7, {"team": "ops"}, 9.0)
    assert (signature["retry"]["maxAttempts"], signature["retry"]["backoff"]) == (5, "FIXED")
    assert signature["eta"] is not None or signature["countdown"] == 3600.0
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    eta = conveyor("submit", "add", "1", "1", "--eta", tomorrow, "--queue", "later", address=server.address)
    assert eta.code == 0, eta.err
    queues = conveyor("queues", address=server.address)
    header, *rows = queues.lines
    assert header.split() == ["QUEUE", "READY", "DELAYED", "IN-FLIGHT", "UNROUTABLE", "PAUSED"]
    (later,) = [row.split() for row in rows if row.startswith("later ")]
    assert later == ["later", "0", "2", "0", "0", "no"]
    assert conveyor("purge", "later", address=server.address).out.startswith("purged ")


def test_queue_and_admin_commands_say_what_happened(idle: Server) -> None:
    address = idle.address
    assert conveyor("workers", address=address).out == "no workers connected\n"
    assert conveyor("dead", "list", address=address).out == "no dead letters\n"
    assert conveyor("queues", address=address).out == "no active queues (conveyor queues --all lists every queue)\n"
    assert conveyor("pause", "mail", address=address).out.startswith("paused queue mail")
    (row,) = conveyor("queues", address=address).lines[1:]
    assert row.split() == ["mail", "0", "0", "0", "0", "yes"]
    assert conveyor("resume", "mail", address=address).out == "resumed queue mail\n"
    added = conveyor("schedule", "add", "nightly", "0 3 * * *", "noop", address=address)
    assert added.code == 0 and "nightly" in added.lines[1], added.err
    assert conveyor("schedule", "delete", "nightly", address=address).out == "deleted schedule nightly\n"
    assert conveyor("schedule", "list", address=address).out == "no schedules\n"
    assert json.loads(conveyor("-o", "json", "workers", address=address).out) == {"workers": []}


def test_dead_list_is_one_line_per_dead_letter(server: Server) -> None:
    ids = [conveyor("submit", "fail", f"dead-{i}", "--queue", "default", "--wait", "30",
                    address=server.address).lines[0] for i in range(2)]
    wait_for(lambda: all(i in conveyor("dead", "list", address=server.address).out for i in ids), 20, "dead letters")
    listed = conveyor("dead", "list", address=server.address)
    assert listed.lines[0].split() == ["ID", "NAME", "QUEUE", "FAILED", "AT", "ERROR"]
    for task_id, message in zip(ids, ("dead-0", "dead-1"), strict=True):
        (line,) = [line for line in listed.lines if line.startswith(task_id)]
        assert line.split()[1:3] == ["fail", "default"]
        assert line.endswith(f"ValueError: {message}")
    full = conveyor("dead", "list", "--full", address=server.address)
    assert f"id:        {ids[0]}" in full.out


def test_usage_errors_are_one_line(tmp_path: Path, server: Server) -> None:
    ran = conveyor("submit", "add", "--kw", "y", address=server.address)
    assert (ran.code, ran.err) == (2, "conveyor: --kw 'y': use --kw key=value\n")
    missing = tmp_path / "missing.yaml"
    ran = conveyor("serve", "--config", str(missing), "--port", "0")
    assert ran.code == 2
    assert ran.err == f"conveyor: cannot read the config file {missing}: No such file or directory\n"
    ran = conveyor("get", "no-such-task", address=server.address)
    assert ran.code == 1 and len(ran.err.splitlines()) == 1 and ran.err.startswith("conveyor: NOT_FOUND"), ran.err


def test_a_closed_pipe_is_silent(server: Server) -> None:
    argv = [sys.executable, "-m", "conveyor_server.cli", "dead", "list", "--full", "--address", server.address]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # as `| head -0` would
        err = process.stderr.read()
        process.wait(60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_shell_completion(tmp_path: Path) -> None:
    """What `eval "$(register-python-argcomplete conveyor)"` makes bash ask the command."""
    answer = tmp_path / "completions"
    line = "conveyor submit add --ti"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(answer)}
    subprocess.run([sys.executable, "-m", "conveyor_server.cli"], cwd=REPO, env=env, timeout=60, check=False,
                   capture_output=True)
    assert answer.read_text().split() == ["--time-limit"]
