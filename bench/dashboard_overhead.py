"""What the dashboard costs the task hot path when no browser is connected (issue #18: at most
3% of bench/compare.py's throughput): the same Conveyor throughput run with the server's HTTP
dashboard on (the default of `conveyor serve`) and off (`--http 0` and `task_index: false`: the
task index exists for the dashboard's task list and ListTasks, and costs a write per state
change), alternating.

    pip install -e '.[redis,bench]'
    python bench/dashboard_overhead.py                      # 4 rounds of 10,000 noop tasks, each mode
    python bench/dashboard_overhead.py --rounds 6 --tasks 20000

Each run is bench/compare.py's Conveyor set-up and throughput phase: one `conveyor serve` on the
local Redis as broker and backend, one `conveyor worker bench.noop_worker` (`--concurrency`
thread slots), a warm-up of 100 sequential tasks, then `--tasks` noop tasks submitted by
SubmitBatch and timed until every result is stored. With the dashboard on, the server listens on
a free loopback port (CONVEYOR_HTTP_PORT, as `--http PORT`), which is checked to answer HTTP and
is not read during the run. Every run starts a fresh server and worker; the modes alternate,
and the order within a round rotates, so a trend in the machine's load hits both. Printed:
tasks/s and server CPU microseconds per task for each run, then the medians of each mode and
the difference. Speed is reported, never asserted; the load average is printed because other
work on the machine skews every figure. Keys go under a prefix unique to each run in `--db`,
deleted after it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import (
    WARMUP_TASKS,
    BenchError,
    ConveyorRun,
    Figures,
    add_conveyor_worker_arguments,
    cpu_meter,
    db_url,
    delete_prefix,
    load,
)
from tests.support.processes import free_port

MODES = ("dashboard on", "dashboard off")


def dashboard_answers(port: int) -> bool:
    """True when something answers HTTP on the port (any status: a login page, a 401)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def one_run(mode: str, index: int, args: argparse.Namespace, workdir: Path) -> Figures:
    url = db_url(args.redis, args.db)
    prefix = f"convdash-{os.getpid()}-{index}"
    run = ConveyorRun(args, url, prefix, workdir)
    port = free_port() if mode == "dashboard on" else 0
    run.env = {"CONVEYOR_HTTP_PORT": str(port), "CONVEYOR_TASK_INDEX": "true" if port else "false"}
    figures = Figures("conveyor", mode)
    try:
        run.start()
        if port and not dashboard_answers(port):
            raise BenchError(f"the dashboard does not answer on port {port}")
        run.latency(WARMUP_TASKS)
        processes = {**run.procs(), "redis": None}
        with cpu_meter(figures, processes, url):
            run.throughput(args.tasks, figures)
        run.verify(figures)
        run.check()
    finally:
        run.stop()
        delete_prefix(url, prefix)
    return figures


def server_us(figures: Figures) -> float:
    return 1e6 * figures.cpu.get("server", float("nan")) / max(figures.tasks, 1)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="noop tasks in each run")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each mode")
    parser.add_argument("--concurrency", type=int, default=8, help="task slots in the worker process")
    parser.add_argument("--conveyor-prefetch", type=int, help="tasks held per slot (default: the worker's own, auto)")
    add_conveyor_worker_arguments(parser)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=14, help="Redis DB to use")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between completion checks")
    args = parser.parse_args()
    args.pool = "threads"  # what ConveyorRun reads besides the options above
    return args


def main() -> int:
    args = parse()
    print(f"{os.cpu_count()} CPUs; load average {load()}; {args.rounds} rounds of {args.tasks:,} noop tasks, "
          f"{args.concurrency} slots", flush=True)
    results: dict[str, list[Figures]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="conveyor-dashboard-") as tmp:
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                try:
                    figures = one_run(mode, len(results[mode]) * 2 + MODES.index(mode), args, Path(tmp))
                except BenchError as exc:
                    print(f"dashboard_overhead: {mode}: {exc}", file=sys.stderr)
                    return 1
                results[mode].append(figures)
                print(f"  round {round_ + 1}  {mode:<13}  {figures.throughput:>7,.0f} tasks/s  "
                      f"submit {figures.submit_rate:>7,.0f}/s  server {server_us(figures):>4.0f} us/task  "
                      f"load {load()}", flush=True)
    on, off = (statistics.median(f.throughput for f in results[mode]) for mode in MODES)
    on_cpu, off_cpu = (statistics.median(server_us(f) for f in results[mode]) for mode in MODES)
    print(f"\nmedians over {args.rounds} runs each:")
    for mode, rate, cpu in zip(MODES, (on, off), (on_cpu, off_cpu), strict=True):
        rates = [f.throughput for f in results[mode]]
        print(f"  {mode:<13}  {rate:>7,.0f} tasks/s ({min(rates):,.0f}-{max(rates):,.0f})  server {cpu:.0f} us/task")
    cost = (off - on) / off
    print(f"the dashboard costs {cost:+.1%} of throughput (target <= 3%: {'met' if cost <= 0.03 else 'NOT met'}) "
          f"and {on_cpu - off_cpu:+.0f} us ({(on_cpu - off_cpu) / off_cpu:+.1%}) of server CPU per task (CPU time "
          "moves less than throughput on a busy machine)")
    print(f"load average at the end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
