"""How refusals are reported (api/status.py): every status carries an ErrorInfo, INVALID_ARGUMENT
a BadRequest, a retry hint a RetryInfo; the SDK reads them back, from unary trailers and from a
Session's CallError; docs/errors.md lists every reason the server sends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

import conveyor_server
from conveyor import FieldViolation, InvalidArgument, ResourceExhausted, TaskNotFound
from conveyor.call_stream import call_error
from conveyor.errors import rpc_failed
from conveyor.v1 import task_pb2, task_service_pb2
from conveyor_server.api import status
from conveyor_server.api.session import _error
from conveyor_server.config import Limits
from conveyor_server.core import errors
from conveyor_server.core.validation import check_signature

REPO = Path(__file__).resolve().parents[2]


def unpacked(refusal: status.Refusal) -> dict[str, Any]:
    """The refusal's details as the trailer carries them, by type name."""
    trailers = dict(refusal.trailing_metadata)
    sent = rpc_status.to_status(refusal.status)
    assert trailers[status.STATUS_DETAILS_KEY] == dict(sent.trailing_metadata)[status.STATUS_DETAILS_KEY]
    found: dict[str, Any] = {}
    for detail in refusal.status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


def test_a_not_found_carries_its_reason_and_metadata_and_nothing_else() -> None:
    reported = status.refusal(errors.NotFound("no task 'x'", reason="TASK_NOT_FOUND", metadata={"task_id": "x"}))
    assert reported is not None
    details = unpacked(reported)
    assert set(details) == {"ErrorInfo"}
    info = details["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == ("TASK_NOT_FOUND", "conveyor.dev", {"task_id": "x"})
    assert reported.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reported.status.message == "no task 'x'"


@pytest.mark.parametrize(("kind", "reason"), [
    (errors.InvalidArgument, "INVALID_ARGUMENT"),
    (errors.NotFound, "NOT_FOUND"),
    (errors.AlreadyExists, "ALREADY_EXISTS"),
    (errors.FailedPrecondition, "FAILED_PRECONDITION"),
    (errors.ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (errors.PermissionDenied, "PERMISSION_DENIED"),
    (errors.Unavailable, "BACKEND_UNAVAILABLE"),
])
def test_each_error_kind_has_a_default_reason(kind: type[errors.CoreError], reason: str) -> None:
    reported = status.refusal(kind("refused"))
    assert reported is not None
    assert unpacked(reported)["ErrorInfo"].reason == reason


def test_invalid_argument_names_the_field_in_a_bad_request() -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        check_signature(task_pb2.Signature(name="add", queue="no spaces"), Limits())
    reported = status.refusal(refused.value)
    assert reported is not None
    violations = unpacked(reported)["BadRequest"].field_violations
    assert [(v.field, v.description) for v in violations] == [("task.queue", str(refused.value))]
    # Without a known field, the violation is the request's as a whole.
    whole = status.refusal(errors.InvalidArgument("bad"))
    assert whole is not None
    assert [v.field for v in unpacked(whole)["BadRequest"].field_violations] == [""]


def test_a_retry_hint_is_sent_as_retry_info_and_as_retry_after_ms() -> None:
    reported = status.refusal(errors.ResourceExhausted("slow down", retry_after_seconds=2.5, reason="RATE_LIMITED"))
    assert reported is not None
    details = unpacked(reported)
    assert details["RetryInfo"].retry_delay.ToMilliseconds() == 2500
    assert details["ErrorInfo"].reason == "RATE_LIMITED"
    assert dict(reported.trailing_metadata)[status.RETRY_AFTER_KEY] == "2500"
    without = status.refusal(errors.ResourceExhausted("too big"))
    assert without is not None
    assert "RetryInfo" not in unpacked(without)


def test_a_bug_is_reported_as_an_internal_error() -> None:
    reported = status.unexpected(RuntimeError("boom"), "test")
    assert reported.code == grpc.StatusCode.UNKNOWN
    assert unpacked(reported)["ErrorInfo"].reason == status.INTERNAL_ERROR


def test_the_sdk_reads_the_details_of_a_unary_refusal() -> None:
    reported = status.refusal(errors.InvalidArgument("task: name is empty", field="task.name"))
    assert reported is not None
    error = rpc_failed(grpc.aio.AioRpcError(
        reported.code, grpc.aio.Metadata(), grpc.aio.Metadata(*reported.trailing_metadata), reported.message
    ))
    assert isinstance(error, InvalidArgument)
    assert (error.reason, error.metadata, error.retry_after) == ("INVALID_ARGUMENT", {}, None)
    assert error.field_violations == (FieldViolation("task.name", "task: name is empty"),)


def test_the_sdk_reads_the_same_details_from_a_session_call_error() -> None:
    reported = status.refusal(errors.ResourceExhausted(
        "queue full", retry_after_seconds=1.0, reason="QUEUE_FULL", metadata={"queue": "small"}
    ))
    assert reported is not None
    answer = _error(reported).error
    error = rpc_failed(call_error(task_service_pb2.CallError.FromString(answer.SerializeToString())))
    assert isinstance(error, ResourceExhausted)
    assert (error.reason, error.metadata, error.retry_after) == ("QUEUE_FULL", {"queue": "small"}, 1.0)


def test_an_error_without_details_has_empty_ones() -> None:
    error = rpc_failed(grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(("retry-after-ms", "300")), "gone"
    ))
    assert isinstance(error, TaskNotFound)
    assert (error.reason, error.metadata, error.field_violations, error.retry_after) == ("", {}, (), 0.3)


def test_docs_list_every_reason_the_server_sends() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (REPO / "docs/errors.md").read_text(), re.MULTILINE))
    sent = {"UNAUTHENTICATED", status.INTERNAL_ERROR}  # auth uses its code's name; a bug's reason
    # The package as imported (mutation testing runs a staged copy of it, not server/ itself).
    for path in Path(conveyor_server.__file__).parent.rglob("*.py"):
        # (?!XX): mutation testing's staged copy also holds mutated strings ("XXQUEUE_FULLXX").
        sent.update(re.findall(r'(?:reason=|REASON = |UNSUPPORTED = )"(?!XX)([A-Z_]+)"', path.read_text()))
    assert "TASK_NOT_FOUND" in sent and "QUEUE_FULL" in sent  # the scan finds raise sites
    assert sent <= documented, f"undocumented reasons: {sorted(sent - documented)}"
