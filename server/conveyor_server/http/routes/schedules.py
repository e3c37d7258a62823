"""Periodic schedules: list (with their next fire times), create, run now, pause, resume, delete."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conveyor.v1 import admin_service_pb2

from ...core.schedules import next_tick
from .. import convert
from ..access import CHANGE, READ, json_body
from ..context import dashboard, endpoint
from . import params
from .tasks import signature_from_json

NEXT_RUNS = 5


def next_runs(schedule: admin_service_pb2.Schedule, count: int = NEXT_RUNS) -> list[str]:
    """The schedule's next fire times (none while it is paused)."""
    if schedule.paused:
        return []
    runs, after = [], time.time()
    for _ in range(count):
        after = next_tick(schedule.cron, after)
        stamp = admin_service_pb2.Schedule().next_run_at
        stamp.FromSeconds(after)
        runs.append(convert.when(stamp) or "")
    return runs


@endpoint(READ)
async def list_schedules(request: Request) -> Response:
    schedules = await dashboard(request).core.admin.schedules.all()
    return JSONResponse({"schedules": [convert.schedule(s, next_runs(s)) for s in schedules]})


@endpoint(CHANGE)
async def create(request: Request) -> Response:
    """{"name", "cron", "task": {"name", "args", "kwargs", "queue", ...}, "missed_ticks": "SKIP"|"RUN_ONCE"};
    a schedule with the same name is replaced."""
    body = await json_body(request)
    missed = params.field(body, "missed_ticks", str, "SKIP").upper()
    if missed not in ("SKIP", "RUN_ONCE"):
        raise params.bad(f"missed_ticks must be SKIP or RUN_ONCE, got {missed!r}")
    schedule = admin_service_pb2.Schedule(
        name=params.field(body, "name", str, ""), cron=params.field(body, "cron", str, ""),
        task=signature_from_json(params.field(body, "task", dict, {})),
        missed_ticks=admin_service_pb2.MissedTicks.Value(f"MISSED_TICKS_{missed}"),
    )
    created = await dashboard(request).core.admin.schedules.create(schedule)
    return JSONResponse(convert.schedule(created, next_runs(created)), status_code=201)


@endpoint(CHANGE)
async def run_now(request: Request) -> Response:
    """Submit the schedule's task once, now (its cron is not affected)."""
    task_id = await dashboard(request).core.admin.run_schedule_now(request.path_params["name"])
    return JSONResponse({"task_id": task_id}, status_code=201)


@endpoint(CHANGE)
async def pause(request: Request) -> Response:
    """Stop the schedule from firing until it is resumed."""
    schedule = await dashboard(request).core.admin.schedules.set_paused(request.path_params["name"], True)
    return JSONResponse(convert.schedule(schedule, next_runs(schedule)))


@endpoint(CHANGE)
async def resume(request: Request) -> Response:
    """Fire the schedule again from its next tick after now (ticks missed while paused do not run)."""
    schedule = await dashboard(request).core.admin.schedules.set_paused(request.path_params["name"], False)
    return JSONResponse(convert.schedule(schedule, next_runs(schedule)))


@endpoint(CHANGE)
async def delete(request: Request) -> Response:
    await dashboard(request).core.admin.schedules.delete(request.path_params["name"])
    return Response(status_code=204)


ROUTES = [
    Route("/api/v1/schedules", list_schedules, methods=["GET"]),
    Route("/api/v1/schedules", create, methods=["POST"]),
    Route("/api/v1/schedules/{name}/run", run_now, methods=["POST"]),
    Route("/api/v1/schedules/{name}/pause", pause, methods=["POST"]),
    Route("/api/v1/schedules/{name}/resume", resume, methods=["POST"]),
    Route("/api/v1/schedules/{name}", delete, methods=["DELETE"]),
]
