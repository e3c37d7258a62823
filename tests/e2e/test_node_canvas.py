"""The Node package's canvas features at run time, on SQLite and on Redis (broker and backend, with
a key prefix of their own): the Node client submits (tests/e2e/node_canvas_client.js) and a Node
worker runs the tasks (tests/e2e/node_canvas_tasks.js). link and linkError on chains and groups
(perMember too), canvas options (args and kwargs for the first step, countdown), expires,
ignoreResult (ResultIgnored) and a task's Reject, with and without requeue, as
tests/e2e/test_reject.py checks it for Python.

Needs `node` and workers/node/node_modules (`npm ci` in workers/node); skipped without them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_node import NODE, NodeWorker
from tests.e2e.test_node import pytestmark as needs_node
from tests.support.cli import conveyor
from tests.support.engine_cluster import Cluster, engine_cluster, showing_logs
from tests.support.processes import REPO, Proc, eventually, settled

pytestmark = [needs_node, pytest.mark.timeout(240)]

WAIT = 60.0
ENGINES = ["sqlite", "redis"]
SCRIPTS = REPO / "tests" / "e2e"


def start_node_worker(directory: Path, address: str, env: dict[str, str]) -> Proc:
    return NodeWorker(directory, address, queues=("default",), script=SCRIPTS / "node_canvas_tasks.js", env=env)


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server whose broker and backend are both `param`, and one Node worker of node_canvas_tasks.js."""
    with engine_cluster(request, tmp_path_factory, "node_canvas", 8, start_worker=start_node_worker) as started:
        yield started


@pytest.fixture
def node(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster; a failing test shows its processes' logs."""
    with showing_logs(cluster) as shown:
        yield shown


def label() -> str:
    return uuid.uuid4().hex[:10]


async def scenario(cluster: Cluster, name: str, *labels: str) -> dict[str, Any]:
    """Run one scenario of node_canvas_client.js against the cluster; what it printed, as JSON."""
    assert NODE is not None
    done = await asyncio.to_thread(
        subprocess.run, [NODE, str(SCRIPTS / "node_canvas_client.js"), name, *labels], cwd=REPO,
        capture_output=True, text=True, timeout=WAIT + 30, check=False,
        env={**os.environ, "CONVEYOR_ADDRESS": cluster.server.address},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


async def logged(cluster: Cluster, prefix: str, expected: int) -> list[str]:
    """The lines starting with `prefix` once `expected` are there and no more come."""
    await eventually(lambda: len(cluster.lines(prefix)) >= expected, WAIT, f"{expected} x {prefix!r}")
    return await settled(lambda: cluster.lines(prefix))


# -- link and linkError ------------------------------------------------------------------------------


async def test_a_chain_linked_from_node_gives_its_last_value_to_the_callback_once(node: Cluster) -> None:
    name = label()
    report = await scenario(node, "chain-link", name)
    assert report.get("value") == 13, report
    assert await logged(node, f"note {name} ", 1) == [f"note {name} 13"]


async def test_a_failed_step_runs_the_chains_error_callback_once_and_cancels_the_rest(node: Cluster) -> None:
    errors, after = label(), label()
    report = await scenario(node, "chain-link-error", errors, after)
    failed_step = report["taskIds"][1]
    assert report["failed"]["type"] == "ExpectedError" and report["failed"]["message"] == "boom"
    assert await logged(node, f"error {errors} ", 1) == [f"error {errors} {failed_step} ExpectedError"]
    assert report["last"]["state"] == "CANCELLED"
    assert node.lines(f"note {after} ") == [], "the steps after the failed one do not run"


async def test_a_group_linked_from_node_gives_the_list_to_the_callback_once(node: Cluster) -> None:
    name = label()
    report = await scenario(node, "group-link", name)
    assert report.get("value") == [2, 4], report
    assert await logged(node, f"note {name} ", 1) == [f"note {name} [2,4]"]


async def test_a_groups_error_callback_runs_per_failed_member_or_once(node: Cluster) -> None:
    each, once = label(), label()
    report = await scenario(node, "group-link-error", each, once)
    _, first_failed, second_failed = report["taskIds"]
    assert report["failed"]["type"] == "GroupMemberFailed"
    assert "ExpectedError: a" in report["failed"]["message"] and "ExpectedError: b" in report["failed"]["message"]
    assert sorted(await logged(node, f"error {each} ", 2)) == sorted(
        f"error {each} {member} ExpectedError" for member in (first_failed, second_failed)
    ), "perMember: once per failed member, with its own error"
    assert await logged(node, f"error {once} ", 1) == [f"error {once} {first_failed} GroupMemberFailed"]


# -- canvas options --------------------------------------------------------------------------------------


async def test_canvas_options_prepend_args_to_the_first_step_and_hold_its_start_back(node: Cluster) -> None:
    report = await scenario(node, "options")
    first_call = {"args": [1, 2], "kwargs": {"own": 1, "extra": "x"}}
    assert report.get("value") == {"args": [first_call, 3], "kwargs": {}}, f"the second step gets no options: {report}"
    assert report["first"]["delayMs"] >= 1400, "countdown 1.5: it starts 1.5 s after the submit"


# -- expires and ignoreResult ----------------------------------------------------------------------------


async def test_a_node_task_not_started_by_its_expiry_ends_expired_and_never_runs(node: Cluster) -> None:
    name, errors = label(), label()
    report = await scenario(node, "expires", name, errors)
    late = report["late"]
    assert (late["failed"]["state"], late["failed"]["type"]) == ("EXPIRED", "Expired")
    assert (late["record"]["state"], late["record"]["attempts"]) == ("EXPIRED", 0)
    assert await logged(node, f"error {errors} ", 1) == [f"error {errors} {late['taskId']} Expired"]
    assert node.lines(f"note {name} ") == [], "an expired task never runs"
    assert (report["past"]["state"], report["past"]["attempts"]) == ("EXPIRED", 0), "expires as a past Date"
    assert report["inTime"] == {"value": 3}


async def test_reading_an_ignored_result_from_node_throws_result_ignored(node: Cluster) -> None:
    report = await scenario(node, "ignore-result")
    ignored = report["ignored"]
    assert ignored["ignored"] == {"name": "ResultIgnored", "taskId": ignored["taskId"]}
    assert report["record"]["state"] == "SUCCESS" and report["record"]["value"] is None
    assert (report["failing"]["failed"]["state"], report["failing"]["failed"]["type"]) == ("FAILURE", "ExpectedError")
    assert report["chain"].get("value") == {"args": [None], "kwargs": {}}, f"the next step gets null: {report}"


# -- dispatch options ----------------------------------------------------------------------------------------


async def test_the_node_clients_dispatch_options_reach_the_server(node: Cluster) -> None:
    name = label()
    report = await scenario(node, "dispatch-options", name)
    first, again = report["unique"]
    assert first == again, "uniqueFor: the second submit got the live task's id"
    assert report["value"] == 10
    failed = report["unroutable"]["failed"]
    assert (failed["state"], failed["type"]) == ("FAILURE", "Unroutable"), report
    assert report["keys"] == [f"customer-{name}", f"account-{name}", 2]
    assert report["keyed"] == {"value": 2}


# -- Reject --------------------------------------------------------------------------------------------------


async def test_a_node_task_that_rejects_itself_fails_once_runs_its_errback_and_is_a_dead_letter(
    node: Cluster,
) -> None:
    name, errors, chained, after = label(), label(), label(), label()
    report = await scenario(node, "reject", name, errors, chained, after)
    assert report["failed"] == {"taskId": report["taskId"], "state": "FAILURE", "type": "Rejected",
                                "message": f"refused {name}"}
    assert report["record"]["attempts"] == 1, "a rejected task is not retried, whatever its retry policy"
    assert node.lines(f"run {name}") == [f"run {name}"]
    assert await logged(node, f"error {errors} ", 1) == [f"error {errors} {report['taskId']} Rejected"]
    dead = await asyncio.to_thread(conveyor, "dead", "list", address=node.server.address)
    assert dead.code == 0 and report["taskId"] in dead.out, dead
    assert report["chain"]["failed"]["type"] == "Rejected"
    assert node.lines(f"note {after} ") == [], "the steps after a rejected one do not run"


async def test_a_node_task_that_requeues_itself_runs_the_same_attempt_again_and_succeeds(node: Cluster) -> None:
    name, chained = label(), label()
    report = await scenario(node, "requeue", name, chained)
    assert report.get("value") == {"runs": 3, "attempt": 1}, report
    record = report["record"]
    assert (record["state"], record["attempts"], record["error"]) == ("SUCCESS", 1, None), "a requeue is no failure"
    assert record["history"].count("RECEIVED") == 3
    assert len(node.lines(f"run {name}")) == 3
    assert report["chain"].get("value") == {"args": [{"runs": 2, "attempt": 1}], "kwargs": {}}, report
    dead = await asyncio.to_thread(conveyor, "dead", "list", address=node.server.address)
    assert report["taskId"] not in dead.out
