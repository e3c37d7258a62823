"""The task index's own cost per task, measured directly on the Redis backend: the part of the
dashboard that runs on the task path (issue #18). A throughput A/B (bench/dashboard_overhead.py)
cannot see a few percent on a 2-core machine whose runs spread by 20%; this counts CPU instead.

For each task the server notes every record it writes (PENDING, RECEIVED, STARTED, SUCCESS, as a
quick task goes through them) with `TaskIndexer.note()`, and the background flush writes the
entries in one script call per WRITE_CHUNK tasks. Here the same calls run in this process against
the backend: this process's CPU is the server's share, and Redis's CPU (INFO, the whole server)
over the flushes is the engine's.

    python bench/task_index_cost.py                       # 100,000 tasks in batches of 1,000
    python bench/task_index_cost.py --tasks 200000 --existing 1000000

`--existing` first fills the index with that many ended tasks, so that the sorted sets are as
deep as on a busy server. `--ttl` sets how long an ended task stays listed: a short one (say 2 s)
measures a steady state, where the index forgets an expired task for every task it adds (a busy
server's, once its first `ttl` has passed), and that forgetting is counted too. Keys go under a
prefix unique to the run in `--db`, deleted after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import db_url, delete_prefix, load
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor_server.backends.redis import RedisBackend
from conveyor_server.core.task_index import TaskIndexer

# The states a quick task's record is written in, in order (each write is noted).
STATES = (result_pb2.TASK_STATE_PENDING, result_pb2.TASK_STATE_RECEIVED, result_pb2.TASK_STATE_STARTED,
          result_pb2.TASK_STATE_SUCCESS)


@dataclass
class Cost:
    tasks: int = 0
    note_seconds: float = 0.0  # this process: TaskIndexer.note() for every write
    flush_seconds: float = 0.0  # this process: building and sending the flush
    redis_seconds: float = 0.0  # Redis: the whole server's CPU during the flushes
    listed_at_end: int = 0  # tasks still in the index after the run (the rest expired and were forgotten)
    memory_bytes: int = 0  # Redis's used memory after the run less before it

    def per_task_us(self, seconds: float) -> float:
        return 1e6 * seconds / max(self.tasks, 1)


def records(start: int, count: int, run: str) -> list[records_pb2.TaskRecord]:
    now = time.time()
    made = []
    for n in range(start, start + count):
        record = records_pb2.TaskRecord()
        result = record.result
        result.task_id, result.queue, result.name = f"{run}-{n:09d}", "bench", "noop"
        result.submitted_at.FromNanoseconds(int((now + n * 1e-6) * 1e9))
        made.append(record)
    return made


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def index_tasks(indexer: TaskIndexer, client: redis.Redis, batch: list[records_pb2.TaskRecord],
                      cost: Cost | None) -> None:
    writes = []  # the records as written in each state (made before the clock starts)
    for state in STATES:
        for record in batch:
            record.result.state = state
        writes.append([records_pb2.TaskRecord.FromString(r.SerializeToString()) for r in batch])
    noting = time.process_time()
    for written in writes:
        for record in written:
            indexer.note(record)
    flushing = time.process_time()
    redis_before = redis_cpu(client) if cost is not None else 0.0
    await indexer.flush()
    if cost is not None:
        cost.redis_seconds += redis_cpu(client) - redis_before
        cost.flush_seconds += time.process_time() - flushing
        cost.note_seconds += flushing - noting
        cost.tasks += len(batch)


async def measure(args: argparse.Namespace, url: str, prefix: str) -> Cost:
    backend = RedisBackend.from_url(f"{url}?prefix={prefix}", ttl_seconds=args.ttl)
    await backend.connect()
    indexer = TaskIndexer.for_backend(backend)
    client = redis.Redis.from_url(url)
    cost = Cost()
    memory_before = int(client.info("memory")["used_memory"])
    try:
        for start in range(0, args.existing, args.batch):
            await index_tasks(indexer, client, records(start, min(args.batch, args.existing - start), "old"), None)
        for start in range(0, args.tasks, args.batch):
            await index_tasks(indexer, client, records(start, min(args.batch, args.tasks - start), "new"), cost)
        cost.listed_at_end = int(client.zcard(f"{prefix}:ti:all"))
        cost.memory_bytes = int(client.info("memory")["used_memory"]) - memory_before
    finally:
        await indexer.close()  # stops the background flusher the notes started (nothing is left to write)
        await backend.close()
        client.close()
    return cost


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks measured")
    parser.add_argument("--existing", type=int, default=0, help="ended tasks in the index before measuring")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per flush (the server flushes every "
                        "0.25 s: 1,000 is a server running 4,000 tasks/s)")
    parser.add_argument("--hot-path-us", type=float, default=0.0,
                        help="CPU microseconds per task of the whole hot path without the index (server, worker, "
                             "client and Redis, e.g. from bench/compare.py), to print the index's share of it")
    parser.add_argument("--ttl", type=float, default=86_400.0,
                        help="seconds an ended task stays in the index (a short one measures its forgetting too)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=14, help="Redis DB to use")
    return parser.parse_args()


def main() -> int:
    args = parse()
    url = db_url(args.redis, args.db)
    prefix = f"convindex-{os.getpid()}"
    print(f"{os.cpu_count()} CPUs; load average {load()}; {args.tasks:,} tasks in flushes of {args.batch:,}, "
          f"{args.existing:,} ended tasks indexed before; {len(STATES)} record writes noted per task; "
          f"ended tasks listed for {args.ttl:g} s", flush=True)
    try:
        cost = asyncio.run(measure(args, url, prefix))
    finally:
        delete_prefix(url, prefix)
    note, flush, engine = (cost.per_task_us(s) for s in (cost.note_seconds, cost.flush_seconds, cost.redis_seconds))
    total = note + flush + engine
    forgotten = args.existing + args.tasks - cost.listed_at_end
    print(f"{forgotten:,} of the {args.existing + args.tasks:,} tasks expired and were forgotten during the run")
    if cost.listed_at_end:
        print(f"Redis memory: {cost.memory_bytes / cost.listed_at_end:,.0f} bytes per listed task "
              f"({cost.memory_bytes / 2**20:,.0f} MiB for {cost.listed_at_end:,})")
    print(f"per task: note {note:.1f} us + flush {flush:.1f} us (server) + Redis {engine:.1f} us = {total:.1f} us CPU")
    if args.hot_path_us:
        share = total / args.hot_path_us
        print(f"that is {share:.1%} of the {args.hot_path_us:,.0f} us of CPU a task costs without the index "
              f"(target <= 3%: {'met' if share <= 0.03 else 'NOT met'})")
    print(f"load average at the end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
