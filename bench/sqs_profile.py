"""Where the time goes with SQS as the broker: moto, the server's broker code, or the rest.

    python bench/sqs_profile.py                         # 2,000 noop tasks on a patched moto of its own
    python bench/sqs_profile.py --tasks 5000 --py-spy   # and py-spy profiles of the server and moto
    python bench/sqs_profile.py --unpatched             # moto as `moto_server` ships it (no locks, slow clock)
    python bench/sqs_profile.py --endpoint http://127.0.0.1:4566   # an SQS of your own (ElasticMQ, LocalStack)
    python bench/sqs_profile.py --workers 3 --concurrency 8 --server-env CONVEYOR_LEASE_SECONDS=3 \
        --server-env CONVEYOR_HEARTBEAT_INTERVAL_SECONDS=0.5      # the fault tests' short leases

Starts moto (in a process of its own, patched as the tests patch it: tests/fixtures/broker_services.py),
`conveyor serve` with `sqs://` and a Redis backend (the local one, a unique prefix), and `conveyor worker
bench.noop_worker` processes; submits noop tasks in batches and times them until every result is stored.
Prints tasks/s, the CPU seconds each process used (moto, server, workers, this client) and, with --py-spy,
self time by package for the server and for moto (files kept with --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procstat import cpu_seconds
from conveyor import Client, sig
from conveyor.v1 import result_pb2
from tests.fixtures.broker_services import drop_redis_prefix, ensure_redis, wait_for_port
from tests.support.processes import Proc, Server, WorkerProc, free_port, wait_for_workers

MOTO = """
import signal, sys, time
from tests.fixtures.broker_services import patch_moto, start_moto
server, endpoint = start_moto(int(sys.argv[1]))
signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
while True:
    time.sleep(3600)
"""
# Packages a frame's file is filed under, first match wins; anything else keeps its file name.
PACKAGES = (
    "conveyor_server/brokers/sqs", "conveyor_server/", "conveyor/", "aiobotocore/", "botocore/", "aiohttp/",
    "moto/", "werkzeug/", "jinja2/", "xmltodict", "redis/", "grpc", "asyncio/", "google/protobuf", "json/",
    "http/", "socketserver", "threading", "ssl", "email/", "urllib/", "dateutil", "selectors", "socket",
)
_FILE = re.compile(r"\(([^:)]+)")


def package_of(frame: str) -> str:
    found = _FILE.search(frame)
    path = found.group(1) if found else frame
    return next((package for package in PACKAGES if package in path), path.rsplit("/", 1)[-1])


def self_time(profile: Path, top: int = 12) -> str:
    """Self time by package from py-spy's raw (collapsed stacks) output; idle frames dropped."""
    own: Counter[str] = Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            own[package_of(stack.split(";")[-1])] += int(count)
    total = sum(own.values())
    if not total:
        return "    no samples"
    return "\n".join(f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top))


def start_moto(workdir: Path, unpatched: bool) -> tuple[Proc, str]:
    port = free_port()
    if unpatched:
        moto_server = Path(sys.executable).with_name("moto_server")
        argv = [str(moto_server), "-H", "127.0.0.1", "-p", str(port)]
    else:
        argv = [sys.executable, "-c", MOTO, str(port)]
    proc = Proc(argv, workdir / "moto.log")
    if not wait_for_port(port, 30):
        proc.stop()
        raise RuntimeError(f"moto did not listen on {port}:\n{proc.output()}")
    return proc, f"http://127.0.0.1:{port}"


async def run(address: str, tasks: int, batch: int) -> tuple[float, float]:
    """(submit seconds, end-to-end seconds) for `tasks` noop tasks."""
    async with Client(address) as client:
        started = time.perf_counter()
        ids: list[str] = []
        for offset in range(0, tasks, batch):
            submitted = await client.submit_batch(sig("noop") for _ in range(min(batch, tasks - offset)))
            ids += [s.task_id for s in submitted]
        submitted_at = time.perf_counter()
        for offset in range(0, len(ids), 200):
            results = await asyncio.gather(*(client.get_result(t, wait=300) for t in ids[offset:offset + 200]))
            failed = [r.task_id for r in results if r.state != result_pb2.TASK_STATE_SUCCESS]
            assert not failed, f"{len(failed)} tasks did not succeed: {failed[:5]}"
        return submitted_at - started, time.perf_counter() - started


def spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        print("py-spy not found: no profiles", file=sys.stderr)
        return None
    return subprocess.Popen(
        [binary, "record", "--format", "raw", "--nonblocking", "--pid", str(pid), "--duration", str(int(seconds) + 1),
         "--output", str(out), "--rate", "200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def measure(args: argparse.Namespace, workdir: Path) -> None:
    procs: list[Proc] = []
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        if args.endpoint:
            endpoint = args.endpoint
        else:
            moto, endpoint = start_moto(workdir, args.unpatched)
            procs.append(moto)
        broker = f"sqs://?endpoint={endpoint}&region=us-east-1&prefix={prefix}&bands={args.bands}"
        backend = f"{args.backend}{'&' if '?' in args.backend else '?'}prefix={prefix}"
        env = {"CONVEYOR_LOG_LEVEL": "WARNING", **dict(item.split("=", 1) for item in args.server_env)}
        server = Server(workdir, broker, backend, env=env)
        procs.append(server)
        workers = [WorkerProc(workdir, server.address, module="bench.noop_worker", concurrency=args.concurrency,
                              name=f"worker-{i}") for i in range(args.workers)]
        procs += workers
        wait_for_workers(server.address, args.workers)
        asyncio.run(run(server.address, min(args.tasks, 200), args.batch))  # warm-up: queues, connections

        pids = {"server": server.pid, "workers": workers[0].pid} | ({} if args.endpoint else {"moto": procs[0].pid})
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        spies = {}
        if args.py_spy:
            for name in ("server", "moto"):
                if name in pids:
                    spies[name] = (spy(pids[name], workdir / f"{name}.txt", args.spy_seconds), workdir / f"{name}.txt")
        submit_s, total_s = asyncio.run(run(server.address, args.tasks, args.batch))
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        used["workers"] *= len(workers)  # roughly: they share the load evenly
        used["client"] = time.process_time() - client_before
        print(f"{args.tasks} tasks: submit {args.tasks / submit_s:,.0f}/s, end to end {args.tasks / total_s:,.0f} "
              f"tasks/s ({total_s:.1f} s)")
        print("CPU seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in used.items())
              + f" (of {total_s:.1f} s wall, 2 x that on 2 cores)")
        for name, (process, out) in spies.items():
            if process is not None:
                process.wait(args.spy_seconds + 30)
                if out.exists():
                    print(f"{name}: self time by package (first {args.spy_seconds:.0f} s of the run)")
                    print(self_time(out))
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.backend.startswith("redis"):
            drop_redis_prefix(args.backend, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500, help="tasks per SubmitBatch call")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="window of each worker")
    parser.add_argument("--bands", type=int, default=3, choices=[1, 3, 10])
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="server setting, e.g. CONVEYOR_LEASE_SECONDS=3 (repeatable)")
    parser.add_argument("--backend", default="", help="backend URL (default: the local Redis, db 0)")
    parser.add_argument("--endpoint", help="an SQS endpoint of your own instead of a moto of its own")
    parser.add_argument("--unpatched", action="store_true", help="run moto_server as shipped")
    parser.add_argument("--py-spy", action="store_true", help="profile the server and moto with py-spy")
    parser.add_argument("--spy-seconds", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="keep logs and profiles")
    args = parser.parse_args()
    args.backend = args.backend or ensure_redis()
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-sqs-profile-"))
    try:
        measure(args, workdir)
    finally:
        if args.keep:
            print(f"logs and profiles: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
