"""Fault f: queued tasks are cancelled through replica B while workers pull from replica A. A cancelled task
ends CANCELLED and never starts after its Cancel returned; every other task succeeds."""

from __future__ import annotations

import pytest

from tests.faults.conftest import RunFault, assert_no_loss
from tests.faults.scenarios import CancelAcrossReplicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def test_cancel_through_one_replica_stops_queued_tasks_another_dispatches(run_fault: RunFault) -> None:
    row = await run_fault(CancelAcrossReplicas())
    assert row.cancelled > 0, f"no cancel target was still queued: the load drained too fast\n{row.report()}"
    assert_no_loss(row)
