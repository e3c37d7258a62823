"""Shared fixtures. Real services are started on loopback by the fixture modules below;
processes a test starts are stopped after it, and their logs are shown when it fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import SHOWN_ON_FAILURE, Proc

pytest_plugins = [
    "tests.fixtures.broker_services",
    "tests.fixtures.backend_services",
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
