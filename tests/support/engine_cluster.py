"""A server on one engine (broker and backend both) and one worker process of a test task
module, for end-to-end tests parametrised over engines; and a client of it whose failure shows
both processes' logs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor import Client
from tests.e2e.test_engines import FAST, engine_url
from tests.support.processes import SHOWN_ON_FAILURE, Proc, Server, WorkerProc, log_lines, wait_for_workers

# Starts a worker other than `conveyor worker MODULE` (a Node worker script, say): called with
# the cluster's directory (for its log), the server's address and the environment it must pass on.
StartWorker = Callable[[Path, str, dict[str, str]], Proc]


@dataclass
class Cluster:
    server: Server
    worker: Proc
    log_file: Path  # what the worker's tasks logged (CONVEYOR_TEST_LOG)

    @property
    def procs(self) -> list[Proc]:
        return [self.server, self.worker]

    def lines(self, prefix: str) -> list[str]:
        return log_lines(self.log_file, prefix)


@contextlib.contextmanager
def engine_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, module: str, concurrency: int,
    start_worker: StartWorker | None = None,
) -> Iterator[Cluster]:
    """A server whose broker and backend are both `request.param` ("sqlite", "redis", ...) and one
    worker of the task module `module` (or the one `start_worker` starts, `module` then naming
    only the directory); both stopped on leaving."""
    directory = tmp_path_factory.mktemp(f"{module.rsplit('.', 1)[-1]}-{request.param}")
    log_file = directory / "events.log"
    log_file.touch()
    broker = engine_url(request, "broker", request.param, directory)
    backend = engine_url(request, "backend", request.param, directory)
    started: list[Proc] = []
    try:
        server = Server(directory, broker, backend, env=FAST, wait=False)
        started.append(server)
        server.wait_ready()
        env = {"CONVEYOR_TEST_LOG": str(log_file)}
        if start_worker is None:
            worker: Proc = WorkerProc(directory, server.address, module=module, concurrency=concurrency, env=env)
        else:
            worker = start_worker(directory, server.address, env)
        started.append(worker)
        wait_for_workers(server.address, 1)
        yield Cluster(server, worker, log_file)
    finally:
        for proc in reversed(started):
            proc.stop()


@contextlib.contextmanager
def showing_logs(cluster: Cluster) -> Iterator[Cluster]:
    """While open, a failing test shows the logs of `cluster`'s processes (tests/conftest.py)."""
    SHOWN_ON_FAILURE[:] = cluster.procs
    try:
        yield cluster
    finally:
        SHOWN_ON_FAILURE.clear()


@contextlib.asynccontextmanager
async def cluster_client(cluster: Cluster) -> AsyncIterator[Client]:
    """A client of `cluster`; while it is open, a failing test shows the cluster's logs."""
    with showing_logs(cluster):
        async with Client(cluster.server.address) as connected:
            yield connected
