"""End-to-end throughput: N noop tasks submitted in batches, time until every result is stored.

    python bench/throughput.py                                  # memory and sqlite engines
    python bench/throughput.py --broker redis://127.0.0.1:6379/0 --backend redis://127.0.0.1:6379/0

The server and the worker run as separate processes (as in production); this process is
the client. Completion is detected from queue stats, then every result is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.queue_info import queue_info
from conveyor import Client, sig
from conveyor.v1 import admin_service_pb2_grpc, result_pb2
from tests.support.processes import Server, WorkerProc, wait_for_workers


async def drained(address: str, queue: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        while True:
            info = await queue_info(admin, queue)
            if info is not None and info.ready + info.delayed + info.in_flight == 0:
                return
            await asyncio.sleep(0.01)


async def run_once(address: str, tasks: int, batch: int, task_name: str) -> tuple[float, float]:
    async with Client(address) as client:
        started = time.perf_counter()
        ids: list[str] = []
        for offset in range(0, tasks, batch):
            submitted = await client.submit_batch(sig(task_name) for _ in range(min(batch, tasks - offset)))
            ids.extend(s.task_id for s in submitted)
        submitted_at = time.perf_counter()
        await drained(address, "default")
        # The queue is empty; the last results may still be in flight to the backend.
        for task_id in ids[-200:]:
            result = await client.get_result(task_id, wait=30)
            assert result.state == result_pb2.TASK_STATE_SUCCESS, result
        finished = time.perf_counter()
        missing = 0
        for offset in range(0, len(ids), 500):
            results = await asyncio.gather(*(client.get_result(t) for t in ids[offset:offset + 500]))
            missing += sum(r.state != result_pb2.TASK_STATE_SUCCESS for r in results)
        assert missing == 0, f"{missing} tasks did not succeed"
    return submitted_at - started, finished - started


def measure(broker: str, backend: str, args: argparse.Namespace, workdir: Path) -> None:
    server = Server(workdir, broker, backend, env={"CONVEYOR_LOG_LEVEL": "WARNING"})
    workers = [
        WorkerProc(workdir, server.address, module="bench.noop_worker", concurrency=args.concurrency)
        for _ in range(args.workers)
    ]
    try:
        wait_for_workers(server.address, args.workers)
        asyncio.run(run_once(server.address, min(args.tasks, 500), args.batch, args.task))  # warm-up
        submit_s, total_s = asyncio.run(run_once(server.address, args.tasks, args.batch, args.task))
        print(f"{broker.split(':', maxsplit=1)[0]:>8} / {backend.split(':', maxsplit=1)[0]:<8} {args.tasks:>7} tasks  "
              f"submit {args.tasks / submit_s:>9,.0f}/s  end-to-end {args.tasks / total_s:>8,.0f} tasks/s  "
              f"({total_s:.2f} s)", flush=True)
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", help="broker URL (default: run memory:// and sqlite)")
    parser.add_argument("--backend", help="backend URL (default: the same engine as the broker)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000, help="tasks per SubmitBatch call")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=64, help="window of each worker")
    parser.add_argument("--task", default="noop", choices=["noop", "anoop"], help="sync or async noop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        workdir = Path(tmp)
        if args.broker:
            measure(args.broker, args.backend or args.broker, args, workdir)
            return
        db = workdir / "bench.db"
        for url in ("memory://", f"sqlite:///{db}"):
            measure(url, url, args, workdir)


if __name__ == "__main__":
    main()
