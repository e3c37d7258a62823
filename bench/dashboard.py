"""How fast the dashboard lists tasks with 100,000 of them stored, on SQLite and on Redis.

    python bench/dashboard.py                               # SQLite and Redis, 100,000 tasks
    python bench/dashboard.py --tasks 20000 --engines sqlite
    python bench/dashboard.py --redis redis://127.0.0.1:6379/11

For each engine a server (gRPC and the dashboard's HTTP API, in this process) stores `--tasks`
task records through its own task store, as a submit and a worker would (states spread over
success, failure, pending and started, ten task names, five queues, submission times over the
last hour), so the task index is filled by the same background writes as in production. Then
each query below is sent over HTTP `--repeat` times after a warm-up, timing the whole request
(index read, record reads, JSON): the first page (50 tasks, newest first), the first page of
each filter, and the fifth page (following next_page_token). The target is the first page in
under 300 ms (issue 18); the figures are printed, not asserted (a shared machine is noisy).

Redis keys go under a prefix unique to the run and are deleted at the end; SQLite uses a
temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from google.protobuf.timestamp_pb2 import Timestamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor.values import to_value
from conveyor_server.app import ConveyorServer
from conveyor_server.config import Settings
from conveyor_server.core.records import TaskStates, error, new_record, transition
from tests.support.processes import free_port

BATCH = 2_000
TARGET_MS = 300.0
NAMES = [f"task_{i}" for i in range(10)]
QUEUES = [f"queue_{i}" for i in range(5)]
# Ended tasks mostly, as a dashboard sees them; a few still waiting or running.
STATES = (
    [TaskStates.TASK_STATE_SUCCESS] * 80
    + [TaskStates.TASK_STATE_FAILURE] * 10
    + [TaskStates.TASK_STATE_PENDING] * 6
    + [TaskStates.TASK_STATE_STARTED] * 4
)


def record(now: float, rng: random.Random) -> records_pb2.TaskRecord:
    signature = task_pb2.Signature(id=str(uuid.uuid4()), name=rng.choice(NAMES), queue=rng.choice(QUEUES),
                                   args=[to_value(rng.randint(0, 1000)), to_value("some text")])
    submitted = now - rng.uniform(0, 3600)
    stamp = Timestamp()
    stamp.FromNanoseconds(int(submitted * 1e9))
    made = new_record(signature, at=stamp)
    state = rng.choice(STATES)
    if state != TaskStates.TASK_STATE_PENDING:
        made.result.attempts = 1
        transition(made, TaskStates.TASK_STATE_STARTED, at=stamp, worker_id="bench-worker")
    if state == TaskStates.TASK_STATE_SUCCESS:
        made.result.result.CopyFrom(to_value(42))
        transition(made, state, at=stamp)
    elif state == TaskStates.TASK_STATE_FAILURE:
        failed = error("ValueError", "bad input", "Traceback (most recent call last):\n  ...\nValueError: bad input")
        made.result.error.CopyFrom(failed)
        transition(made, state, at=stamp, error=failed)
    return made


async def fill(server: ConveyorServer, count: int) -> float:
    """Store `count` records through the server's store; seconds taken (index flushed)."""
    rng = random.Random(7)
    core = server.core
    started = time.perf_counter()
    now = time.time()
    for start in range(0, count, BATCH):
        await core.store.create([record(now, rng) for _ in range(min(BATCH, count - start))])
        await core.admin.indexer.flush()
        if (start + BATCH) % 20_000 == 0:
            print(f"  stored {start + BATCH:,} tasks", flush=True)
    return time.perf_counter() - started


async def timed(client: httpx.AsyncClient, path: str, params: dict[str, str], repeat: int) -> list[float]:
    for _ in range(3):
        (await client.get(path, params=params)).raise_for_status()
    times = []
    for _ in range(repeat):
        begun = time.perf_counter()
        response = await client.get(path, params=params)
        times.append((time.perf_counter() - begun) * 1000)
        response.raise_for_status()
    return times


async def fifth_page(client: httpx.AsyncClient) -> dict[str, str]:
    params = {"page_size": "50"}
    for _ in range(4):
        params["page_token"] = (await client.get("/api/v1/tasks", params=params)).json()["next_page_token"]
    return params


async def measure(server: ConveyorServer, repeat: int) -> list[tuple[str, list[float], int]]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client:
        some_id = (await client.get("/api/v1/tasks", params={"page_size": "1"})).json()["tasks"][0]["id"]
        queries = [
            ("first page (50, newest first)", {"page_size": "50"}),
            ("state=FAILURE", {"state": "FAILURE"}),
            ("queue=queue_3", {"queue": "queue_3"}),
            ("name=task_7", {"name": "task_7"}),
            ("state=FAILURE&queue=queue_3", {"state": "FAILURE", "queue": "queue_3"}),
            ("state=STARTED&name=task_2 (rare)", {"state": "STARTED", "name": "task_2"}),
            ("id prefix (8 chars)", {"id": some_id[:8]}),
            ("oldest first", {"order": "oldest"}),
            ("fifth page", await fifth_page(client)),
        ]
        found = []
        for label, params in queries:
            count = len((await client.get("/api/v1/tasks", params=params)).json()["tasks"])
            found.append((label, await timed(client, "/api/v1/tasks", params, repeat), count))
        return found


def report(engine: str, tasks: int, fill_seconds: float, rows: list[tuple[str, list[float], int]]) -> None:
    rate = tasks / fill_seconds
    print(f"\n{engine}: {tasks:,} tasks stored in {fill_seconds:.1f} s ({rate:,.0f}/s, index included)")
    print(f"  {'query':<36} {'tasks':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for label, times, count in rows:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(f"  {label:<36} {count:>5} {statistics.median(times):>8.1f} {p95:>8.1f} {max(times):>8.1f}")
    first = statistics.median(rows[0][1])
    verdict = "under" if first < TARGET_MS else "OVER"
    print(f"  first page: {first:.1f} ms median, {verdict} the {TARGET_MS:.0f} ms target")


async def run_engine(engine: str, backend_url: str, tasks: int, repeat: int) -> None:
    settings = Settings(port=0, broker_url="memory://", backend_url=backend_url, http_port=free_port())
    server = ConveyorServer(settings)
    await server.start()
    try:
        fill_seconds = await fill(server, tasks)
        report(engine, tasks, fill_seconds, await measure(server, repeat))
    finally:
        await server.stop()


def drop_redis(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=10_000):
            client.delete(key)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="task records to store")
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per query")
    parser.add_argument("--engines", default="sqlite,redis", help="comma-separated: sqlite, redis")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis server for the redis engine")
    args = parser.parse_args()
    for engine in args.engines.split(","):
        if engine == "sqlite":
            with tempfile.TemporaryDirectory() as directory:
                asyncio.run(run_engine("SQLite", f"sqlite:///{directory}/bench.db", args.tasks, args.repeat))
        elif engine == "redis":
            prefix = f"benchdash{uuid.uuid4().hex[:8]}"
            try:
                asyncio.run(run_engine("Redis", f"{args.redis}?prefix={prefix}", args.tasks, args.repeat))
            finally:
                drop_redis(args.redis, prefix)
        else:
            parser.error(f"unknown engine {engine!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
