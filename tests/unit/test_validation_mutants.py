"""Signature checks: the boundaries mutation testing found unpinned (exactly at a limit is
accepted, one past it is refused) and the place an error names. The clock is injected."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import task_pb2, workflow_pb2
from conveyor_server.config import Limits
from conveyor_server.core import validation
from conveyor_server.core.errors import InvalidArgument
from conveyor_server.core.validation import MAX_ETA_SECONDS, check_signature, check_workflow

NOW = 1_700_000_000
LIMITS = Limits(max_args_bytes=100)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "time", SimpleNamespace(time=lambda: float(NOW)))


def sig(**fields: object) -> task_pb2.Signature:
    return task_pb2.Signature(name="n", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "accepted",
    [
        sig(eta=Timestamp(seconds=NOW + MAX_ETA_SECONDS)),  # exactly a year ahead
        sig(eta=Timestamp(seconds=1)),  # the first second after 1970
        sig(eta=Timestamp(seconds=NOW, nanos=999_999_999)),
        sig(countdown=Duration(seconds=MAX_ETA_SECONDS)),  # exactly a year
        sig(countdown=Duration(nanos=1)),
        sig(retry=task_pb2.RetryPolicy(initial=Duration(), max=Duration(nanos=500_000_000))),  # zero and under 1 s
        sig(args=[task_pb2.Value(string_value="x" * 98)]),  # exactly max_args_bytes
    ],
    ids=["eta-a-year-ahead", "eta-1970", "eta-max-nanos", "countdown-a-year", "countdown-1ns", "retry-short",
         "args-at-limit"],
)
def test_a_signature_exactly_at_a_limit_is_accepted(accepted: task_pb2.Signature) -> None:
    check_signature(accepted, LIMITS)


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (sig(eta=Timestamp(seconds=NOW + MAX_ETA_SECONDS + 1)), "eta is more than a year ahead"),
        (sig(eta=Timestamp(seconds=NOW, nanos=1_000_000_000)), "eta has invalid nanos 1000000000"),
        (sig(countdown=Duration(seconds=MAX_ETA_SECONDS, nanos=500_000_000)), "countdown is more than a year"),
        (sig(args=[task_pb2.Value(string_value="x" * 99)]), "over the limit of 100"),
    ],
)
def test_a_signature_just_past_a_limit_is_refused(refused: task_pb2.Signature, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_signature(refused, LIMITS)


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (sig(countdown=Duration(seconds=-1)), r"^requests\[2\]\.task: countdown is negative"),
        (sig(retry=task_pb2.RetryPolicy(max_attempts=-1)), r"^requests\[2\]\.task: retry.max_attempts is negative"),
    ],
)
def test_a_refusal_names_where_the_bad_field_is(refused: task_pb2.Signature, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_signature(refused, LIMITS, "requests[2].task")


CALLBACK = ".on_success[0]"  # where a callback of the task at `where` is


@pytest.mark.parametrize(
    ("where", "shown"),
    [
        ("w" * (160 - len(CALLBACK)), "w" * (160 - len(CALLBACK)) + CALLBACK),  # 160 characters: kept whole
        ("a" * 60 + "m" * 11 + "z" * (90 - len(CALLBACK)), "a" * 60 + "..." + "z" * (90 - len(CALLBACK)) + CALLBACK),
    ],
    ids=["at-160", "at-161"],
)
def test_a_place_in_a_refusal_is_cut_to_its_first_60_and_last_90_characters_past_160(where: str, shown: str) -> None:
    too_deep = sig(on_success=[sig()])
    with pytest.raises(InvalidArgument) as refused:
        check_signature(too_deep, Limits(max_workflow_depth=1), where)
    assert str(refused.value).startswith(f"{shown}: callbacks nest deeper than the limit of 1")


def test_headers_of_exactly_one_mib_are_named_in_mib() -> None:
    with pytest.raises(InvalidArgument, match=r"^task: headers are 1 MiB, over the 64 KiB limit$"):
        check_signature(sig(headers={"k": "x" * ((1 << 20) - 1)}), LIMITS)


def test_a_map_expanding_into_exactly_the_task_limit_is_accepted() -> None:
    items = [task_pb2.Value(int_value=n) for n in range(3)]
    mapped = workflow_pb2.Workflow(map=workflow_pb2.Map(task=sig(), items=items, chunk_size=1))  # 3 chunk tasks
    assert check_workflow(mapped, Limits(max_workflow_tasks=3)) == 3
    with pytest.raises(InvalidArgument, match=r"^workflow\.map: expands into 3 tasks, over the limit of 2"):
        check_workflow(mapped, Limits(max_workflow_tasks=2))
