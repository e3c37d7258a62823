"""Fault e: a worker is killed with SIGKILL every 2 s (and replaced) while the load runs."""

from __future__ import annotations

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.scenarios import WorkerKill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("engine", ["redis", "sqlite"])
async def test_killing_a_worker_every_2_s_loses_nothing_and_runs_each_chord_callback_once(
    run_fault: RunFault, engine: str
) -> None:
    row = await run_fault(WorkerKill(engine=engine))
    assert row.server_engines == {engine}, f"asked for {engine}, the servers ran on {row.server_engines}"
    assert_no_loss(row)
