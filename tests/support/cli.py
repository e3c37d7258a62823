"""Running the real `conveyor` CLI in tests, and the SQLite server with one worker that CLI tests share."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import REPO, Server, WorkerProc, wait_for_workers


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def conveyor(*args: str, address: str | None = None, timeout: float = 60.0) -> Ran:
    """Run `conveyor ARGS` (the global --address, when given, after the subcommand as users may)."""
    argv = [sys.executable, "-m", "conveyor_server.cli", *args, *(["--address", address] if address else [])]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    return Ran(done.returncode, done.stdout, done.stderr)


def sqlite_server_with_worker(tmp: Path) -> Iterator[Server]:
    """A server on the SQLite default (its file in `tmp`) with one worker on the default queue;
    for a module-scoped fixture: `yield from sqlite_server_with_worker(tmp_path_factory.mktemp(...))`."""
    url = f"sqlite:///{tmp / 'conveyor.db'}"
    started = Server(tmp, url, url)
    worker = WorkerProc(tmp, started.address)
    try:
        wait_for_workers(started.address, 1)
        yield started
    finally:
        worker.stop()
        started.stop()
