"""Dead letters: tasks that failed for good. List, replay (one, some, or all of a queue) and delete."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import convert
from ..access import CHANGE, READ, json_body
from ..context import dashboard, endpoint
from . import params

MAX_LISTED = 10_000


@endpoint(READ)
async def list_dead_letters(request: Request) -> Response:
    """?queue=&limit=&page_token= (oldest first; next_page_token is empty on the last page)."""
    limit = params.integer(request, "limit", 100, 1, MAX_LISTED)
    tasks, token = await dashboard(request).core.admin.dead_letter_page(
        request.query_params.get("queue", "").strip(), limit, request.query_params.get("page_token", ""))
    return JSONResponse({"tasks": [convert.task(t) for t in tasks], "next_page_token": token})


@endpoint(CHANGE)
async def replay(request: Request) -> Response:
    """{"task_ids": [...]} replays those; {"queue": "q"} (or {}) replays every dead letter of the
    queue (of every queue): each becomes a new task with the same call."""
    body = await json_body(request)
    task_ids = params.field(body, "task_ids", list, [])
    if not all(isinstance(t, str) for t in task_ids):
        raise params.bad("task_ids must be a list of strings")
    replayed = await dashboard(request).core.admin.replay(task_ids, params.field(body, "queue", str, ""))
    return JSONResponse({"task_ids": replayed})


@endpoint(CHANGE)
async def delete(request: Request) -> Response:
    """Take a task off the dead letters without replaying it (its record stays until it expires)."""
    await dashboard(request).core.admin.forget_dead_letters([request.path_params["task_id"]])
    return Response(status_code=204)


ROUTES = [
    Route("/api/v1/dead-letters", list_dead_letters, methods=["GET"]),
    Route("/api/v1/dead-letters/replay", replay, methods=["POST"]),
    Route("/api/v1/dead-letters/{task_id}", delete, methods=["DELETE"]),
]
