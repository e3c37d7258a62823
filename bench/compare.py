"""Conveyor, Celery and Dramatiq side by side: the same workload on the same local Redis, in one run.

    pip install -e '.[redis,bench]'
    python bench/compare.py                                  # 10,000 tasks, 1,000 latency samples
    python bench/compare.py --tasks 2000 --systems conveyor,dramatiq
    python bench/compare.py --matched                        # 2 worker processes x 1 slot each, peers tuned
    python bench/compare.py --matched --rounds 3             # three rounds in rotated order, then medians
    python bench/compare.py --systems conveyor --replicas 2 --processes 2    # two server replicas
    python bench/compare.py --systems conveyor --profile /tmp/server.svg    # py-spy on the server
    python bench/compare.py --systems conveyor --profile /tmp/server.txt    # collapsed stacks, to grep

For each system in turn, this process is the client and everything else is a separate OS process:

- Conveyor: `conveyor serve` with the Redis broker and the Redis backend, and one
  `conveyor worker bench.noop_worker` process.
- Celery: one `celery worker` process on a Redis broker and Redis result backend.
- Dramatiq: `dramatiq --processes 1`, one worker process (plus Dramatiq's idle supervisor),
  on a Redis broker with the Results middleware on Redis.

Concurrency is the same everywhere: `--concurrency` (8) task slots in one worker process, as
threads. Conveyor's worker runs sync tasks on a pool of that many threads; Dramatiq runs
`--threads 8`; Celery runs `--pool threads --concurrency 8` by default, so that each system has
exactly one worker process. `--celery-pool prefork` gives Celery's own default instead (8 child
processes, which on a 2-core machine mostly adds context switches), and `--pool processes` runs
Conveyor's tasks in its processes pool (8 child processes) instead of threads. Prefetch stays at each
system's default: Celery holds 4 tasks per slot (a window of 32), Dramatiq 2 per thread, and
Conveyor's worker sizes its own window, from 4 per slot up to 64 while tasks end quickly (a
window of 32-512); `--conveyor-prefetch 4` fixes it at Celery's, `--conveyor-prefetch 1` at just
its 8 slots. Celery runs
without gossip, mingle and heartbeats, as it is usually deployed; this only helps Celery.

`--replicas N` runs N `conveyor serve` processes on the same Redis: worker process n connects
to replica n mod N, SubmitBatch calls go to the replicas in turn, and each latency sample is
submitted to one replica and waited for on the next (so a result recorded by another replica
is part of it); the server CPU per task counts every replica.

`--matched` gives every system the same worker processes and slots, 2 processes x 1 slot (one
per core of a 2-core box), each peer tuned as its docs advise for many short tasks: Conveyor
runs two `conveyor worker --concurrency 1 --prefetch 64` processes, Dramatiq `--processes 2 --threads 1` with
`dramatiq_queue_prefetch` 128, Celery one worker with a prefork pool of 2 and
`worker_prefetch_multiplier` 64. `--processes`, `--conveyor-prefetch`, `--celery-prefetch` and
`--dramatiq-prefetch` set these one by one (beside `--matched` they win). The settings are printed under the table.

Measurements, in this order:

1. Warm-up: 100 sequential tasks (this also waits for the worker to be ready).
2. Light-load latency: `--latency-tasks` (1,000) sequential tasks, each submitted and then
   waited for with the system's own result API: `await client.result(id, wait=...)`,
   `AsyncResult.get()`, `Message.get_result(block=True)`. p50/p99 of submit -> result.
3. Throughput: `--tasks` noop tasks submitted in bulk (Conveyor: SubmitBatch of `--batch`;
   Celery: apply_async on one producer, which with a Redis backend also subscribes the client
   to each result, as Celery does by default; Dramatiq: actor.send; neither has a batch call),
   then the time until every result is stored. Celery and Dramatiq write a result key only
   when a task ends, so the client polls EXISTS over the result keys in id order; Conveyor
   writes every result before it acks the task, so the client polls the queue's stats in Redis
   (the broker's own stats script) until nothing is ready, delayed or in flight. Both polls
   run every `--poll` seconds. Afterwards (not timed) every result is read back and must be a
   success, or the run fails.

`--rounds N` runs every system N times, each round in a rotated order (round 1: conveyor,
celery, dramatiq; round 2: celery, dramatiq, conveyor; ...), prints each round's table, then
each system's medians and the median of the per-round ratios against the targets. On a VM
whose speed drifts by a third within a minute, one round can favour whichever system ran in a
fast spell; the medians over rotated rounds do not depend on the order.

Keys: each system gets its own Redis DB (`--db`, `--db`+1, `--db`+2) and its keys start with
a prefix unique to this run; on exit exactly the keys under those prefixes are deleted.
CPU seconds used during the throughput phase are shown per process (client, server, worker,
Redis), which tells where a 2-core machine spent its time, and so are the Redis commands per
task (commands inside Lua scripts count; other clients of the same Redis count too). The load
average is printed first and last: on a machine that is busy with other work every figure is
skewed. `--profile FILE` records the Conveyor server with py-spy during the throughput phase,
`--profile-worker FILE` its first worker process (`--profile-native` adds C frames, at a large
cost in speed). Exits 1 on any error (a lost task,
a worker that died) after measuring the other systems; speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procstat
from bench.peers import CELERY_PREFETCH_ENV, PREFIX_ENV, QUEUE, URL_ENV
from bench.queue_info import queue_info
from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2_grpc, result_pb2
from conveyor.window import AdaptiveWindow
from conveyor_server.brokers.redis import RedisBroker
from tests.support.processes import REPO, Proc, Server, WorkerProc, wait_for_workers

SYSTEMS = ("conveyor", "celery", "dramatiq")
# --matched: 2 worker processes x 1 slot everywhere (the cores of this 2-core box); every system
# with a deep prefetch, as each one's docs advise for many short tasks (Conveyor's README,
# Celery's prefetch multiplier, Dramatiq's queue prefetch); a flag given beside --matched wins.
MATCHED = {"processes": 2, "concurrency": 1, "conveyor_prefetch": 64, "celery_pool": "prefork",
           "celery_prefetch": 64, "dramatiq_prefetch": 128}
MATCHED_HELP = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in MATCHED.items())
WARMUP_TASKS = 100
# A run fails when results stop arriving for this long.
STALL_SECONDS = 60.0
CHUNK = 1000


class BenchError(Exception):
    """The run went wrong (a lost task, a dead process): reported, and the exit code is 1."""


@dataclass
class Figures:
    system: str
    worker: str
    tasks: int = 0
    submit_seconds: float = math.nan
    total_seconds: float = math.nan
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    # Commands the whole Redis server processed during the throughput phase (other clients count too).
    redis_commands: int = 0
    # How the system was tuned (worker processes, slots, prefetch): printed beside the figures.
    settings: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.tasks / self.total_seconds if self.total_seconds > 0 else math.nan

    @property
    def submit_rate(self) -> float:
        return self.tasks / self.submit_seconds if self.submit_seconds > 0 else math.nan

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000


# -- Redis housekeeping -------------------------------------------------------------------------

def db_url(base: str, db: int) -> str:
    parts = urlsplit(base)
    return parts._replace(path=f"/{db}", query="").geturl()


def _glob_escape(text: str) -> str:
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def delete_prefix(url: str, prefix: str) -> int:
    """Delete the keys under `prefix` (and only those); returns how many."""
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


def redis_pid(url: str) -> int | None:
    """The Redis server's pid when it runs on this machine and /proc shows it."""
    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return pid if Path(f"/proc/{pid}/stat").exists() else None


def wait_keys(client: redis.Redis, keys: Sequence[bytes | str], poll: float, check: Callable[[], None]) -> None:
    """Block until every key exists. Walks the keys in order, CHUNK at a time, so each poll is cheap."""
    done = present = 0
    last_progress = time.monotonic()
    while done < len(keys):
        chunk = keys[done:done + CHUNK]
        count = int(client.exists(*chunk))
        if count == len(chunk):
            done, present = done + len(chunk), 0
            last_progress = time.monotonic()
            continue
        if count != present:
            present, last_progress = count, time.monotonic()
        elif time.monotonic() - last_progress > STALL_SECONDS:
            stored = done + sum(int(client.exists(*keys[i:i + CHUNK])) for i in range(done, len(keys), CHUNK))
            raise BenchError(f"results stopped arriving for {STALL_SECONDS:.0f} s: "
                             f"{len(keys) - stored} of {len(keys)} missing")
        check()
        time.sleep(poll)


# -- processes ----------------------------------------------------------------------------------

def stop_group(proc: Proc) -> None:
    """Stop a worker and whatever it forked (Dramatiq's worker process, Celery's prefork pool): the
    process runs in its own session, so its group holds exactly what this benchmark started."""
    proc.stop()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def check_alive(*procs: Proc) -> None:
    for proc in procs:
        if not proc.alive():
            tail = "\n".join(proc.output().splitlines()[-30:])
            raise BenchError(f"{' '.join(proc.argv[:6])} ... exited with {proc.popen.returncode}:\n{tail}")


@contextmanager
def cpu_meter(figures: Figures, processes: dict[str, int | None], url: str) -> Iterator[None]:
    """CPU seconds each process (with its children) used inside the block, the client being this process,
    and Redis's (as `redis`, from INFO: the whole server, so other clients count too); and the number of
    commands Redis processed meanwhile."""
    def redis_figures() -> tuple[int, float]:
        client = redis.Redis.from_url(url)
        try:
            cpu = client.info("cpu")
            return int(client.info("stats")["total_commands_processed"]), cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        finally:
            client.close()

    def sample() -> dict[str, float]:
        times = os.times()
        out = {"client": times.user + times.system}
        for name, pid in processes.items():
            if pid is not None:
                out[name] = procstat.cpu_seconds(pid)
        return out

    before, (commands_before, redis_before) = sample(), redis_figures()
    yield
    after, (commands_after, redis_after) = sample(), redis_figures()
    figures.redis_commands = commands_after - commands_before - 2  # less the two INFO calls
    figures.cpu = {name: after[name] - before[name] for name in before if name in after}
    figures.cpu["redis"] = redis_after - redis_before


@contextmanager
def profiled(pid: int, output: str | None, seconds_hint: str, native: bool = False) -> Iterator[None]:
    """Run py-spy record on `pid` for the duration of the block (when an output path is given);
    an output ending in .data records with Linux perf instead (every thread, the CPU clock:
    bench/perf_summary.py reads it)."""
    if not output:
        yield
        return
    if output.endswith(".data"):
        exe = shutil.which("perf")
        if exe is None:
            raise BenchError("a .data profile needs Linux perf (apt-get install linux-perf)")
        argv = [exe, "record", "--event", "cpu-clock", "--freq", "999", "--call-graph", "fp", "--pid", str(pid),
                "--output", output]
    else:
        fmt = "speedscope" if output.endswith(".json") else "raw" if output.endswith(".txt") else "flamegraph"
        beside = Path(sys.executable).with_name("py-spy")
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            raise BenchError("--profile needs py-spy (pip install -e '.[bench]')")
        argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", fmt, "--output", output,
                *(["--native"] if native else ["--nonblocking"])]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # the recorder attaches
    if recorder.poll() is not None:
        stderr = recorder.stderr.read().decode() if recorder.stderr else ""
        raise BenchError(f"{Path(exe).name} exited with {recorder.returncode}: {stderr}")
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(60)
        except subprocess.TimeoutExpired:
            recorder.kill()
        print(f"  profile of pid {pid} during {seconds_hint} written to {output}", flush=True)


# -- the systems --------------------------------------------------------------------------------

def add_conveyor_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker options ConveyorRun reads besides --concurrency and --conveyor-prefetch
    (bench/limits.py and bench/dashboard_overhead.py run Conveyor through it too)."""
    parser.add_argument("--processes", type=int, default=1, help="worker processes of each system (Celery: one "
                        "worker whose pool has processes x concurrency slots)")
    parser.add_argument("--replicas", type=int, default=1, help="Conveyor server processes on the same engines; "
                        "workers, submissions and waits are spread over them in turn")
    parser.add_argument("--pool", default="threads", choices=["threads", "processes"],
                        help="Conveyor's worker pool: threads, or processes (a child process per slot, as "
                             "Celery's prefork)")


class ConveyorRun:
    name = "conveyor"

    def __init__(self, args: argparse.Namespace, url: str, prefix: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.prefix = prefix
        self.workdir = workdir
        slots = f"{args.concurrency} threads" if args.pool == "threads" else f"{args.concurrency} children"
        prefetch = args.conveyor_prefetch
        window = AdaptiveWindow(args.concurrency)
        self.worker_desc = (f"{process_count(args)}, {slots}, "
                            + (f"window {args.concurrency * prefetch}" if prefetch else
                               f"window {window.floor}-{window.ceiling}"))
        self.settings = (f"{args.processes} x `conveyor worker --concurrency {args.concurrency}"
                         + (f" --prefetch {prefetch}`" if prefetch else "` (prefetch auto)") + f" ({args.pool} pool)")
        self.replicas = getattr(args, "replicas", 1)
        if self.replicas > 1:
            self.worker_desc += f", {self.replicas} servers"
            self.settings += (f"; {self.replicas} `conveyor serve` replicas, worker n on replica n mod "
                              f"{self.replicas}, calls spread over them in turn")
        self.servers: list[Server] = []
        self.workers: list[WorkerProc] = []
        self.ids: list[str] = []
        # More environment for the server and the worker, and their directory (bench/limits.py
        # runs the code of an older revision this way).
        self.env: dict[str, str] = {}
        self.cwd = REPO

    def start(self) -> None:
        engine = f"{self.url}?prefix={self.prefix}"
        self.servers = [
            Server(self.workdir, engine, engine, env={"CONVEYOR_LOG_LEVEL": "WARNING", **self.env}, cwd=self.cwd)
            for _ in range(self.replicas)
        ]
        self.workers = [
            WorkerProc(self.workdir, self.servers[n % self.replicas].address, module="bench.noop_worker",
                       concurrency=self.args.concurrency, prefetch=self.args.conveyor_prefetch,
                       env={"CONVEYOR_LOG_LEVEL": "WARNING", "CONVEYOR_BENCH_POOL": self.args.pool, **self.env},
                       cwd=self.cwd, name=f"worker-{n}")
            for n in range(self.args.processes)
        ]
        for index, server in enumerate(self.servers):
            wait_for_workers(server.address, len(self.workers[index::self.replicas]))

    def procs(self) -> dict[str, int | None]:
        assert self.servers and self.workers
        workers = {f"worker-{n}" if len(self.workers) > 1 else "worker": w.pid for n, w in enumerate(self.workers)}
        # Every replica's CPU counts as the server's (see server_cpu()).
        servers = {"server" if n == 0 else f"server-{n}": s.pid for n, s in enumerate(self.servers)}
        return {**servers, **workers}

    def check(self) -> None:
        assert self.servers and self.workers
        check_alive(*self.servers, *self.workers)

    @property
    def address(self) -> str:
        assert self.servers
        return self.servers[0].address

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def latency(self, count: int, gap: float = 0.0) -> list[float]:
        """`count` tasks one after another, each submitted `gap` seconds after the last ended."""
        async def run() -> list[float]:
            samples = []
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(Client(address)) for address in self.addresses]
                for n in range(count):
                    if gap:
                        await asyncio.sleep(gap)
                    # With replicas, a task is submitted to one and waited for on the next, as
                    # a load balancer may send the two calls; its worker may be on either.
                    submitter, waiter = clients[n % len(clients)], clients[(n + 1) % len(clients)]
                    started = time.perf_counter()
                    submitted = await submitter.submit("noop")
                    await waiter.result(submitted.task_id, wait=30)
                    samples.append(time.perf_counter() - started)
            return samples
        return asyncio.run(run())

    def throughput(self, count: int, figures: Figures) -> None:
        async def run() -> tuple[float, float, list[str]]:
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(Client(address)) for address in self.addresses]
                ids: list[str] = []
                started = time.perf_counter()
                for n, offset in enumerate(range(0, count, self.args.batch)):
                    size = min(self.args.batch, count - offset)
                    submitted = await clients[n % len(clients)].submit_batch(sig("noop") for _ in range(size))
                    ids.extend(s.task_id for s in submitted)
                submitted_at = time.perf_counter()
                await self.drained()
                finished = time.perf_counter()
            return submitted_at - started, finished - started, ids

        submit_s, total_s, self.ids = asyncio.run(run())
        figures.submit_seconds, figures.total_seconds, figures.tasks = submit_s, total_s, count

    def verify(self, figures: Figures) -> None:
        late, failed = asyncio.run(self._verify(self.ids))
        if late:
            figures.notes.append(f"{late} results were not stored yet when the queue was drained")
        if failed:
            raise BenchError(f"conveyor: {failed} of {len(self.ids)} tasks did not succeed")

    async def drained(self) -> None:
        """Every result is written before its task is acked, so an empty queue means all are
        stored. The queue is read in Redis with the broker's own stats script, as the peers'
        checks read their result keys there: asking the server (ListQueues, about 2 ms of its CPU
        a call) every 10 ms took about a fifth of the server's CPU from the run it measured. The
        code of another revision (bench/limits.py) is asked through its server: its keys may differ."""
        async with contextlib.AsyncExitStack() as stack:
            if self.cwd == REPO:
                broker = RedisBroker.from_url(f"{self.url}?prefix={self.prefix}")
                await broker.connect()
                stack.push_async_callback(broker.close)

                async def left() -> int:
                    stats = await broker.stats("default")
                    return stats.ready + stats.delayed + stats.in_flight
            else:
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(self.address))
                admin = admin_service_pb2_grpc.AdminServiceStub(channel)

                async def left() -> int:
                    info = await queue_info(admin, "default")
                    return info.ready + info.delayed + info.in_flight if info is not None else -1

            last_left, last_progress = -1, time.monotonic()
            while (now_left := await left()) != 0:
                if now_left != last_left:
                    last_left, last_progress = now_left, time.monotonic()
                elif time.monotonic() - last_progress > STALL_SECONDS:
                    raise BenchError(f"conveyor: {now_left} tasks still queued after {STALL_SECONDS:.0f} s "
                                     "without progress")
                self.check()
                await asyncio.sleep(self.args.poll)

    async def _verify(self, ids: list[str]) -> tuple[int, int]:
        """(results not yet terminal at once, results not SUCCESS even after waiting)."""
        late = failed = 0
        async with Client(self.address) as client:
            # 50 reads at a time: the server's Redis pool refuses a command past 100 connections.
            for offset in range(0, len(ids), 50):
                chunk = ids[offset:offset + 50]
                results = await asyncio.gather(*(client.get_result(t) for t in chunk))
                for task_id, result in zip(chunk, results, strict=True):
                    if result.state == result_pb2.TASK_STATE_SUCCESS:
                        continue
                    late += 1
                    again = await client.get_result(task_id, wait=30)
                    failed += again.state != result_pb2.TASK_STATE_SUCCESS
        return late, failed

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for server in self.servers:
            server.stop()


class CeleryRun:
    name = "celery"

    def __init__(self, args: argparse.Namespace, url: str, prefix: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.workdir = workdir
        pool = args.celery_pool
        slots = args.processes * args.concurrency  # one Celery worker: its pool holds every slot
        self.worker_desc = (f"1 process, {slots} threads" if pool == "threads"
                            else f"1 + {slots} processes (prefork)")
        self.settings = (f"`celery worker --pool {pool} --concurrency {slots}`, worker_prefetch_multiplier "
                         f"{args.celery_prefetch}, without gossip, mingle and heartbeat")
        self.worker: Proc | None = None
        self.module: Any = None
        self.ids: list[str] = []

    def start(self) -> None:
        # Imported here: the module reads the URL and prefix that run_system() put in the environment.
        self.module = importlib.import_module("bench.peers.celery_app")
        argv = [sys.executable, "-m", "celery", "-A", "bench.peers.celery_app", "worker",
                "--pool", self.args.celery_pool, "--concurrency", str(self.args.processes * self.args.concurrency),
                "-Q", QUEUE,
                "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
        self.worker = Proc(argv, self.workdir / "celery-worker.log", cwd=REPO)

    def procs(self) -> dict[str, int | None]:
        assert self.worker
        return {"worker": self.worker.pid}

    def check(self) -> None:
        assert self.worker
        check_alive(self.worker)

    def latency(self, count: int) -> list[float]:
        noop = self.module.noop
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            noop.delay().get(timeout=30)
            samples.append(time.perf_counter() - started)
        return samples

    def throughput(self, count: int, figures: Figures) -> None:
        app, noop = self.module.app, self.module.noop
        backend = app.backend
        ids = self.ids
        client = redis.Redis.from_url(self.url)
        try:
            started = time.perf_counter()
            with app.producer_or_acquire() as producer:
                for _ in range(count):
                    ids.append(noop.apply_async(producer=producer).id)
            submitted_at = time.perf_counter()
            wait_keys(client, [backend.get_key_for_task(task_id) for task_id in ids], self.args.poll, self.check)
            finished = time.perf_counter()
        finally:
            client.close()
        figures.submit_seconds, figures.total_seconds, figures.tasks = submitted_at - started, finished - started, count

    def verify(self, figures: Figures) -> None:
        backend = self.module.app.backend
        failed = 0
        for offset in range(0, len(self.ids), CHUNK):
            chunk = self.ids[offset:offset + CHUNK]
            for raw in backend.mget([backend.get_key_for_task(task_id) for task_id in chunk]):
                failed += raw is None or backend.decode_result(raw).get("status") != "SUCCESS"
        if failed:
            raise BenchError(f"celery: {failed} of {len(self.ids)} tasks did not succeed")

    def stop(self) -> None:
        if self.worker:
            stop_group(self.worker)
        if self.module is not None:
            self.module.app.close()


class DramatiqRun:
    name = "dramatiq"

    def __init__(self, args: argparse.Namespace, url: str, prefix: str, workdir: Path) -> None:
        self.args = args
        self.url = url
        self.workdir = workdir
        self.worker_desc = f"{process_count(args)}, {args.concurrency} threads"
        prefetch = args.dramatiq_prefetch or 2 * args.concurrency
        self.settings = (f"`dramatiq --processes {args.processes} --threads {args.concurrency}`, "
                         f"dramatiq_queue_prefetch {prefetch}" + ("" if args.dramatiq_prefetch else " (its default)"))
        self.worker: Proc | None = None
        self.module: Any = None
        self.messages: list[Any] = []

    def start(self) -> None:
        # Imported here: the module reads the URL and prefix that run_system() put in the environment.
        self.module = importlib.import_module("bench.peers.dramatiq_app")
        argv = [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_app",
                "--processes", str(self.args.processes), "--threads", str(self.args.concurrency), "--queues", QUEUE]
        env = {"dramatiq_queue_prefetch": str(self.args.dramatiq_prefetch)} if self.args.dramatiq_prefetch else None
        self.worker = Proc(argv, self.workdir / "dramatiq-worker.log", env=env, cwd=REPO)

    def procs(self) -> dict[str, int | None]:
        assert self.worker
        return {"worker": self.worker.pid}

    def check(self) -> None:
        assert self.worker
        check_alive(self.worker)

    def latency(self, count: int) -> list[float]:
        noop, backend = self.module.noop, self.module.backend
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            noop.send().get_result(backend=backend, block=True, timeout=30_000)
            samples.append(time.perf_counter() - started)
        return samples

    def throughput(self, count: int, figures: Figures) -> None:
        noop, backend = self.module.noop, self.module.backend
        client = redis.Redis.from_url(self.url)
        try:
            started = time.perf_counter()
            messages = self.messages = [noop.send() for _ in range(count)]
            submitted_at = time.perf_counter()
            wait_keys(client, [backend.build_message_key(m) for m in messages], self.args.poll, self.check)
            finished = time.perf_counter()
        finally:
            client.close()
        figures.submit_seconds, figures.total_seconds, figures.tasks = submitted_at - started, finished - started, count

    def verify(self, figures: Figures) -> None:
        failed = 0
        for message in self.messages:
            try:
                self.module.backend.get_result(message)
            except Exception:
                failed += 1
        if failed:
            raise BenchError(f"dramatiq: {failed} of {len(self.messages)} tasks did not succeed")

    def stop(self) -> None:
        if self.worker:
            stop_group(self.worker)
        if self.module is not None:
            self.module.broker.close()


SystemClass = type[ConveyorRun] | type[CeleryRun] | type[DramatiqRun]
CLASSES: dict[str, SystemClass] = {"conveyor": ConveyorRun, "celery": CeleryRun, "dramatiq": DramatiqRun}


def process_count(args: argparse.Namespace) -> str:
    return "1 process" if args.processes == 1 else f"{args.processes} processes"


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_system(name: str, db: int, args: argparse.Namespace, workdir: Path, redis_proc: int | None) -> Figures:
    url = db_url(args.redis, db)
    prefix = f"convbench-{os.getpid()}-{name}"
    # The peers' modules and worker processes read these (see bench/peers/__init__.py).
    os.environ[URL_ENV], os.environ[PREFIX_ENV] = url, prefix
    os.environ[CELERY_PREFETCH_ENV] = str(args.celery_prefetch)
    system = CLASSES[name](args, url, prefix, workdir)
    figures = Figures(name, system.worker_desc, settings=system.settings)
    print(f"{name}: redis db {db}, keys under {prefix!r}, worker: {system.worker_desc}", flush=True)
    try:
        system.start()
        measure_latency(name, system, figures, args.latency_tasks)
        processes = {**system.procs(), "redis": redis_proc}
        profile_pid = processes.get("server") if args.profile else None
        worker_pid = next((pid for key, pid in processes.items() if key.startswith("worker")), None)
        profile_worker_pid = worker_pid if args.profile_worker and name == "conveyor" else None
        with profiled(profile_pid or 0, args.profile if profile_pid else None, "the throughput phase",
                      args.profile_native), \
                profiled(profile_worker_pid or 0, args.profile_worker if profile_worker_pid else None,
                         "the throughput phase", args.profile_native), \
                cpu_meter(figures, processes, url):
            system.throughput(args.tasks, figures)
        system.verify(figures)
        system.check()
        print(f"  throughput {figures.tasks} tasks: submitted in {figures.submit_seconds:.2f} s, "
              f"all results stored after {figures.total_seconds:.2f} s = {figures.throughput:,.0f} tasks/s", flush=True)
        for note in figures.notes:
            print(f"  note: {note}", flush=True)
    finally:
        system.stop()
        deleted = delete_prefix(url, prefix)
        print(f"  stopped; deleted {deleted} keys under {prefix!r}", flush=True)
    return figures


def measure_latency(name: str, system: ConveyorRun | CeleryRun | DramatiqRun, figures: Figures, count: int) -> None:
    """The warm-up (which also waits for the worker), then `count` sequential tasks' latencies."""
    guarded(f"{name} warm-up", lambda: system.latency(WARMUP_TASKS), system.check)
    figures.latencies = guarded(f"{name} latency", lambda: system.latency(count), system.check)
    print(f"  latency   p50 {figures.percentile_ms(0.50):.2f} ms  p99 {figures.percentile_ms(0.99):.2f} ms",
          flush=True)


def guarded(what: str, action: Callable[[], list[float]], check: Callable[[], None]) -> list[float]:
    """Runs a latency loop; a worker that died turns a timeout into a clear error."""
    try:
        return action()
    except Exception as exc:
        check()
        raise BenchError(f"{what} failed: {exc!r}") from exc


# -- report -------------------------------------------------------------------------------------

def print_table(title: str, header: str, rows: list[str]) -> None:
    """A titled table: header, a rule as wide as it, then the rows (bench/cluster.py prints one too)."""
    print()
    print(title)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(row)


def server_cpu_per_task_us(figures: Figures) -> float:
    """Server CPU per task in microseconds, every replica counted."""
    seconds = sum(value for name, value in figures.cpu.items() if name.startswith("server"))
    return 1e6 * seconds / max(figures.tasks, 1)


def throughput_targets(args: argparse.Namespace) -> dict[str, float]:
    """Issue #21's targets for Conveyor's throughput over each peer's: with matched resources
    (--matched), and at each system's best."""
    return {"celery": 8.0, "dramatiq": 2.0} if args.matched else {"celery": 5.0, "dramatiq": 3.0}


def report_rounds(rounds: list[list[Figures]], args: argparse.Namespace) -> None:
    """Each system's medians over the rounds, and the median of the per-round throughput ratios."""
    by_round = [{f.system: f for f in results} for results in rounds]
    systems = [name for name in SYSTEMS if any(name in figures for figures in by_round)]
    print(f"\nmedians over {len(rounds)} rounds, each in a rotated order:")
    for name in systems:
        runs = [figures[name] for figures in by_round if name in figures]
        rates = ", ".join(f"{f.throughput:,.0f}" for f in runs)
        print(f"  {name:<9} tasks/s {statistics.median(f.throughput for f in runs):>7,.0f} ({rates}); "
              f"p50 {statistics.median(f.percentile_ms(0.5) for f in runs):.2f} ms, "
              f"p99 {statistics.median(f.percentile_ms(0.99) for f in runs):.2f} ms")
    for peer, target in throughput_targets(args).items():
        ratios = [figures["conveyor"].throughput / figures[peer].throughput
                  for figures in by_round if "conveyor" in figures and peer in figures]
        if ratios:
            ratio = statistics.median(ratios)
            print(f"Conveyor/{peer.capitalize():<8} throughput {ratio:5.2f}x median "
                  f"({', '.join(f'{r:.2f}' for r in ratios)}; target >= {target}x: "
                  f"{'met' if ratio >= target else 'NOT met'})")


def report(results: list[Figures], args: argparse.Namespace) -> None:
    header = (f"{'system':<9} {'worker':<34} {'submit/s':>9} {'tasks/s':>8} {'total s':>8} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'redis cmd/task':>14}   cpu s during throughput")
    rows = [
        f"{f.system:<9} {f.worker:<34} {f.submit_rate:>9,.0f} {f.throughput:>8,.0f} {f.total_seconds:>8.2f} "
        f"{f.percentile_ms(0.5):>7.2f} {f.percentile_ms(0.99):>7.2f} "
        f"{f.redis_commands / max(f.tasks, 1):>14.1f}   " + "  ".join(f"{k} {v:.1f}" for k, v in f.cpu.items())
        for f in results
    ]
    print_table(f"{args.tasks:,} noop tasks in bulk; latency over {args.latency_tasks:,} sequential tasks; "
                f"{args.concurrency} task slots per worker; Redis {args.redis}", header, rows)
    by_name = {f.system: f for f in results}
    conveyor = by_name.get("conveyor")
    if conveyor is None:
        return
    print("settings:")
    for f in results:
        print(f"  {f.system:<9} {f.settings}")
    print()
    for peer, target in throughput_targets(args).items():
        other = by_name.get(peer)
        if other is None:
            continue
        ratio = conveyor.throughput / other.throughput
        p50 = other.percentile_ms(0.5) / conveyor.percentile_ms(0.5)
        p99 = other.percentile_ms(0.99) / conveyor.percentile_ms(0.99)
        print(f"Conveyor/{peer.capitalize():<8} throughput {ratio:5.2f}x (target >= {target}x: "
              f"{'met' if ratio >= target else 'NOT met'});  latency: {peer} p50 is {p50:.2f}x, "
              f"p99 {p99:.2f}x Conveyor's")
    p50, p99 = conveyor.percentile_ms(0.5), conveyor.percentile_ms(0.99)
    print(f"Conveyor latency p50 {p50:.2f} ms (target <= 1.5 ms: {'met' if p50 <= 1.5 else 'NOT met'}), "
          f"p99 {p99:.2f} ms (target <= 4 ms: {'met' if p99 <= 4 else 'NOT met'})")
    commands = conveyor.redis_commands / max(conveyor.tasks, 1)
    print(f"Conveyor Redis commands per task {commands:.1f} (target <= 15: {'met' if commands <= 15 else 'NOT met'})")
    server_us = server_cpu_per_task_us(conveyor)
    print(f"Conveyor server CPU per task {server_us:.0f} µs (target <= 250 µs: "
          f"{'met' if server_us <= 250 else 'NOT met'}), every replica counted")
    if "redis" in conveyor.cpu:
        print(f"Conveyor redis CPU per task {1e6 * conveyor.cpu['redis'] / max(conveyor.tasks, 1):.0f} µs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in the throughput phase")
    parser.add_argument("--latency-tasks", type=int, default=1_000, help="sequential tasks in the latency phase")
    parser.add_argument("--concurrency", type=int, default=8, help="task slots in each system's worker process")
    parser.add_argument("--conveyor-prefetch", type=int,
                        help="tasks Conveyor's worker holds per slot (default: its own, auto: 4, as Celery's, "
                             "and up to 64 while tasks are short)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (the DB number is --db)")
    parser.add_argument("--db", type=int, default=10, help="Redis DB of Conveyor; Celery and Dramatiq use the next two")
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per Conveyor SubmitBatch call")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between completion checks")
    add_conveyor_worker_arguments(parser)
    parser.add_argument("--celery-pool", default="threads", choices=["threads", "prefork", "solo"])
    parser.add_argument("--celery-prefetch", type=int, default=4,
                        help="Celery's worker_prefetch_multiplier (its default: 4)")
    parser.add_argument("--dramatiq-prefetch", type=int, default=0,
                        help="dramatiq_queue_prefetch per worker process (0: its default, 2 x threads)")
    parser.add_argument("--matched", action="store_true",
                        help=f"every system with the same worker processes and slots, each peer tuned as its docs "
                             f"advise for many short tasks: {MATCHED_HELP}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, each round in a rotated order, then print "
                             "the medians (the machine's speed drifts during a run)")
    parser.add_argument("--profile", help="py-spy output (.svg, .txt raw, .json speedscope) of the Conveyor "
                                          "server during the throughput phase, or a Linux perf recording (.data: "
                                          "CPU by library and thread, bench/perf_summary.py)")
    parser.add_argument("--profile-worker", help="py-spy output of the (first) Conveyor worker process, as --profile")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native: show C frames (gRPC core)")
    args = parser.parse_args()
    if args.matched:
        for option, value in MATCHED.items():
            if getattr(args, option) == parser.get_default(option):
                setattr(args, option, value)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        parser.error(f"unknown systems: {', '.join(unknown)}" if unknown else "no systems given")
    try:
        redis_proc = redis_pid(db_url(args.redis, args.db))
    except redis.RedisError as exc:
        print(f"compare: Redis at {args.redis} does not answer: {exc}", file=sys.stderr)
        return 1

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds: list[list[Figures]] = []
    errors: list[str] = []
    # Every system runs on this interpreter (servers and workers are started with sys.executable).
    print(f"{os.cpu_count()} CPUs; load average {load()}; Python {platform.python_version()} for every system",
          flush=True)
    if os.getloadavg()[0] > 1.0:
        print("warning: the machine is already busy; every figure below is skewed by that", flush=True)
    with tempfile.TemporaryDirectory(prefix="conveyor-compare-") as tmp:
        for number in range(args.rounds):
            # Rotated, so that no system always runs first (or last) in the machine's drift.
            order = names[number % len(names):] + names[:number % len(names)]
            if args.rounds > 1:
                print(f"\nround {number + 1} of {args.rounds}: {', '.join(order)}", flush=True)
            results: list[Figures] = []
            for name in order:
                db = args.db + SYSTEMS.index(name)
                try:
                    results.append(run_system(name, db, args, Path(tmp), redis_proc))
                except Exception as exc:
                    if not isinstance(exc, BenchError):
                        traceback.print_exc()
                    errors.append(f"{name}: {exc}")
                    print(f"  ERROR {name}: {exc}", file=sys.stderr, flush=True)
            results.sort(key=lambda f: names.index(f.system))
            rounds.append(results)
            report(results, args)
    if args.rounds > 1:
        report_rounds(rounds, args)
    print(f"load average at the end {load()}")
    for error in errors:
        print(f"compare: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
