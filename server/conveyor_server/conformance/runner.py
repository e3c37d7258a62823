"""Runs the kit: starts the server, the proxy and the worker under test, runs the chosen
scenarios in order, and stops everything whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from conveyor import Client
from conveyor.client import TERMINAL
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc

from . import fault_scenarios as faults
from . import value_scenarios as values
from .kit import Kit, ScenarioFailed, tail
from .processes import ServerProcess, Tokens, WorkerProcess
from .proxy import LinkProxy

SERVER_START_SECONDS = 30.0
SCENARIO_SECONDS = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Kit], Awaitable[None]]


# In the order they run: `hello` first (the others need a connected worker), `drain` last (it
# ends the worker).
SCENARIOS = (
    Scenario("hello", values.hello),
    Scenario("results", values.results),
    Scenario("unicode", values.unicode),
    Scenario("large-values", values.large_values),
    Scenario("bytes", values.bytes_reversed),
    Scenario("errors", values.errors),
    Scenario("retries", values.retries),
    Scenario("progress", values.progress),
    Scenario("cancel", faults.cancel),
    Scenario("time-limit", faults.time_limit),
    Scenario("heartbeats", faults.heartbeats),
    Scenario("reconnect-resend", faults.reconnect_resend),
    Scenario("reconnect-held", faults.reconnect_held),
    Scenario("stale-lease", faults.stale_lease),
    Scenario("drain", faults.drain),
)
NAMES = tuple(scenario.name for scenario in SCENARIOS)


@dataclass(frozen=True)
class Options:
    worker_cmd: str
    only: frozenset[str] = frozenset()
    skip: frozenset[str] = frozenset()
    startup_timeout: float = 30.0
    keep: bool = False


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Run:
    outcomes: list[Outcome]
    directory: Path
    server_log: str
    worker_log: str

    @property
    def passed(self) -> bool:
        return all(outcome.status != "FAIL" for outcome in self.outcomes)


def selected(options: Options) -> list[Scenario]:
    """The scenarios to run: --only (hello always), minus --skip."""
    unknown = sorted((options.only | options.skip) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; the scenarios are {', '.join(NAMES)}")
    wanted = options.only | {"hello"} if options.only else set(NAMES)
    return [s for s in SCENARIOS if s.name in wanted and (s.name == "hello" or s.name not in options.skip)]


async def run_kit(options: Options) -> Run:
    scenarios = selected(options)
    directory = Path(tempfile.mkdtemp(prefix="conveyor-conformance-"))
    tokens = Tokens.new()
    server = ServerProcess(directory, tokens)
    worker: WorkerProcess | None = None
    try:
        async with _started(server, tokens) as admin, _proxy(server.port) as proxy:
            queue = f"conformance-{uuid.uuid4().hex[:10]}"
            worker = WorkerProcess(directory, options.worker_cmd, {
                "CONVEYOR_ADDRESS": proxy.address, "CONVEYOR_QUEUE": queue, "CONVEYOR_TOKEN": tokens.worker,
            })
            worker.start()
            async with Client(server.address, token=tokens.admin, max_retry_seconds=5) as client:
                kit = Kit(server, worker, proxy, tokens, queue, client, admin, options.startup_timeout)
                outcomes = await _run_all(kit, scenarios)
        return Run(outcomes, directory, server.output(), worker.output())
    finally:
        if worker is not None:
            worker.stop(kill=True)
        server.stop()
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)


async def _run_all(kit: Kit, scenarios: list[Scenario]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    blocked = ""
    for scenario in scenarios:
        if blocked:
            outcomes.append(Outcome(scenario.name, "SKIP", message=blocked))
            continue
        outcome = await _run_one(kit, scenario)
        outcomes.append(outcome)
        if scenario.name == "hello" and outcome.status == "FAIL":
            blocked = "not run: the worker never became ready (see hello)"
        elif kit.worker.exit_code() is not None:
            blocked = f"not run: the worker exited with status {kit.worker.exit_code()}"
    return outcomes


async def _run_one(kit: Kit, scenario: Scenario) -> Outcome:
    began = time.monotonic()
    try:
        async with asyncio.timeout(SCENARIO_SECONDS):
            await scenario.run(kit)
    except ScenarioFailed as exc:
        return Outcome(scenario.name, "FAIL", time.monotonic() - began, str(exc))
    except TimeoutError:
        return Outcome(scenario.name, "FAIL", time.monotonic() - began,
                       f"the scenario did not end within {SCENARIO_SECONDS:g} s")
    except grpc.aio.AioRpcError as exc:  # the kit's own calls: the server is in trouble
        return Outcome(scenario.name, "FAIL", time.monotonic() - began,
                       f"a call to the kit's server failed: {exc.code().name}: {exc.details()}")
    finally:
        await _tidy(kit)
    return Outcome(scenario.name, "PASS", time.monotonic() - began)


async def _tidy(kit: Kit) -> None:
    """Undo what a scenario may have left: a cut link, tasks still running."""
    kit.proxy.restore()
    with contextlib.suppress(grpc.aio.AioRpcError):
        for task_id in kit.submitted:
            if (await kit.client.get_result(task_id)).state not in TERMINAL:
                await kit.client.cancel(task_id)
    kit.submitted.clear()


@contextlib.asynccontextmanager
async def _started(
    server: ServerProcess, tokens: Tokens
) -> AsyncIterator[admin_service_pb2_grpc.AdminServiceAsyncStub]:
    """The server, started and answering, and an admin stub to it."""
    server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        admin: admin_service_pb2_grpc.AdminServiceAsyncStub = admin_service_pb2_grpc.AdminServiceStub(channel)
        metadata = (("authorization", f"Bearer {tokens.admin}"),)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                await admin.ListWorkers(admin_service_pb2.ListWorkersRequest(), metadata=metadata, timeout=2)
                break
            except grpc.aio.AioRpcError:
                if not server.running or time.monotonic() > deadline:
                    output = tail(server.output())
                    raise RuntimeError(f"the kit's server did not start; its output ends:\n{output}") from None
                await asyncio.sleep(0.1)
        yield admin


@contextlib.asynccontextmanager
async def _proxy(port: int) -> AsyncIterator[LinkProxy]:
    proxy = LinkProxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
