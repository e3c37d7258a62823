"""Composition root: builds engines, core and gRPC server from Settings, and runs them."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conveyor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

from .api.admin_service import AdminServicer
from .api.auth import Authenticator, AuthInterceptor
from .api.decoding import DecodeGuardInterceptor
from .api.ratelimit import SubmitRateLimiter
from .api.reflection import enable_reflection
from .api.task_service import TaskServicer
from .api.worker_service import WorkerServicer
from .backends.base import Backend
from .background import stop_tasks
from .brokers.base import Broker
from .config import Settings, with_data_dir
from .core.admin import Admin
from .core.admission import admission_for
from .core.cancel_notices import CancelNotices
from .core.cancellation import Canceller
from .core.clock import SYSTEM_CLOCK, Clock
from .core.connection import WorkerConnections
from .core.dispatch import Dispatcher
from .core.followups import FollowUps
from .core.inspection import Inspector
from .core.lease_recovery import LeaseRecoverer
from .core.limits import ConcurrencySlots, DispatchLimits, RateLimiter, RateLimitTable, configured_limits
from .core.outbox import Outbox
from .core.outcomes import OutcomeRecorder
from .core.pauses import QueuePauses
from .core.publish_index import PublishIndex, bucket_seconds_for
from .core.publisher import Publisher
from .core.reconciler import Reconciler
from .core.repair import Repairer, with_repair_after
from .core.results import ResultReader
from .core.schedules import Schedules
from .core.sessions import SessionRegistry
from .core.store import TaskStore
from .core.submission import Submitter
from .core.task_index import TaskIndexer
from .core.task_registry import TaskRegistry
from .core.task_schemas import SubmitChecks
from .engines import open_backend, open_broker
from .http.exposure import check_http_exposure
from .metrics import ServerMetrics
from .security import check_exposure, server_credentials

if TYPE_CHECKING:
    from .http.server import DashboardServer

log = logging.getLogger(__name__)
METRICS_REFRESH_SECONDS = 5.0

SERVICE_NAMES = (
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass
class Core:
    """The server's domain objects, wired together; usable without gRPC in tests."""

    settings: Settings
    broker: Broker
    backend: Backend
    store: TaskStore
    submitter: Submitter
    reader: ResultReader
    canceller: Canceller
    connections: WorkerConnections
    registry: SessionRegistry
    admin: Admin
    metrics: ServerMetrics
    outbox: Outbox
    reconciler: Reconciler
    repairer: Repairer
    task_registry: TaskRegistry
    cancel_notices: CancelNotices
    lease_recoverer: LeaseRecoverer
    _maintenance: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(
        cls, settings: Settings, broker: Broker | None = None, backend: Backend | None = None,
        *, clock: Clock = SYSTEM_CLOCK,
    ) -> Core:
        """`clock`: the one every component built here reads (tests pass one they set)."""
        settings = with_server_id(with_repair_after(with_data_dir(settings)))
        broker = broker or open_broker(settings.broker_url)
        backend = backend or open_backend(settings.backend_url, settings.result_ttl_seconds)
        metrics = ServerMetrics()
        indexer = TaskIndexer.for_backend(backend, enabled=settings.task_index, clock=clock)
        store = TaskStore(backend, write_hook=indexer.note if indexer.enabled else None)
        index = PublishIndex(backend=backend, bucket_seconds=bucket_seconds_for(settings.repair_after_seconds),
                             clock=clock.wall)
        publisher = Publisher(broker, on_published=index.note, clock=clock.wall)
        followups = FollowUps(
            store=store, publisher=publisher, default_queue=settings.default_queue, limits=settings.limits
        )
        workflow = followups.workflow
        outbox = Outbox(backend, clock=clock)
        repairer = Repairer(store=store, broker=broker, publisher=publisher, index=index,
                            repair_after=settings.repair_after_seconds, clock=clock.wall)
        reconciler = Reconciler(outbox=outbox, store=store, publisher=publisher, workflow=workflow,
                                followups=followups, grace_seconds=settings.outbox_grace_seconds, repairer=repairer,
                                clock=clock.wall)
        recorder = OutcomeRecorder(store=store, followups=followups, on_attempt_ended=metrics.attempt_ended,
                                   clock=clock)
        rate_limits = RateLimitTable(backend=backend, configured=configured_limits(settings.rate_limits),
                                     clock=clock.monotonic)
        limits = DispatchLimits(table=rate_limits, rates=RateLimiter(backend=backend, clock=clock.monotonic),
                                slots=ConcurrencySlots(store=store, clock=clock.wall))
        dispatcher = Dispatcher(store=store, broker=broker, followups=followups, lease_seconds=settings.lease_seconds,
                                max_deliveries=settings.max_deliveries, limits=limits, clock=clock,
                                server_id=settings.server_id)
        registry = SessionRegistry(clock=clock.monotonic)
        pauses = QueuePauses(backend=backend, ttl_seconds=settings.result_ttl_seconds, clock=clock.monotonic)
        tasks = TaskRegistry(backend=backend, server_id=settings.server_id,
                             beat_seconds=settings.heartbeat_interval_seconds,
                             retention_seconds=settings.task_registry_retention_seconds, clock=clock.wall)
        connections = WorkerConnections(settings=settings, broker=broker, store=store, dispatcher=dispatcher,
                                        recorder=recorder, registry=registry, pauses=pauses, tasks=tasks, clock=clock)
        submitter = Submitter(settings=settings, store=store, publisher=publisher, workflow=workflow, outbox=outbox,
                              on_submitted=metrics.tasks_submitted,
                              admission=admission_for(broker=broker, limits=settings.queue_limits, indexer=indexer,
                                                        clock=clock),
                              checks=SubmitChecks(registry=tasks, strict_tasks=settings.strict_tasks), clock=clock)
        reader = ResultReader(store, running_here=dispatcher.running_here)
        cancel_notices = CancelNotices(backend=backend, stop_held=connections.cancel_running, clock=clock.wall)
        canceller = Canceller(store=store, followups=followups, outbox=outbox, stop_running=cancel_notices.stop)
        schedules = Schedules(backend=backend, submitter=submitter, settings=settings, clock=clock.wall)
        admin = Admin(
            broker=broker, store=store, registry=registry, reader=reader, submitter=submitter,
            server_id=settings.server_id, pauses=pauses, schedules=schedules, canceller=canceller, repairer=repairer,
            tasks=tasks, rate_limits=rate_limits, indexer=indexer,
            inspector=Inspector(store=store, reader=reader, registry=registry, lease_seconds=settings.lease_seconds,
                                clock=clock),
        )
        return cls(
            settings=settings, broker=broker, backend=backend, store=store, submitter=submitter, reader=reader,
            canceller=canceller, connections=connections, registry=registry, admin=admin, metrics=metrics,
            outbox=outbox, reconciler=reconciler, repairer=repairer, task_registry=tasks, cancel_notices=cancel_notices,
            lease_recoverer=LeaseRecoverer(broker=broker, interval_seconds=settings.recover_interval_seconds),
        )

    async def start(self) -> None:
        await self.broker.connect()
        await self.backend.connect()
        self._maintenance.append(asyncio.create_task(self.lease_recoverer.run()))
        self._maintenance.append(asyncio.create_task(self.reconciler.run(self.settings.reconcile_interval_seconds)))
        self._maintenance.append(asyncio.create_task(self.admin.schedules.run()))
        self._maintenance.append(asyncio.create_task(self.task_registry.run()))
        self._maintenance.append(asyncio.create_task(self.cancel_notices.run()))
        # Dispatch checks both on every claim: kept fresh here, a claim does not wait to read them.
        self._maintenance.append(asyncio.create_task(self.admin.pauses.keep_fresh()))
        self._maintenance.append(asyncio.create_task(self.admin.rate_limits.keep_fresh()))
        if self.settings.metrics_port:
            self._maintenance.append(asyncio.create_task(
                self.metrics.refresh_forever(self.broker, self.registry, METRICS_REFRESH_SECONDS)
            ))

    async def stop(self) -> None:
        await stop_tasks(*self._maintenance)
        await self.connections.shutdown()
        await self.submitter.close()
        await self.outbox.drain()
        await self.repairer.index.close()
        await self.task_registry.close()
        await self.admin.indexer.close()
        self.metrics.close()
        await self.broker.close()
        await self.backend.close()


def with_server_id(settings: Settings) -> Settings:
    """Settings with a server id: the configured one, or one unique to this process."""
    if settings.server_id:
        return settings
    return settings.replace(server_id=f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


class ConveyorServer:
    """The gRPC server around a Core: task, worker and admin services, health, reflection."""

    def __init__(self, settings: Settings, core: Core | None = None) -> None:
        settings = with_server_id(settings)
        self.settings = settings
        self.core = core or Core.build(settings)
        check_exposure(settings)
        check_http_exposure(settings)
        self.credentials = server_credentials(settings)  # read now: a bad path fails at startup
        limit = settings.limits.max_message_bytes
        self.authenticator = Authenticator(settings.security.tokens)
        interceptors = [AuthInterceptor(self.authenticator), DecodeGuardInterceptor()]
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC sets SO_REUSEPORT by default: a second server on this port would start and the
            # kernel would split clients between the two. Off, a port in use is an error.
            ("grpc.so_reuseport", 0),
        ])
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        # The dashboard and HTTP API (http/), when http_port is set; its bound port (0: not served).
        self.http: DashboardServer | None = None
        self.http_port = 0

    def _register(self) -> None:
        core = self.core
        self.tasks = TaskServicer(core.submitter, core.reader, core.canceller, self.authenticator, SubmitRateLimiter(
            self.settings.security.submit_rate_per_second, self.settings.security.submit_burst
        ))
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(self.tasks, self.server)
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(core.connections, self.authenticator), self.server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(core.admin), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server)

    async def start(self) -> int:
        """Connect the engines and listen; returns the bound port (useful with port 0)."""
        await self.core.start()
        self._register()
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = (
                self.server.add_secure_port(address, self.credentials) if self.credentials
                else self.server.add_insecure_port(address)
            )
        except RuntimeError:  # gRPC's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            self.metrics_port = self.core.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        if self.settings.http_port:
            await self._start_http()
        log.info("conveyor listening on %s:%d (broker %s, backend %s)", self.settings.host, self.port,
                 self.settings.broker_url, self.settings.backend_url)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls and release the engines. Workers are not told to drain: their
        streams end and they reconnect (to another replica, or to this one once restarted)."""
        for name in (*SERVICE_NAMES, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.tasks.end_sessions()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.core.stop()

    async def _start_http(self) -> None:
        # Imported here: worker processes load this module too and never serve HTTP.
        from .http.server import DashboardServer  # noqa: PLC0415

        self.http = DashboardServer(self.settings, self.core, self.authenticator)
        try:
            self.http_port = await self.http.start()
        except BaseException:
            await self.server.stop(0)
            raise

    async def wait(self) -> None:
        await self.server.wait_for_termination()

