"""The fault scenarios: each builds its topology on a Rig and injects one fault while the load runs.

Every engine is private to the scenario (a redis-server on a free port, AOF on, fsync always), so nothing here
touches the shared Redis or RabbitMQ, and a crash of ours cannot hurt another test.

- redis-sigterm / redis-sigkill: 1 server; one Redis is broker and backend (direct); Redis stopped with that
  signal mid-load, down 3 s, started again on its AOF.
- backend-cut: 1 server; broker Redis direct, backend Redis through the proxy; the proxy cut for 3 s while
  chords are completing.
- broker-cut: 1 server; broker Redis through the proxy, backend Redis direct; cut for 3 s in the submit burst.
- replica-kill: 2 replicas share one Redis, a worker on each, clients on both; kill -9 of replica A, started
  again after 5 s (longer than a lease).
- worker-kill: 1 server, one Redis, 3 workers; kill -9 of a worker every 2 s, a replacement started each time.
- cancel-replicas: 2 replicas, workers and submits on A only; the queue's not-yet-started tail cancelled via B.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import signal
import time
from collections.abc import Callable

import grpc

from conveyor.v1 import task_service_pb2, task_service_pb2_grpc
from tests.faults.harness import Load, Rig, Run, Scenario, blocking, outage
from tests.support.processes import Server
from tests.support.redis_server import RedisServer

OUTAGE_SECONDS = 3.0
# How long a fault waits for its moment (so much submitted, so much run) before giving up.
TRIGGER_SECONDS = 30.0


def _one_redis(rig: Rig) -> RedisServer:
    return rig.redis("redis")


def _engines(rig: Rig, engine: str) -> tuple[str, str]:
    """(broker URL, backend URL) on a private Redis, or on the embedded SQLite default (one file
    in the scenario's directory, shared by its replicas)."""
    if engine == "sqlite":
        url = f"sqlite:///{rig.workdir / 'conveyor.db'}"
        return url, url
    redis = _one_redis(rig)
    return redis.url(prefix=rig.prefix("q")), redis.url(prefix=rig.prefix("r"))


def _serve_on(rig: Rig, broker: str, backend: str, workers: int, name: str = "server") -> Server:
    server = rig.server(broker, backend, name=name)
    for i in range(workers):
        rig.worker(server.address, name=f"{name}-worker-{i}")
    rig.wait_for_workers(server.address, workers)
    return server


class RedisRestart(Scenario):
    """a. The one Redis (broker and backend) stopped with `signum` mid-load and started again on its AOF."""

    def __init__(self, signum: int, down_seconds: float = OUTAGE_SECONDS, at_fraction: float = 0.35) -> None:
        self.signum = signum
        self.down_seconds = down_seconds
        self.at_fraction = at_fraction
        self.name = f"redis-{signal.Signals(signum).name.lower()}"
        self.description = f"Redis (broker+backend, AOF) {signal.Signals(signum).name}, down {down_seconds} s"
        self.redis: RedisServer | None = None

    def setup(self, rig: Rig) -> None:
        self.redis = _one_redis(rig)
        _serve_on(rig, self.redis.url(prefix=rig.prefix("q")), self.redis.url(prefix=rig.prefix("r")),
                  rig.load.workers)

    async def inject(self, run: Run) -> None:
        redis = self.redis
        assert redis is not None
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, TRIGGER_SECONDS, "load submitted")
        await outage(run, self.description, lambda: redis.stop(self.signum), redis.start, self.down_seconds)


class EngineCut(Scenario):
    """b/c. One engine reached through the TCP proxy, cut for 3 s; the other engine reached directly.

    `cut="backend"` waits until chords are completing (a quarter of the members ran) so that member results,
    group counting and callback publication meet the outage; `cut="broker"` cuts during the submit burst."""

    def __init__(self, cut: str, down_seconds: float = OUTAGE_SECONDS) -> None:
        if cut not in ("backend", "broker"):
            raise ValueError(f"cut the backend or the broker, not {cut!r}")
        self.cut = cut
        self.down_seconds = down_seconds
        self.name = f"{cut}-cut"
        self.description = f"{cut} unreachable (proxy cut) for {down_seconds} s"
        self.proxy_cut: Callable[[], None] = lambda: None
        self.proxy_restore: Callable[[], None] = lambda: None

    def setup(self, rig: Rig) -> None:
        broker, backend = rig.redis("broker-redis"), rig.redis("backend-redis")
        proxied = backend if self.cut == "backend" else broker
        proxy = rig.proxy(proxied.port)
        self.proxy_cut, self.proxy_restore = proxy.cut, proxy.restore
        via = f"redis://{proxy.address}/0"
        broker_url = via if self.cut == "broker" else broker.url()
        backend_url = via if self.cut == "backend" else backend.url()
        _serve_on(rig, f"{broker_url}?prefix={rig.prefix('q')}", f"{backend_url}?prefix={rig.prefix('r')}",
                  rig.load.workers)

    async def inject(self, run: Run) -> None:
        if self.cut == "backend":
            members = len(run.chord_ids()) * run.rig.load.members
            await run.until(lambda: run.log.count("member") >= members // 4, TRIGGER_SECONDS,
                            "a quarter of the members ran")
        else:
            await run.until(lambda: run.submitted_fraction >= 0.3, TRIGGER_SECONDS, "30% of the load submitted")
        await outage(run, self.description, self.proxy_cut, self.proxy_restore, self.down_seconds)


class ReplicaKill(Scenario):
    """d. Two replicas on one Redis, a worker on each, clients on both; replica A is kill -9ed and, like a
    supervisor would, started again after 5 s (its worker reconnects to it). 5 s is longer than a lease
    (FAST_RECOVERY: 3 s), so replica B has to recover what A had leased before A is back."""

    name = "replica-kill"

    def __init__(self, down_seconds: float = 5.0, at_fraction: float = 0.4, engine: str = "redis") -> None:
        self.down_seconds = down_seconds
        self.at_fraction = at_fraction
        self.engine = engine
        if engine != "redis":
            self.name = f"replica-kill-{engine}"
        self.description = f"kill -9 of replica A of 2 (shared {engine}), restarted after {down_seconds} s"
        self.victim: Server | None = None

    def setup(self, rig: Rig) -> None:
        broker, backend = _engines(rig, self.engine)
        self.victim = _serve_on(rig, broker, backend, 1, name="replica-a")
        _serve_on(rig, broker, backend, 1, name="replica-b")

    async def inject(self, run: Run) -> None:
        victim = self.victim
        assert victim is not None
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, TRIGGER_SECONDS, "load submitted")
        await outage(run, self.description, victim.kill9, victim.restart, self.down_seconds)


class WorkerKill(Scenario):
    """e. kill -9 of one of three workers every 2 s, a replacement started each time, until the load ran."""

    name = "worker-kill"

    def __init__(
        self, every_seconds: float = 2.0, workers: int = 3, max_kills: int = 15, engine: str = "redis"
    ) -> None:
        self.every_seconds = every_seconds
        self.workers = workers
        self.max_kills = max_kills
        self.engine = engine
        if engine != "redis":
            self.name = f"worker-kill-{engine}"
        self.description = f"kill -9 a worker (of {workers}) every {every_seconds} s, replaced each time ({engine})"
        self.address = ""

    def setup(self, rig: Rig) -> None:
        broker, backend = _engines(rig, self.engine)
        self.address = _serve_on(rig, broker, backend, self.workers).address

    async def inject(self, run: Run) -> None:
        rig = run.rig
        total = run.total_ids()
        await run.until(lambda: run.log.count() >= total // 20, TRIGGER_SECONDS, "5% of the load ran")
        run.fault_began(self.description)
        kills = 0
        while kills < self.max_kills and not (run.loaded.is_set() and len(run.log.by_task()) >= total * 0.9):
            victim = rig.live_workers()[0]  # the oldest
            await blocking(functools.partial(rig.kill_worker, victim))
            rig.worker(self.address, name=f"replacement-{kills}")
            kills += 1
            await asyncio.sleep(self.every_seconds)
        run.fault_over()
        run.notes.append(f"{kills} workers killed; {len(run.log.by_task())} of {total} ids had run by then")


class CancelAcrossReplicas(Scenario):
    """f. Clients submit to replica A and workers pull from it; the tail of the queue (`fraction` of the lone
    tasks, last submitted first, those not yet started) is cancelled one by one through replica B (which no
    worker or submit uses) while A dispatches. Cancelled tasks must end CANCELLED
    and not start after their Cancel returned; everything else succeeds."""

    name = "cancel-replicas"
    description = "cancel the queue's tail via replica B while workers pull from replica A"

    def tune(self, load: Load) -> Load:
        """A queue deep enough that its tail is still queued when the cancels go out."""
        return dataclasses.replace(load, submit_seconds=2.0, task_seconds=max(load.task_seconds, 0.01))

    def __init__(self, fraction: float = 0.15) -> None:
        self.fraction = fraction
        self.replica_b = ""

    def setup(self, rig: Rig) -> None:
        redis = _one_redis(rig)
        broker, backend = redis.url(prefix=rig.prefix("q")), redis.url(prefix=rig.prefix("r"))
        _serve_on(rig, broker, backend, rig.load.workers, name="replica-a")
        self.replica_b = rig.server(broker, backend, name="replica-b", for_clients=False).address

    async def inject(self, run: Run) -> None:
        await run.loaded.wait()
        ran = run.log.by_task()
        lone = run.lone_task_ids()
        targets = [t for t in reversed(lone[-int(len(lone) * self.fraction):]) if t not in ran]
        run.fault_began(f"cancelling {len(targets)} queued tasks through replica B")
        gate = asyncio.Semaphore(8)
        async with grpc.aio.insecure_channel(self.replica_b) as channel:
            replica_b = task_service_pb2_grpc.TaskServiceStub(channel)

            async def cancel(task_id: str) -> None:
                async with gate:
                    try:
                        await replica_b.Cancel(task_service_pb2.CancelRequest(id=task_id), timeout=10)
                        run.cancelled_at[task_id] = time.time()
                    except grpc.aio.AioRpcError as exc:
                        run.cancel_errors[task_id] = f"{exc.code().name}: {exc.details()}"

            await asyncio.gather(*(cancel(t) for t in targets))
        run.fault_over()


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "redis-sigterm": lambda: RedisRestart(signal.SIGTERM),
    "redis-sigkill": lambda: RedisRestart(signal.SIGKILL),
    "backend-cut": lambda: EngineCut("backend"),
    "broker-cut": lambda: EngineCut("broker"),
    "replica-kill": ReplicaKill,
    "worker-kill": WorkerKill,
    "cancel-replicas": CancelAcrossReplicas,
    "replica-kill-sqlite": lambda: ReplicaKill(engine="sqlite"),
    "worker-kill-sqlite": lambda: WorkerKill(engine="sqlite"),
}
