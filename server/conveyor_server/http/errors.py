"""Errors as JSON: every refusal is `{"error": {"status", "code", "message"}}` with the HTTP status
that Google's API guidelines give the gRPC code (`api/status.py` decides the code, once for
both APIs)."""

from __future__ import annotations

import logging

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from conveyor.errors import UnencodableValue

from ..api.status import RETRY_AFTER_KEY, refusal, unexpected
from ..core.task_index import ListingUnsupported

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
CODE_FOR_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                   405: "METHOD_NOT_ALLOWED", 409: "ALREADY_EXISTS", 415: "INVALID_ARGUMENT", 501: "UNIMPLEMENTED"}


class ApiError(Exception):
    """A refusal decided by the HTTP layer itself (a bad parameter, no token)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_body(status: int, code: str, message: str) -> dict[str, dict[str, object]]:
    return {"error": {"status": status, "code": code, "message": message}}


def refuse(code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    status = HTTP_STATUS.get(code, 500)
    return JSONResponse(error_body(status, code.name, message), status_code=status, headers=headers)


def response_for(exc: BaseException, where: str) -> JSONResponse:
    """The JSON error `exc` is reported with; a bug is logged and is a 500."""
    if isinstance(exc, ApiError):
        return refuse(exc.code, str(exc))
    if isinstance(exc, ListingUnsupported):
        return refuse(grpc.StatusCode.UNIMPLEMENTED, str(exc))
    if isinstance(exc, UnencodableValue):
        return refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    found = refusal(exc) or unexpected(exc, where)
    headers = {}
    for key, value in found.trailing_metadata:
        if key == RETRY_AFTER_KEY and isinstance(value, str):
            headers["Retry-After"] = str(max(1, round(int(value) / 1000)))
    return refuse(found.code, found.message, headers)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith("/api/"):
        return Response(exc.detail, status_code=exc.status_code, media_type="text/plain")
    code = CODE_FOR_STATUS.get(exc.status_code, "UNKNOWN")
    return JSONResponse(error_body(exc.status_code, code, str(exc.detail)), status_code=exc.status_code)
