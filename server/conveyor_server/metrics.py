"""Prometheus metrics: submissions, outcomes by task name and state, latencies, queue depth,
workers and in-flight tasks. Served on metrics_host:metrics_port when metrics_port is set."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import result_pb2
from conveyor.values import seconds_of

from .brokers.base import Broker
from .core.sessions import SessionRegistry

# The state key of an attempt that ended by asking to be replaced (no TaskState says it).
REPLACED_KEY = -1

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.submitted = Counter("conveyor_tasks_submitted", "Tasks accepted, per queue", ["queue"], registry=r)
        self.outcomes = Counter(
            "conveyor_task_outcomes", "Attempts that ended, per task name and state", ["name", "state"], registry=r
        )
        self.runtime = Histogram(
            "conveyor_task_runtime_seconds", "Time from start to end of an attempt", ["name"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "conveyor_task_latency_seconds", "Time from submission to the final result", ["name"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "conveyor_queue_depth",
            "Tasks per queue: ready, delayed, in flight, or unroutable (no worker here registered their names)",
            ["queue", "kind"], registry=r,
        )
        self.workers = Gauge("conveyor_workers", "Workers connected to this replica", registry=r)
        self.in_flight = Gauge("conveyor_in_flight", "Tasks held by workers of this replica", registry=r)
        # Labelled children, looked up once per label set: this runs for every task.
        self._outcome_of: dict[tuple[str, int], Any] = {}
        self._timings_of: dict[str, tuple[Any, Any]] = {}

    def tasks_submitted(self, records: list[records_pb2.TaskRecord]) -> None:
        for queue, count in collections.Counter(record.result.queue for record in records).items():
            self.submitted.labels(queue).inc(count)

    def attempt_ended(self, record: records_pb2.TaskRecord) -> None:
        result = record.result
        # An attempt that asked to be replaced ends "replaced" (its task waits for the replacement).
        key = (result.name, REPLACED_KEY if record.replaced_by and not result.HasField("finished_at") else result.state)
        outcome = self._outcome_of.get(key)
        if outcome is None:
            state = "replaced" if key[1] == REPLACED_KEY else result_pb2.TaskState.Name(result.state)
            state = state.removeprefix("TASK_STATE_").lower()
            outcome = self._outcome_of[key] = self.outcomes.labels(result.name, state)
        outcome.inc()
        timings = self._timings_of.get(result.name)
        if timings is None:
            timings = self._timings_of[result.name] = (
                self.runtime.labels(result.name), self.latency.labels(result.name)
            )
        runtime, latency = timings
        if result.HasField("finished_at"):
            finished = seconds_of(result.finished_at)
            if result.HasField("started_at"):
                runtime.observe(max(finished - seconds_of(result.started_at), 0))
            latency.observe(max(finished - seconds_of(result.submitted_at), 0))

    async def refresh(self, broker: Broker, sessions: SessionRegistry) -> None:
        """Gauges that are read, not counted: queue depths and this replica's workers."""
        for queue in await broker.queues():
            stats = await broker.stats(queue)
            self.queue_depth.labels(queue, "ready").set(stats.ready)
            self.queue_depth.labels(queue, "delayed").set(stats.delayed)
            self.queue_depth.labels(queue, "in_flight").set(stats.in_flight)
            self.queue_depth.labels(queue, "unroutable").set(sessions.unroutable.count(queue))
        self.workers.set(len(sessions.sessions))
        self.in_flight.set(sum(s.in_flight for s in sessions.sessions.values()))

    async def refresh_forever(self, broker: Broker, sessions: SessionRegistry, interval: float) -> None:
        while True:
            try:
                await self.refresh(broker, sessions)
            except Exception:
                log.exception("refreshing metrics failed; will retry")
            await asyncio.sleep(interval)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint (port 0 picks one); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
