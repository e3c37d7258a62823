"""The API's routes, one module per resource."""

from __future__ import annotations

from starlette.routing import BaseRoute

from . import dead_letters, events, limits, overview, queues, schedules, session, tasks

ROUTES: list[BaseRoute] = [
    *session.ROUTES, *overview.ROUTES, *queues.ROUTES, *tasks.ROUTES, *dead_letters.ROUTES,
    *schedules.ROUTES, *limits.ROUTES, *events.ROUTES,
]
