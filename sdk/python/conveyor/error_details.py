"""Reads the google.rpc details a refusal carries (docs/errors.md): the ErrorInfo reason and
metadata, BadRequest field violations and the RetryInfo delay, from `grpc-status-details-bin`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

RETRY_AFTER_KEY = "retry-after-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path (e.g. "task.name"; empty: the request as a whole) and why."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """What a status's details say; empty when the server sent none (an older server)."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    retry_after: float | None = None


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """The details of a failed call's status (its trailers)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError has the Call's accessors
    except ValueError:  # details that contradict the call's own code or message
        status = None
    details = _unpack(status.details if status is not None else ())
    if details.retry_after is None:
        return ErrorDetails(details.reason, details.domain, details.metadata, details.field_violations,
                            _retry_after_trailer(error))
    return details


def status_trailer(code: grpc.StatusCode, message: str, details: Sequence[Any]) -> tuple[str, bytes]:
    """The `grpc-status-details-bin` trailer a unary call would carry (for Session answers)."""
    number: int = code.value[0]
    status = status_pb2.Status(code=number, message=message, details=list(details))
    return STATUS_DETAILS_KEY, bytes(status.SerializeToString())


def _unpack(details: Sequence[Any]) -> ErrorDetails:
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    retry = error_details_pb2.RetryInfo()
    found = {"info": False, "bad": False, "retry": False}
    for detail in details:
        for name, message in (("info", info), ("bad", bad), ("retry", retry)):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
                found[name] = True
    violations = tuple(FieldViolation(v.field, v.description) for v in bad.field_violations)
    delay = retry.retry_delay.ToTimedelta().total_seconds() if found["retry"] else None
    return ErrorDetails(info.reason, info.domain, dict(info.metadata), violations, delay)


def _retry_after_trailer(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(float(value) / 1000.0, 0.0)
            except (TypeError, ValueError):
                return None
    return None
