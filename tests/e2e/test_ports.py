"""`conveyor serve` never shares its port: gRPC turns SO_REUSEPORT on by default, and a second
server on a busy port would start and have the kernel split the clients between two unrelated
servers. It exits instead, with one line on stderr; so does a bind address it cannot have."""

from __future__ import annotations

import socket
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import grpc
import pytest

from conveyor.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from tests.support.processes import REPO, START_SECONDS, Server, free_port, serving

FRESH_CONNECTIONS = 40


def _serve(tmp_path: Path, port: int, host: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `conveyor serve` on its own database; it is expected to exit by itself."""
    db = tmp_path / "second.db"
    argv = [sys.executable, "-m", "conveyor_server.cli", "serve", "--port", str(port),
            "--broker", f"sqlite:///{db}", "--backend", f"sqlite:///{db}"]
    if host is not None:
        argv += ["--host", host]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=START_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"conveyor serve --port {port} kept running:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _answered_by(address: str, task_id: str) -> grpc.StatusCode:
    """GetResult over a new TCP connection (a local subchannel pool: no connection reuse)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        try:
            stub.GetResult(task_service_pb2.GetResultRequest(task_id=task_id), timeout=10)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return code
        return grpc.StatusCode.OK


def test_a_second_server_on_a_busy_port_exits_with_one_line_and_the_first_keeps_every_call(
    sqlite_server: Server, tmp_path: Path
) -> None:
    with grpc.insecure_channel(sqlite_server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        submitted = stub.Submit(task_service_pb2.SubmitRequest(task=task_pb2.Signature(name="add")), timeout=10)

    second = _serve(tmp_path, sqlite_server.port)

    assert second.returncode != 0
    assert second.stderr.splitlines() == [f"conveyor: cannot listen on 127.0.0.1:{sqlite_server.port}: address in use"]
    assert sqlite_server.alive() and serving(sqlite_server.address)
    # A second server would know nothing of this task: every connection reaches the first.
    answers = [_answered_by(sqlite_server.address, submitted.task_id) for _ in range(FRESH_CONNECTIONS)]
    assert answers == [grpc.StatusCode.OK] * FRESH_CONNECTIONS


def test_a_port_held_by_another_program_is_one_clear_line(tmp_path: Path) -> None:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        refused = _serve(tmp_path, port)

    assert refused.returncode != 0
    assert refused.stderr.splitlines() == [f"conveyor: cannot listen on 127.0.0.1:{port}: address in use"]


@pytest.mark.parametrize(("host", "reason"), [
    ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never a local address
    ("no-such-host.invalid", "unknown host"),
])
def test_a_bind_address_the_server_cannot_have_is_one_clear_line(tmp_path: Path, host: str, reason: str) -> None:
    port = free_port()

    refused = _serve(tmp_path, port, host)

    assert refused.returncode != 0
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"conveyor: cannot listen on {host}:{port}: {reason}")
