"""Fault-injection fixtures: run one scenario of tests/faults/scenarios.py and check its result row.

The `procs` fixture (tests/conftest.py) receives every server and worker a scenario starts, so their logs are
attached to a failing test; the scenario's Rig stops them (and its private redis-servers and proxies) itself,
and once more after the test in case the run was interrupted (a timeout).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.faults.harness import Load, Row, Scenario, run_scenario
from tests.faults.rig import code_under_test
from tests.support.processes import Proc


class RunFault(Protocol):
    def __call__(self, scenario: Scenario, load: Load | None = None) -> Awaitable[Row]: ...


@pytest.fixture
def run_fault(tmp_path: Path, procs: list[Proc]) -> Iterator[RunFault]:
    """`row = await run_fault(scenario)` (or `run_fault(scenario, load)`, a load other than the default, which
    the scenario may still tune): the row is printed (shown with -s or on failure)."""
    cleanups: list[Callable[[], None]] = []

    async def run(scenario: Scenario, load: Load | None = None) -> Row:
        tuned = scenario.tune(load or Load())  # as run_scenario will
        print(f"\n{scenario.description}\nload: {tuned.describe()}\ncode under test: {code_under_test()}")
        row = await run_scenario(scenario, tmp_path, load, procs=procs, cleanups=cleanups)
        print(row.report())
        return row

    yield run
    for cleanup in cleanups:
        cleanup()


def assert_no_loss(row: Row) -> None:
    """Every id the client was told was accepted reached its expected end; each callback ran once."""
    report = row.report()
    assert not row.fault_error, f"the fault was not injected:\n{report}"
    assert row.submitted > 0, report
    assert row.refused == 0, f"submits given up after retrying:\n{report}"
    assert row.lost == 0, f"accepted tasks lost:\n{report}"
    assert row.stuck == 0, f"accepted tasks stuck (not terminal):\n{report}"
    assert row.callbacks_fired == row.callbacks_expected, f"chord callbacks never executed:\n{report}"
    assert row.callback_extra == 0, f"chord callbacks executed more than once:\n{report}"
    assert row.started_after_cancel == 0, f"cancelled tasks started after the cancel returned:\n{report}"
    assert row.ok, report
