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
- redis-10s: as redis-sigkill, down 10 s (the Redis broker's own outage, and the Redis backend's with it).
- redis-backend-10s / mongodb-backend-10s / memcached-backend-10s: 1 server; the broker on a private Redis that
  stays up, the backend on its own engine, out for 10 s while chords complete (see BackendOutage for how each
  engine is stopped).
- rabbitmq-10s / sqs-10s: 1 server; the broker on its own engine (a private RabbitMQ node on ports of its own, or
  moto in a process of its own), the backend on a private Redis that stays up; the broker out for 10 s mid-load
  (see BrokerOutage: the node stopped and started again; moto killed and restarted, its queues lost, so the servers
  run with a quick repair of lost messages).
- sqlite-lock: 2 replicas on the embedded default (one SQLite file, broker and backend); another connection
  holds the file's write lock (BEGIN EXCLUSIVE) for 3 s.

Every scenario names the `engine` its fault hits and the `outage`, for bench/faults.py's engine x outage table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import signal
import time
from collections.abc import Callable

import grpc

from conveyor.v1 import task_service_pb2, task_service_pb2_grpc
from tests.faults.harness import Load, Rig, Run, Scenario, blocking, outage
from tests.faults.rig import EngineProcess
from tests.fixtures.moto_process import QUICK_REPAIR_ENV
from tests.support.processes import Server, replica_target
from tests.support.redis_server import RedisServer
from tests.support.sqlite_lock import SqliteWriteLock

OUTAGE_SECONDS = 3.0
# An engine's own outage (issue #22): stopped this long mid-load, then back.
ENGINE_OUTAGE_SECONDS = 10.0
# The embedded default's: its file locked this long.
SQLITE_LOCK_SECONDS = 3.0
# What a server logs when its repair of lost messages republished tasks, and when it finds its SQS queues gone.
REPAIRED = re.compile(r"repair of lost messages: republished (\d+) tasks")
QUEUES_RECREATED = "creating them again"
# How long a fault waits for its moment (so much submitted, so much run) before giving up.
TRIGGER_SECONDS = 30.0


def republished_by_repair(server_output: str) -> int:
    """Tasks a server's repair of lost messages republished, from its log."""
    return sum(int(n) for n in REPAIRED.findall(server_output))


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


def _serve_on(rig: Rig, broker: str, backend: str, workers: int, name: str = "server",
              env: dict[str, str] | None = None) -> Server:
    server = rig.server(broker, backend, name=name, env=env)
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
        if down_seconds != OUTAGE_SECONDS:
            self.name = f"redis-{down_seconds:.0f}s"
        self.description = f"Redis (broker+backend, AOF) {signal.Signals(signum).name}, down {down_seconds} s"
        self.engine = "redis (broker + backend)"
        self.outage = f"{signal.Signals(signum).name}, restarted on its AOF after {down_seconds:.0f} s"
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
        self.engine = f"redis {cut}"
        self.outage = f"connections cut (proxy) for {down_seconds:.0f} s"
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
    supervisor would, started again after 5 s. 5 s is longer than a lease (FAST_RECOVERY: 3 s), so replica B has
    to recover what A had leased before A is back. Each worker is given both replicas' addresses, its own first
    (gRPC's address list), as docs/durability.md advises: A's worker reconnects to B at once and delivers there
    the results A died before recording, while their lease still holds."""

    name = "replica-kill"

    def __init__(self, down_seconds: float = 5.0, at_fraction: float = 0.4, engine: str = "redis") -> None:
        self.down_seconds = down_seconds
        self.at_fraction = at_fraction
        self.store = engine
        if engine != "redis":
            self.name = f"replica-kill-{engine}"
        self.description = f"kill -9 of replica A of 2 (shared {engine}), restarted after {down_seconds} s"
        self.engine = f"server replica ({engine})"
        self.outage = f"kill -9 of 1 of 2, back after {down_seconds:.0f} s"
        self.victim: Server | None = None

    def setup(self, rig: Rig) -> None:
        broker, backend = _engines(rig, self.store)
        replica_a = self.victim = rig.server(broker, backend, name="replica-a")
        replica_b = rig.server(broker, backend, name="replica-b")
        rig.worker(replica_target(replica_a.address, replica_b.address), name="replica-a-worker-0")
        rig.worker(replica_target(replica_b.address, replica_a.address), name="replica-b-worker-0")
        rig.wait_for_workers(replica_a.address, 1)
        rig.wait_for_workers(replica_b.address, 1)

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
        self.store = engine
        if engine != "redis":
            self.name = f"worker-kill-{engine}"
        self.description = f"kill -9 a worker (of {workers}) every {every_seconds} s, replaced each time ({engine})"
        self.engine = f"worker ({engine})"
        self.outage = f"kill -9 of 1 of {workers} every {every_seconds:.0f} s"
        self.address = ""

    def setup(self, rig: Rig) -> None:
        broker, backend = _engines(rig, self.store)
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
    engine = "server replicas (redis)"
    outage = "cancels through another replica"

    def tune(self, load: Load) -> Load:
        """A queue deep enough that its tail is still in the broker when the cancels go out: the workers
        run 2 x 8 slots / 50 ms = 320 tasks/s against ~1,100/s submitted, so ~1,500 wait at the end of the
        submits and the tail is seconds away from any worker's prefetch. (With 10 ms tasks the workers kept
        up and the "tail" was already in their prefetch buffers: a cancel then races the handout, as the
        README's "Time limits, cancels and crashing tasks" allows, which is not what this scenario tests.)"""
        return dataclasses.replace(load, submit_seconds=2.0, task_seconds=max(load.task_seconds, 0.05))

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


class BackendOutage(Scenario):
    """The backend alone is out for 10 s while chords complete; the broker, a private Redis of its own, stays up
    (so this is the backend's outage, not the broker's: redis-10s covers a Redis that is both).

    - redis: kill -9, started again on its AOF (fsync always) on the same port.
    - mongodb: nx-27017 kill -9, started again on the same port and database file (SQLite, WAL: what it
      committed survives a crash, so a restart is fair).
    - memcached: frozen with SIGSTOP, thawed with SIGCONT. Not a restart: memcached keeps everything in memory,
      so a restart drops every record, which no store could survive (docs/durability.md). A frozen server is
      also the harder case for a client: its port still accepts connections and nothing answers, so only the
      client's own timeouts end its calls.
    """

    ENGINES = ("redis", "mongodb", "memcached")
    # nx-27017 (a Python server on one SQLite file) records some 30-50 tasks a second here, not the 200 a
    # second the default load submits: its load is spread out to that pace (and given longer to finish), so
    # that the run measures the outage, not a backlog. Ids (tasks and chord members and callbacks) per second.
    NX27017_IDS_PER_SECOND = 40.0

    def __init__(self, engine: str, down_seconds: float = ENGINE_OUTAGE_SECONDS) -> None:
        if engine not in self.ENGINES:
            raise ValueError(f"backend engine: one of {self.ENGINES}, not {engine!r}")
        self.backend = engine
        self.down_seconds = down_seconds
        self.name = f"{engine}-backend-{down_seconds:.0f}s"
        how = "frozen (SIGSTOP)" if engine == "memcached" else "killed (SIGKILL) and restarted"
        self.description = f"{engine} backend {how}, out for {down_seconds} s while chords complete"
        self.engine = f"{engine} backend (broker: redis)"
        self.outage = (f"SIGSTOP for {down_seconds:.0f} s" if engine == "memcached"
                       else f"SIGKILL, restarted after {down_seconds:.0f} s")
        self.down: Callable[[], object] = lambda: None
        self.up: Callable[[], object] = lambda: None

    def tune(self, load: Load) -> Load:
        if self.backend != "mongodb":
            return load
        ids = load.tasks + load.chords * (load.members + 1)
        return dataclasses.replace(load, submit_seconds=max(load.submit_seconds, ids / self.NX27017_IDS_PER_SECOND),
                                   stuck_after_seconds=max(load.stuck_after_seconds, 60.0))

    def setup(self, rig: Rig) -> None:
        broker = rig.redis("broker-redis").url(prefix=rig.prefix("q"))
        backend = self._backend(rig)
        _serve_on(rig, broker, backend, rig.load.workers)

    def _backend(self, rig: Rig) -> str:
        """Start the backend engine; set `down` and `up`; return the server's backend URL."""
        if self.backend == "redis":
            redis = rig.redis("backend-redis")
            self.down, self.up = functools.partial(redis.stop, signal.SIGKILL), redis.start
            return redis.url(prefix=rig.prefix("r"))
        engine: EngineProcess
        if self.backend == "mongodb":
            engine = rig.nx27017("backend-nx27017")
            self.down, self.up = engine.kill, engine.start
            # Collection names: letters, digits and '_' only.
            return f"{engine.url}?prefix={rig.prefix('r').replace('-', '_')}"
        engine = rig.memcached("backend-memcached")
        self.down, self.up = engine.freeze, engine.thaw
        return f"{engine.url}?prefix={rig.prefix('r')}"

    async def inject(self, run: Run) -> None:
        members = len(run.chord_ids()) * run.rig.load.members
        await run.until(lambda: run.log.count("member") >= members // 4, TRIGGER_SECONDS,
                        "a quarter of the members ran")
        await outage(run, self.description, self.down, self.up, self.down_seconds)


class BrokerOutage(Scenario):
    """The broker alone is out for 10 s mid-load; the backend, a private Redis, stays up (RabbitMQ and SQS are
    brokers only).

    - rabbitmq: a private RabbitMQ node (tests/fixtures/rabbitmq_node.py: its own name, ports and epmd; the shared
      node on 5672 is never touched) stopped gracefully, started again after 10 s on its data (durable queues and
      persistent messages survive). Its boot takes several seconds more; the outage ends when it answers AMQP.
    - sqs: moto in a process of its own (tests/fixtures/moto_process.py) killed and, after 10 s, started again on
      its port. moto keeps its queues in memory, so they are gone: the server creates them again, and what they
      held comes back through the repair of lost messages, which the server runs with QUICK_REPAIR_ENV (repair
      after 4 s, not the default of a few lease lengths); the row's outage says so.
    """

    ENGINES = ("rabbitmq", "sqs")
    # moto (one Python process, its receives serialised) runs some 90 ids a second here, not the 200 a second the
    # default load submits, and what was accepted during the outage reaches it in one burst when it is back: at
    # 100 ids a second that burst (~1,000 messages) held its first receives up 3 s. The load is spread out to half
    # that pace (and given longer to finish), so that the run measures the outage, not moto's backlog.
    MOTO_IDS_PER_SECOND = 50.0
    # The node's boot (10-25 s on the machines measured) adds to the outage: submits keep retrying through it.
    RABBITMQ_GIVE_UP_SECONDS = 90.0

    def __init__(self, engine: str, down_seconds: float = ENGINE_OUTAGE_SECONDS, at_fraction: float = 0.35) -> None:
        if engine not in self.ENGINES:
            raise ValueError(f"broker engine: one of {self.ENGINES}, not {engine!r}")
        self.broker = engine
        self.down_seconds = down_seconds
        self.at_fraction = at_fraction
        self.name = f"{engine}-{down_seconds:.0f}s"
        self.engine = f"{engine} broker (backend: redis)"
        if engine == "rabbitmq":
            self.description = f"the broker's own RabbitMQ node stopped mid-load, started again after {down_seconds} s"
            self.outage = f"node stopped, started again after {down_seconds:.0f} s"
        else:
            self.description = (f"the broker's moto (SQS) killed mid-load, restarted after {down_seconds} s without "
                                "its queues")
            self.outage = (f"SIGKILL, restarted after {down_seconds:.0f} s, queues lost "
                           f"(server: repair_after {QUICK_REPAIR_ENV['CONVEYOR_REPAIR_AFTER_SECONDS']} s)")
        self.server_env: dict[str, str] = QUICK_REPAIR_ENV if engine == "sqs" else {}
        self.down: Callable[[], object] = lambda: None
        self.up: Callable[[], object] = lambda: None
        self.server: Server | None = None

    def republished(self) -> int:
        """Tasks the server's repair of lost messages republished (from its log)."""
        assert self.server is not None
        return republished_by_repair(self.server.output())

    def queues_recreated(self) -> bool:
        assert self.server is not None
        return QUEUES_RECREATED in self.server.output()

    def tune(self, load: Load) -> Load:
        if self.broker == "rabbitmq":
            return dataclasses.replace(
                load, submit_give_up_seconds=max(load.submit_give_up_seconds, self.RABBITMQ_GIVE_UP_SECONDS),
                stuck_after_seconds=max(load.stuck_after_seconds, 60.0))
        ids = load.tasks + load.chords * (load.members + 1)
        return dataclasses.replace(load, submit_seconds=max(load.submit_seconds, ids / self.MOTO_IDS_PER_SECOND),
                                   stuck_after_seconds=max(load.stuck_after_seconds, 90.0))

    def setup(self, rig: Rig) -> None:
        backend = rig.redis("backend-redis").url(prefix=rig.prefix("r"))
        self.server = _serve_on(rig, self._broker(rig), backend, rig.load.workers, env=self.server_env)

    def _broker(self, rig: Rig) -> str:
        """Start the broker engine; set `down` and `up`; return the server's broker URL."""
        if self.broker == "rabbitmq":
            node = rig.rabbitmq_node("broker-rabbitmq")
            self.down, self.up = node.stop, node.start
            return f"{node.url}?prefix={rig.prefix('q')}"
        moto = rig.moto("broker-moto")
        self.down, self.up = moto.kill, moto.start
        return moto.broker_url(rig.prefix("q"))

    async def inject(self, run: Run) -> None:
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, TRIGGER_SECONDS, "load submitted")
        await outage(run, self.description, self.down, self.up, self.down_seconds)


class SqliteLock(Scenario):
    """The embedded default (one SQLite file, broker and backend) locked for 3 s mid-load: another connection
    holds `BEGIN EXCLUSIVE`, as a backup tool or a stray `sqlite3` shell would. Two replicas share the file, as
    in replica-kill-sqlite. Their writers wait on the lock (the busy timeout) and go on once it is released.

    Not "made unwritable": the suite runs as root, which file modes do not stop, and a server's open
    descriptors keep writing to a file whose mode changed; the lock is what another process can really do."""

    name = "sqlite-lock"
    engine = "sqlite (broker + backend, 2 replicas)"

    def __init__(self, locked_seconds: float = SQLITE_LOCK_SECONDS, at_fraction: float = 0.35) -> None:
        self.locked_seconds = locked_seconds
        self.at_fraction = at_fraction
        self.description = f"the SQLite file locked (BEGIN EXCLUSIVE by another connection) for {locked_seconds} s"
        self.outage = f"write lock held {locked_seconds:.0f} s"
        self.lock: SqliteWriteLock | None = None

    def setup(self, rig: Rig) -> None:
        broker, backend = _engines(rig, "sqlite")
        self.lock = SqliteWriteLock(rig.workdir / "conveyor.db")
        _serve_on(rig, broker, backend, 1, name="replica-a")
        _serve_on(rig, broker, backend, 1, name="replica-b")

    async def inject(self, run: Run) -> None:
        lock = self.lock
        assert lock is not None
        await run.until(lambda: run.submitted_fraction >= self.at_fraction, TRIGGER_SECONDS, "load submitted")
        try:
            await outage(run, self.description, lock.hold, lock.release, self.locked_seconds)
        finally:
            await blocking(lock.release)


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
    "redis-10s": lambda: RedisRestart(signal.SIGKILL, ENGINE_OUTAGE_SECONDS),
    "redis-backend-10s": lambda: BackendOutage("redis"),
    "mongodb-backend-10s": lambda: BackendOutage("mongodb"),
    "memcached-backend-10s": lambda: BackendOutage("memcached"),
    "sqlite-lock": SqliteLock,
    "rabbitmq-10s": lambda: BrokerOutage("rabbitmq"),
    "sqs-10s": lambda: BrokerOutage("sqs"),
}
