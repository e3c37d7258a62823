"""Generator groups from the Node client (workers/node/lib/streaming.js): an async generator as a
group or a chord header is streamed to a real server (SQLite) in pieces, and a generator that
throws midway submits nothing. A Python worker runs the tasks (tests/e2e/stream_tasks.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from conveyor import Client
from tests.e2e.test_node import NODE, NODE_DIR, pytestmark  # noqa: F401 - skipped without node, as there
from tests.support.processes import Proc, Server, WorkerProc, log_lines, settled, wait_for_workers

SCRIPT = """
const { Client, group, chord, sig } = require('./lib');
async function* members(n, prefix) {
  for (let i = 0; i < n; i++) yield sig('stream.echo', [i], {}, prefix ? { id: `${prefix}-${i}` } : {});
}
async function* broken() {
  yield* members(1500, 'node-abandoned');
  throw new Error('the producer broke');
}
(async () => {
  const client = new Client(process.env.CONVEYOR_ADDRESS);
  const grouped = await client.submitWorkflow(group(members(2500)));
  const values = await client.result(grouped.resultId, 120);
  const chorded = await client.submitWorkflow(chord(members(1500), sig('stream.gather', ['node'])));
  const gathered = await client.result(chorded.resultId, 120);
  let error = '';
  try { await client.submitWorkflow(group(broken())); } catch (e) { error = e.message; }
  console.log(JSON.stringify({ taskIds: grouped.taskIds.length, values, gathered, error }));
  client.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


async def test_the_node_client_streams_generator_groups_and_chords(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server
) -> None:
    log_file = tmp_path / "events.log"
    log_file.touch()
    worker = WorkerProc(tmp_path, sqlite_server.address, module="tests.e2e.stream_tasks", concurrency=64,
                        env={"CONVEYOR_TEST_LOG": str(log_file)})
    procs.append(worker)
    wait_for_workers(sqlite_server.address, 1)
    assert NODE is not None
    done = await asyncio.to_thread(
        subprocess.run, [NODE, "-e", SCRIPT], cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
        check=False, env={**os.environ, "CONVEYOR_ADDRESS": sqlite_server.address},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["taskIds"] == 0 and report["values"] == list(range(2500))
    assert report["gathered"] == list(range(1500)) and report["error"] == "the producer broke"
    assert await settled(lambda: log_lines(log_file, "gather node ")) == ["gather node 1500"]
    async with Client(sqlite_server.address) as client:
        for task_id in ("node-abandoned-0", "node-abandoned-1499"):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.get_result(task_id)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
