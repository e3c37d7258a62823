"""Fault d: one of two server replicas sharing Redis engines is killed with SIGKILL mid-load (and started
again after 3 s); workers and clients are connected to both, clients fail over to the other replica."""

from __future__ import annotations

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.scenarios import ReplicaKill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("engine", ["redis", "sqlite"])
async def test_kill_9_of_one_of_two_replicas_loses_nothing(run_fault: RunFault, engine: str) -> None:
    row = await run_fault(ReplicaKill(engine=engine))
    assert row.server_engines == {engine}, f"asked for {engine}, the servers ran on {row.server_engines}"
    assert_no_loss(row)
