"""What a worker's window costs a mixed queue: quick tasks held behind a long one.

    pip install -e '.[redis,bench]'
    python bench/prefetch.py                          # 2 workers x 1 slot; prefetch unset, 4 and 1
    python bench/prefetch.py --tasks 10000 --every 50 --long 0.5

One queue gets `--tasks` tasks, every `--every`th a `pause(--long)` and the others `noop`, in one
batch, run by `--processes` worker processes of `--concurrency` slots (bench/noop_worker.py),
for each prefetch setting in turn on the same Redis. A prefetch is a wager that the tasks a
worker holds will soon get a slot: a long task makes the quick ones held behind it wait while
another worker could run them. Printed per setting: throughput over the batch, and how long
the quick tasks waited from their submit to their start (p50, p99, max), from their records.
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
from bench.latency import ms
from conveyor import Client, sig
from conveyor.values import seconds_of

SETTINGS = (None, 4, 1)  # prefetch: unset (the worker sizes it), Celery's 4, none


async def run_batch(address: str, tasks: int, every: int, long_seconds: float) -> tuple[float, list[float]]:
    """Submits the mixed batch, waits for every result; returns the seconds it took and the
    quick tasks' waits (submit -> start)."""
    async with Client(address) as client:
        signatures = [sig("pause", long_seconds) if n % every == every - 1 else sig("noop") for n in range(tasks)]
        started = time.perf_counter()
        submitted = await client.submit_batch(signatures)
        results = [await client.get_result(item.task_id, wait=120) for item in submitted]
        elapsed = time.perf_counter() - started
    waits = [
        seconds_of(result.started_at) - seconds_of(result.history[0].at)
        for result, signature in zip(results, signatures, strict=True)
        if signature.name == "noop"
    ]
    return elapsed, waits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--every", type=int, default=100, help="every Nth task is long")
    parser.add_argument("--long", type=float, default=0.2, help="seconds a long task runs")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--db", type=int, default=10)
    args = parser.parse_args()
    url = db_url(args.redis, args.db)
    longs = args.tasks // args.every
    print(f"{args.tasks:,} tasks, {longs} of them pause({args.long}), the rest noop; "
          f"{args.processes} worker processes x {args.concurrency} slots; Redis {url}")
    print(f"{'prefetch':<10} {'tasks/s':>8} {'quick wait p50 ms':>18} {'p99 ms':>8} {'max ms':>8}")
    for prefetch in SETTINGS:
        run_args = argparse.Namespace(concurrency=args.concurrency, conveyor_prefetch=prefetch,
                                      processes=args.processes, pool="threads", replicas=1)
        prefix = f"prefetchbench-{os.getpid()}-{prefetch or 'auto'}"
        with tempfile.TemporaryDirectory(prefix="conveyor-prefetch-") as tmp:
            run = ConveyorRun(run_args, url, prefix, Path(tmp))
            try:
                run.start()
                elapsed, waits = asyncio.run(run_batch(run.address, args.tasks, args.every, args.long))
            finally:
                run.stop()
                delete_prefix(url, prefix)
        print(f"{prefetch or 'unset':<10} {args.tasks / elapsed:>8,.0f} {ms(waits, 0.5):>18.1f} "
              f"{ms(waits, 0.99):>8.1f} {1000 * max(waits):>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
