"""The two processes the kit runs: a Conveyor server on the SQLite default in a temporary
directory, and the worker under test. Both log to files in that directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# The kit's server: short leases and heartbeats so lease handling shows within seconds.
LEASE_SECONDS = 4.0
HEARTBEAT_SECONDS = 0.5
STREAM_GRACE_SECONDS = 2.0
STOP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Tokens:
    """Bearer secrets: the kit's own (admin) and the worker's (role worker)."""

    admin: str
    worker: str

    @classmethod
    def new(cls) -> Tokens:
        return cls(admin=os.urandom(16).hex(), worker=os.urandom(16).hex())

    def config(self) -> list[dict[str, str]]:
        def entry(name: str, role: str, secret: str) -> dict[str, str]:
            return {"name": name, "role": role, "sha256": hashlib.sha256(secret.encode()).hexdigest()}

        return [entry("conformance-kit", "admin", self.admin), entry("worker-under-test", "worker", self.worker)]


def _without_conveyor_settings() -> dict[str, str]:
    """The environment minus CONVEYOR_* variables: the user's settings must not leak in. The
    test suite's CONVEYOR_TEST_* markers stay, so its leftover check sees the kit's processes."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith("CONVEYOR_") or key.startswith("CONVEYOR_TEST_")}


class _Logged:
    """A child process whose output goes to a log file."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def signal(self, number: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(number)

    def stop(self, kill: bool = False) -> None:
        """Stop the process (SIGTERM, SIGKILL after STOP_SECONDS; SIGKILL at once with `kill`) and
        whatever it started in its process group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children it left behind
        if self._log is not None:
            self._log.close()
            self._log = None


class ServerProcess(_Logged):
    """`conveyor serve` on 127.0.0.1:port (a free one unless given) with its SQLite file in
    `directory`, its tokens and short leases in a config file there."""

    def __init__(self, directory: Path, tokens: Tokens, port: int | None = None) -> None:
        super().__init__(directory / "server.log")
        self.directory = directory
        self.port = port or free_port()
        self.config_path = directory / "conveyor.yaml"
        settings = {
            "lease_seconds": LEASE_SECONDS, "heartbeat_interval_seconds": HEARTBEAT_SECONDS,
            "stream_grace_seconds": STREAM_GRACE_SECONDS, "http_port": 0,
            "security": {"tokens": tokens.config()},
        }
        self.config_path.write_text(json.dumps(settings))  # JSON is YAML

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "conveyor_server.cli", "serve", "--config", str(self.config_path),
                "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.directory / "data")]
        self._spawn(argv, _without_conveyor_settings())


class WorkerProcess(_Logged):
    """The worker under test: `command` split like a shell would, run without one."""

    def __init__(self, directory: Path, command: str, env: dict[str, str]) -> None:
        super().__init__(directory / "worker.log")
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("--worker-cmd is empty")
        self.env = env
        self.started_at = 0.0

    def start(self) -> None:
        environment = {**_without_conveyor_settings(), **self.env}
        self.started_at = time.monotonic()
        try:
            self._spawn(self.argv, environment)
        except OSError as exc:
            raise ValueError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()
