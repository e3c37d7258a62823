"""`conveyor conformance` against the Python, Node and Go conformance workers (they pass), and
against broken workers (the kit fails them, naming the fault)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO, RUN_ID

PYTHON_WORKER = f"{sys.executable} workers/python/conformance_worker.py"
BROKEN_WORKER = f"{sys.executable} tests/worker_conformance/broken_worker.py"
NODE_WORKER = "node workers/node/conformance-worker.js"
GO_WORKER_PACKAGE = "sdk/go/cmd/conformance-worker"
KIT_SECONDS = 120
GO_BUILD_SECONDS = 300

pytestmark = pytest.mark.timeout(KIT_SECONDS + 30)


def conformance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "conveyor_server.cli", "conformance", *args]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=KIT_SECONDS, check=False,
                          env={**os.environ, "CONVEYOR_TEST_RUN": RUN_ID, **(env or {})})


def row(output: str, scenario: str) -> str:
    """The table's line for `scenario`, with its spaces collapsed."""
    for line in output.splitlines():
        if line.split(" ", 1)[0] == scenario:
            return " ".join(line.split())
    raise AssertionError(f"no row for {scenario} in:\n{output}")


def worker_command(language: str, tmp_path: Path) -> str:
    """The reference conformance worker's command; skips when its toolchain is missing."""
    if language == "python":
        return PYTHON_WORKER
    if language == "node":
        if shutil.which("node") is None:
            pytest.skip("node is not installed")
        return NODE_WORKER
    if shutil.which("go") is None or not (REPO / GO_WORKER_PACKAGE).is_dir():
        pytest.skip("go or the Go SDK's conformance worker is missing")
    binary = tmp_path / "go-conformance-worker"
    built = subprocess.run([str(REPO / "scripts" / "go"), "build", "-o", str(binary), "./cmd/conformance-worker"],
                           capture_output=True, text=True, timeout=GO_BUILD_SECONDS, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    return str(binary)


@pytest.mark.timeout(GO_BUILD_SECONDS + KIT_SECONDS + 30)
@pytest.mark.parametrize("language", ["python", "node", "go"])
def test_the_reference_worker_passes_every_scenario(language: str, tmp_path: Path) -> None:
    ran = conformance("--worker-cmd", worker_command(language, tmp_path))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "conformance: passed (15 passed, 0 failed, 0 not run)" in ran.stdout


def test_a_worker_whose_echo_returns_a_wrong_value_fails_with_what_it_returned() -> None:
    ran = conformance("--worker-cmd", BROKEN_WORKER, "--only", "results,bytes", env={"CONFORMANCE_BREAK": "echo"})
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert row(ran.stdout, "results").startswith("results FAIL")
    assert "conformance.echo(0) returned [0], expected 0" in row(ran.stdout, "results")
    assert row(ran.stdout, "bytes").startswith("bytes PASS")
    assert "conformance: FAILED (2 passed, 1 failed, 0 not run)" in ran.stdout


def test_a_worker_that_ignores_cancels_fails_the_drain_that_waits_for_the_cancelled_task() -> None:
    ran = conformance("--worker-cmd", BROKEN_WORKER, "--only", "cancel,drain", env={"CONFORMANCE_BREAK": "cancel"})
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "the worker did not exit within 15 s of SIGTERM" in row(ran.stdout, "drain")
    assert row(ran.stdout, "drain").startswith("drain FAIL")


def test_a_worker_that_exits_at_once_fails_hello_and_the_rest_do_not_run() -> None:
    ran = conformance("--worker-cmd", f"{sys.executable} -c 'raise SystemExit(3)'", "--only", "results")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "the worker exited with status 3" in row(ran.stdout, "hello")
    assert row(ran.stdout, "results") == "results SKIP - not run: the worker never became ready (see hello)"


def test_an_unknown_scenario_name_is_a_usage_error() -> None:
    ran = conformance("--worker-cmd", PYTHON_WORKER, "--only", "results,nonsense")
    assert ran.returncode == 2
    assert "unknown scenario(s) nonsense" in ran.stderr


@pytest.mark.parametrize(("fault", "scenario", "reason"), [
    ("resend", "reconnect-resend", "did not send its result again after reconnecting"),  # forgets unacked results
    ("held", "reconnect-held", "did not name the running task in `held`"),  # its Hello names no held task
])
def test_a_worker_that_breaks_a_reconnect_rule_fails_that_scenario_saying_why(
    fault: str, scenario: str, reason: str
) -> None:
    ran = conformance("--worker-cmd", BROKEN_WORKER, "--only", scenario, env={"CONFORMANCE_BREAK": fault})
    assert ran.returncode == 1, ran.stdout + ran.stderr
    failed = row(ran.stdout, scenario)
    assert failed.startswith(f"{scenario} FAIL")
    assert reason in failed
