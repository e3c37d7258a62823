"""The Go SDK (sdk/go) from the outside: the README's Go worker and client, built with
`scripts/go` (Debian's Go packages, offline), in a chain Python → Go → Node, and the Go
conformance worker through `conveyor conformance`.

Needs `go` and Debian's golang-google-grpc-dev / golang-google-protobuf-dev; skipped without
them. The Node steps also need `node` and workers/node/node_modules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from conveyor import Client, chain, sig
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.e2e.test_node import NODE, NODE_DIR, NodeWorker
from tests.support.processes import REPO, Proc, Server, WorkerProc, wait_for_workers

GO_PACKAGES = Path("/usr/share/gocode/src/google.golang.org")
GO_BLOCK = re.compile(r"^```go\n(.*?)^```", re.S | re.M)
GO_FILE = re.compile(r"^// (\w+\.go)\b")

pytestmark = pytest.mark.skipif(
    shutil.which("go") is None or not (GO_PACKAGES / "grpc").is_dir() or not (GO_PACKAGES / "protobuf").is_dir(),
    reason="needs `go` and Debian's golang-go, golang-google-grpc-dev and golang-google-protobuf-dev",
)
needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules").is_dir(),
    reason="needs `node` on PATH and workers/node/node_modules (run `npm ci` in workers/node)",
)


def go_build(source: str, out: Path) -> Path:
    """`scripts/go build` of a file or a package under sdk/go (`./cmd/...`); fails with go's output."""
    built = subprocess.run(
        [str(REPO / "scripts" / "go"), "build", "-o", str(out), source],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, f"go build {source} failed:\n{built.stdout}{built.stderr}"
    return out


def readme_go_files() -> dict[str, str]:
    """The README's ```go blocks by the file name their first line gives (`// worker.go`)."""
    files = {}
    for block in GO_BLOCK.finditer((REPO / "README.md").read_text()):
        named = GO_FILE.match(block.group(1))
        assert named, f"a README Go block does not start with its file name: {block.group(1)[:60]!r}"
        files[named.group(1)] = block.group(1)
    return files


@pytest.fixture(scope="module")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The README's Go programs and the conformance worker, built once."""
    out = tmp_path_factory.mktemp("go")
    built = {}
    for name, code in readme_go_files().items():
        source = out / "src" / name.removesuffix(".go") / name  # one main package per directory
        source.parent.mkdir(parents=True)
        source.write_text(code)
        built[name] = go_build(str(source), out / name.removesuffix(".go"))
    built["conformance-worker"] = go_build("./cmd/conformance-worker", out / "conformance-worker")
    return built


def start_go_worker(binary: Path, server: Server, procs: list[Proc], log_dir: Path) -> Proc:
    worker = Proc([str(binary)], log_dir / f"{binary.name}.log", env={"CONVEYOR_ADDRESS": server.address})
    procs.append(worker)
    return worker


def test_the_readme_has_a_go_worker_and_client() -> None:
    assert {"worker.go", "client.go"} <= set(readme_go_files())


@needs_node
async def test_a_chain_runs_python_then_go_then_node(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, client: Client, go_bin: dict[str, Path]
) -> None:
    procs.append(WorkerProc(tmp_path, sqlite_server.address, module="tests.e2e.py_tasks", name="py-worker"))
    start_go_worker(go_bin["worker.go"], sqlite_server, procs, tmp_path)
    procs.append(NodeWorker(tmp_path, sqlite_server.address, queues=("default",)))
    wait_for_workers(sqlite_server.address, 3)
    submitted = await client.submit(chain(sig("py.add", 1, 2), sig("go.add", 10), sig("node.mul", 2)))
    assert await client.result(submitted.task_id, wait=30) == 26  # ((1 + 2) + 10) * 2
    steps = [await client.get_result(task_id) for task_id in submitted.task_ids]
    assert [step.name for step in steps] == ["py.add", "go.add", "node.mul"]
    assert worker_languages(sqlite_server.address)[steps[1].worker_id] == "go"


def worker_languages(address: str) -> dict[str, str]:
    """Connected workers by id, with the language their Hello gave."""
    with grpc.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        workers = admin.ListWorkers(admin_service_pb2.ListWorkersRequest(), timeout=5).workers
    return {worker.worker_id: worker.language for worker in workers}


@needs_node
def test_the_readme_go_client_runs_a_chain_on_go_and_node(
    tmp_path: Path, procs: list[Proc], sqlite_server: Server, go_bin: dict[str, Path]
) -> None:
    start_go_worker(go_bin["worker.go"], sqlite_server, procs, tmp_path)
    procs.append(NodeWorker(tmp_path, sqlite_server.address, queues=("default",)))
    wait_for_workers(sqlite_server.address, 2)
    ran = subprocess.run(
        [str(go_bin["client.go"])], env={**os.environ, "CONVEYOR_ADDRESS": sqlite_server.address},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip() == "30"


def test_the_go_worker_passes_the_conformance_kit(go_bin: dict[str, Path]) -> None:
    kit = subprocess.run(
        [sys.executable, "-m", "conveyor_server.cli", "conformance", "--worker-cmd", str(go_bin["conformance-worker"])],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert kit.returncode == 0, kit.stdout + kit.stderr
    assert "0 failed" in kit.stdout
