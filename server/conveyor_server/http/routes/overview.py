"""The overview: workers, queue totals, recent failures and the last hour's samples."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...backends.task_index import TaskQuery
from ...core.records import TaskStates
from .. import convert
from ..access import READ
from ..context import Dashboard, dashboard, endpoint

RECENT_FAILURES = 10


async def recent_failures(dash: Dashboard) -> dict[str, Any]:
    indexer = dash.core.admin.indexer
    if not indexer.enabled:
        return {"tasks": None, "reason": indexer.unsupported}
    page = await indexer.find(TaskQuery(states=frozenset({TaskStates.TASK_STATE_FAILURE}), limit=RECENT_FAILURES))
    return {"tasks": [convert.task(r.result) for r in page.records], "reason": ""}


@endpoint(READ)
async def overview(request: Request) -> Response:
    dash = dashboard(request)
    queues = (await dash.live.queue_table())["queues"]
    return JSONResponse({
        "workers": len(dash.core.registry.sessions),
        "queues": len(queues),
        "ready": sum(q["ready"] for q in queues),
        "delayed": sum(q["delayed"] for q in queues),
        "in_flight": sum(q["in_flight"] for q in queues),
        "paused": sum(1 for q in queues if q["paused"]),
        "recent_failures": await recent_failures(dash),
    })


@endpoint(READ)
async def history(request: Request) -> Response:
    """The samples of the last hour, oldest first."""
    sampler = dashboard(request).sampler
    return JSONResponse({"interval": sampler.interval, "samples": [s.json() for s in sampler.history]})


ROUTES = [
    Route("/api/v1/overview", overview, methods=["GET"]),
    Route("/api/v1/metrics/history", history, methods=["GET"]),
]
