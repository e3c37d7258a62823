"""Real OS processes for end-to-end tests: servers and workers started from the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_SECONDS = 20.0
# Processes of the running test; the e2e conftest prints their logs when the test fails.
SHOWN_ON_FAILURE: list[Proc] = []


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serving(address: str, timeout: float = 1.0) -> bool:
    """True when the server at `address` answers a gRPC health check with SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


class Proc:
    """A child process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            self.argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Server(Proc):
    """`conveyor serve`; with no broker/backend it runs on its defaults (SQLite in `cwd`).

    With `wait=False` the constructor returns at once: register the process for cleanup, then
    call wait_ready(), so a server that never gets ready is still stopped.
    """

    def __init__(self, log_dir: Path, broker: str | None = None, backend: str | None = None,
                 port: int | None = None, env: dict[str, str] | None = None, name: str = "server",
                 cwd: Path = REPO, wait: bool = True) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "conveyor_server.cli", "serve", "--port", str(self.port)]
        if broker:
            argv += ["--broker", broker]
        if backend:
            argv += ["--backend", backend]
        super().__init__(argv, log_dir / f"{name}-{self.port}.log", env, cwd)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.popen.returncode}:\n{self.output()}")
            if serving(self.address):
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in {START_SECONDS} s:\n{self.output()}")

    def restart(self) -> None:
        """Start a fresh process on the same port and engines (after a stop or kill)."""
        Proc.__init__(self, self.argv, self.log_path, self.env, self.cwd)
        self.wait_ready()


class WorkerProc(Proc):
    def __init__(self, log_dir: Path, address: str, module: str = "tests.e2e.workload",
                 queues: Sequence[str] = ("default",), concurrency: int = 4,
                 env: dict[str, str] | None = None, name: str = "worker", prefetch: int | None = None) -> None:
        argv = [sys.executable, "-m", "conveyor_server.cli", "--address", address, "worker", module,
                "--concurrency", str(concurrency)]
        if prefetch is not None:
            argv += ["--prefetch", str(prefetch)]
        for queue in queues:
            argv += ["--queue", queue]
        super().__init__(argv, log_dir / f"{name}-{time.monotonic_ns()}.log", env)


def wait_for_workers(address: str, count: int, seconds: float = START_SECONDS) -> None:
    """Block until `count` workers are connected to the server at `address`."""
    deadline = time.monotonic() + seconds
    connected = 0
    with grpc.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        while time.monotonic() < deadline:
            connected = len(admin.ListWorkers(admin_service_pb2.ListWorkersRequest(), timeout=2).workers)
            if connected >= count:
                return
            time.sleep(0.05)
    raise RuntimeError(f"only {connected} of {count} workers connected to {address} in {seconds} s")


def run_cli(address: str, *args: str, timeout: float = 60.0) -> str:
    """Run a `conveyor` client command as its own OS process; returns what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "conveyor_server.cli", "--address", address, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"conveyor {' '.join(args)} exited with {done.returncode}:\n{done.stderr}")
    return done.stdout


def log_lines(path: Path, prefix: str) -> list[str]:
    """Lines of a CONVEYOR_TEST_LOG file that start with `prefix` (see tests/e2e/workload.py)."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith(prefix)]


def wait_until(condition: Callable[[], object], seconds: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it is truthy; AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {seconds} s")


async def eventually(condition: Callable[[], object], seconds: float = 30.0, what: str = "condition") -> None:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not met within {seconds} s")
