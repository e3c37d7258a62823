"""What handing a sync task to a pool thread costs: the worker's threads pool (SlotThreads)
beside `loop.run_in_executor` on a ThreadPoolExecutor, which it replaced.

    python bench/handover.py                   # 20,000 sequential noop calls each, three rounds

Each call is handed over and awaited before the next, as a one-slot worker runs a queue of
short tasks: a hand-over, the thread's wake-up, the call, the hand-back and the loop's wake-up.
Prints the CPU (this process, every thread) and wall time per call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor.pools.slot_threads import SlotThreads


def noop() -> None:
    return None


async def measured(calls: int, handover: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    for _ in range(min(calls, 1_000)):  # warm-up
        await handover()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await handover()
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


async def executor_round(calls: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as executor:
        return await measured(calls, lambda: loop.run_in_executor(executor, noop))


async def slot_threads_round(calls: int) -> tuple[float, float]:
    threads: SlotThreads[None] = SlotThreads(1, "bench-handover")
    try:
        return await measured(calls, lambda: threads.submit(noop))
    finally:
        threads.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000, help="sequential calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.calls:,} sequential noop calls per round, one thread, uvloop")
    print(f"{'hand-over':<42} {'CPU µs/call':>12} {'wall µs/call':>13}")
    for _ in range(args.rounds):
        for name, round_ in (("loop.run_in_executor (ThreadPoolExecutor)", executor_round),
                             ("SlotThreads.submit (the threads pool)", slot_threads_round)):
            cpu, wall = uvloop.run(round_(args.calls))
            print(f"{name:<42} {1e6 * cpu:>12.1f} {1e6 * wall:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
