"""What dispatch limits cost the tasks they do not limit (issue #15): Conveyor's throughput with no
policy configured, then with a rate limit on another task name whose backlog waits in the same
queue. Both figures are printed; speed is reported, never asserted.

    pip install -e '.[redis,bench]'
    python bench/limits.py                          # 5,000 noop tasks; 2,000 limited ones at 10/s
    python bench/limits.py --tasks 20000 --backlog 5000 --limited-rate 50/s

The set-up is bench/compare.py's for Conveyor (one `conveyor serve` on the local Redis as broker
and backend, one `conveyor worker bench.noop_worker`, `--concurrency` thread slots), in its own
Redis DB (`--db`) under a key prefix unique to the run, deleted on exit.

1. No policy: `--tasks` `noop` tasks submitted in batches of `--batch`, timed until every one
   has its result (read in submission order, so a poll costs one GetResult).
2. A rate limit of `--limited-rate` on `anoop` (`conveyor limits set anoop ...`), a backlog of
   `--backlog` `anoop` tasks submitted first to the same queue, then `--tasks` `noop` tasks
   again, timed the same way. Dispatch passes over the backlog once (each limited task is
   fetched, finds no token and goes back to wait for its turn), then the backlog comes back at
   its limit's pace; the second figure says how much that slows the tasks of other names.
Afterwards the queue is purged and the limit deleted. `--rounds N` runs both phases N times in
turn and prints the medians too (a busy machine skews single figures). Exits 1 when a task fails
or a process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import WARMUP_TASKS, BenchError, ConveyorRun, db_url, delete_prefix, load
from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2
from conveyor.worker import DEFAULT_PREFETCH

LIMITED = "anoop"
# Give up on a phase when results stop coming for this long.
STALL_SECONDS = 60.0


async def _set_limit(address: str, rate: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.SetRateLimit(admin_service_pb2.SetRateLimitRequest(
            limit=admin_service_pb2.RateLimit(name=LIMITED, rate=rate)
        ))


async def _clean_up(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        purged = await admin.PurgeQueue(admin_service_pb2.PurgeQueueRequest(queue="default"))
        await admin.DeleteRateLimit(admin_service_pb2.DeleteRateLimitRequest(name=LIMITED))
        return purged.purged


async def _all_done(client: Client, ids: list[str], poll: float, run: ConveyorRun) -> None:
    """Until every task has succeeded: read in submission order, so a poll is one call."""
    index, last_progress = 0, time.monotonic()
    while index < len(ids):
        result = await client.get_result(ids[index])
        if result.state == result_pb2.TASK_STATE_SUCCESS:
            index, last_progress = index + 1, time.monotonic()
            continue
        if result.state in (result_pb2.TASK_STATE_FAILURE, result_pb2.TASK_STATE_CANCELLED):
            raise BenchError(f"task {ids[index]} ended {result_pb2.TaskState.Name(result.state)}")
        if time.monotonic() - last_progress > STALL_SECONDS:
            raise BenchError(f"{len(ids) - index} tasks still running after {STALL_SECONDS:.0f} s without progress")
        run.check()
        await asyncio.sleep(poll)


async def _submit(client: Client, name: str, count: int, batch: int) -> list[str]:
    ids: list[str] = []
    for offset in range(0, count, batch):
        size = min(batch, count - offset)
        ids += [s.task_id for s in await client.submit_batch(sig(name) for _ in range(size))]
    return ids


def no_policy(run: ConveyorRun, args: argparse.Namespace) -> float:
    """Seconds until `--tasks` noop tasks ended, with no limit anywhere."""
    async def measure() -> float:
        async with Client(run.address) as client:
            started = time.perf_counter()
            await _all_done(client, await _submit(client, "noop", args.tasks, args.batch), args.poll, run)
            return time.perf_counter() - started

    return asyncio.run(measure())


def beside_a_limited_backlog(run: ConveyorRun, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds until `--tasks` noop tasks ended, submitted behind a backlog of limited tasks; and
    how many of that backlog ran meanwhile."""
    async def measure() -> tuple[float, int]:
        await _set_limit(run.address, args.limited_rate)
        async with Client(run.address) as client:
            backlog = await _submit(client, LIMITED, args.backlog, args.batch)
            started = time.perf_counter()
            await _all_done(client, await _submit(client, "noop", args.tasks, args.batch), args.poll, run)
            took = time.perf_counter() - started
            ran = 0
            for offset in range(0, len(backlog), 50):
                reads = await asyncio.gather(*(client.get_result(t) for t in backlog[offset:offset + 50]))
                ran += sum(r.state == result_pb2.TASK_STATE_SUCCESS for r in reads)
        return took, ran

    return asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5_000, help="noop tasks in each phase")
    parser.add_argument("--backlog", type=int, default=2_000, help=f"limited {LIMITED!r} tasks queued first in phase 2")
    parser.add_argument("--limited-rate", default="10/s", help=f"the rate limit on {LIMITED!r}")
    parser.add_argument("--concurrency", type=int, default=8, help="task slots in the worker process")
    parser.add_argument("--conveyor-prefetch", type=int, default=DEFAULT_PREFETCH, help="tasks held per slot")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=13, help="Redis DB to use")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between completion checks")
    parser.add_argument("--rounds", type=int, default=1, help="times to run both phases, in turn")
    args = parser.parse_args()
    args.pool = "threads"  # what ConveyorRun reads besides the options above

    url = db_url(args.redis, args.db)
    prefix = f"limitsbench-{os.getpid()}"
    print(f"{os.cpu_count()} CPUs; load average {load()}; redis db {args.db}, keys under {prefix!r}", flush=True)
    with tempfile.TemporaryDirectory(prefix="conveyor-limits-") as tmp:
        run = ConveyorRun(args, url, prefix, Path(tmp))
        try:
            run.start()
            run.latency(WARMUP_TASKS)
            plain_rates, beside_rates = [], []
            for _ in range(args.rounds):
                plain_took = no_policy(run, args)
                plain_rates.append(args.tasks / plain_took)
                print(f"no policy: {args.tasks:,} noop tasks in {plain_took:.2f} s = {plain_rates[-1]:,.0f} tasks/s",
                      flush=True)
                took, ran = beside_a_limited_backlog(run, args)
                beside_rates.append(args.tasks / took)
                print(f"with a {args.limited_rate} limit on {LIMITED!r} and {args.backlog:,} of them queued first: "
                      f"{args.tasks:,} noop tasks in {took:.2f} s = {beside_rates[-1]:,.0f} tasks/s; "
                      f"{ran:,} {LIMITED!r} ran meanwhile ({ran / took:.1f}/s)", flush=True)
                purged = asyncio.run(_clean_up(run.address))
                print(f"  purged the {purged:,} limited tasks left; load average {load()}", flush=True)
            plain, beside = statistics.median(plain_rates), statistics.median(beside_rates)
            print(f"median over {args.rounds} rounds: no policy {plain:,.0f} tasks/s; beside the limited backlog "
                  f"{beside:,.0f} tasks/s ({beside / plain:.0%} of no policy)", flush=True)
        except BenchError as exc:
            print(f"limits: {exc}", file=sys.stderr)
            return 1
        finally:
            run.stop()
            print(f"stopped; deleted {delete_prefix(url, prefix)} keys under {prefix!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
