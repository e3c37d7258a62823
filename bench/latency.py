"""Where a lone task's submit -> result time goes at light load, beside the floors under it.

    pip install -e '.[redis,bench]'
    python bench/latency.py                    # 1,000 sequential tasks, 3,000 floor calls

Three floors, each measured alone on this machine, then Conveyor's hops and a whole task:

1. grpc.aio, unary: a Python grpc.aio server that answers at once (a generic handler, no
   proto), called sequentially; wall time per call and the server's CPU per call.
2. grpc.aio, stream: the same server echoing messages on one bidirectional stream, one at a
   time (the Python SDK sends Submit and GetResult on such a stream, the Session).
3. Redis: a trivial EVALSHA from redis-py's asyncio client, sequentially (wall per call).
4. Conveyor, two hops alone: a submit to a queue no worker serves (the Submit's engine calls
   and messages without the run), and `result(id)` of a task that has ended (a GetResult that
   need not wait), each with the server's CPU per call.
5. Conveyor: `submit("noop")` then `result(id, wait=30)` (bench/compare.py's latency phase)
   on Redis, with the server's, the worker's and this client's CPU per task and the Redis
   commands per task (with `--replicas` and `--processes`, every replica's and every worker's
   CPU; a task is submitted to one replica and waited for on the next, as bench/compare.py does).

`--profile FILE` records the (first) server with py-spy while the sequential tasks run,
`--profile-worker FILE` the (first) worker; a FILE ending in .data records with Linux perf
instead, whose CPU clock counts only time on a CPU, the kernel's and every thread's included
(bench/perf_summary.py).
`--phases` also prints when each of the server's steps on a task's path began and ended, as
the median offset from the task's Submit (bench/phases.py): which hops the time goes to.

A task at light load crosses the client's stream twice (Submit, then GetResult), the worker's
stream twice (the assignment, the result) and a handful of Redis calls one after another, so
its p50 cannot go much under the sum of those floors; the figures show how close it is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat
from bench.compare import ConveyorRun, add_conveyor_worker_arguments, db_url, delete_prefix, profiled
from bench.phases import phases
from bench.watch import redis_commands
from conveyor import Client, sig
from tests.support.processes import REPO

SERVICE = "bench.Echo"
# The queue of `conveyor submit alone`: no worker serves it (its tasks are deleted with the prefix).
UNSERVED_QUEUE = "latency-bench-unserved"
WARMUP_CALLS = 200


# -- the grpc.aio echo server (run as a child: `python bench/latency.py --echo-server`) ----------

async def serve_echo() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# -- floors ---------------------------------------------------------------------------------------

async def timed(count: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(WARMUP_CALLS):
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def timed_with_cpu(
    count: int, call: Callable[[], Awaitable[object]], server_cpu: Callable[[], float]
) -> tuple[list[float], float]:
    """timed(), and the server's CPU seconds per call over the warm-up and the timed calls."""
    before = server_cpu()
    samples = await timed(count, call)
    return samples, (server_cpu() - before) / (count + WARMUP_CALLS)


def grpc_floors(count: int) -> list[tuple[str, list[float], float]]:
    """(name, wall samples, server CPU seconds per call) for a unary call and a stream echo."""
    child = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())

        def server_cpu() -> float:
            return procstat.cpu_seconds(child.pid, tree=False)

        return asyncio.run(echoed(f"127.0.0.1:{port}", count, server_cpu))
    finally:
        child.kill()
        child.wait()


async def echoed(address: str, count: int, server_cpu: Callable[[], float]) -> list[tuple[str, list[float], float]]:
    rows = []
    async with grpc.aio.insecure_channel(address) as channel:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Unary")
        rows.append(("grpc.aio unary call", *await timed_with_cpu(count, lambda: unary(b"x"), server_cpu)))
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(f"/{SERVICE}/Stream")()

        async def echo() -> object:
            await call.write(b"x")
            return await call.read()

        rows.append(("grpc.aio stream message echo", *await timed_with_cpu(count, echo, server_cpu)))
        await call.done_writing()
    return rows


async def redis_floor(url: str, count: int) -> list[float]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        script = client.register_script("return 1")
        return await timed(count, lambda: script(keys=[], args=[]))
    finally:
        await client.aclose()


# -- Conveyor -------------------------------------------------------------------------------------

async def conveyor_hops(
    address: str, count: int, server_cpu: Callable[[], float]
) -> list[tuple[str, list[float], str]]:
    """Two of a task's hops alone: a submit to a queue no worker serves (its calls and messages
    without the run), and the result of a task that has ended (a GetResult that need not wait)."""
    rows = []
    async with Client(address) as client:
        submits, cpu = await timed_with_cpu(
            count, lambda: client.submit(sig("noop"), queue=UNSERVED_QUEUE), server_cpu
        )
        rows.append(("conveyor submit alone", submits, f"server {1e6 * cpu:.0f} µs CPU/call"))
        ended = (await client.submit("noop")).task_id
        await client.result(ended, wait=30)
        reads, cpu = await timed_with_cpu(count, lambda: client.result(ended, wait=30), server_cpu)
        rows.append(("conveyor result of an ended task", reads, f"server {1e6 * cpu:.0f} µs CPU/call"))
    return rows


def ms(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return 1e3 * ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000, help="sequential Conveyor tasks")
    parser.add_argument("--calls", type=int, default=3_000, help="sequential calls per floor")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds between one task's result and the next submit (sparse traffic: "
                             "what is read again every second is then read on a task's path)")
    parser.add_argument("--conveyor-prefetch", type=int, help="tasks held per slot (default: the worker's own, auto)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--db", type=int, default=14)
    parser.add_argument("--phases", action="store_true",
                        help="also print when the server's steps on a task's path began and ended")
    parser.add_argument("--profile", help="py-spy output (.svg, .txt raw, .json speedscope) of the server "
                        "during the sequential tasks (bench/profile_summary.py reads the .txt), or a Linux perf "
                        "recording (.data: CPU by library and thread, bench/perf_summary.py reads it)")
    parser.add_argument("--profile-worker", help="py-spy output of the (first) worker process, as --profile")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native: show C frames (gRPC core)")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    add_conveyor_worker_arguments(parser)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(serve_echo())
        return 0
    url, prefix = db_url(args.redis, args.db), f"latencybench-{os.getpid()}"
    rows = [(name, samples, f"server {1e6 * cpu:.0f} µs CPU/call")
            for name, samples, cpu in grpc_floors(args.calls)]
    rows.append(("redis-py asyncio EVALSHA", asyncio.run(redis_floor(url, args.calls)), ""))
    with tempfile.TemporaryDirectory(prefix="conveyor-latency-bench-") as temp:
        run = ConveyorRun(args, url, prefix, Path(temp))
        notes = Path(temp) / "phases.txt"
        if args.phases:
            paths = [str(REPO / "bench" / "phases_hook"), str(REPO), os.environ.get("PYTHONPATH", "")]
            run.env = {"CONVEYOR_BENCH_PHASES": str(notes), "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        try:
            run.start()
            procs = run.procs()
            server = procs["server"]
            servers = [pid for name, pid in procs.items() if name.startswith("server") and pid is not None]
            workers = [pid for name, pid in procs.items() if name.startswith("worker") and pid is not None]
            assert server is not None and workers

            def servers_cpu() -> float:  # every replica's (--replicas)
                return sum(procstat.cpu_seconds(pid) for pid in servers)

            def workers_cpu() -> float:  # every worker process's (--processes)
                return sum(procstat.cpu_seconds(pid) for pid in workers)

            run.latency(WARMUP_CALLS)
            before = (servers_cpu(), workers_cpu(), time.process_time(), redis_commands(url))
            with profiled(server, args.profile, "the sequential tasks", args.profile_native), \
                    profiled(workers[0], args.profile_worker, "the sequential tasks", args.profile_native):
                samples = run.latency(args.tasks, args.gap)  # bench/compare.py's latency loop
            after = (servers_cpu(), workers_cpu(), time.process_time(), redis_commands(url))
            hops = asyncio.run(conveyor_hops(run.address, args.tasks, lambda: procstat.cpu_seconds(server)))
            run.check()
        finally:
            run.stop()
            delete_prefix(url, prefix)
        # The warm-up's tasks came first, then the measured loop's, then the hops'.
        steps = phases(notes, WARMUP_CALLS, args.tasks) if args.phases else []
    server_per_task, workers_per_task, client_per_task, commands = (
        (b - a) / args.tasks for a, b in zip(before, after, strict=True)
    )
    rows.extend(hops)
    rows.append(("conveyor submit -> result", samples,
                 f"server {1e6 * server_per_task:.0f}, worker {1e6 * workers_per_task:.0f}, "
                 f"client {1e6 * client_per_task:.0f} "
                 f"µs CPU/task; {commands:.1f} redis cmd/task"))
    print(f"\n{os.cpu_count()} CPUs; Redis {url}; worker: {run.settings}")
    print(f"{'sequential':<34} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>8}  cost")
    for name, values, cost in rows:
        print(f"{name:<34} {ms(values, 0.5):>7.3f} {ms(values, 0.99):>7.3f} "
              f"{1e3 * statistics.fmean(values):>8.3f}  {cost}")
    if steps:
        print(f"\nthe server's steps on a task's path, median µs after its Submit began (> began, < ended), "
              f"over the {args.tasks} measured tasks; each note costs the server a few microseconds")
        for step, offset, count in steps:
            print(f"{offset:>8.0f}  {step}" + (f"  ({count} tasks)" if count < args.tasks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
