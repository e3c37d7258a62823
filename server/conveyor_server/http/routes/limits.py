"""Rate limits by task name, and the task registry (what workers registered)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...core.limits import RateLimit, rate_limit
from .. import convert
from ..access import CHANGE, READ, json_body
from ..context import dashboard, endpoint
from . import params


def limit_json(limit: RateLimit) -> dict[str, object]:
    return {"name": limit.name, "rate": limit.rate, "burst": limit.burst, "per_key": limit.per_key,
            "source": limit.source.value}


@endpoint(READ)
async def list_limits(request: Request) -> Response:
    limits = await dashboard(request).core.admin.list_rate_limits()
    return JSONResponse({"limits": [limit_json(limit) for limit in limits]})


@endpoint(CHANGE)
async def set_limit(request: Request) -> Response:
    """{"rate": "100/s", "burst": 0, "per_key": false} for the task name in the path."""
    body = await json_body(request)
    wanted = rate_limit(request.path_params["name"], params.field(body, "rate", str, ""),
                        params.field(body, "burst", int, 0), params.field(body, "per_key", bool, False))
    return JSONResponse(limit_json(await dashboard(request).core.admin.set_rate_limit(wanted)))


@endpoint(CHANGE)
async def delete_limit(request: Request) -> Response:
    await dashboard(request).core.admin.delete_rate_limit(request.path_params["name"])
    return Response(status_code=204)


@endpoint(READ)
async def registered_tasks(request: Request) -> Response:
    tasks = await dashboard(request).core.admin.registered_tasks()
    return JSONResponse({"tasks": [convert.message(t) for t in tasks]})


ROUTES = [
    Route("/api/v1/limits", list_limits, methods=["GET"]),
    Route("/api/v1/limits/{name}", set_limit, methods=["PUT"]),
    Route("/api/v1/limits/{name}", delete_limit, methods=["DELETE"]),
    Route("/api/v1/registered-tasks", registered_tasks, methods=["GET"]),
]
