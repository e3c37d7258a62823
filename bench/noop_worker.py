"""The worker the benchmarks run: `conveyor worker bench.noop_worker`. CONVEYOR_BENCH_POOL picks
its pool (threads by default; bench/compare.py --pool processes sets it)."""

import os
import time

from conveyor import Worker

worker = Worker(concurrency=64, pool=os.environ.get("CONVEYOR_BENCH_POOL", "threads"))  # type: ignore[arg-type]


@worker.task("noop")
def noop() -> None:
    return None


@worker.task("anoop")
async def anoop() -> None:
    return None


@worker.task("pause")
def pause(seconds: float) -> None:
    """A long task among quick ones (bench/prefetch.py)."""
    time.sleep(seconds)
