"""InspectTask's lease expiry (core/inspection.py): the edge mutation testing found unpinned (a
holder connected to this replica and heard from since its lease was written moves the expiry).
Memory engines with the core on a ManualClock."""

from __future__ import annotations

import pytest

from conveyor.v1 import worker_service_pb2
from conveyor.values import seconds_of
from tests.unit.clocks import ManualClock
from tests.unit.replicas import lease_all
from tests.unit.test_durability import QUEUE, Engines, lone, manual, manual_engines, quick_repairs, submit, task

__all__ = ["manual", "manual_engines", "quick_repairs"]  # fixtures used by the tests below


async def test_the_lease_ends_a_lease_after_the_holder_was_last_heard_from_on_this_replica(
    manual_engines: Engines, manual: ManualClock
) -> None:
    core = manual_engines.core
    await submit(core, lone(task(task_id="h1")))
    session = core.connections.open(worker_service_pb2.Hello(worker_id="w1", queues=[QUEUE], max_in_flight=1))
    claim = await lease_all(core, "w1")
    await session.settle(0, claim.leases)
    leased_at = manual.wall
    lease = core.settings.lease_seconds

    shown = await core.admin.inspection("h1")
    assert seconds_of(shown.lease_expires_at) == pytest.approx(leased_at + lease, abs=1e-6)

    manual.advance(50.0)
    session.last_seen = manual.monotonic - 10.0  # its last message came 10 s ago, 40 s after the lease
    shown = await core.admin.inspection("h1")
    assert shown.lease_holder == "w1"
    assert seconds_of(shown.lease_expires_at) == pytest.approx(leased_at + 40.0 + lease, abs=1e-6)
