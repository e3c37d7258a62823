"""Conveyor on one Redis and on a three-master Redis Cluster, side by side in one run.

    pip install -e '.[redis,bench]'
    python bench/cluster.py                          # 10,000 tasks, 1,000 latency samples
    python bench/cluster.py --tasks 20000 --concurrency 1 --conveyor-prefetch 64

Both engines are started here on free loopback ports and stopped at the end, with the same
persistence (`--appendonly yes --appendfsync everysec` by default, Redis's own advice for
AOF; `--appendfsync always` for the tests' setting): one `redis-server`, and three
`redis-server --cluster-enabled yes` joined by `redis-cli --cluster create` (no replicas).
Conveyor uses each as broker and backend (`redis://...` and `redis+cluster://...`), with one
`conveyor serve` and the worker processes of bench/compare.py, and runs compare.py's phases:
warm-up, sequential latency, then `--tasks` noop tasks in SubmitBatch calls until the queue
drains. Redis commands and Redis CPU are summed over every node; all of them share this
machine's cores with the server and the worker, so the cluster's figures show its cost per
task here, not the capacity three machines would give.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procstat
from bench.compare import (
    BenchError,
    ConveyorRun,
    Figures,
    add_conveyor_worker_arguments,
    measure_latency,
    print_table,
    server_cpu_per_task_us,
)
from tests.fixtures.redis_cluster import start_redis_cluster
from tests.support.processes import end_group, free_port, track, wait_for

PREFIX = f"clusterbench-{os.getpid()}"


@contextmanager
def single_redis(directory: Path, appendfsync: str) -> Iterator[tuple[str, list[int]]]:
    """One redis-server on a free port: (URL, [port])."""
    port = free_port()
    data = directory / "single"
    data.mkdir()
    with (data / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    track(process)
    try:
        wait_for(lambda: _answers(port), 20.0, f"redis-server on {port}")
        yield f"redis://127.0.0.1:{port}/0", [port]
    finally:
        end_group(process)


@contextmanager
def cluster_redis(directory: Path, appendfsync: str) -> Iterator[tuple[str, list[int]]]:
    """Three cluster masters: (URL naming them all, their ports)."""
    cluster = start_redis_cluster(directory / "cluster", appendfsync)
    try:
        yield cluster.url, list(cluster.ports)
    finally:
        cluster.stop()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def node_figures(ports: list[int]) -> tuple[int, float, list[int]]:
    """(commands processed, CPU seconds, pids) summed over the nodes; the INFO calls count 2 each."""
    commands, cpu, pids = 0, 0.0, []
    for port in ports:
        client = redis.Redis(port=port)
        try:
            stats, usage, server = client.info("stats"), client.info("cpu"), client.info("server")
        finally:
            client.close()
        commands += int(stats["total_commands_processed"])
        cpu += usage["used_cpu_user"] + usage["used_cpu_sys"]
        pids.append(int(server["process_id"]))
    return commands, cpu, pids


def measure(name: str, url: str, ports: list[int], args: argparse.Namespace, workdir: Path) -> Figures:
    run = ConveyorRun(args, url, PREFIX, workdir)
    figures = Figures(name, run.worker_desc, settings=run.settings)
    print(f"{name}: {url}", flush=True)
    try:
        run.start()
        measure_latency(name, run, figures, args.latency_tasks)
        processes = run.procs()
        commands_before, redis_before, _ = node_figures(ports)
        before = {key: procstat.cpu_seconds(pid) for key, pid in processes.items() if pid is not None}
        run.throughput(args.tasks, figures)
        after = {key: procstat.cpu_seconds(pid) for key, pid in processes.items() if pid is not None}
        commands_after, redis_after, _ = node_figures(ports)
        # Less the three INFO calls per node of each reading.
        figures.redis_commands = commands_after - commands_before - 3 * len(ports)
        figures.cpu = {key: after[key] - before[key] for key in after}
        figures.cpu["redis"] = redis_after - redis_before
        run.verify(figures)
        run.check()
    finally:
        run.stop()
    return figures


def _row(f: Figures) -> str:
    per_task = max(f.tasks, 1)
    columns = [f"{f.throughput:>8,.0f}", f"{f.percentile_ms(0.5):>7.2f}", f"{f.percentile_ms(0.99):>7.2f}",
               f"{f.redis_commands / per_task:>9.1f}", f"{server_cpu_per_task_us(f):>15.0f}",
               f"{1e6 * f.cpu['redis'] / per_task:>14.0f}"]
    return f"{f.system:<26} " + " ".join(columns)


def report(results: list[Figures], args: argparse.Namespace) -> None:
    header = (f"{'engine':<26} {'tasks/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cmd/task':>9} "
              f"{'server µs/task':>15} {'redis µs/task':>14}")
    rows = [_row(f) for f in results]
    print_table(f"{args.tasks:,} noop tasks in bulk; latency over {args.latency_tasks:,} sequential tasks; "
                f"AOF appendfsync {args.appendfsync} everywhere", header, rows)
    print(f"worker: {results[0].settings}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency-tasks", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--conveyor-prefetch", type=int, help="tasks held per slot (default: the worker's own, auto)")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between drain checks")
    parser.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    add_conveyor_worker_arguments(parser)
    args = parser.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        print("needs redis-server and redis-cli", file=sys.stderr)
        return 1
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-cluster-bench-") as temp:
        workdir = Path(temp)
        engines = (("one Redis", single_redis), ("Redis Cluster, 3 masters", cluster_redis))
        try:
            for name, engine in engines:
                with engine(workdir, args.appendfsync) as (url, ports):
                    results.append(measure(name, url, ports, args, workdir))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
