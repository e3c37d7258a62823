"""InspectTask beyond the result (core/inspection.py): lease holder and expiry, deliveries,
whether follow-ups are still owed; on two replicas over the memory engines."""

from __future__ import annotations

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor.values import seconds_of
from conveyor_server.core.errors import NotFound
from conveyor_server.core.inspection import LEASED
from conveyor_server.core.outbox import FOLLOW_UPS, PUBLISH, Outbox
from tests.unit.replicas import Replicas, lease_all, quick_repairs, replicas, run_ready
from tests.unit.test_durability import chain, lone, submit, task

__all__ = ["quick_repairs", "replicas"]  # fixtures used by the tests below


async def test_a_queued_task_shows_no_lease_and_its_delivery_count(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="q1")))
    shown = await replicas.b.admin.inspection("q1")
    assert shown.result.task_id == "q1" and shown.enqueued
    assert shown.lease_holder == "" and not shown.HasField("lease_expires_at")
    assert shown.deliveries == 0 and not shown.follow_ups_pending


async def test_a_leased_task_shows_its_holder_and_when_the_lease_ends(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="l1")))
    await lease_all(replicas.a, "worker-7")
    shown = await replicas.b.admin.inspection("l1")
    record = await replicas.a.store.get("l1")
    assert record is not None
    leased_at = max(seconds_of(t.at) for t in record.result.history if t.state in LEASED)
    lease = replicas.b.settings.lease_seconds
    assert shown.lease_holder == "worker-7" and shown.deliveries == 1
    assert seconds_of(shown.lease_expires_at) == pytest.approx(leased_at + lease, abs=1e-6)

    # A renewal later than the transition moves the expiry.
    renewed_at = leased_at + 5

    def renew(task_id: str, current: records_pb2.TaskRecord) -> bool:
        current.lease_renewed_at.FromNanoseconds(round(renewed_at * 1e9))
        return True

    await replicas.a.store.update_loaded(["l1"], renew)
    shown = await replicas.b.admin.inspection("l1")
    assert seconds_of(shown.lease_expires_at) == pytest.approx(renewed_at + lease, abs=1e-6)


async def test_an_ended_task_shows_no_lease(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="e1")))
    await run_ready(replicas.a)
    shown = await replicas.b.admin.inspection("e1")
    assert shown.lease_holder == "" and not shown.HasField("lease_expires_at") and shown.deliveries == 1


async def test_follow_ups_still_owed_are_shown_for_the_task_they_name_only(replicas: Replicas) -> None:
    await submit(replicas.a, lone(task(task_id="f1")), lone(task(task_id="f2")))
    outbox = Outbox(replicas.a.store.backend)
    await outbox.promise(FOLLOW_UPS, task_ids=["f1"])
    await outbox.promise(PUBLISH, task_ids=["f2"])  # a publish owed is not a follow-up owed
    assert (await replicas.b.admin.inspection("f1")).follow_ups_pending
    assert not (await replicas.b.admin.inspection("f2")).follow_ups_pending


async def test_a_workflow_id_shows_the_workflows_result_alone_and_an_unknown_id_is_not_found(
    replicas: Replicas,
) -> None:
    [response] = await submit(replicas.a, chain(task(task_id="c1"), task(task_id="c2")))
    shown = await replicas.b.admin.inspection(response.workflow_id)
    assert shown.result.task_id == response.workflow_id and shown.result.state == result_pb2.TASK_STATE_PENDING
    assert shown.deliveries == 0 and shown.workflow_node_id == ""
    with pytest.raises(NotFound):
        await replicas.b.admin.inspection("nope")
