"""Server memory with a deep queue: RSS with N tasks queued (no worker connected), and after they drain.

    python bench/memory.py                              # 1,000,000 tasks, on Redis, then on SQLite
    python bench/memory.py --tasks 100000 --engines redis

For each engine, `conveyor serve` runs as its own process with that engine as broker and
backend. This process submits `--tasks` noop tasks with SubmitBatch (`--batch` per call,
`--parallel` calls in flight) while no worker is connected, checks that the queue holds
exactly that many, and reads the server's resident memory (VmRSS in /proc, Linux only).
Then one worker process (`bench.noop_worker`, `--concurrency` slots) drains the queue, and
the RSS is read again, right away and after `--settle` seconds. VmHWM is the peak RSS of
the server over the whole run. The store's own size is shown too: Redis `used_memory` growth
(of the whole Redis server, so other clients' keys count) or the SQLite file with its WAL.

Redis keys go to DB `--db` under a prefix unique to this run and are deleted at the end;
the SQLite file lives in a temporary directory. Exits 1 on errors: a submission that did
not queue every task, a drain that stalls for `--stall` seconds, a sampled result that is
not a success, or a drain that exceeds `--drain-timeout` (when given).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procstat
from bench.compare import db_url, delete_prefix
from bench.queue_info import queue_info
from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2_grpc, result_pb2
from tests.support.processes import Server, WorkerProc, wait_for_workers

ENGINES = ("redis", "sqlite")
# How many task ids are kept to check their results after the drain.
SAMPLE = 1000


class BenchError(Exception):
    pass


@dataclass
class Row:
    engine: str
    tasks: int = 0
    submit_seconds: float = 0.0
    drain_seconds: float = 0.0
    rss_idle: int = 0
    rss_queued: int = 0
    rss_drained: int = 0
    rss_settled: int = 0
    peak: int = 0
    store_queued: int = 0
    store_drained: int = 0
    # (tasks done, server RSS KiB) at each quarter of the drain: flat, or growing per task?
    rss_by_done: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


async def queue_depth(admin: admin_service_pb2_grpc.AdminServiceAsyncStub) -> tuple[int, int]:
    """(ready + delayed, in flight) of the default queue."""
    info = await queue_info(admin, "default", rpc_timeout=60)
    return (info.ready + info.delayed, info.in_flight) if info is not None else (0, 0)


async def submit(address: str, tasks: int, batch: int, parallel: int) -> tuple[int, list[str]]:
    """Submits `tasks` noops; returns how many ids came back and an evenly spread sample of them."""
    every = max(1, tasks // SAMPLE)
    sample: list[str] = []
    accepted = 0
    next_offset = 0
    started = time.perf_counter()

    async def sender(client: Client) -> None:
        nonlocal accepted, next_offset
        while next_offset < tasks:
            offset = next_offset
            size = min(batch, tasks - offset)
            next_offset += size
            submitted = await client.submit_batch(sig("noop") for _ in range(size))
            accepted += len(submitted)
            sample.extend(s.task_id for i, s in enumerate(submitted) if (offset + i) % every == 0)
            if accepted // 100_000 != (accepted - len(submitted)) // 100_000:
                rate = accepted / (time.perf_counter() - started)
                print(f"    {accepted:>9,} submitted ({rate:,.0f}/s)", flush=True)

    async with Client(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as client:
        await asyncio.gather(*(sender(client) for _ in range(parallel)))
    return accepted, sample


async def drain(
    address: str, total: int, stall: float, limit: float, server: Server, worker: WorkerProc,
    rss_by_done: list[tuple[int, int]],
) -> None:
    """Waits until the queue is empty; reads the server's RSS into `rss_by_done` as the drain
    passes 0, 1/4, 1/2 and 3/4 of `total` (and at the end)."""
    checkpoints = [total * quarter // 4 for quarter in range(4)]
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        started = last_report = last_progress = time.monotonic()
        last_left = -1
        while True:
            queued, in_flight = await queue_depth(admin)
            left = queued + in_flight
            while checkpoints and total - left >= checkpoints[0]:
                rss_by_done.append((total - left, procstat.status_kib(server.pid, "VmRSS")))
                checkpoints.pop(0)
            if left == 0:
                rss_by_done.append((total, procstat.status_kib(server.pid, "VmRSS")))
                return
            now = time.monotonic()
            if left != last_left:
                last_left, last_progress = left, now
            elif now - last_progress > stall:
                raise BenchError(f"drain stalled: {left:,} tasks left, no progress for {stall:.0f} s")
            if limit and now - started > limit:
                raise BenchError(f"drain not finished after {limit:.0f} s: {left:,} of {total:,} tasks left")
            if now - last_report > 30:
                done = total - left
                print(f"    {done:>9,} done ({done / (now - started):,.0f}/s), {left:,} left", flush=True)
                last_report = now
            for proc in (server, worker):
                if not proc.alive():
                    raise BenchError(f"{proc.argv[3]} exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
            await asyncio.sleep(0.2)


async def check_sample(address: str, ids: list[str]) -> int:
    failed = 0
    async with Client(address) as client:
        for offset in range(0, len(ids), 50):  # the server's Redis pool refuses a command past 100 connections
            chunk = ids[offset:offset + 50]
            results = await asyncio.gather(*(client.get_result(task_id, wait=10) for task_id in chunk))
            failed += sum(r.state != result_pb2.TASK_STATE_SUCCESS for r in results)
    return failed


def store_size(engine: str, url: str, db_path: Path | None) -> int:
    """KiB: Redis used_memory, or the SQLite file plus its WAL."""
    if engine == "redis":
        client = redis.Redis.from_url(url)
        try:
            return int(client.info("memory")["used_memory"]) // 1024
        finally:
            client.close()
    assert db_path is not None
    return sum(p.stat().st_size for p in db_path.parent.glob(db_path.name + "*")) // 1024


def measure(engine: str, args: argparse.Namespace, workdir: Path) -> Row:
    row = Row(engine)
    prefix = f"convbench-mem-{os.getpid()}"
    redis_url = db_url(args.redis, args.db)
    db_path = workdir / f"memory-{os.getpid()}.db" if engine == "sqlite" else None
    url = f"{redis_url}?prefix={prefix}" if engine == "redis" else f"sqlite:///{db_path}"
    store_base = store_size(engine, redis_url, None) if engine == "redis" else 0
    print(f"{engine}: {url}", flush=True)
    server = Server(workdir, url, url, env={"CONVEYOR_LOG_LEVEL": "WARNING"}, name=f"server-{engine}")
    worker: WorkerProc | None = None
    try:
        time.sleep(1.0)
        row.rss_idle = procstat.status_kib(server.pid, "VmRSS")
        print(f"  idle server RSS {mib(row.rss_idle)} MiB; submitting {args.tasks:,} tasks", flush=True)
        started = time.perf_counter()
        accepted, sample = asyncio.run(submit(server.address, args.tasks, args.batch, args.parallel))
        row.submit_seconds = time.perf_counter() - started
        row.tasks = accepted

        async def depth() -> tuple[int, int]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                return await queue_depth(admin_service_pb2_grpc.AdminServiceStub(channel))

        queued, in_flight = asyncio.run(depth())
        if accepted != args.tasks or queued != args.tasks or in_flight:
            raise BenchError(f"submitted {args.tasks:,}, accepted {accepted:,}, queued {queued:,}, "
                             f"in flight {in_flight:,}")
        row.rss_queued = procstat.status_kib(server.pid, "VmRSS")
        row.store_queued = store_size(engine, redis_url, db_path) - store_base
        print(f"  {queued:,} queued in {row.submit_seconds:.1f} s ({accepted / row.submit_seconds:,.0f}/s): "
              f"server RSS {mib(row.rss_queued)} MiB, peak {mib(procstat.status_kib(server.pid, 'VmHWM'))} MiB; "
              f"store {mib(row.store_queued)} MiB", flush=True)

        worker = WorkerProc(workdir, server.address, module="bench.noop_worker", concurrency=args.concurrency,
                            env={"CONVEYOR_LOG_LEVEL": "WARNING"})
        wait_for_workers(server.address, 1)
        started = time.perf_counter()
        asyncio.run(drain(server.address, queued, args.stall, args.drain_timeout, server, worker, row.rss_by_done))
        row.drain_seconds = time.perf_counter() - started
        row.rss_drained = procstat.status_kib(server.pid, "VmRSS")
        print(f"  drained in {row.drain_seconds:.1f} s ({queued / row.drain_seconds:,.0f}/s): "
              f"server RSS {mib(row.rss_drained)} MiB", flush=True)
        print("  server RSS as the drain went: " + ", ".join(
            f"{done:,} done {mib(rss)} MiB" for done, rss in row.rss_by_done), flush=True)
        failed = asyncio.run(check_sample(server.address, sample))
        if failed:
            raise BenchError(f"{failed} of {len(sample)} sampled tasks did not succeed")
        time.sleep(args.settle)
        row.rss_settled = procstat.status_kib(server.pid, "VmRSS")
        row.peak = procstat.status_kib(server.pid, "VmHWM")
        row.store_drained = store_size(engine, redis_url, db_path) - store_base
        print(f"  after {args.settle:.0f} s idle: server RSS {mib(row.rss_settled)} MiB, peak {mib(row.peak)} MiB; "
              f"{len(sample)} sampled results are successes", flush=True)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        if engine == "redis":
            print(f"  deleted {delete_prefix(redis_url, prefix):,} keys under {prefix!r}", flush=True)
    return row


def report(rows: list[Row]) -> None:
    print()
    header = (f"{'engine':<7} {'tasks':>9} {'submit/s':>9} {'drain/s':>8} {'RSS idle':>9} {'queued':>7} "
              f"{'drained':>8} {'+settle':>8} {'peak':>6}   store: queued / drained")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r.engine:<7} {r.tasks:>9,} {r.tasks / r.submit_seconds:>9,.0f} {r.tasks / r.drain_seconds:>8,.0f} "
              f"{mib(r.rss_idle):>9} {mib(r.rss_queued):>7} {mib(r.rss_drained):>8} {mib(r.rss_settled):>8} "
              f"{mib(r.peak):>6}   {mib(r.store_queued)} / {mib(r.store_drained)} MiB")
    print("(server RSS in MiB)")
    for r in rows:
        if r.rss_by_done:
            low, high = min(rss for _, rss in r.rss_by_done), max(rss for _, rss in r.rss_by_done)
            steps = "  ".join(f"{done:,}: {mib(rss)}" for done, rss in r.rss_by_done)
            print(f"{r.engine}: server RSS over the drain (tasks done: MiB) {steps}; spread {mib(high - low)} MiB "
                  f"({100 * (high - low) / low:.0f}% of the lowest)")
    for r in rows:
        if r.engine == "redis":
            verdict = "met" if r.rss_queued < 150 * 1024 else "NOT met"
            print(f"target: server RSS < 150 MB with {r.tasks:,} tasks queued on Redis: "
                  f"{r.rss_queued * 1024 / 1e6:,.0f} MB, {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of redis,sqlite")
    parser.add_argument("--batch", type=int, default=5_000, help="tasks per SubmitBatch call (at most 10,000)")
    parser.add_argument("--parallel", type=int, default=2, help="SubmitBatch calls in flight")
    parser.add_argument("--concurrency", type=int, default=64, help="slots of the worker that drains the queue")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=13)
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before the last RSS reading")
    parser.add_argument("--stall", type=float, default=120.0, help="fail when the drain makes no progress this long")
    parser.add_argument("--drain-timeout", type=float, default=0.0, help="fail when draining takes longer (0: never)")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines must name some of {', '.join(ENGINES)}")
    rows: list[Row] = []
    errors: list[str] = []
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="conveyor-memory-") as tmp:
        for engine in engines:
            try:
                rows.append(measure(engine, args, Path(tmp)))
            except (BenchError, grpc.RpcError, RuntimeError, OSError, redis.RedisError) as exc:
                errors.append(f"{engine}: {exc}")
                print(f"  ERROR {engine}: {exc}", file=sys.stderr, flush=True)
    report(rows)
    for error in errors:
        print(f"memory: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
