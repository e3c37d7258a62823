"""Client.watch over many tasks beside the queue's own throughput, on Redis, in one run.

    pip install -e '.[redis,bench]'
    python bench/watch.py                      # 10,000 tasks (the most one watch may follow)
    python bench/watch.py --tasks 2000 --concurrency 1 --conveyor-prefetch 64

One `conveyor serve` on Redis (broker and backend, DB `--db`, keys under a prefix of this run,
deleted at the end) and the worker processes of bench/compare.py. Two phases, each with fresh
tasks:

1. queue: `--tasks` noop tasks in SubmitBatch calls, then the time until the queue is drained
   (compare.py's throughput phase);
2. watch: the same number submitted the same way, and one `Client.watch(ids)` over all of them,
   opened once they are submitted, read until every task has reported a terminal state; the
   queue's drain is polled meanwhile, so the last line says whether the watch kept up with the
   queue (saw the last task end no later than the queue was drained) or fell behind it.

Each phase prints tasks/s, Redis commands per task, the server's CPU per task and this
process's (the client that submits and watches), since on a small machine every process
competes for the same cores (Redis counts every client: run it on a quiet Redis). A watch
that costs O(changes) needs a few more commands per task than the queue alone; one that
re-read every watched task on each change fell far behind (issue #21: 222 tasks/s over 2,000
tasks). The SDK asks for events in batches (max_events_per_response), so a message carries
the events found together, not one each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat
from bench.compare import (
    ConveyorRun,
    Figures,
    add_conveyor_worker_arguments,
    db_url,
    delete_prefix,
    measure_latency,
    profiled,
)
from conveyor import Client, sig
from conveyor.v1 import result_pb2

TERMINAL = {result_pb2.TASK_STATE_SUCCESS, result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED,
            result_pb2.TASK_STATE_EXPIRED}


def redis_commands(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


async def watched(run: ConveyorRun, count: int, batch: int) -> tuple[float, float]:
    """Submit `count` tasks and watch them all to their end: (seconds until the watch saw every
    task end, seconds until the queue was drained), both from the first submit. A result is
    stored before its task leaves the queue, so the difference is how far the watch lags."""
    async with Client(run.address) as client:
        started = time.perf_counter()
        ids: list[str] = []
        for offset in range(0, count, batch):
            submitted = await client.submit_batch(sig("noop") for _ in range(min(batch, count - offset)))
            ids.extend(s.task_id for s in submitted)

        async def drained() -> float:
            await run.drained()
            return time.perf_counter() - started

        queue = asyncio.create_task(drained())
        ended: set[str] = set()
        async for event in client.watch(ids):
            if event.state in TERMINAL:
                if event.state != result_pb2.TASK_STATE_SUCCESS:
                    raise RuntimeError(f"task {event.task_id} ended {result_pb2.TaskState.Name(event.state)}")
                ended.add(event.task_id)
        if len(ended) != count:
            raise RuntimeError(f"the watch ended with {len(ended)} of {count} tasks finished")
        return time.perf_counter() - started, await queue


def measured(run: ConveyorRun, url: str, action: Callable[[], float]) -> tuple[float, int, float, float]:
    """(seconds `action` says it took, Redis commands meanwhile, server CPU seconds meanwhile,
    this process's CPU seconds meanwhile: the client that submits, and watches)."""
    server = run.procs()["server"]
    assert server is not None
    commands, cpu, own = redis_commands(url), procstat.cpu_seconds(server), time.process_time()
    seconds = action()
    return (seconds, redis_commands(url) - commands - 1, procstat.cpu_seconds(server) - cpu,
            time.process_time() - own)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per phase (a watch follows 10,000 at most)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--conveyor-prefetch", type=int, help="tasks held per slot (default: the worker's own, auto)")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between drain checks (queue phase)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--db", type=int, default=14)
    parser.add_argument("--profile", help="py-spy output (.svg, .txt raw) of the server during the watch phase")
    add_conveyor_worker_arguments(parser)
    args = parser.parse_args()
    url, prefix = db_url(args.redis, args.db), f"watchbench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="conveyor-watch-bench-") as temp:
        run = ConveyorRun(args, url, prefix, Path(temp))
        try:
            run.start()
            measure_latency("conveyor", run, Figures("conveyor", run.worker_desc), 10)

            def queue_phase() -> float:
                figures = Figures("conveyor", run.worker_desc)
                run.throughput(args.tasks, figures)
                return figures.total_seconds

            rows = [("queue (drained)", *measured(run, url, queue_phase))]
            drained_after: list[float] = []

            def watch_phase() -> float:
                seconds, drained = asyncio.run(watched(run, args.tasks, args.batch))
                drained_after.append(drained)
                return seconds

            with profiled(run.procs()["server"] or 0, args.profile, "the watch phase"):
                rows.append(("watch (every task ended)", *measured(run, url, watch_phase)))
            run.check()
        finally:
            run.stop()
            delete_prefix(url, prefix)
    print()
    print(f"{args.tasks:,} noop tasks per phase; worker: {run.settings}")
    print(f"{'phase':<26} {'tasks/s':>8} {'redis cmd/task':>15} {'server µs/task':>15} {'client µs/task':>15}")
    for name, seconds, commands, cpu, own in rows:
        print(f"{name:<26} {args.tasks / seconds:>8,.0f} {commands / args.tasks:>15.1f} "
              f"{1e6 * cpu / args.tasks:>15.0f} {1e6 * own / args.tasks:>15.0f}")
    watch_seconds, drained = rows[1][1], drained_after[0]
    lag = 1e3 * (watch_seconds - drained)
    print(f"watch phase: the queue was drained after {drained:.2f} s, the watch saw the last task end after "
          f"{watch_seconds:.2f} s, {abs(lag):.0f} ms {'after' if lag > 0 else 'before'} the drain was seen "
          f"(polled every {1e3 * args.poll:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
