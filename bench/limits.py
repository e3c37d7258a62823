"""What dispatch limits cost the tasks they do not limit (issue #15), and what this code costs
against older code: Conveyor's throughput with no policy configured (optionally also on the code
of earlier revisions, `--baseline`), with a rate limit set on a name that is never submitted,
and with a rate limit on another task name whose backlog waits in the same queue. Every figure
is printed, each round and as medians; speed is reported, never asserted.

    pip install -e '.[redis,bench]'
    python bench/limits.py                          # 5,000 noop tasks; 2,000 limited ones at 10/s
    python bench/limits.py --rounds 3 --baseline 171110e
    python bench/limits.py --tasks 20000 --backlog 5000 --limited-rate 50/s

The set-up is bench/compare.py's for Conveyor (one `conveyor serve` on the local Redis as broker
and backend, one `conveyor worker bench.noop_worker`, `--concurrency` thread slots), in its own
Redis DB (`--db`) under key prefixes unique to the run, deleted on exit. Each phase submits
`--tasks` `noop` tasks in batches of `--batch` and is timed until every one has its result (read
in submission order, so a poll costs one GetResult); the CPU time the server and the worker
used meanwhile is shown per task too, a figure that other work on the machine skews far less
than throughput:

1. No policy.
2. `--baseline REV` (repeatable): no policy, on the code of REV. Its tree is extracted with
   `git archive` into a temporary directory, and its server and worker run from there (on
   PYTHONPATH, with PYTHONSAFEPATH so this checkout's modules do not shadow it); the client
   and the measurement are this checkout's.
3. A rate limit of `--limited-rate` on `never_submitted`: a limit exists, none of the tasks has it.
4. A rate limit of `--limited-rate` on `anoop` (`conveyor limits set anoop ...`), a backlog of
   `--backlog` `anoop` tasks submitted first to the same queue, then the `noop` tasks. Dispatch
   passes over the backlog once (each limited task is fetched, finds no token and goes back to
   wait for its turn), then the backlog comes back at its limit's pace; this figure says how
   much that slows the tasks of other names. Afterwards the queue is purged.
Limits are deleted after their phase. `--rounds N` runs the phases N times in turn (a busy
machine skews single figures: compare the spread too), the no-policy runs of phases 1 and 2 in
a rotating order. Exits 1 when a task fails or a process
dies.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procstat
from bench.compare import (
    WARMUP_TASKS,
    BenchError,
    ConveyorRun,
    add_conveyor_worker_arguments,
    db_url,
    delete_prefix,
    load,
)
from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2
from tests.support.processes import REPO

LIMITED = "anoop"
UNUSED = "never_submitted"
# Give up on a phase when results stop coming for this long.
STALL_SECONDS = 60.0
NO_POLICY = "no policy"


async def _set_limit(address: str, name: str, rate: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.SetRateLimit(admin_service_pb2.SetRateLimitRequest(
            limit=admin_service_pb2.RateLimit(name=name, rate=rate)
        ))


async def _clean_up(address: str, name: str) -> int:
    """Purge the queue and delete the limit on `name`; how many tasks were purged."""
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        purged = await admin.PurgeQueue(admin_service_pb2.PurgeQueueRequest(queue="default"))
        await admin.DeleteRateLimit(admin_service_pb2.DeleteRateLimitRequest(name=name))
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


@dataclass(frozen=True)
class Measured:
    # noop tasks per second, from the first submit until the last result
    rate: float
    # CPU milliseconds the server and the worker used meanwhile, per noop task
    cpu_ms: float


async def _noop_rate(client: Client, run: ConveyorRun, args: argparse.Namespace) -> Measured:
    """`--tasks` noop tasks, timed, and the CPU time they cost."""
    pids = [pid for pid in run.procs().values() if pid is not None]
    cpu, started = sum(map(procstat.cpu_seconds, pids)), time.perf_counter()
    await _all_done(client, await _submit(client, "noop", args.tasks, args.batch), args.poll, run)
    took, cpu = time.perf_counter() - started, sum(map(procstat.cpu_seconds, pids)) - cpu
    return Measured(args.tasks / took, cpu * 1000 / args.tasks)


def no_policy(run: ConveyorRun, args: argparse.Namespace) -> Measured:
    """With no limit anywhere."""
    async def measure() -> Measured:
        async with Client(run.address) as client:
            return await _noop_rate(client, run, args)

    return asyncio.run(measure())


def beside_an_unused_limit(run: ConveyorRun, args: argparse.Namespace) -> Measured:
    """With a rate limit on a name none of the tasks has."""
    async def measure() -> Measured:
        await _set_limit(run.address, UNUSED, args.limited_rate)
        try:
            async with Client(run.address) as client:
                return await _noop_rate(client, run, args)
        finally:
            await _clean_up(run.address, UNUSED)

    return asyncio.run(measure())


def beside_a_limited_backlog(run: ConveyorRun, args: argparse.Namespace) -> tuple[Measured, int, int]:
    """Noop tasks submitted behind a backlog of limited tasks; how many of that backlog ran
    meanwhile, and how many were purged afterwards."""
    async def measure() -> tuple[Measured, int, int]:
        await _set_limit(run.address, LIMITED, args.limited_rate)
        async with Client(run.address) as client:
            backlog = await _submit(client, LIMITED, args.backlog, args.batch)
            rate = await _noop_rate(client, run, args)
            ran = 0
            for offset in range(0, len(backlog), 50):
                reads = await asyncio.gather(*(client.get_result(t) for t in backlog[offset:offset + 50]))
                ran += sum(r.state == result_pb2.TASK_STATE_SUCCESS for r in reads)
        return rate, ran, await _clean_up(run.address, LIMITED)

    return asyncio.run(measure())


def extract(revision: str, into: Path) -> Path:
    """The tree of `revision` of this repository, written under `into` (read-only for the checkout)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {revision}: {archive.stderr.decode().strip()}")
    tree = into / f"tree-{revision}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def code_of(tree: Path) -> dict[str, str]:
    """Environment that makes `python -m conveyor_server.cli` run the server and SDK of `tree`."""
    paths = [tree, tree / "server", tree / "sdk" / "python"]
    return {"PYTHONPATH": os.pathsep.join(str(p) for p in paths), "PYTHONSAFEPATH": "1"}


def summary(figures: dict[str, list[Measured]], rounds: int) -> list[str]:
    """Median, spread and share of the no-policy median of each phase, for throughput and CPU."""
    width = max(len(label) for label in figures)
    lines = [f"median over {rounds} rounds (min-max), and as a share of '{NO_POLICY}':",
             f"  {'':<{width}}  {'tasks/s':>24}  {'server+worker CPU ms/task':>27}"]
    reference = figures[NO_POLICY]
    for label, measured in figures.items():
        rate = _cell([m.rate for m in measured], [m.rate for m in reference], 0)
        cpu = _cell([m.cpu_ms for m in measured], [m.cpu_ms for m in reference], 3)
        lines.append(f"  {label:<{width}}  {rate:>24}  {cpu:>27}")
    return lines


def _cell(values: list[float], reference: list[float], places: int) -> str:
    median = statistics.median(values)
    share = median / statistics.median(reference)
    return f"{median:,.{places}f} ({min(values):,.{places}f}-{max(values):,.{places}f}) {share:>4.0%}"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5_000, help="noop tasks in each phase")
    parser.add_argument("--backlog", type=int, default=2_000, help=f"limited {LIMITED!r} tasks queued first in phase 4")
    parser.add_argument("--limited-rate", default="10/s", help=f"the rate limit on {LIMITED!r} and {UNUSED!r}")
    parser.add_argument("--baseline", action="append", default=[], metavar="REV",
                        help="also measure no policy on the code of this git revision (repeatable)")
    parser.add_argument("--concurrency", type=int, default=8, help="task slots in the worker process")
    parser.add_argument("--conveyor-prefetch", type=int, help="tasks held per slot (default: the worker's own, auto)")
    add_conveyor_worker_arguments(parser)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=13, help="Redis DB to use")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between completion checks")
    parser.add_argument("--rounds", type=int, default=1, help="times to run the phases, in turn")
    args = parser.parse_args()
    args.pool = "threads"  # what ConveyorRun reads besides the options above
    return args


def one_round(runs: dict[str, ConveyorRun], args: argparse.Namespace, figures: dict[str, list[Measured]],
              turn: int) -> None:
    """Each phase once, its figure printed and added to `figures`; the no-policy runs start with
    a different one each `turn`, so none always comes first."""
    current = runs[NO_POLICY]

    def record(label: str, measured: Measured, note: str = "") -> None:
        figures.setdefault(label, []).append(measured)
        print(f"{label}: {args.tasks:,} noop tasks at {measured.rate:,.0f} tasks/s, "
              f"{measured.cpu_ms:.3f} CPU ms each{note}; load average {load()}", flush=True)

    labels = list(runs)
    for label in labels[turn % len(labels):] + labels[:turn % len(labels)]:
        record(label, no_policy(runs[label], args))
    record(f"a {args.limited_rate} limit on {UNUSED!r}", beside_an_unused_limit(current, args))
    measured, ran, purged = beside_a_limited_backlog(current, args)
    record(f"beside {args.backlog:,} {LIMITED!r} queued first, limited to {args.limited_rate}", measured,
           f" ({ran:,} {LIMITED!r} ran meanwhile, {purged:,} purged after)")


def main() -> int:
    args = parse()
    url = db_url(args.redis, args.db)
    prefix = f"limitsbench-{os.getpid()}"
    print(f"{os.cpu_count()} CPUs; load average {load()}; redis db {args.db}, keys under {prefix!r}", flush=True)
    with tempfile.TemporaryDirectory(prefix="conveyor-limits-") as tmp:
        runs: dict[str, ConveyorRun] = {NO_POLICY: ConveyorRun(args, url, f"{prefix}-now", Path(tmp))}
        try:
            for revision in args.baseline:
                run = ConveyorRun(args, url, f"{prefix}-{revision}", Path(tmp))
                run.cwd = extract(revision, Path(tmp))
                run.env = code_of(run.cwd)
                runs[f"{NO_POLICY}, code of {revision}"] = run
            for run in runs.values():
                run.start()
                run.latency(WARMUP_TASKS)
            figures: dict[str, list[Measured]] = {}
            for turn in range(args.rounds):
                one_round(runs, args, figures, turn)
            print("\n".join(summary(figures, args.rounds)), flush=True)
        except BenchError as exc:
            print(f"limits: {exc}", file=sys.stderr)
            return 1
        finally:
            for run in runs.values():
                run.stop()
                print(f"stopped; deleted {delete_prefix(url, run.prefix)} keys under {run.prefix!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
