"""What a fault scenario starts: private redis-servers, nx-27017 and memcached servers, a private RabbitMQ node,
a moto (SQS) process, TCP proxies,
`conveyor serve` replicas and `conveyor worker` processes; `Rig.close()` stops all of it whatever happened.

Servers run with FAST_RECOVERY (short leases and graces, tests/chaos/conftest.py). Set CONVEYOR_FAULTS_CODE to
run servers and workers from another checkout (see `code_env`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from tests.chaos.conftest import FAST_RECOVERY
from tests.faults.load import Load
from tests.fixtures.backend_services import Service, start_memcached, start_nx27017
from tests.fixtures.moto_process import MotoProcess
from tests.fixtures.rabbitmq_node import RabbitNode
from tests.support.processes import Proc, Server, WorkerProc, wait_for_workers
from tests.support.proxy import TcpProxy
from tests.support.redis_server import RedisServer

CODE_VARIABLE = "CONVEYOR_FAULTS_CODE"
# Log lines that tell the lead what the server saw.
SERVER_LOG_PATTERN = re.compile(r"\b(ERROR|CRITICAL|WARNING)\b")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ ")


def code_under_test() -> str:
    return os.environ.get(CODE_VARIABLE) or "this tree"


def code_env() -> dict[str, str]:
    """PYTHONPATH for servers and workers when CONVEYOR_FAULTS_CODE names another checkout (a directory with
    `server/` and `sdk/python/`, e.g. `git archive HEAD server sdk/python | tar -x -C DIR`): the suite then runs
    against that code while the tests and tasks come from this tree."""
    root = os.environ.get(CODE_VARIABLE)
    if not root:
        return {}
    paths = [str(Path(root) / "server"), str(Path(root) / "sdk" / "python")]
    if existing := os.environ.get("PYTHONPATH"):
        paths.append(existing)
    return {"PYTHONPATH": os.pathsep.join(paths)}


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is in state T (stopped); /proc/PID/task/TID/stat's third field."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, IndexError):
            continue
    return bool(states) and all(state == "T" for state in states)


class EngineProcess:
    """An nx-27017 or memcached server a scenario can kill and start again on the same port (and data), or
    freeze (SIGSTOP: its port still accepts connections, nothing answers) and thaw (SIGCONT)."""

    def __init__(self, start: Callable[[int | None], Service]) -> None:
        self._start = start
        self.service = start(None)
        port = urlsplit(self.service.url).port
        assert port is not None
        self.port = port

    @property
    def url(self) -> str:
        return self.service.url

    def kill(self) -> None:
        self.service.kill()

    def start(self) -> None:
        """Start again on the same port; returns once it answers."""
        self.service = self._start(self.port)

    def freeze(self) -> None:
        """SIGSTOP, then wait until every thread of the server is stopped: the signal is delivered
        asynchronously, and a call sent in between would still be answered."""
        self.service.send(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(self.service.process.pid):
            assert time.monotonic() < deadline, "the engine did not stop within 5 s of SIGSTOP"
            time.sleep(0.005)

    def thaw(self) -> None:
        self.service.send(signal.SIGCONT)

    def close(self) -> None:
        self.service.kill()  # SIGKILL ends a frozen process too


class Rig:
    """Everything one scenario starts; `close()` stops all of it, whatever happened.

    Processes go to `procs` too (the `procs` fixture of tests/conftest.py), so their logs are attached to a
    failing test's report."""

    def __init__(self, workdir: Path, load: Load, procs: list[Proc] | None = None) -> None:
        self.workdir = workdir
        self.load = load
        self.procs: list[Proc] = procs if procs is not None else []
        self.run_id = uuid.uuid4().hex[:8]
        self.queue = f"faults-{self.run_id}"
        self.log_path = workdir / "executions.log"
        self.log_path.touch()
        self.redises: list[RedisServer] = []
        self.engines: list[EngineProcess] = []
        self.brokers: list[RabbitNode | MotoProcess] = []
        self.proxies: list[TcpProxy] = []
        self.servers: list[Server] = []
        self.workers: list[WorkerProc] = []
        # Client addresses (replicas); submits and reads rotate over them.
        self.addresses: list[str] = []
        self.killed_worker_pids: set[int] = set()

    def redis(self, name: str) -> RedisServer:
        server = RedisServer(self.workdir / name)
        self.redises.append(server)
        server.start()
        return server

    def nx27017(self, name: str) -> EngineProcess:
        """A private nx-27017 (the MongoDB wire protocol on a SQLite file in `name/`)."""
        directory = self.workdir / name
        directory.mkdir()
        return self._engine(lambda port: start_nx27017(directory, port=port))

    def memcached(self, name: str) -> EngineProcess:
        directory = self.workdir / name
        directory.mkdir()
        return self._engine(lambda port: start_memcached(log_dir=directory, port=port))

    def rabbitmq_node(self, name: str) -> RabbitNode:
        """A started private RabbitMQ node on ports of its own (never the shared one on 5672)."""
        node = RabbitNode(self.workdir / name)
        self.brokers.append(node)
        return node.start()

    def moto(self, name: str) -> MotoProcess:
        """A started moto (SQS) in a process of its own, on a port it keeps across restarts."""
        directory = self.workdir / name
        directory.mkdir()
        moto = MotoProcess(directory, self.procs)
        self.brokers.append(moto)
        moto.start()
        return moto

    def _engine(self, start: Callable[[int | None], Service]) -> EngineProcess:
        engine = EngineProcess(start)
        self.engines.append(engine)
        return engine

    def proxy(self, port: int) -> TcpProxy:
        proxy = TcpProxy("127.0.0.1", port)
        self.proxies.append(proxy)
        return proxy.start()

    def prefix(self, kind: str) -> str:
        return f"f{kind}-{self.run_id}"

    def server(self, broker: str, backend: str, name: str = "server", for_clients: bool = True,
               env: dict[str, str] | None = None) -> Server:
        """A replica on these engines; clients submit to and read from it unless `for_clients` is False. `env`
        adds to (or overrides) FAST_RECOVERY."""
        server = Server(self.workdir, broker, backend, env={**FAST_RECOVERY, **(env or {}), **code_env()}, name=name,
                        cwd=self.workdir, wait=False)
        self.servers.append(server)
        self.procs.append(server)
        server.wait_ready()
        if for_clients:
            self.addresses.append(server.address)
        return server

    def worker(self, address: str, name: str = "worker") -> WorkerProc:
        worker = WorkerProc(self.workdir, address, queues=[self.queue], concurrency=self.load.concurrency,
                            env={"CONVEYOR_TEST_LOG": str(self.log_path), **code_env()}, name=name)
        self.workers.append(worker)
        self.procs.append(worker)
        return worker

    def kill_worker(self, worker: WorkerProc) -> None:
        self.killed_worker_pids.add(worker.pid)
        worker.kill9()

    def live_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive()]

    def wait_for_workers(self, address: str, count: int) -> None:
        wait_for_workers(address, count)

    def engine_schemes(self) -> set[str]:
        """The URL schemes of the brokers and backends the servers were started on: what the run really used."""
        return {urlsplit(url).scheme for server in self.servers for url in (server.broker, server.backend) if url}

    def exited_by_themselves(self) -> list[str]:
        """Servers and workers that are gone although the test did not kill them (a crash, or an exit)."""
        gone = [p for p in [*self.servers, *self.workers] if not p.alive() and p.pid not in self.killed_worker_pids]
        return [f"{p.log_path.name} (pid {p.pid}, exit {p.popen.returncode})" for p in gone]

    def close(self) -> None:
        for proc in reversed([*self.workers, *self.servers]):
            with contextlib.suppress(Exception):
                proc.stop(timeout=5)
        for proxy in self.proxies:
            proxy.stop()
        for redis in self.redises:
            redis.stop(signal.SIGKILL)
        for engine in self.engines:
            engine.close()
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                broker.close()

    def server_log_excerpt(self, limit: int = 8) -> list[str]:
        """Distinct warning/error lines of every server log (timestamps cut), most frequent first."""
        seen: Counter[str] = Counter()
        for server in self.servers:
            if not server.log_path.exists():
                continue
            for line in server.log_path.read_text(errors="replace").splitlines():
                if SERVER_LOG_PATTERN.search(line):
                    seen[TIMESTAMP.sub("", line)[:240]] += 1
        return [f"{count}x {line}" for line, count in seen.most_common(limit)]
