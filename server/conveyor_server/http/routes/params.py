"""Query-string and body values, checked: a bad one is a 400 naming the parameter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from starlette.requests import Request

from ..convert import state_number
from ..errors import ApiError


def bad(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise bad(f"{name} must be between {low} and {high}, got {value}")
    return value


def micros(request: Request, name: str) -> int | None:
    """A time as RFC 3339 (2024-05-01T12:00:00Z) or epoch seconds, in microseconds."""
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(float(raw) * 1_000_000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise bad(f"{name} must be a time such as 2024-05-01T12:00:00Z or epoch seconds, got {raw!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def states(request: Request, name: str = "state") -> frozenset[int]:
    """Repeated or comma-separated state names (SUCCESS, failure, ...)."""
    found: set[int] = set()
    for raw in request.query_params.getlist(name):
        for part in filter(None, (p.strip() for p in raw.split(","))):
            number = state_number(part)
            if number is None or number == 0:
                raise bad(f"{name} {part!r} is not a task state (PENDING, RECEIVED, STARTED, RETRY, SUCCESS, "
                          "FAILURE, CANCELLED, EXPIRED)")
            found.add(number)
    return frozenset(found)


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] when it has the right JSON type; the default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool) and bool not in _kinds(kind)):
        expected = " or ".join(k.__name__ for k in _kinds(kind))
        raise bad(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
