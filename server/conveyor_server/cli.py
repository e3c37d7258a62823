"""The `conveyor` command: serve, worker, submit, get, watch, cancel, and the admin commands
queues, workers, purge, pause, resume, inspect, dead and schedule."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import importlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from google.protobuf import json_format

from conveyor import Client, Sig, Worker
from conveyor import loop as event_loop
from conveyor.client import default_address, state_name
from conveyor.tls import bearer_metadata, open_channel
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from conveyor.worker import DEFAULT_PREFETCH

from . import logs
from .app import ConveyorServer
from .config import ConfigError, Settings, load_settings
from .engine_errors import transient_cause
from .engines import EngineError
from .telemetry import configure_tracing

log = logging.getLogger(__name__)


def _parse_arg(text: str) -> Any:
    """CLI args are JSON when they parse as JSON (1, 2.5, true, [1,2]), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _print(message: Any) -> None:
    print(json_format.MessageToJson(message, indent=2, always_print_fields_with_no_presence=False))


# -- serve ----------------------------------------------------------------------------------

class StartupError(Exception):
    """`conveyor serve` cannot start for a reason the user can fix; printed as one line."""


REASONS = {
    errno.EADDRINUSE: "address in use",
    errno.EADDRNOTAVAIL: "not an address of this machine",
    errno.EACCES: "permission denied",
}


def check_listen(host: str, port: int) -> None:
    """StartupError when the server cannot listen on host:port. gRPC only says "Failed to
    bind" (and logs to stderr), so the address is tried first with a plain socket."""
    where = f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise StartupError(f"cannot listen on {where}: the port must be between 0 and 65535")
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise StartupError(f"cannot listen on {where}: unknown host ({reason})") from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as exc:
                failures.append(exc)
    # Some of the host's addresses taken is enough to refuse: clients would reach two servers.
    taken = [f for f in failures if f.errno in (errno.EADDRINUSE, errno.EACCES)]
    if taken or (failures and len(failures) == len(found)):
        failure = (taken or failures)[0]
        reason = REASONS.get(failure.errno or 0) or (failure.strerror or str(failure)).lower()
        raise StartupError(f"cannot listen on {where}: {reason}")


def _redacted(url: str) -> str:
    """The URL without its password, fit for a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _startup_error(exc: Exception, settings: Settings) -> StartupError | None:
    """The one-line explanation of a failed start, when it is the user's to fix."""
    cause = transient_cause(exc)
    if cause is not None:
        kind = type(cause)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        return StartupError(
            f"cannot reach the broker ({_redacted(settings.broker_url)}) or backend "
            f"({_redacted(settings.backend_url)}): {name}: {' '.join(str(cause).split())}"
        )
    if isinstance(exc, OSError) and str(exc).startswith("cannot listen on"):  # from ConveyorServer.start
        check_listen(settings.host, settings.port)  # raises with the reason when it can tell
        return StartupError(str(exc))
    return None


async def _serve(args: argparse.Namespace) -> None:
    settings = load_settings(args.config)
    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "broker_url": args.broker, "backend_url": args.backend,
    }.items() if v is not None}
    settings = settings.replace(**overrides)
    check_listen(settings.host, settings.port)  # before the engines: a port in use fails at once
    logs.configure(settings.log_level, settings.log_json or args.log_json)
    server = ConveyorServer(settings)
    tracing_provider = configure_tracing(settings.otlp_endpoint, server.settings.server_id)
    try:
        await server.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await server.core.stop()  # release what started before the failure
        if tracing_provider is not None:
            tracing_provider.shutdown()
        known = _startup_error(exc, settings)
        if known is None:
            raise
        log.debug("startup failed", exc_info=exc)
        raise known from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"conveyor serving on {settings.host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop()
    if tracing_provider is not None:
        tracing_provider.shutdown()


# -- worker ---------------------------------------------------------------------------------

def _worker(args: argparse.Namespace) -> None:
    logs.configure(args.log_level, args.log_json)
    sys.path.insert(0, ".")
    module = importlib.import_module(args.module)
    worker = getattr(module, args.attr, None)
    if not isinstance(worker, Worker):
        # A module of plain functions: register its public callables by name.
        worker = Worker(args.address, queues=args.queue or ["default"], concurrency=args.concurrency or 8,
                        prefetch=args.prefetch or DEFAULT_PREFETCH)
        for name in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            function = getattr(module, name)
            if callable(function) and getattr(function, "__module__", None) == module.__name__:
                worker.task(name)(function)
    else:
        worker.configure(args.address, args.queue, args.concurrency, args.prefetch)
    worker.run_forever()


# -- client commands ------------------------------------------------------------------------

async def _submit(args: argparse.Namespace) -> None:
    kwargs = dict(item.split("=", 1) for item in args.kw)
    task = Sig(args.name, tuple(_parse_arg(a) for a in args.args), {k: _parse_arg(v) for k, v in kwargs.items()})
    task = task.set(queue=args.queue or "", priority=args.priority, countdown=args.countdown)
    async with Client(args.address) as client:
        submitted = await client.submit(task)
        print(submitted.task_id, flush=True)
        if args.wait is not None:
            result = await client.get_result(submitted.task_id, wait=args.wait)
            _print(result)


async def _get(args: argparse.Namespace) -> None:
    async with Client(args.address) as client:
        _print(await client.get_result(args.id, wait=args.wait))


async def _watch(args: argparse.Namespace) -> None:
    async with Client(args.address) as client:
        ids = [] if args.workflow else [args.id]
        async for event in client.watch(ids, workflow_id=args.id if args.workflow else ""):
            print(f"{event.at.ToJsonString()} {event.task_id} {state_name(event.state)}", flush=True)


async def _cancel(args: argparse.Namespace) -> None:
    async with Client(args.address) as client:
        for task_id in await client.cancel(args.id):
            print(task_id)


async def _admin(args: argparse.Namespace) -> None:
    async with open_channel(args.address or default_address()) as channel:
        admin = _Authorized(admin_service_pb2_grpc.AdminServiceStub(channel))
        if args.command == "queues":
            _print(await admin.ListQueues(admin_service_pb2.ListQueuesRequest()))
        elif args.command == "workers":
            _print(await admin.ListWorkers(admin_service_pb2.ListWorkersRequest()))
        elif args.command == "purge":
            _print(await admin.PurgeQueue(admin_service_pb2.PurgeQueueRequest(queue=args.queue_name)))
        elif args.command == "pause":
            _print(await admin.PauseQueue(admin_service_pb2.PauseQueueRequest(queue=args.queue_name)))
        elif args.command == "resume":
            _print(await admin.ResumeQueue(admin_service_pb2.ResumeQueueRequest(queue=args.queue_name)))
        elif args.command == "inspect":
            _print(await admin.InspectTask(admin_service_pb2.InspectTaskRequest(task_id=args.id)))
        elif args.command == "schedule":
            await _schedule(admin, args)
        elif args.dead_command == "list":
            _print(await admin.ListDeadLetters(admin_service_pb2.ListDeadLettersRequest(queue=args.queue or "")))
        else:
            _print(await admin.ReplayDeadLetters(
                admin_service_pb2.ReplayDeadLettersRequest(task_ids=args.ids, queue=args.queue or "")
            ))


class _Authorized:
    """Calls a stub's methods with the bearer token (CONVEYOR_TOKEN / --token) attached."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return functools.partial(method, metadata=bearer_metadata(None))


def _apply_connection_flags(args: argparse.Namespace) -> None:
    """--token and --tls-* reach every client and worker through the environment they read."""
    for flag, variable in (("token", "CONVEYOR_TOKEN"), ("tls_ca", "CONVEYOR_TLS_CA"),
                           ("tls_cert", "CONVEYOR_TLS_CERT"), ("tls_key", "CONVEYOR_TLS_KEY")):
        value = getattr(args, flag, None)
        if value:
            os.environ[variable] = value


MISSED_TICKS = {
    "skip": admin_service_pb2.MISSED_TICKS_SKIP,
    "run-once": admin_service_pb2.MISSED_TICKS_RUN_ONCE,
}


async def _schedule(admin: Any, args: argparse.Namespace) -> None:
    if args.schedule_command == "add":
        kwargs = dict(item.split("=", 1) for item in args.kw)
        task = Sig(args.task, tuple(_parse_arg(a) for a in args.args), {k: _parse_arg(v) for k, v in kwargs.items()})
        task = task.set(queue=args.queue or "", priority=args.priority)
        schedule = admin_service_pb2.Schedule(
            name=args.name, cron=args.cron, task=task.to_proto(), missed_ticks=MISSED_TICKS[args.missed]
        )
        _print(await admin.CreateSchedule(admin_service_pb2.CreateScheduleRequest(schedule=schedule)))
    elif args.schedule_command == "list":
        _print(await admin.ListSchedules(admin_service_pb2.ListSchedulesRequest()))
    else:
        _print(await admin.DeleteSchedule(admin_service_pb2.DeleteScheduleRequest(name=args.name)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="A gRPC polyglot task server.")
    parser.add_argument("--address", help="server address for client commands (env CONVEYOR_ADDRESS)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    parser.add_argument("--token", help="bearer token for client, worker and admin commands (env CONVEYOR_TOKEN)")
    parser.add_argument("--tls-ca", help="CA bundle to verify the server: turns on TLS (env CONVEYOR_TLS_CA)")
    parser.add_argument("--tls-cert", help="client certificate for mTLS (env CONVEYOR_TLS_CERT)")
    parser.add_argument("--tls-key", help="client key for mTLS (env CONVEYOR_TLS_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="YAML settings file (env CONVEYOR_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--broker", help="broker URL, e.g. sqlite:///conveyor.db, redis://127.0.0.1:6379/0")
    serve.add_argument("--backend", help="backend URL, e.g. sqlite:///conveyor.db, redis://127.0.0.1:6379/0")

    worker = commands.add_parser("worker", help="run a Python worker for a module of tasks")
    worker.add_argument("module", help="module that defines a Worker (or plain task functions)")
    worker.add_argument("--attr", default="worker", help="name of the Worker object in the module")
    worker.add_argument("--queue", action="append", help="queue to serve (repeatable)")
    worker.add_argument("--concurrency", type=int, help="tasks run at once (default: the Worker's own, or 8)")
    worker.add_argument("--prefetch", type=int, help=f"tasks held per slot, so the next is ready when one ends "
                        f"(default: the Worker's own, or {DEFAULT_PREFETCH}; 1 for long tasks)")

    submit = commands.add_parser("submit", help="submit a task: conveyor submit add 1 2")
    submit.add_argument("name")
    submit.add_argument("args", nargs="*", help="arguments; JSON where they parse as JSON")
    submit.add_argument("--kw", action="append", default=[], help="keyword argument key=value")
    submit.add_argument("--queue")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--countdown", type=float)
    submit.add_argument("--wait", type=float, help="wait up to this many seconds and print the result")

    get = commands.add_parser("get", help="print a task's result")
    get.add_argument("id")
    get.add_argument("--wait", type=float, default=0.0)

    watch = commands.add_parser("watch", help="print a task's (or workflow's) state changes")
    watch.add_argument("id")
    watch.add_argument("--workflow", action="store_true", help="the id is a workflow id")

    cancel = commands.add_parser("cancel", help="cancel a task or workflow")
    cancel.add_argument("id")

    commands.add_parser("queues", help="list queues with their depth")
    commands.add_parser("workers", help="list connected workers")
    purge = commands.add_parser("purge", help="drop every queued task of a queue")
    purge.add_argument("queue_name")
    pause = commands.add_parser("pause", help="stop handing out a queue's tasks (it still accepts new ones)")
    pause.add_argument("queue_name")
    resume = commands.add_parser("resume", help="hand out a paused queue's tasks again")
    resume.add_argument("queue_name")
    inspect = commands.add_parser("inspect", help="print everything the server knows about a task")
    inspect.add_argument("id")
    schedule = commands.add_parser("schedule", help="periodic tasks: add, list, delete")
    schedule_commands = schedule.add_subparsers(dest="schedule_command", required=True)
    schedule_add = schedule_commands.add_parser(
        "add", help='add or replace a schedule: conveyor schedule add nightly "0 3 * * *" cleanup'
    )
    schedule_add.add_argument("name")
    schedule_add.add_argument("cron", help="5 fields in UTC (minute hour day month weekday), or 6 with leading seconds")
    schedule_add.add_argument("task", help="task name")
    schedule_add.add_argument("args", nargs="*", help="arguments; JSON where they parse as JSON")
    schedule_add.add_argument("--kw", action="append", default=[], help="keyword argument key=value")
    schedule_add.add_argument("--queue")
    schedule_add.add_argument("--priority", type=int, default=0)
    schedule_add.add_argument("--missed", choices=sorted(MISSED_TICKS), default="skip",
                              help="after downtime: skip missed ticks (default) or run once for them")
    schedule_commands.add_parser("list")
    schedule_delete = schedule_commands.add_parser("delete")
    schedule_delete.add_argument("name")
    dead = commands.add_parser("dead", help="dead letters: tasks that failed for good")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True)
    dead_list = dead_commands.add_parser("list")
    dead_list.add_argument("--queue")
    replay = dead_commands.add_parser("replay")
    replay.add_argument("ids", nargs="*", help="task ids (default: all)")
    replay.add_argument("--queue")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_connection_flags(args)
    if getattr(args, "config", None) is None and args.command == "serve":
        args.config = os.environ.get("CONVEYOR_CONFIG")
    try:
        if args.command == "worker":
            _worker(args)
            return 0
        handler = {
            "serve": _serve, "submit": _submit, "get": _get, "watch": _watch, "cancel": _cancel,
        }.get(args.command, _admin)
        with contextlib.suppress(KeyboardInterrupt):
            event_loop.run(handler(args))
    except (ConfigError, EngineError) as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"conveyor: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
