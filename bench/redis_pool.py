"""CPU per Redis command through each connection pool the Redis engines could use.

    python bench/redis_pool.py                 # GET and a 4-command pipeline, 1 and 8 callers

redis-py's asyncio client takes a connection from its pool and gives it back around every
command and pipeline. Its `BlockingConnectionPool` (which the engines need: a burst waits for a
connection instead of failing) does that under a condition, a timeout and a lock, with metrics
coroutines on the way; `QuickBlockingPool` (server/conveyor_server/redis_quick_pool.py) takes
idle connections without them. The rounds alternate the pools, so a slow spell of the machine
falls on each; this process's CPU per command is printed for each round, with its median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor_server.redis_packing import packing_in_c
from conveyor_server.redis_pool import MAX_CONNECTIONS, WAIT_SECONDS
from conveyor_server.redis_quick_pool import QuickBlockingPool

POOLS: dict[str, Callable[[str], aioredis.ConnectionPool]] = {
    "redis-py BlockingConnectionPool": lambda url: aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=WAIT_SECONDS),
    "redis-py ConnectionPool (fails past max)": lambda url: aioredis.ConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS),
    "QuickBlockingPool": lambda url: QuickBlockingPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=WAIT_SECONDS),
}


async def cpu_per_command(client: aioredis.Redis, key: str, commands: int, callers: int, pipeline: bool) -> float:
    """This process's CPU per command, in µs, for `commands` run by `callers` concurrent callers."""
    async def get() -> None:
        await client.get(key)

    async def pipelined() -> None:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(4):
                pipe.get(key)
            await pipe.execute()

    call: Callable[[], Awaitable[None]] = pipelined if pipeline else get
    per_call = 4 if pipeline else 1

    async def caller() -> None:
        for _ in range(commands // callers // per_call):
            await call()

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return (time.process_time() - started) / commands * 1e6


async def measure(url: str, commands: int, rounds: int) -> None:
    key = f"bench-redis-pool:{uuid.uuid4().hex}"
    cases = [(callers, pipeline) for pipeline in (False, True) for callers in (1, 8)]
    figures: dict[tuple[str, int, bool], list[float]] = {}
    for _ in range(rounds):
        for name, make in POOLS.items():
            pool = make(url)
            pool.connection_class = packing_in_c(pool.connection_class)  # as the engines' clients
            client = aioredis.Redis.from_pool(pool)
            try:
                await client.set(key, "v")
                for callers, pipeline in cases:
                    await cpu_per_command(client, key, commands // 5, callers, pipeline)  # warm up
                    cpu = await cpu_per_command(client, key, commands, callers, pipeline)
                    figures.setdefault((name, callers, pipeline), []).append(cpu)
            finally:
                await client.delete(key)
                await client.aclose()
    print(f"{commands:,} commands per case and round, {rounds} alternated rounds; Redis {url}")
    print(f"{'pool':<42} {'case':<22} {'median µs CPU/cmd':>18}  rounds")
    for callers, pipeline in cases:
        for name in POOLS:
            values = figures[(name, callers, pipeline)]
            case = f"{'pipeline of 4' if pipeline else 'GET'}, {callers} caller{'s' if callers > 1 else ''}"
            print(f"{name:<42} {case:<22} {statistics.median(values):>18.1f}  "
                  + " ".join(f"{v:.1f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="the Redis to use (one key, deleted)")
    parser.add_argument("--commands", type=int, default=8_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.redis, args.commands, args.rounds))


if __name__ == "__main__":
    main()
