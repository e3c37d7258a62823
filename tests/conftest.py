"""Shared fixtures. Real services are started on loopback by the fixture modules below;
processes a test starts are stopped after it, and their logs are shown when it fails.

Every process the run started (tests/support/processes.py keeps the registry) is killed with
its process group when the session ends, however it ends: passed, failed, timed out, Ctrl-C or
SIGTERM. Session fixtures drop the keys, queues and exchanges of the run's prefix.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.support.processes import RUN_ID, SHOWN_ON_FAILURE, Proc, stop_all

pytest_plugins = [
    "tests.fixtures.broker_services",
    "tests.fixtures.backend_services",
    "tests.fixtures.rabbitmq_node",
    "tests.fixtures.redis_cluster",
]


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes registered here are stopped after the test; their logs shown on failure."""
    SHOWN_ON_FAILURE.clear()
    yield SHOWN_ON_FAILURE
    for proc in reversed(SHOWN_ON_FAILURE):
        proc.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if call.when == "call" and report.failed:  # type: ignore[attr-defined]
        for proc in SHOWN_ON_FAILURE:
            title = f"log of {' '.join(proc.argv[-6:])}"
            report.sections.append((title, proc.output()[-4000:]))  # type: ignore[attr-defined]
    return report


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI time-out, `kill`) would end pytest without its finalisers: make it an
    # interrupt, which pytest handles like Ctrl-C (fixtures torn down, the session finished).
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_report_header(config: pytest.Config) -> str:
    return f"conveyor test run: {RUN_ID} (the prefix of its keys, queues and process environment)"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session-wide finaliser: after every fixture's teardown, no process of the run lives on."""
    left = stop_all()
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"killed {len(left)} process(es) still running at the end of the session:")
            for command in left:
                reporter.write_line(f"  {command[:200]}")
