"""Server-Sent Events behind the live pages (see live.py and sse.py).

- /api/v1/events/overview   `sample` per sample taken
- /api/v1/events/queues     `queues` (the table) when it changes
- /api/v1/events/workers    `workers` (the table) when it changes
- /api/v1/events/tasks      `changed` when the task index took writes (the list page reloads)
- /api/v1/events/tasks/{id}  `task` (the task in full) on each state change
- /api/v1/events/workflows/{id}  `workflow` (the graph) on each change of its tasks
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import convert
from ..access import READ
from ..context import dashboard, endpoint
from ..live import Broadcast
from ..sse import Emit, Source, event_stream
from .tasks import task_detail

# A workflow's graph is sent at most this often while its tasks change.
GRAPH_SECONDS = 0.2
JsonFactory = Callable[[], Awaitable[dict[str, Any]]]


def _relay(hub: Broadcast, event: str, first: JsonFactory | None = None) -> Source:
    async def source(emit: Emit) -> None:
        async with hub.subscribe() as queue:
            if first is not None:
                await emit(event, await first())
            elif hub.last is not None:
                await emit(event, hub.last)
            while True:
                await emit(event, await queue.get())

    return source


@endpoint(READ)
async def overview_events(request: Request) -> Response:
    dash = dashboard(request)
    return event_stream(_relay(dash.live.samples, "sample"), dash.stopping)


@endpoint(READ)
async def queue_events(request: Request) -> Response:
    dash = dashboard(request)
    return event_stream(_relay(dash.live.queues, "queues", dash.live.queue_table), dash.stopping)


@endpoint(READ)
async def worker_events(request: Request) -> Response:
    dash = dashboard(request)
    return event_stream(_relay(dash.live.workers, "workers"), dash.stopping)


@endpoint(READ)
async def task_list_events(request: Request) -> Response:
    dash = dashboard(request)
    return event_stream(_relay(dash.live.tasks, "changed"), dash.stopping)


@endpoint(READ)
async def task_events(request: Request) -> Response:
    dash = dashboard(request)
    task_id = request.path_params["task_id"]
    await task_detail(request, task_id)  # an unknown id is a 404 before the stream starts

    async def source(emit: Emit) -> None:
        await emit("task", await task_detail(request, task_id))
        if not task_id.startswith("wf-"):
            seen = 0
            async for event in dash.core.reader.watch([task_id], until_done=True):
                if len(event.result.history) > seen:
                    seen = len(event.result.history)
                    await emit("task", await task_detail(request, task_id))
        await asyncio.Event().wait()  # ended: stay open (quiet) rather than have the page reconnect

    return event_stream(source, dash.stopping)


@endpoint(READ)
async def workflow_events(request: Request) -> Response:
    dash = dashboard(request)
    workflow_id = request.path_params["workflow_id"]
    reader = dash.core.reader
    ids = await reader.resolve_ids([], workflow_id)

    async def source(emit: Emit) -> None:
        last = None
        loop = asyncio.get_running_loop()
        sent_at = 0.0
        async for _ in reader.watch(ids, until_done=True):
            if loop.time() - sent_at < GRAPH_SECONDS:
                await asyncio.sleep(GRAPH_SECONDS)
            graph = convert.workflow(await reader.workflow(workflow_id))
            if graph != last:
                await emit("workflow", graph)
                last, sent_at = graph, loop.time()
        graph = convert.workflow(await reader.workflow(workflow_id))
        if graph != last:
            await emit("workflow", graph)
        await asyncio.Event().wait()

    return event_stream(source, dash.stopping)


ROUTES = [
    Route("/api/v1/events/overview", overview_events, methods=["GET"]),
    Route("/api/v1/events/queues", queue_events, methods=["GET"]),
    Route("/api/v1/events/workers", worker_events, methods=["GET"]),
    Route("/api/v1/events/tasks", task_list_events, methods=["GET"]),
    Route("/api/v1/events/tasks/{task_id}", task_events, methods=["GET"]),
    Route("/api/v1/events/workflows/{workflow_id}", workflow_events, methods=["GET"]),
]
