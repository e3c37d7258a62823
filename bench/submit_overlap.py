"""How fast tasks complete while a client is still submitting, against after it stopped.

    pip install -e '.[redis,bench]'
    python bench/submit_overlap.py                     # 20,000 noop tasks, 2 workers x 1 slot, prefetch 64

One client submits `--tasks` noop tasks in SubmitBatch calls of 1,000 (bench/compare.py's
throughput phase, at its `--matched` settings) while this process reads the queue's stats in
Redis every 20 ms. Completed tasks are those submitted and no longer ready, delayed or in
flight (every result is written before its task is acked). It prints the completion rate
during the submission and after it: a server loop busy with the submitted batches leaves the
workers' windows to run dry, and the first rate falls well below the second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import ConveyorRun, db_url, delete_prefix
from conveyor import Client, sig
from conveyor.loop import run as run_loop
from conveyor_server.brokers.redis import RedisBroker

BATCH = 1000
POLL_SECONDS = 0.02


async def overlap(address: str, url: str, prefix: str, tasks: int) -> str:
    broker = RedisBroker.from_url(f"{url}?prefix={prefix}")
    await broker.connect()
    submitted = 0
    async with Client(address) as client:
        await client.result((await client.submit("noop")).task_id, wait=30)  # the workers are ready
        began = time.monotonic()

        async def submit() -> float:
            nonlocal submitted
            for start in range(0, tasks, BATCH):
                size = min(BATCH, tasks - start)
                await client.submit_batch(sig("noop") for _ in range(size))
                submitted += size
            return time.monotonic() - began

        submitting = asyncio.create_task(submit())
        completed_during = 0
        while True:
            stats = await broker.stats("default")
            completed = submitted - (stats.ready + stats.delayed + stats.in_flight)
            if not submitting.done():
                completed_during = completed
            elif completed == tasks:
                break
            await asyncio.sleep(POLL_SECONDS)
        total = time.monotonic() - began
        during = await submitting
    await broker.close()
    after = total - during
    return (f"submitted {tasks:,} in {during:.2f} s; completed meanwhile {completed_during:,} = "
            f"{completed_during / during:,.0f} tasks/s; the other {tasks - completed_during:,} in "
            f"{after:.2f} s = {(tasks - completed_during) / after:,.0f} tasks/s; overall {tasks / total:,.0f} tasks/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=1, help="slots per worker process")
    parser.add_argument("--conveyor-prefetch", type=int, default=64, help="tasks held per slot")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--db", type=int, default=14)
    args = parser.parse_args()
    args.pool, args.replicas = "threads", 1
    url, prefix = db_url(args.redis, args.db), f"overlapbench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="conveyor-overlap-bench-") as temp:
        run = ConveyorRun(args, url, prefix, Path(temp))
        print(f"{os.cpu_count()} CPUs; Redis {url}; worker: {run.settings}", flush=True)
        try:
            run.start()
            for _ in range(args.rounds):
                print(run_loop(overlap(run.address, url, prefix, args.tasks)), flush=True)
                run.check()
        finally:
            run.stop()
            delete_prefix(url, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
