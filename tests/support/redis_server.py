"""A private `redis-server` for fault-injection tests: stopped (any signal) and started again on the
same port and data directory, so what it had written to its append-only file survives.

    server = RedisServer(tmp_path / "redis")       # a free loopback port, AOF on, fsync always
    server.start()
    url = server.url(db=0)
    server.stop(signal.SIGKILL)                      # crash: no shutdown save, only the AOF remains
    server.start()                                   # same port, same dir: the AOF is replayed

Never touches the shared Redis on 6379. `stop()` without a signal is a clean SIGTERM shutdown.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.support.processes import end_group, free_port, track

LOOPBACK = "127.0.0.1"
START_SECONDS = 20.0
STOP_SECONDS = 15.0
PORT_ATTEMPTS = 3


def answers(port: int, timeout: float = 0.5) -> bool:
    """PING over a raw socket: True once the server has loaded its data and accepts commands."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process at a time on a fixed port and directory (see the module docstring)."""

    def __init__(self, data_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.log_path = data_dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def url(self, db: int = 0, prefix: str = "") -> str:
        base = f"redis://{self.address}/{db}"
        return f"{base}?prefix={prefix}" if prefix else base

    def argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(self.log_path), "--protected-mode", "no", *self.extra_args,
        ]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start (or start again) on the same port and dir; returns once it answers PING.

        The first start may pick another free port if the chosen one was taken meanwhile; later starts
        keep the port, since clients (and proxies) already point at it."""
        if self.alive():
            raise RuntimeError(f"redis-server on {self.address} is already running")
        attempts = PORT_ATTEMPTS if self.starts == 0 else 1
        for attempt in range(attempts):
            try:
                self._launch()
                return self
            except _Exited:
                if attempt + 1 == attempts:
                    raise
                self.port = free_port()
        return self

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        track(self.process)  # killed at the end of the test session even if nobody stops it
        self.starts += 1
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _Exited(f"redis-server exited with {self.process.returncode}; see {self.log_path}:\n"
                              f"{self.log_tail()}")
            if answers(self.port):
                return
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"redis-server did not answer on {self.address} in {START_SECONDS} s:\n{self.log_tail()}")

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """Send `signum` and wait for the process to end (SIGKILL if it lingers); returns its exit code.

        SIGTERM is a clean shutdown (Redis fsyncs the AOF); SIGKILL is a crash. Idempotent."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_SECONDS)
        return end_group(process)  # it has ended: this only unregisters it

    def restart(self, signum: int = signal.SIGTERM, down_seconds: float = 0.0) -> None:
        """Stop with `signum`, stay down `down_seconds`, start again on the same port and dir."""
        self.stop(signum)
        time.sleep(down_seconds)
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Exited(RuntimeError):
    """redis-server quit while starting (most often: another process took the port first)."""
