"""The `conveyor` command: serve, worker, submit, get, watch, cancel, and the admin commands
queues, queue, workers, tasks, purge, pause, resume, inspect, dead, schedule, repair and config,
and conformance (the worker conformance kit)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import functools
import importlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import argcomplete
import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration

from conveyor import Client, RetryPolicy, Sig, Worker, __version__
from conveyor import loop as event_loop
from conveyor.client import TERMINAL, default_address, state_name
from conveyor.otel_env import configure_from_env
from conveyor.pools.base import POOL_KINDS
from conveyor.tls import bearer_metadata, open_channel
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc, result_pb2, task_service_pb2
from conveyor.values import from_value, seconds_of, set_seconds
from conveyor.window import MAX_PREFETCH
from conveyor.worker import DEFAULT_PREFETCH

from . import cli_output as out
from . import conformance, logs
from .app import ConveyorServer
from .cli_workflow import is_workflow_id, workflow_json, workflow_text
from .config import ConfigError, Settings, load_settings, with_data_dir
from .config_example import EXAMPLE as CONFIG_EXAMPLE
from .engine_errors import transient_cause
from .engines import EngineError
from .gc_freeze import freeze_startup_objects
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


class UsageError(Exception):
    """A command line the user can fix (a --kw without `=`, say); printed as one line, exit 2."""


def _pairs(flag: str, items: Sequence[str]) -> dict[str, str]:
    """`key=value` options as a dict; UsageError for one without `=` or a key."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: use {flag} key=value")
        pairs[key] = value
    return pairs


def _emit(args: argparse.Namespace, message: Any, text: str) -> None:
    """`text` for people, or with -o json the message as plain JSON values."""
    print(out.dumps(out.plain(message)) if args.output == "json" else text, flush=True)


def _datetime(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time, e.g. 2030-01-31T08:00:00Z") from None


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
    if isinstance(exc, OSError) and str(exc).startswith("cannot serve the dashboard"):  # from http/server.py
        return StartupError(str(exc))
    if isinstance(exc, OSError) and str(exc).startswith("cannot listen on"):  # from ConveyorServer.start
        check_listen(settings.host, settings.port)  # raises with the reason when it can tell
        return StartupError(str(exc))
    return None


async def _serve(args: argparse.Namespace) -> None:
    try:
        settings = load_settings(args.config)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {args.config}: {exc.strerror or exc}") from None
    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "broker_url": args.broker, "backend_url": args.backend,
        "data_dir": args.data_dir,
    }.items() if v is not None}
    settings = with_data_dir(settings.replace(**overrides))
    if args.http is not None:
        http_host, http_port = http_address(args.http, settings.http_host)
        settings = settings.replace(http_host=http_host, http_port=http_port)
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
    frozen = freeze_startup_objects()
    log.debug("%d objects built at startup are exempt from garbage collection", frozen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"conveyor serving on {settings.host}:{server.port}", flush=True)
    if server.http is not None and server.http_port:
        print(f"dashboard on {server.http.url}", flush=True)
    await stop.wait()
    await server.stop()
    if tracing_provider is not None:
        tracing_provider.shutdown()


def http_address(text: str, default_host: str) -> tuple[str, int]:
    """--http: "0" (off), "PORT", ":PORT", "HOST:PORT" or "[IPv6]:PORT"."""
    host, _, port = text.strip().rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http expects [HOST:]PORT (a port from 0 to 65535; 0 turns the dashboard off), "
                          f"got {text!r}")
    return host.strip("[]") or default_host, int(port)


# -- worker ---------------------------------------------------------------------------------

class WorkerNotFound(Exception):
    """`conveyor worker MODULE` found no Worker to run; printed as one line."""


# Where `conveyor worker MODULE` looks for the Worker, in order (`app` is Celery's convention).
WORKER_ATTRIBUTES = ("worker", "app")


def find_worker(module: Any, attr: str | None) -> Worker | None:
    """The module's Worker: the attribute `attr`, else the first of WORKER_ATTRIBUTES it defines.
    None when it defines none of them (a module of plain task functions); WorkerNotFound when
    the attribute is missing or is not a Worker."""
    names = (attr,) if attr else WORKER_ATTRIBUTES
    for name in names:
        if not hasattr(module, name):
            continue
        found = getattr(module, name)
        if not isinstance(found, Worker):
            raise WorkerNotFound(f"{module.__name__}.{name} is a {type(found).__name__}, not a conveyor.Worker")
        return found
    if attr:
        raise WorkerNotFound(f"{module.__name__} has no attribute {attr!r}")
    return None


def _worker_module(name: str) -> Any:
    sys.path.insert(0, ".")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # the module itself, not one it imports
            raise WorkerNotFound(f"cannot import {name}: {exc}") from None
        raise


def _worker(args: argparse.Namespace) -> int:
    # CONVEYOR_LOG_LEVEL (as for the server) applies unless --log-level says otherwise.
    level = os.environ.get("CONVEYOR_LOG_LEVEL", args.log_level) if args.log_level == "INFO" else args.log_level
    logs.configure(level, args.log_json)
    try:
        module = _worker_module(args.module)
        worker = find_worker(module, args.attr)
        if worker is None:
            # A module of plain functions: register its public callables by name.
            worker = Worker(args.address, queues=args.queue or ["default"], concurrency=args.concurrency or 8,
                            prefetch=args.prefetch)
            for name in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
                function = getattr(module, name)
                if callable(function) and getattr(function, "__module__", None) == module.__name__:
                    worker.task(name)(function)
            if not worker.tasks:
                raise WorkerNotFound(f"{args.module} defines no Worker (looked for {' or '.join(WORKER_ATTRIBUTES)}) "
                                     "and no task functions")
        worker.configure(args.address, args.queue, args.concurrency, args.prefetch, args.pool,
                         max_tasks_per_child=args.max_tasks_per_child,
                         max_memory_per_child=args.max_memory_per_child and args.max_memory_per_child * 2**20)
        # After the module is imported: tracing it sets up itself is kept.
        tracing_provider = configure_from_env("conveyor-worker")
        try:
            worker.run_forever()
        finally:
            if tracing_provider is not None:
                tracing_provider.shutdown()  # flushes the spans still batched
    except (WorkerNotFound, ValueError) as exc:  # ValueError: a setting or pool the tasks cannot use
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    return 0


# -- client commands ------------------------------------------------------------------------

def submit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Sig options the submit command line sets (see Sig.set)."""
    options: dict[str, Any] = {
        "queue": args.queue or "", "priority": args.priority, "countdown": args.countdown, "eta": args.eta,
        "time_limit": args.time_limit, "idempotency_key": args.idempotency_key or "",
        "headers": _pairs("--header", args.header), "expires": args.expires, "ignore_result": args.ignore_result,
    }
    if args.retries is not None or args.backoff is not None:
        attempts = RetryPolicy().max_attempts if args.retries is None else args.retries + 1
        options["retry"] = RetryPolicy(max_attempts=attempts, backoff=args.backoff or "exponential")
    return options


async def _submit(args: argparse.Namespace) -> int:
    kwargs = {k: _parse_arg(v) for k, v in _pairs("--kw", args.kw).items()}
    task = Sig(args.name, tuple(_parse_arg(a) for a in args.args), kwargs).set(**submit_options(args))
    async with Client(args.address) as client:
        submitted = await client.submit(task)
        print(submitted.task_id, flush=True)
        if args.wait is None:
            return 0
        return _show_result(args, await client.get_result(submitted.task_id, wait=args.wait), args.wait)


def _show_result(args: argparse.Namespace, result: result_pb2.TaskResult, waited: float | None) -> int:
    """Print a task's result (its value alone, or the record with -o json); the exit code:
    0 SUCCESS, 1 FAILURE, CANCELLED or EXPIRED, 2 still running after a wait."""
    state = state_name(result.state)
    if args.output == "json":
        print(out.dumps(out.plain(result)), flush=True)
    elif result.state == result_pb2.TASK_STATE_SUCCESS:
        print(out.value_text(from_value(result.result)), flush=True)
    elif result.state in TERMINAL:
        print(f"conveyor: task {result.task_id} ended {state}: {result.error.type}: {result.error.message}",
              file=sys.stderr)
    elif not waited:
        print(state, flush=True)
    if result.state == result_pb2.TASK_STATE_SUCCESS:
        return 0
    if result.state in TERMINAL:
        return 1
    if waited:
        print(f"conveyor: task {result.task_id} is still {state} after {waited:g} s", file=sys.stderr)
        return 2
    return 0


async def _get(args: argparse.Namespace) -> int:
    async with Client(args.address) as client:
        result = await client.get_result(args.id, wait=args.wait or 0.0)
        if not is_workflow_id(args.id):
            return _show_result(args, result, args.wait)
        return _show_workflow(args, await client.get_workflow(args.id), result, args.wait)


def _show_workflow(args: argparse.Namespace, workflow: task_service_pb2.GetWorkflowResponse,
                   overall: result_pb2.TaskResult, waited: float | None) -> int:
    """Print a workflow as a tree (nested with -o json); the exit code as for a task's result."""
    print(out.dumps(workflow_json(workflow, overall)) if args.output == "json" else workflow_text(workflow, overall),
          flush=True)
    if overall.state == result_pb2.TASK_STATE_SUCCESS:
        return 0
    if overall.state in TERMINAL:
        return 1
    if waited:
        print(f"conveyor: workflow {workflow.workflow_id} is still {state_name(overall.state)} after {waited:g} s",
              file=sys.stderr)
        return 2
    return 0


async def _watch(args: argparse.Namespace) -> None:
    async with Client(args.address) as client:
        workflow = args.workflow or is_workflow_id(args.id)
        ids = [] if workflow else [args.id]
        async for event in client.watch(ids, workflow_id=args.id if workflow else ""):
            if args.output == "json":
                print(json.dumps(out.plain(event), ensure_ascii=False), flush=True)
            else:
                line = f"{event.at.ToJsonString()} {event.task_id} {state_name(event.state)} {event.result.name}"
                print(line.rstrip(), flush=True)
        if workflow:  # it ended: the whole tree, as `get` shows it (one JSON line with -o json)
            tree, overall = await client.get_workflow(args.id), await client.get_result(args.id)
            print(json.dumps({"workflow": workflow_json(tree, overall)}, ensure_ascii=False) if args.output == "json"
                  else workflow_text(tree, overall), flush=True)


async def _cancel(args: argparse.Namespace) -> None:
    async with Client(args.address) as client:
        cancelled = await client.cancel(args.id)
        if is_workflow_id(args.id):
            tree, overall = await client.get_workflow(args.id), await client.get_result(args.id)
            _show_cancelled_workflow(args, cancelled, tree, overall)
            return
    if args.output == "json":
        print(out.dumps({"cancelledTaskIds": cancelled}), flush=True)
    elif not cancelled:
        print(f"nothing to cancel: {args.id} has no task still waiting or running", flush=True)
    else:
        print("\n".join(cancelled), flush=True)


def _show_cancelled_workflow(args: argparse.Namespace, cancelled: list[str],
                             tree: task_service_pb2.GetWorkflowResponse, overall: result_pb2.TaskResult) -> None:
    """What a workflow's cancel did, then the workflow's tree as it stands."""
    if args.output == "json":
        print(out.dumps({"cancelledTaskIds": cancelled, "workflow": workflow_json(tree, overall)}), flush=True)
        return
    done = f"cancelled {len(cancelled)} of its tasks" if cancelled else "nothing to cancel: every task had ended"
    print(f"{done}\n{workflow_text(tree, overall)}", flush=True)


async def _config(args: argparse.Namespace) -> None:
    print(CONFIG_EXAMPLE, end="", flush=True)


async def _admin(args: argparse.Namespace) -> None:
    async with open_channel(args.address or default_address()) as channel:
        admin = _Authorized(admin_service_pb2_grpc.AdminServiceStub(channel))
        if args.command == "queues":
            queues = await admin.ListQueues(admin_service_pb2.ListQueuesRequest(active_only=not args.all))
            _emit(args, queues, out.queues_table(list(queues.queues)) if queues.queues or args.all
                  else "no active queues (conveyor queues --all lists every queue)")
        elif args.command == "workers":
            workers = await admin.ListWorkers(admin_service_pb2.ListWorkersRequest())
            _emit(args, workers, out.workers_table(list(workers.workers)))
        elif args.command == "purge":
            purged = await admin.PurgeQueue(admin_service_pb2.PurgeQueueRequest(queue=args.queue_name))
            _emit(args, purged, f"purged {purged.purged} tasks from queue {args.queue_name}")
        elif args.command == "pause":
            paused = await admin.PauseQueue(admin_service_pb2.PauseQueueRequest(queue=args.queue_name))
            _emit(args, paused, f"paused queue {args.queue_name}: it accepts tasks but hands none out "
                                f"until `conveyor resume {args.queue_name}`")
        elif args.command == "resume":
            resumed = await admin.ResumeQueue(admin_service_pb2.ResumeQueueRequest(queue=args.queue_name))
            _emit(args, resumed, f"resumed queue {args.queue_name}")
        elif args.command == "inspect":
            inspected = await admin.InspectTask(admin_service_pb2.InspectTaskRequest(task_id=args.id))
            _emit(args, inspected, out.inspection_text(inspected))
        elif args.command == "schedule":
            await _schedule(admin, args)
        elif args.command == "queue":
            await _queue(admin, args)
        else:
            await _dead(admin, args)


async def _queue(admin: Any, args: argparse.Namespace) -> None:
    """`conveyor queue delete NAME [--force]`."""
    deleted = await admin.DeleteQueue(admin_service_pb2.DeleteQueueRequest(queue=args.queue_name, force=args.force))
    purged = f" (purged {deleted.purged} tasks first)" if deleted.purged else ""
    _emit(args, deleted, f"deleted queue {args.queue_name}{purged}")


async def _dead(admin: Any, args: argparse.Namespace) -> None:
    """`conveyor dead list | replay | delete`."""
    if args.dead_command == "list":
        dead = await admin.ListDeadLetters(admin_service_pb2.ListDeadLettersRequest(queue=args.queue or ""))
        full = "\n\n".join(out.task_text(task) for task in dead.tasks) or "no dead letters"
        _emit(args, dead, full if args.full else out.dead_table(list(dead.tasks)))
    elif args.dead_command == "delete":
        deleted = await admin.DeleteDeadLetter(admin_service_pb2.DeleteDeadLetterRequest(task_id=args.id))
        _emit(args, deleted, f"deleted dead letter {args.id}")
    else:
        replayed = await admin.ReplayDeadLetters(
            admin_service_pb2.ReplayDeadLettersRequest(task_ids=args.ids, queue=args.queue or "")
        )
        ids = list(replayed.task_ids)
        _emit(args, replayed, "\n".join([f"replayed {len(ids)} dead letters as new tasks:", *ids])
              if ids else "no dead letters to replay")


# -- repair -----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in `text`: a number of seconds, or parts such as 90s, 10m, 1h30m, 2d, 250ms.
    A sign is kept, so the server can refuse a negative age with its own message."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if re.fullmatch(r"\d+(?:\.\d+)?", body):
        return sign * float(body)
    if not parts or "".join(number + unit for number, unit in parts) != body:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 90s, 10m, 1h30m or a number of seconds")
    seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"{text!r} is too long a duration")
    return sign * seconds


def format_age(seconds: float) -> str:
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


async def _repair(args: argparse.Namespace) -> None:
    """One line per task republished (or, with --dry-run, that would be), then a summary."""
    older_than = Duration()
    set_seconds(older_than, args.older_than)
    request = admin_service_pb2.RepairTasksRequest(
        older_than=older_than, queue=args.queue or "", dry_run=args.dry_run, force=args.force
    )
    async with open_channel(args.address or default_address()) as channel:
        reply = await _Authorized(admin_service_pb2_grpc.AdminServiceStub(channel)).RepairTasks(request)
    for task in reply.tasks:
        age = format_age(seconds_of(task.age))
        print(f"{task.task_id}  {task.name}  {task.queue}  {state_name(task.state)}  {age}")
    verb = "would republish" if reply.dry_run else "republished"
    held = f", {reply.held} still queued" if reply.held else ""
    hint = " (--force republishes those too)" if reply.held and not args.force else ""
    print(f"{verb} {len(reply.tasks)} tasks ({reply.checked} live tasks checked{held}){hint}", flush=True)


# -- tasks -------------------------------------------------------------------------------------

async def _tasks(args: argparse.Namespace) -> None:
    """The task registry: a table (one task per line), or with --json the ListRegisteredTasks reply."""
    async with open_channel(args.address or default_address()) as channel:
        reply = await _Authorized(admin_service_pb2_grpc.AdminServiceStub(channel)).ListRegisteredTasks(
            admin_service_pb2.ListRegisteredTasksRequest()
        )
    if args.json or args.output == "json":
        _print(reply)
        return
    print(tasks_table(list(reply.tasks)), flush=True)


def tasks_table(tasks: Sequence[admin_service_pb2.RegisteredTask], now: float | None = None) -> str:
    """Name, live workers, queues, languages, when last seen, schema and description."""
    at = time.time() if now is None else now
    rows = [("NAME", "LIVE", "QUEUES", "LANGUAGES", "LAST SEEN", "SCHEMA", "DESCRIPTION")]
    for task in tasks:
        seen = at - seconds_of(task.last_seen)
        schema = "-" if not task.call_schema else "typed" if task.schema_variants <= 1 else (
            f"{task.schema_variants} variants")
        rows.append((
            task.name, str(len(task.worker_ids)), ",".join(task.queues) or "-", ",".join(task.languages) or "-",
            "now" if task.worker_ids else f"{format_age(max(seen, 0.0))} ago", schema, task.description,
        ))
    if len(rows) == 1:
        return "no task registered: no worker has connected within the registry's retention"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


# -- rate limits -------------------------------------------------------------------------------

async def _limits(args: argparse.Namespace) -> None:
    async with open_channel(args.address or default_address()) as channel:
        admin = _Authorized(admin_service_pb2_grpc.AdminServiceStub(channel))
        if args.limits_command == "set":
            limit = admin_service_pb2.RateLimit(name=args.name, rate=args.rate, burst=args.burst,
                                                per_key=args.key_scoped)
            reply = await admin.SetRateLimit(admin_service_pb2.SetRateLimitRequest(limit=limit))
            print(limits_table([reply.limit]), flush=True)
        elif args.limits_command == "list":
            reply = await admin.ListRateLimits(admin_service_pb2.ListRateLimitsRequest())
            print(limits_table(list(reply.limits)) if reply.limits else "no rate limits", flush=True)
        else:
            await admin.DeleteRateLimit(admin_service_pb2.DeleteRateLimitRequest(name=args.name))
            print(f"deleted the rate limit of {args.name}", flush=True)


def limits_table(limits: Sequence[admin_service_pb2.RateLimit]) -> str:
    rows = [("NAME", "RATE", "BURST", "PER KEY", "SOURCE")]
    rows += [(limit.name, limit.rate, str(limit.burst), "yes" if limit.per_key else "no", limit.source)
             for limit in limits]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


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
        kwargs = {k: _parse_arg(v) for k, v in _pairs("--kw", args.kw).items()}
        task = Sig(args.task, tuple(_parse_arg(a) for a in args.args), kwargs)
        task = task.set(queue=args.queue or "", priority=args.priority)
        schedule = admin_service_pb2.Schedule(
            name=args.name, cron=args.cron, task=task.to_proto(), missed_ticks=MISSED_TICKS[args.missed]
        )
        created = await admin.CreateSchedule(admin_service_pb2.CreateScheduleRequest(schedule=schedule))
        _emit(args, created, out.schedules_table([created.schedule]))
    elif args.schedule_command == "list":
        listed = await admin.ListSchedules(admin_service_pb2.ListSchedulesRequest())
        _emit(args, listed, out.schedules_table(list(listed.schedules)))
    elif args.schedule_command == "pause":
        paused = await admin.PauseSchedule(admin_service_pb2.PauseScheduleRequest(name=args.name))
        _emit(args, paused, out.schedules_table([paused.schedule]))
    elif args.schedule_command == "resume":
        resumed = await admin.ResumeSchedule(admin_service_pb2.ResumeScheduleRequest(name=args.name))
        _emit(args, resumed, out.schedules_table([resumed.schedule]))
    else:
        deleted = await admin.DeleteSchedule(admin_service_pb2.DeleteScheduleRequest(name=args.name))
        _emit(args, deleted, f"deleted schedule {args.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="A gRPC polyglot task server.")
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="YAML settings file (env CONVEYOR_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--broker", help="broker URL, e.g. sqlite:///conveyor.db, redis://127.0.0.1:6379/0")
    serve.add_argument("--backend", help="backend URL, e.g. sqlite:///conveyor.db, redis://127.0.0.1:6379/0")
    serve.add_argument("--data-dir", metavar="DIR", help="where the default SQLite broker and backend keep "
                       "their file, conveyor.db (default: the current directory; env CONVEYOR_DATA_DIR)")
    serve.add_argument("--http", metavar="[HOST:]PORT",
                       help="the dashboard and HTTP API (default 127.0.0.1:8080; 0 turns them off)")

    worker = commands.add_parser(
        "worker", help="run a Python worker for a module of tasks",
        description="Run the Worker a module defines (named worker or app, or --attr), or its plain task "
                    "functions. Logs at INFO unless --log-level or CONVEYOR_LOG_LEVEL says otherwise.",
    )
    worker.add_argument("module", help="module that defines a Worker (or plain task functions)")
    worker.add_argument("--attr", help=f"name of the Worker object in the module (default: "
                        f"{' or '.join(WORKER_ATTRIBUTES)})")
    worker.add_argument("--queue", action="append", help="queue to serve (repeatable)")
    worker.add_argument("--concurrency", type=int, help="tasks run at once (default: the Worker's own, or 8)")
    worker.add_argument("--prefetch", type=int, help=f"tasks held per slot, so the next is ready when one ends "
                        f"(default: the Worker's own, or auto: {DEFAULT_PREFETCH}, up to {MAX_PREFETCH} while tasks "
                        "are short; 1 for long tasks)")
    worker.add_argument("--pool", choices=POOL_KINDS, help="where tasks run: threads (default), processes "
                        "(a child process per slot; time limits and cancels stop any task) or async")
    worker.add_argument("--max-tasks-per-child", type=int, metavar="N",
                        help="processes pool: replace a child after it ran N tasks")
    worker.add_argument("--max-memory-per-child", type=int, metavar="MIB",
                        help="processes pool: replace a child once its memory grew past MIB MiB")

    submit = commands.add_parser("submit", help="submit a task: conveyor submit add 1 2")
    submit.add_argument("name")
    submit.add_argument("args", nargs="*", help="arguments; JSON where they parse as JSON")
    submit.add_argument("--kw", action="append", default=[], help="keyword argument key=value")
    submit.add_argument("--queue", help="queue to put the task on (default: default)")
    submit.add_argument("--priority", type=int, default=0, help="0-9, higher first")
    submit.add_argument("--countdown", type=float, metavar="SECONDS", help="start no sooner than this from now")
    submit.add_argument("--eta", type=_datetime, metavar="TIME", help="start no sooner than this ISO 8601 time "
                        "(UTC unless it says otherwise)")
    submit.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop an attempt running longer")
    submit.add_argument("--retries", type=int, metavar="N", help="run a failing task up to N more times")
    submit.add_argument("--backoff", choices=("exponential", "fibonacci", "fixed"),
                        help="how the pause between retries grows (default: exponential)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="a second submit with this key returns the first task")
    submit.add_argument("--expires", type=float, metavar="SECONDS",
                        help="not started this long after submit, the task never runs and ends EXPIRED")
    submit.add_argument("--ignore-result", action="store_true", help="do not store the task's return value")
    submit.add_argument("--header", action="append", default=[], metavar="K=V", help="task header (repeatable)")
    submit.add_argument("--wait", type=float, metavar="SECONDS",
                        help="wait this long and print the result; "
                             "exit 0 SUCCESS, 1 FAILURE/CANCELLED/EXPIRED, 2 timed out")

    get = commands.add_parser("get", help="print a task's result (its value; the record with -o json), "
                              "or a workflow's tree (a wf-... id)")
    get.add_argument("id")
    get.add_argument("--wait", type=float, metavar="SECONDS",
                     help="wait this long for it to finish; exit 0 SUCCESS, 1 FAILURE/CANCELLED/EXPIRED, 2 timed out")

    watch = commands.add_parser("watch", help="print a task's (or workflow's) state changes; a workflow's tree "
                                "once it ended")
    watch.add_argument("id")
    watch.add_argument("--workflow", action="store_true", help="the id is a workflow id (implied by a wf- prefix)")

    cancel = commands.add_parser("cancel", help="cancel a task or workflow (a wf-... id: then print its tree)")
    cancel.add_argument("id")

    queues = commands.add_parser("queues", help="list active queues (with tasks, workers or a pause) and their depth")
    queues.add_argument("--all", action="store_true", help="every queue the broker knows of, idle ones too")
    queue = commands.add_parser("queue", help="manage one queue: delete")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    queue_delete = queue_commands.add_parser("delete", help="delete an empty queue (it leaves `conveyor queues --all`)")
    queue_delete.add_argument("queue_name")
    queue_delete.add_argument("--force", action="store_true",
                              help="purge its ready and delayed tasks first (they end CANCELLED)")
    commands.add_parser("workers", help="list connected workers")
    tasks = commands.add_parser(
        "tasks", help="list registered tasks: name, live workers, queues, languages, schema, description"
    )
    tasks.add_argument(
        "--json", action="store_true", help="print the ListRegisteredTasks reply as JSON (with the schemas)"
    )
    purge = commands.add_parser("purge", help="drop every queued task of a queue")
    purge.add_argument("queue_name")
    pause = commands.add_parser("pause", help="stop handing out a queue's tasks (it still accepts new ones)")
    pause.add_argument("queue_name")
    resume = commands.add_parser("resume", help="hand out a paused queue's tasks again")
    resume.add_argument("queue_name")
    inspect = commands.add_parser("inspect", help="print everything the server knows about a task: its record, "
                                  "lease holder and expiry, deliveries, workflow node, pending follow-ups")
    inspect.add_argument("id")
    config = commands.add_parser("config", help="server configuration: example")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("example", help="print a commented config file with every setting at its default "
                               "(conveyor config example > conveyor.yaml)")
    schedule = commands.add_parser("schedule", help="periodic tasks: add, list, pause, resume, delete")
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
    schedule_pause = schedule_commands.add_parser("pause", help="stop a schedule from firing until it is resumed")
    schedule_pause.add_argument("name")
    schedule_resume = schedule_commands.add_parser(
        "resume", help="fire a paused schedule again from its next tick (ticks missed while paused do not run)")
    schedule_resume.add_argument("name")
    schedule_delete = schedule_commands.add_parser("delete")
    schedule_delete.add_argument("name")
    dead = commands.add_parser("dead", help="dead letters: tasks that failed for good")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True)
    dead_list = dead_commands.add_parser("list", help="one line per dead letter: id, name, queue, time, error")
    dead_list.add_argument("--queue")
    dead_list.add_argument("--full", action="store_true", help="every dead letter's whole record")
    replay = dead_commands.add_parser(
        "replay", help="run dead letters again as new tasks; replaying one twice creates one task"
    )
    replay.add_argument("ids", nargs="*", help="dead letters' task ids (default: every dead letter)")
    replay.add_argument("--queue", help="without ids: only this queue's dead letters")
    dead_delete = dead_commands.add_parser("delete", help="take a dead letter off the list without replaying it")
    dead_delete.add_argument("id")
    repair = commands.add_parser(
        "repair", help="republish tasks whose broker message was lost (a flushed, deleted or lost queue)"
    )
    repair.add_argument("--older-than", required=True, type=parse_duration, metavar="AGE",
                        help="only tasks with no sign of life for this long, e.g. 10m, 1h30m, 90s")
    repair.add_argument("--queue", help="only this queue's tasks")
    repair.add_argument("--dry-run", action="store_true", help="list what would be republished, change nothing")
    repair.add_argument("--force", action="store_true",
                        help="republish even where the queue's messages could still be the tasks' own (a backlog)")
    limits = commands.add_parser("limits", help="rate limits on task names, applied at dispatch: set, list, delete")
    limits_commands = limits.add_subparsers(dest="limits_command", required=True)
    limits_set = limits_commands.add_parser("set", help="limit a task name, e.g. conveyor limits set send_email 100/s")
    limits_set.add_argument("name", help="the task name")
    limits_set.add_argument("rate", help="<count>/<unit>, unit s, m or h: 100/s, 10/m, 1000/h")
    limits_set.add_argument("--burst", type=int, default=0,
                            help="tasks that may start at once after a quiet spell (default: one second's worth)")
    limits_set.add_argument("--key-scoped", action="store_true",
                            help="one bucket per rate_limit_key of the tasks (a customer, say) instead of one")
    limits_commands.add_parser("list", help="every limit in force")
    limits_delete = limits_commands.add_parser("delete", help="remove a task name's stored limit")
    limits_delete.add_argument("name")
    conformance.add_parser(commands)
    _accept_global_options_everywhere(parser)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes. Subcommands take them too (`conveyor queues --address
    ...`) without defaults of their own, so they never hide one given before the subcommand."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    taken = parser._option_string_actions  # a subcommand's own option of the same name wins
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--address",), {"help": "server address for client commands (env CONVEYOR_ADDRESS)"}),
        (("--log-level",), {"default": default("INFO")}),
        (("--log-json",), {"action": "store_true", "default": default(False), "help": "one JSON object per log line"}),
        (("--token",), {"help": "bearer token for client, worker and admin commands (env CONVEYOR_TOKEN)"}),
        (("--tls-ca",), {"help": "CA bundle to verify the server: turns on TLS (env CONVEYOR_TLS_CA)"}),
        (("--tls-cert",), {"help": "client certificate for mTLS (env CONVEYOR_TLS_CERT)"}),
        (("--tls-key",), {"help": "client key for mTLS (env CONVEYOR_TLS_KEY)"}),
        (("-o", "--output"), {"choices": ("text", "json"), "default": default("text"),
                              "help": "text (tables and lines, the default) or json (plain JSON values)"}),
    ]
    for names, keywords in options:
        if any(name in taken for name in names):
            continue
        keywords.setdefault("default", default(None))
        parser.add_argument(*names, **keywords)


def _accept_global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_global_options(sub, defaults=False)
                _accept_global_options_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # answers the shell's completion request (and exits) when it is one
    args = parser.parse_args(argv)
    _apply_connection_flags(args)
    if getattr(args, "config", None) is None and args.command == "serve":
        args.config = os.environ.get("CONVEYOR_CONFIG")
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "conformance":
            return conformance.command(args)
        handler = {
            "serve": _serve, "submit": _submit, "get": _get, "watch": _watch, "cancel": _cancel,
            "repair": _repair, "tasks": _tasks, "limits": _limits, "config": _config,
        }.get(args.command, _admin)
        with contextlib.suppress(KeyboardInterrupt):
            return event_loop.run(handler(args)) or 0
    except (ConfigError, EngineError, UsageError) as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (`| head`) is gone: say nothing, and keep the interpreter's final flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except StartupError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"conveyor: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
