"""Real OS processes for end-to-end tests (servers and workers started from the CLI), the one way
to wait for something, and the registry that makes sure no process outlives the test run.

- Waiting: `wait_for(condition, seconds, what)` polls until `condition()` is truthy and fails
  the test past its deadline; `eventually` is the same for async tests (it does not block the
  event loop), and `until` polls it every few milliseconds for the unit tests' in-process
  conditions. `settled(read)` waits until a value (a count of runs) stops changing: an
  "exactly once" check counts only after it, so a late duplicate is still seen. A fixed sleep
  is only right where a test checks that something does *not* happen within a window.
- Processes: every `Proc` (and every service a fixture starts, through `track`) runs in a new
  session, is registered here, and `stop()` ends its whole process group. `stop_all()` kills
  whatever is still registered; tests/conftest.py calls it when the session ends (also after a
  failure, a timeout or Ctrl-C), and atexit calls it once more.
- RUN_ID names this test run: every key prefix, queue name and process of the run carries it
  (the environment variable CONVEYOR_TEST_RUN in each process), so what a run leaves behind
  can be found. Set CONVEYOR_TEST_PREFIX to choose it (letters and digits).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing, suppress
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
START_SECONDS = 20.0
STOP_SECONDS = 15.0
POLL_SECONDS = 0.05
# How long a count must stay unchanged before an "exactly once" check trusts it.
SETTLE_SECONDS = 1.0
# Attempts at a free port: another process may take the one chosen before the server binds it.
PORT_ATTEMPTS = 3
# Processes of the running test; tests/conftest.py shows their logs when the test fails.
SHOWN_ON_FAILURE: list[Proc] = []

_T = TypeVar("_T")


def _run_id() -> str:
    chosen = os.environ.get("CONVEYOR_TEST_PREFIX") or f"t{uuid.uuid4().hex[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9]{1,16}", chosen):
        raise ValueError(f"CONVEYOR_TEST_PREFIX must be 1 to 16 letters and digits, not {chosen!r}")
    # Inherited by processes started later (pytest-xdist workers too), so a run has one id.
    os.environ["CONVEYOR_TEST_PREFIX"] = chosen
    return chosen


RUN_ID = _run_id()


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the registry of processes this run started ----------------------------------------------

_started: dict[int, subprocess.Popen[bytes]] = {}
_started_lock = threading.Lock()


def track(process: subprocess.Popen[bytes]) -> None:
    """Register a process started with `start_new_session=True` (its pid is its process group)."""
    with _started_lock:
        _started[process.pid] = process


def end_group(process: subprocess.Popen[bytes], timeout: float = STOP_SECONDS) -> int | None:
    """SIGTERM the process (its children are its own business), SIGKILL it if it lingers, then
    SIGKILL what is left of its process group (a prefork pool's children); unregister it.
    Returns its exit code."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    _kill_group(process.pid)
    with _started_lock:
        _started.pop(process.pid, None)
    return process.returncode


def _kill_group(pgid: int) -> None:
    # Only groups this run created: the pid of a process started in a new session is its group.
    if pgid != os.getpgid(0):
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def stop_all() -> list[str]:
    """SIGKILL the process group of every registered process; returns the command lines of those
    that were still running (a test that forgot to stop them, or an interrupted run)."""
    with _started_lock:
        left = list(_started.values())
        _started.clear()
    running = []
    for process in left:
        if process.poll() is None:
            args = process.args
            running.append(" ".join(map(str, args)) if isinstance(args, list | tuple) else str(args))
        _kill_group(process.pid)
        with suppress(subprocess.TimeoutExpired):
            process.wait(STOP_SECONDS)
    return running


atexit.register(stop_all)


# -- waiting for a condition ------------------------------------------------------------------

def wait_for(condition: Callable[[], object], seconds: float = 30.0, what: str = "condition",
             interval: float = POLL_SECONDS) -> None:
    """Poll `condition` until it is truthy; AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {seconds} s")
        time.sleep(interval)


async def eventually(condition: Callable[[], object], seconds: float = 30.0, what: str = "condition",
                     interval: float = POLL_SECONDS) -> None:
    """`wait_for` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {seconds} s")
        await asyncio.sleep(interval)


# A condition that reads this process's memory (the unit tests' in-process cores) costs nothing
# to check: polled this often, so that a suite of them is not paced by its polls.
IN_MEMORY_POLL_SECONDS = 0.002


async def until(condition: Callable[[], object], seconds: float = 30.0,
                               what: str = "condition") -> None:
    """`eventually` for a condition on this process's own state, polled every few milliseconds."""
    await eventually(condition, seconds, what, IN_MEMORY_POLL_SECONDS)


async def settled(read: Callable[[], _T], window: float = SETTLE_SECONDS, seconds: float = 60.0,
                  what: str = "value") -> _T:
    """The value of `read()` once it has not changed for `window` seconds (polled); an
    AssertionError if it keeps changing for `seconds`. Count runs with it after the results are
    in, so that a duplicate run that comes late is still counted."""
    deadline = time.monotonic() + seconds
    value = read()
    since = time.monotonic()
    while time.monotonic() - since < window:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still changing after {seconds} s (last: {value!r})")
        await asyncio.sleep(POLL_SECONDS)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
    return value


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
            env={**os.environ, "PYTHONUNBUFFERED": "1", "CONVEYOR_TEST_RUN": RUN_ID, **(env or {})},
            start_new_session=True,
        )
        track(self.popen)

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

    def stop(self, timeout: float = STOP_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL if it lingers, then SIGKILL what is left of its process group;
        returns the exit code. Idempotent."""
        code = end_group(self.popen, timeout)
        self._log.close()
        return code

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
        # A port of our choosing is chosen again if another process takes it before we bind it.
        self._port_attempts = 1 if port else PORT_ATTEMPTS
        # The engines it was started on (None: its default), for tests that check what a run really used.
        self.broker, self.backend = broker, backend
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "conveyor_server.cli", "serve", "--port", str(self.port)]
        if broker:
            argv += ["--broker", broker]
        if backend:
            argv += ["--backend", backend]
        # No dashboard on the machine's port 8080 unless a test asks for one: a test server must
        # not take the port a real server (or another run) wants.
        env = {"CONVEYOR_HTTP_PORT": "0", **(env or {})}
        super().__init__(argv, log_dir / f"{name}-{self.port}.log", env, cwd)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if not self.alive():
                if self._port_attempts > 1 and "address in use" in self.output():
                    self._port_attempts -= 1
                    self._listen_on(free_port())
                    continue
                raise RuntimeError(f"server exited with {self.popen.returncode}:\n{self.output()}")
            if serving(self.address):
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready in {START_SECONDS} s:\n{self.output()}")

    def _listen_on(self, port: int) -> None:
        """Start again on `port` (the one chosen was taken before the server could bind it)."""
        self.stop()
        self.argv[self.argv.index("--port") + 1] = str(port)
        self.port, self.address = port, f"127.0.0.1:{port}"
        Proc.__init__(self, self.argv, self.log_path, self.env, self.cwd)

    def restart(self) -> None:
        """Start a fresh process on the same port and engines (after a stop or kill)."""
        Proc.__init__(self, self.argv, self.log_path, self.env, self.cwd)
        self.wait_ready()


class WorkerProc(Proc):
    def __init__(self, log_dir: Path, address: str, module: str = "tests.e2e.workload",
                 queues: Sequence[str] = ("default",), concurrency: int = 4,
                 env: dict[str, str] | None = None, name: str = "worker", prefetch: int | None = None,
                 cwd: Path = REPO) -> None:
        argv = [sys.executable, "-m", "conveyor_server.cli", "--address", address, "worker", module,
                "--concurrency", str(concurrency)]
        if prefetch is not None:
            argv += ["--prefetch", str(prefetch)]
        for queue in queues:
            argv += ["--queue", queue]
        super().__init__(argv, log_dir / f"{name}-{time.monotonic_ns()}.log", env, cwd)


def replica_target(first: str, *others: str) -> str:
    """gRPC's own address list for "host:port" addresses of replicas on loopback: a channel to it connects to
    the first that answers, in this order (pick_first), and reconnects the same way when its stream breaks."""
    return "ipv4:" + ",".join([first, *others])


def connected_workers(address: str) -> int:
    """How many workers the server at `address` lists as connected."""
    with grpc.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        return len(admin.ListWorkers(admin_service_pb2.ListWorkersRequest(), timeout=2).workers)


def wait_for_workers(address: str, count: int, seconds: float = START_SECONDS, exactly: bool = False) -> None:
    """Block until `count` workers (at least, or `exactly`) are connected to the server at `address`."""
    seen = [0]

    def enough() -> bool:
        seen[0] = connected_workers(address)
        return seen[0] == count if exactly else seen[0] >= count

    try:
        wait_for(enough, seconds, f"{count} workers connected to {address}")
    except AssertionError:
        raise RuntimeError(f"{seen[0]} workers, not {count}, connected to {address} in {seconds} s") from None


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


