"""When a task looks lost (core/repair.py's judge and its signs of life), on records built by hand
with explicit times: each boundary is pinned at the second it moves, so a verdict that comes a
moment early (republishing a live task) or late (a lost task waits longer) fails here."""

from __future__ import annotations

import pytest

from conveyor.internal.v1 import records_pb2
from conveyor.values import set_seconds
from conveyor_server.core.records import TaskStates
from conveyor_server.core.repair import MAX_DOUBLINGS, judge, last_sign_of_life, replaces_stale_lease

T0 = 1_000_000.0  # when the task was published
AFTER = 60.0  # repair_after
LEASE_AFTER = 90.0  # repair_after for a running task


def record(
    state: int = TaskStates.TASK_STATE_PENDING, *, changed: float | None = None, **times: float
) -> records_pb2.TaskRecord:
    """A published record in `state`; `changed`: its last transition; `times`: enqueued_at (T0 by
    default), retry_at, lease_renewed_at, repaired_at, eta, countdown (seconds)."""
    made = records_pb2.TaskRecord(enqueued=True, lease_token="lease-1")
    made.result.task_id = "t-1"
    made.result.state = state  # type: ignore[assignment]
    set_seconds(made.enqueued_at, times.pop("enqueued_at", T0))
    if changed is not None:
        set_seconds(made.result.history.add().at, changed)
    for name in ("retry_at", "lease_renewed_at", "repaired_at"):
        if name in times:
            set_seconds(getattr(made, name), times.pop(name))
    if "eta" in times:
        set_seconds(made.result.signature.eta, times.pop("eta"))
    if "countdown" in times:
        set_seconds(made.result.signature.countdown, times.pop("countdown"))
    assert not times, f"unknown times {times}"
    return made


def lost_at(made: records_pb2.TaskRecord, backoff: bool = True) -> float:
    verdict = judge(made, T0, AFTER, LEASE_AFTER, backoff)
    assert verdict is not None
    return verdict.due


# -- which tasks are watched at all ------------------------------------------------------------

@pytest.mark.parametrize("state", [TaskStates.TASK_STATE_SUCCESS, TaskStates.TASK_STATE_FAILURE,
                                   TaskStates.TASK_STATE_CANCELLED, TaskStates.TASK_STATE_UNSPECIFIED])
def test_ended_and_unset_tasks_are_not_watched(state: int) -> None:
    assert judge(record(state), T0 + 10 * AFTER, AFTER, LEASE_AFTER) is None


def test_a_workflow_step_not_published_yet_is_not_watched() -> None:
    made = record()
    made.enqueued = False
    assert judge(made, T0 + 10 * AFTER, AFTER, LEASE_AFTER) is None


def test_a_replaced_task_is_not_watched() -> None:
    made = record(TaskStates.TASK_STATE_STARTED)
    made.replaced_by = "wf-replacement"
    assert judge(made, T0 + 10 * AFTER, AFTER, LEASE_AFTER) is None


# -- when a queued task looks lost --------------------------------------------------------------

def test_a_pending_task_looks_lost_exactly_repair_after_its_publication() -> None:
    made = record()
    early = judge(made, T0 + AFTER - 0.001, AFTER, LEASE_AFTER)
    on_time = judge(made, T0 + AFTER, AFTER, LEASE_AFTER)
    assert early is not None and not early.lost
    assert on_time is not None and on_time.lost
    assert on_time.due == T0 + AFTER
    assert on_time.age == AFTER


def test_a_pending_task_counts_from_its_latest_transition_when_that_is_later() -> None:
    assert lost_at(record(changed=T0 + 5)) == T0 + 5 + AFTER
    assert lost_at(record(changed=T0 - 5)) == T0 + AFTER  # publication is later


def test_a_pending_task_counts_from_its_eta_never_before() -> None:
    assert lost_at(record(eta=T0 + 300)) == T0 + 300 + AFTER
    assert lost_at(record(eta=T0 - 300)) == T0 + AFTER


def test_a_countdown_counts_from_the_publication() -> None:
    assert lost_at(record(countdown=30)) == T0 + 30 + AFTER
    assert last_sign_of_life(record(countdown=30, enqueued_at=T0 + 7)) == T0 + 37


def test_a_retry_counts_from_when_its_next_attempt_was_due() -> None:
    made = record(TaskStates.TASK_STATE_RETRY, retry_at=T0 + 40, changed=T0 + 1)
    assert last_sign_of_life(made) == T0 + 40
    assert lost_at(made) == T0 + 40 + AFTER
    # A retry's publication time is no sign of life; its last transition is, when later.
    assert last_sign_of_life(record(TaskStates.TASK_STATE_RETRY, retry_at=T0 - 9, changed=T0 + 3,
                                    enqueued_at=T0 + 20)) == T0 + 3


# -- when a running task looks lost -------------------------------------------------------------

@pytest.mark.parametrize("state", [TaskStates.TASK_STATE_RECEIVED, TaskStates.TASK_STATE_STARTED])
def test_a_running_task_gets_the_lease_repair_after_from_its_last_renewal(state: int) -> None:
    renewed = record(state, changed=T0 + 2, lease_renewed_at=T0 + 50, enqueued_at=T0 + 99)
    assert last_sign_of_life(renewed) == T0 + 50  # publication is no sign of life once it runs
    assert lost_at(renewed) == T0 + 50 + LEASE_AFTER
    moved = record(state, changed=T0 + 70, lease_renewed_at=T0 + 50)
    assert lost_at(moved) == T0 + 70 + LEASE_AFTER


# -- repeated repairs back off ------------------------------------------------------------------

def test_repeated_repairs_of_one_task_wait_twice_as_long_each_time() -> None:
    due = []
    for repairs in (1, 2, 3, 4):
        made = record(changed=T0, repaired_at=T0 + 100)
        made.repairs = repairs
        due.append(lost_at(made) - (T0 + 100))
    assert due == [AFTER, 2 * AFTER, 4 * AFTER, 8 * AFTER]


def test_the_backoff_stops_doubling_and_a_manual_repair_skips_it() -> None:
    made = record(changed=T0, repaired_at=T0 + 100)
    made.repairs = MAX_DOUBLINGS + 5
    assert lost_at(made) == T0 + 100 + AFTER * 2**MAX_DOUBLINGS
    assert lost_at(made, backoff=False) == T0 + AFTER


def test_the_backoff_never_brings_the_verdict_forward() -> None:
    made = record(changed=T0 + 500, repaired_at=T0)
    made.repairs = 1
    assert lost_at(made) == T0 + 500 + AFTER


# -- a repair's copy of a running task ----------------------------------------------------------

def test_a_repairs_copy_replaces_only_the_lease_it_found_stale_and_only_while_unrenewed() -> None:
    made = record(TaskStates.TASK_STATE_STARTED, lease_renewed_at=T0 + 10, repaired_at=T0 + 10)
    copy = records_pb2.TaskMessage(repairs_lease="lease-1")
    assert replaces_stale_lease(made, copy)  # renewed no later than the repair: still stale
    assert not replaces_stale_lease(made, records_pb2.TaskMessage(repairs_lease="lease-0"))
    assert not replaces_stale_lease(made, records_pb2.TaskMessage())  # not a repair's copy
    set_seconds(made.lease_renewed_at, T0 + 10.5)
    assert not replaces_stale_lease(made, copy)  # the lease showed life after the repair
