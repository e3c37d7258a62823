"""Queues (depths, pause, resume, purge) and the workers connected to this replica."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..access import CHANGE, READ
from ..context import dashboard, endpoint


@endpoint(READ)
async def list_queues(request: Request) -> Response:
    """Every queue: ready, delayed, in flight, unroutable, paused, and submissions per second
    (this replica, from the last sample)."""
    return JSONResponse(await dashboard(request).live.queue_table())


@endpoint(CHANGE)
async def pause(request: Request) -> Response:
    await dashboard(request).core.admin.pause(request.path_params["queue"])
    return JSONResponse({"queue": request.path_params["queue"], "paused": True})


@endpoint(CHANGE)
async def resume(request: Request) -> Response:
    await dashboard(request).core.admin.resume(request.path_params["queue"])
    return JSONResponse({"queue": request.path_params["queue"], "paused": False})


@endpoint(CHANGE)
async def purge(request: Request) -> Response:
    """Drop the queue's ready and delayed tasks (they end CANCELLED); returns how many."""
    purged = await dashboard(request).core.admin.purge(request.path_params["queue"])
    return JSONResponse({"queue": request.path_params["queue"], "purged": purged})


@endpoint(READ)
async def list_workers(request: Request) -> Response:
    return JSONResponse(dashboard(request).live.worker_table())


ROUTES = [
    Route("/api/v1/queues", list_queues, methods=["GET"]),
    Route("/api/v1/queues/{queue}/pause", pause, methods=["POST"]),
    Route("/api/v1/queues/{queue}/resume", resume, methods=["POST"]),
    Route("/api/v1/queues/{queue}/purge", purge, methods=["POST"]),
    Route("/api/v1/workers", list_workers, methods=["GET"]),
]
