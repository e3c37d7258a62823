"""`conveyor get/watch/cancel wf-…` (the workflow tree), `conveyor inspect` (lease, deliveries,
node, follow-ups): the real binary against a real server and worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import SyncClient, chain, group, si, sig
from tests.support.cli import conveyor, sqlite_server_with_worker
from tests.support.processes import Server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server (SQLite) with one worker on the default queue, shared by this module's tests."""
    yield from sqlite_server_with_worker(tmp_path_factory.mktemp("cli-workflows"))


def submit(address: str, target: Any) -> str:
    with SyncClient(address) as client:
        submitted = client.submit(target)
    assert submitted.workflow_id.startswith("wf-")
    return submitted.workflow_id


def tasks_of(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The task nodes under `node`, in tree order."""
    if node["kind"] == "task":
        return [node]
    return [task for child in node["children"] for task in tasks_of(child)]


def test_get_shows_a_finished_workflow_as_a_tree(server: Server) -> None:
    workflow_id = submit(server.address, chain(sig("add", 1, 2), group(sig("mul", 10), sig("mul", 100)), sig("tsum")))
    ran = conveyor("get", workflow_id, "--wait", "30", address=server.address)
    assert ran.code == 0, ran.err
    heading, root, *nodes = ran.lines
    assert heading == f"workflow {workflow_id}  SUCCESS  330"
    assert root == "chain  SUCCESS"
    assert [line.split("── ")[0] for line in nodes] == ["├", "├", "│   ├", "│   └", "└"]
    add, grp, mul10, mul100, tsum = (line.split("── ", 1)[1] for line in nodes)
    assert add.startswith("task add  ") and add.endswith("  SUCCESS  3")
    assert grp == "group  SUCCESS"
    assert mul10.startswith("task mul  ") and mul10.endswith("  SUCCESS  30")
    assert mul100.endswith("  SUCCESS  300")
    assert tsum.startswith("task tsum  ") and tsum.endswith("  SUCCESS  330")

    as_json = conveyor("get", workflow_id, "-o", "json", address=server.address)
    assert as_json.code == 0, as_json.err
    tree = json.loads(as_json.out)
    assert (tree["workflowId"], tree["state"], tree["result"], tree["error"]) == (workflow_id, "SUCCESS", 330, None)
    assert tree["root"]["kind"] == "chain"
    assert [child["kind"] for child in tree["root"]["children"]] == ["task", "group", "task"]
    tasks = tasks_of(tree["root"])
    assert [(t["name"], t["state"], t["result"]) for t in tasks] == [
        ("add", "SUCCESS", 3), ("mul", "SUCCESS", 30), ("mul", "SUCCESS", 300), ("tsum", "SUCCESS", 330),
    ]
    assert tree["resultTaskId"] == tasks[-1]["taskId"]
    assert all(task["taskId"] in ran.out for task in tasks)  # the text tree names every task id


def test_a_failed_workflow_exits_1_and_shows_where_it_failed(server: Server) -> None:
    workflow_id = submit(server.address, chain(sig("add", 1, 2), si("fail", "step two"), sig("add", 5)))
    ran = conveyor("get", workflow_id, "--wait", "30", address=server.address)
    assert ran.code == 1
    assert ran.lines[0].startswith(f"workflow {workflow_id}  FAILURE  ValueError: step two")
    failed = [line for line in ran.lines if "task fail " in line]
    assert len(failed) == 1 and "FAILURE  ValueError: step two" in failed[0]


def test_watch_takes_a_workflow_id_without_the_flag_and_ends_with_the_tree(server: Server) -> None:
    workflow_id = submit(server.address, group(sig("add", 1, 1), sig("add", 2, 2)))
    ran = conveyor("watch", workflow_id, address=server.address)
    assert ran.code == 0, ran.err
    events = [line for line in ran.lines if line[:1].isdigit()]
    assert sum(line.split()[2:] == ["SUCCESS", "add"] for line in events) == 2
    tree_at = ran.lines.index(f"workflow {workflow_id}  SUCCESS  [2, 4]")
    assert ran.lines[tree_at + 1] == "group  SUCCESS"
    assert len(ran.lines) == tree_at + 4  # heading, group, two tasks

    as_json = conveyor("watch", workflow_id, "-o", "json", address=server.address)
    *event_lines, last = as_json.lines
    assert {json.loads(line)["workflowId"] for line in event_lines} == {workflow_id}
    assert json.loads(last)["workflow"]["result"] == [2, 4]


def test_cancel_a_workflow_shows_what_it_left(server: Server) -> None:
    workflow_id = submit(server.address, chain(sig("sleep", 30), sig("add", 1), sig("add", 2)))
    wait_for(lambda: "STARTED" in conveyor("get", workflow_id, address=server.address).out, 20, "the first step")
    waited = conveyor("get", workflow_id, "--wait", "0.5", address=server.address)
    assert waited.code == 2 and waited.err.startswith(f"conveyor: workflow {workflow_id} is still "), waited.err
    assert [line.split("── ", 1)[1].split()[:2] for line in waited.lines[2:]] == [
        ["task", "sleep"], ["task", "add"], ["task", "add"]]
    ran = conveyor("cancel", workflow_id, "-o", "json", address=server.address)
    assert ran.code == 0, ran.err
    reply = json.loads(ran.out)
    tasks = tasks_of(reply["workflow"]["root"])
    assert set(reply["cancelledTaskIds"]) == {task["taskId"] for task in tasks}
    assert {task["state"] for task in tasks} == {"CANCELLED"}
    assert reply["workflow"]["state"] == "CANCELLED"
    again = conveyor("cancel", workflow_id, address=server.address)
    assert again.code == 0, again.err
    assert again.lines[0] == "nothing to cancel: every task had ended"
    assert again.lines[1].startswith(f"workflow {workflow_id}  CANCELLED")
    assert conveyor("get", workflow_id, address=server.address).code == 1


def test_an_unknown_workflow_is_one_line(server: Server) -> None:
    ran = conveyor("get", "wf-nope", address=server.address)
    assert ran.code == 1 and ran.err.startswith("conveyor: NOT_FOUND") and len(ran.err.splitlines()) == 1, ran.err


def test_inspect_shows_the_lease_deliveries_and_workflow_node(server: Server) -> None:
    workflow_id = submit(server.address, chain(sig("sleep", 30), sig("add", 1, 2)))
    first = json.loads(conveyor("get", workflow_id, "-o", "json", address=server.address).out)
    sleeping, waiting = tasks_of(first["root"])
    wait_for(lambda: "STARTED" in conveyor("inspect", sleeping["taskId"], address=server.address).out, 20, "start")
    ran = conveyor("inspect", sleeping["taskId"], "-o", "json", address=server.address)
    assert ran.code == 0, ran.err
    inspected = json.loads(ran.out)
    worker_id = inspected["result"]["workerId"]
    assert worker_id and inspected["leaseHolder"] == worker_id
    assert inspected["leaseExpiresAt"] is not None and inspected["leaseExpiresAt"] > inspected["result"]["startedAt"]
    assert (inspected["deliveries"], inspected["enqueued"], inspected["followUpsPending"]) == (1, True, False)
    assert inspected["workflowNodeId"] == sleeping["nodeId"]
    text = conveyor("inspect", sleeping["taskId"], address=server.address)
    assert f"lease:     held by {worker_id} until " in text.out
    assert "deliveries: 1" in text.lines and f"node:      {sleeping['nodeId']}" in text.lines

    step = json.loads(conveyor("inspect", waiting["taskId"], "-o", "json", address=server.address).out)
    assert (step["leaseHolder"], step["leaseExpiresAt"], step["enqueued"]) == ("", None, False)  # not its turn
    assert conveyor("cancel", workflow_id, address=server.address).code == 0


def test_inspect_of_an_unknown_task_is_not_found(server: Server) -> None:
    ran = conveyor("inspect", "no-such-task", address=server.address)
    assert ran.code == 1 and ran.err.startswith("conveyor: NOT_FOUND"), ran.err

