"""Cross-language end to end: a real server, a Python worker and the Node worker
(workers/node/example.js) as OS processes; Python and Node clients.

Needs `node` and workers/node/node_modules (`npm ci` in workers/node); skipped without them.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client, chain, chord, group, sig, state_name
from tests.support.processes import REPO, Proc, Server, WorkerProc, wait_for

NODE_DIR = REPO / "workers" / "node"
NODE = shutil.which("node")
NODE_QUEUE = "node"

NODE_READY = NODE is not None and (NODE_DIR / "node_modules").is_dir()
NODE_MISSING = "needs `node` on PATH and workers/node/node_modules (run `npm ci` in workers/node)"
# For a parameter that runs a test on the Node worker beside others.
ON_NODE = pytest.param("node", marks=pytest.mark.skipif(not NODE_READY, reason=NODE_MISSING))

pytestmark = pytest.mark.skipif(not NODE_READY, reason=NODE_MISSING)


class NodeWorker(Proc):
    """`node workers/node/example.js` (or another worker script taking the same options) serving
    the given queues."""

    def __init__(self, log_dir: Path, address: str, queues: tuple[str, ...] = (NODE_QUEUE,),
                 concurrency: int = 4, script: Path = NODE_DIR / "example.js",
                 env: dict[str, str] | None = None) -> None:
        assert NODE is not None
        argv = [NODE, str(script), "--address", address, "--concurrency", str(concurrency)]
        for queue in queues:
            argv += ["--queue", queue]
        super().__init__(argv, log_dir / f"node-worker-{time.monotonic_ns()}.log", env)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        def logged() -> bool:
            if not self.alive():
                raise AssertionError(f"node worker exited with {self.popen.returncode}:\n{self.output()}")
            return text in self.output()

        try:
            wait_for(logged, timeout, f"{text!r} in the node worker's log")
        except AssertionError as failed:
            raise AssertionError(f"{failed}:\n{self.output()}") from None


@pytest.fixture
def node_worker(tmp_path: Path, procs: list[Proc], sqlite_server: Server) -> Iterator[NodeWorker]:
    worker = NodeWorker(tmp_path, sqlite_server.address)
    procs.append(worker)
    yield worker


@pytest.fixture
def py_worker(tmp_path: Path, procs: list[Proc], sqlite_server: Server) -> WorkerProc:
    worker = WorkerProc(tmp_path, sqlite_server.address, module="tests.e2e.py_tasks", name="py-worker")
    procs.append(worker)
    return worker


def on_node(name: str, *args: Any) -> Any:
    return sig(name, *args).set(queue=NODE_QUEUE)


async def states_until(client: Client, task_id: str, wanted: str) -> list[str]:
    """Watch a task until it reaches `wanted` (or ends, or 20 s pass); returns the states seen."""
    seen: list[str] = []
    async with asyncio.timeout(20):
        async for event in client.watch([task_id]):
            seen.append(state_name(event.state))
            if seen[-1] == wanted:
                break
    return seen


async def test_chain_runs_python_node_python(client: Client, py_worker: WorkerProc, node_worker: NodeWorker) -> None:
    submitted = await client.submit(chain(sig("py.add", 1, 2), on_node("node.mul", 10), sig("py.add", 5)))
    assert await client.result(submitted.task_id, wait=30) == 35  # (1 + 2) * 10 + 5
    middle = await client.get_result(submitted.task_ids[1])
    assert middle.name == "node.mul" and middle.queue == NODE_QUEUE
    assert [state_name(h.state) for h in middle.history] == ["PENDING", "RECEIVED", "STARTED", "SUCCESS"]


async def test_chord_members_on_node_callback_on_python(
    client: Client, py_worker: WorkerProc, node_worker: NodeWorker
) -> None:
    members = group(on_node("node.mul", i, 10) for i in range(6))
    submitted = await client.submit(chord(members, sig("py.collect")))
    result = await client.result(submitted.task_id, wait=30)
    assert result == {"results": [0, 10, 20, 30, 40, 50], "types": ["int"] * 6}


async def test_a_starmap_runs_its_chunks_on_node(client: Client, node_worker: NodeWorker) -> None:
    chunked = await client.submit(on_node("node.mul").chunks([(i, 10) for i in range(5)], 2))
    assert await client.result(chunked, wait=30) == [[0, 10], [20, 30], [40]]
    mapped = await client.submit(on_node("node.upper").map(["a", "b", "c"], chunk_size=2))
    assert await client.result(mapped, wait=30) == ["A", "B", "C"]


def test_node_client_watches_a_python_task(sqlite_server: Server, py_worker: WorkerProc) -> None:
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(NODE_DIR / "submit-example.js"), "--address", sqlite_server.address, "py.add", "2", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=40, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted py.add ")
    task_id = lines[0].split()[-1]
    events = [line.split() for line in lines[1:]]
    assert all(event[1] == task_id for event in events), done.stdout
    assert [event[2] for event in events] == ["PENDING", "RECEIVED", "STARTED", "SUCCESS"], done.stdout
    assert events[-1][3] == "result=5", done.stdout


async def test_a_task_the_node_worker_lacks_is_not_sent_to_it(client: Client, node_worker: NodeWorker) -> None:
    submitted = await client.submit(on_node("node.nope", 1))
    assert await client.result((await client.submit(on_node("node.mul", 2, 3))).task_id, wait=30) == 6
    result = await client.get_result(submitted.task_id, wait=1.0)
    assert state_name(result.state) == "PENDING", "it waits for a worker that has it, it is not failed"
    assert "node.nope" not in node_worker.output()


async def test_cancel_stops_a_running_node_task(client: Client, node_worker: NodeWorker) -> None:
    submitted = await client.submit(on_node("node.sleep", 30))
    # The Node worker reports Started as soon as it begins, so STARTED shows while it runs.
    assert (await states_until(client, submitted.task_id, "STARTED"))[-1] == "STARTED"
    assert await client.cancel(submitted.task_id) == [submitted.task_id]
    result = await client.get_result(submitted.task_id, wait=10)
    assert state_name(result.state) == "CANCELLED"
    # The worker got the Cancel on its stream and aborted the task's signal.
    node_worker.wait_for(f"node.sleep {submitted.task_id} stopped: TaskCancelled", timeout=10)


async def test_values_and_headers_cross_unchanged(client: Client, node_worker: NodeWorker) -> None:
    values: list[Any] = [
        0, -(2**63), 2**63 - 1, 2**53 + 1, 2.5, -0.125, "héllo ✓", "", True, False,
        b"\x00\xff bytes", [1, "a", None, {"b": [True]}], {"k": {"n": 1.5}}, None,
    ]
    submitted = [await client.submit(on_node("node.echo", value)) for value in values]
    echoed = await asyncio.gather(*(client.result(s.task_id, wait=30) for s in submitted))
    assert echoed == values
    assert [type(e) for e in echoed] == [type(v) for v in values]

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    task = on_node("node.headers").set(headers={"traceparent": traceparent, "x-tenant": "acme"})
    headers = await client.result((await client.submit(task)).task_id, wait=30)
    assert headers["traceparent"] == traceparent and headers["x-tenant"] == "acme"


async def test_a_node_task_replaced_by_a_chain_gives_its_value_to_the_next_step(
    client: Client, node_worker: NodeWorker
) -> None:
    """ctx.replace(chain(node.mul(3, 4), node.add(1))): the caller sees 13, and a chain goes on with it."""
    assert await client.result((await client.submit(on_node("node.replace", 3, 4))).task_id, wait=30) == 13
    submitted = await client.submit(chain(on_node("node.replace", 2, 5), on_node("node.add", 100)))
    assert await client.result(submitted, wait=30) == 111


async def test_node_worker_stops_gracefully(client: Client, node_worker: NodeWorker) -> None:
    submitted = await client.submit(on_node("node.sleep", 1.5))
    await states_until(client, submitted.task_id, "STARTED")
    # SIGTERM: Goodbye, finish the running task, report it, then exit 0.
    assert await asyncio.to_thread(node_worker.stop, 15.0) == 0
    result = await client.get_result(submitted.task_id, wait=5)
    assert state_name(result.state) == "SUCCESS"
    assert "worker stopped" in node_worker.output()


def test_node_unit_tests_pass() -> None:
    """The Node package's own tests (value codec, trace context): `npm test`."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
