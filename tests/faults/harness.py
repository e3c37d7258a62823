"""The fault-injection runner: one load, one fault, one result row.

A scenario (tests/faults/scenarios.py) builds its topology on a `Rig` (tests/faults/rig.py) and injects its
fault while `run_scenario` submits the load (tests/faults/load.py): `Load.tasks` lone tasks plus `Load.chords`
chords of `Load.members` members, every id chosen here and recorded, spread over `Load.submit_seconds` in
SubmitBatch calls. The run then waits (bounded) for every accepted id to be terminal, lets late duplicates
show up for `settle_seconds`, reads the final states and the workers' execution log, and returns a `Row`
(tests/faults/row.py says what each column counts).

The client is honest about acceptance: a SubmitBatch that fails with a transient status (UNAVAILABLE,
UNKNOWN, DEADLINE_EXCEEDED, ...) is sent again with the same ids, to the next replica, until
`submit_give_up_seconds`; ALREADY_EXISTS on a retry means an earlier attempt stored it, so it counts as
accepted. Every accepted id must then reach its expected terminal state.

    row = await run_scenario(WorkerKill(), tmp_path)
    print(row.report())
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from conveyor import state_name
from conveyor.v1 import task_service_pb2, task_service_pb2_grpc
from tests.faults.load import Batch, ChordIds, ExecutionLog, Load, build_plan
from tests.faults.rig import Rig, code_under_test
from tests.faults.row import NOT_FOUND, TERMINAL_NAMES, UNREAD, Evidence, Row, count, format_table, write_outcomes
from tests.support.processes import Proc

__all__ = ["Load", "Rig", "Row", "Run", "Scenario", "blocking", "format_table", "outage", "run_scenario"]

# Statuses after which the client sends the same submission again (with the same ids).
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RETRY_PAUSE_SECONDS = 0.25
POLL_SECONDS = 0.5
POLL_CONCURRENCY = 32


@dataclass
class SubmitOutcome:
    batch: Batch
    accepted: bool
    how: str  # ok, ok-after-retry, already-exists-on-retry, already-exists-first, or the final status
    attempts: int


class Clients:
    """One channel per replica address; calls rotate over them, so a retry goes to the next replica."""

    def __init__(self, addresses: Sequence[str], timeout: float) -> None:
        self.timeout = timeout
        self.channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self.stubs = [task_service_pb2_grpc.TaskServiceStub(c) for c in self.channels]
        self._next = itertools.count()
        self.transient_errors: Counter[str] = Counter()

    def stub(self, pin: int | None = None) -> task_service_pb2_grpc.TaskServiceAsyncStub:
        """The next replica's stub, or replica `pin` (in the order the servers were started)."""
        index = pin if pin is not None else next(self._next)
        return self.stubs[index % len(self.stubs)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def submit(self, batch: Batch, give_up_seconds: float) -> SubmitOutcome:
        deadline = time.monotonic() + give_up_seconds
        for attempt in itertools.count(1):
            try:
                await self.stub().SubmitBatch(batch.request, timeout=self.timeout)
                return SubmitOutcome(batch, True, "ok" if attempt == 1 else "ok-after-retry", attempt)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    how = "already-exists-on-retry" if attempt > 1 else "already-exists-first"
                    return SubmitOutcome(batch, True, how, attempt)
                if code not in TRANSIENT or time.monotonic() > deadline:
                    return SubmitOutcome(batch, False, f"{code.name}: {exc.details()}", attempt)
                self.transient_errors[f"submit {code.name}"] += 1
            await asyncio.sleep(RETRY_PAUSE_SECONDS)
        raise AssertionError("unreachable")

    async def state(self, task_id: str) -> str:
        """The task's state name, NOT_FOUND, or UNREAD when no replica answered."""
        for _ in range(len(self.stubs)):
            try:
                reply = await self.stub().GetResult(task_service_pb2.GetResultRequest(task_id=task_id),
                                                    timeout=self.timeout)
                return state_name(reply.result.state)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return NOT_FOUND
                self.transient_errors[f"get {exc.code().name}"] += 1
        return UNREAD

    async def states(self, task_ids: Iterable[str]) -> dict[str, str]:
        gate = asyncio.Semaphore(POLL_CONCURRENCY)

        async def one(task_id: str) -> tuple[str, str]:
            async with gate:
                return task_id, await self.state(task_id)

        return dict(await asyncio.gather(*(one(t) for t in task_ids)))


class Run:
    """What a scenario's fault sees while the load runs, and where it records the fault's window."""

    def __init__(self, rig: Rig, plan: Sequence[Batch], clients: Clients) -> None:
        self.rig = rig
        self.plan = plan
        self.clients = clients
        self.log = ExecutionLog(rig.log_path)
        self.outcomes: list[SubmitOutcome] = []
        # Wall-clock times (the workers log wall-clock times too).
        self.fault_started: float | None = None
        self.fault_ended: float | None = None
        self.notes: list[str] = []
        # Cancel scenario: id -> wall time its Cancel call returned; ids whose Cancel failed, and why.
        self.cancelled_at: dict[str, float] = {}
        self.cancel_errors: dict[str, str] = {}
        # Set once every batch was answered (accepted or given up).
        self.loaded = asyncio.Event()

    @property
    def submitted_fraction(self) -> float:
        return len(self.outcomes) / len(self.plan)

    def lone_task_ids(self) -> list[str]:
        return [i for b in self.plan for i in b.task_ids]

    def chord_ids(self) -> list[ChordIds]:
        return [b.chord for b in self.plan if b.chord is not None]

    def total_ids(self) -> int:
        return sum(len(b.ids) for b in self.plan)

    async def until(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {seconds} s")
            await asyncio.sleep(0.05)

    def fault_began(self, what: str) -> None:
        self.fault_started = time.time()
        self.notes.append(f"fault: {what} (at {self.submitted_fraction:.0%} of the load submitted, "
                          f"{len(self.log.by_task())} of {self.total_ids()} ids run)")

    def fault_over(self) -> None:
        self.fault_ended = time.time()


class Scenario:
    """One fault: subclasses set `name` and `description` (and, for the engine x outage table, `engine` and
    `outage`) and implement `setup` and `inject`."""

    name = "scenario"
    description = ""
    engine = ""
    outage = ""

    def tune(self, load: Load) -> Load:
        """The load this scenario runs (most run the default)."""
        return load

    def setup(self, rig: Rig) -> None:
        """Start engines, proxies, servers and workers (blocking is fine: nothing runs yet)."""
        raise NotImplementedError

    async def inject(self, run: Run) -> None:
        """Runs beside the load: inject the fault, call run.fault_began/fault_over. Block via `blocking`."""
        raise NotImplementedError


async def run_scenario(scenario: Scenario, workdir: Path, load: Load | None = None,
                       procs: list[Proc] | None = None, cleanups: list[Callable[[], None]] | None = None) -> Row:
    """Start the scenario's topology, submit the load while its fault runs, wait, count; always cleans up.

    `procs` receives every server and worker process; `cleanups` receives the rig's (idempotent) close, for a
    caller that must stop everything even if this coroutine is interrupted (a test timeout)."""
    load = scenario.tune(load or Load())
    began = time.monotonic()
    rig = Rig(workdir, load, procs)
    if cleanups is not None:
        cleanups.append(rig.close)
    try:
        await asyncio.to_thread(scenario.setup, rig)
        row = await _drive(scenario, rig)
    finally:
        await asyncio.to_thread(rig.close)
    row.wall_seconds = time.monotonic() - began
    return row


async def _drive(scenario: Scenario, rig: Rig) -> Row:
    load = rig.load
    clients = Clients(rig.addresses, load.call_timeout_seconds)
    run = Run(rig, build_plan(load, rig.queue, rig.run_id), clients)
    try:
        fault = asyncio.create_task(scenario.inject(run), name=f"fault {scenario.name}")
        try:
            await _submit_all(run)
        finally:
            run.loaded.set()
        fault_error = ""
        try:
            await fault
        except AssertionError as exc:  # its trigger never came: the row says so instead of raising
            fault_error = str(exc)
        if run.fault_ended is None:
            run.fault_over()
            run.notes.append("the fault never marked its end: recovery counted from the end of the load")
        accepted = [i for o in run.outcomes if o.accepted for i in o.batch.ids]
        recover = await _wait_terminal(run, accepted)
        await asyncio.sleep(load.settle_seconds)
        if exited := rig.exited_by_themselves():
            run.notes.append(f"processes that exited by themselves: {exited}")
        final = await clients.states(accepted)
        evidence = _evidence(run, accepted, final)
        row = count(Row(scenario.name, scenario.engine, scenario.outage, recover_seconds=recover,
                        resume_seconds=_resumed(run), client_errors=clients.transient_errors.copy(),
                        notes=run.notes, fault_error=fault_error), evidence)
        row.server_engines = rig.engine_schemes()
        write_outcomes(rig.workdir / "outcomes.csv", run.plan, evidence)
        _describe_fault_window(row, run)
        if clients.transient_errors:
            row.notes.append(f"client retries: {dict(clients.transient_errors)}")
        if not row.ok:
            row.notes.append(f"code under test: {code_under_test()}; logs in {rig.workdir}")
            row.notes.extend(f"server log: {line}" for line in rig.server_log_excerpt())
        return row
    finally:
        await clients.close()


def _evidence(run: Run, accepted: list[str], final: dict[str, str]) -> Evidence:
    return Evidence(
        accepted=accepted,
        refused={i: o.how for o in run.outcomes if not o.accepted for i in o.batch.ids},
        accepted_how={i: o.how for o in run.outcomes if o.accepted for i in o.batch.ids},
        final=final,
        runs=run.log.by_task(),
        chords=run.chord_ids(),
        killed_worker_pids=run.rig.killed_worker_pids,
        cancelled_at=run.cancelled_at,
        cancel_errors=run.cancel_errors,
    )


async def _submit_all(run: Run) -> None:
    load = run.rig.load
    interval = load.submit_seconds / max(len(run.plan), 1)
    start = time.monotonic()

    async def send(batch: Batch) -> None:
        await asyncio.sleep(max(start + batch.index * interval - time.monotonic(), 0.0))
        run.outcomes.append(await run.clients.submit(batch, load.submit_give_up_seconds))

    await asyncio.gather(*(send(b) for b in run.plan))
    run.notes.append(f"submits: {dict(Counter(o.how.split(':')[0] for o in run.outcomes))}")


async def _wait_terminal(run: Run, ids: Sequence[str]) -> float | None:
    """Poll until every id is terminal; seconds after the fault ended, or None when some stay stuck.

    A round reads only the pending ids the log shows ran (one that never ran cannot have ended, except by a
    cancel); every fourth round reads every pending id."""
    assert run.fault_ended is not None
    deadline = time.monotonic() + run.rig.load.stuck_after_seconds
    pending = set(ids)
    for round_number in itertools.count():
        ran = run.log.by_task()
        ask = pending if round_number % 4 == 3 else {i for i in pending if i in ran}
        states = await run.clients.states(sorted(ask))
        pending -= {i for i, s in states.items() if s in TERMINAL_NAMES}
        if not pending:
            return max(time.time() - run.fault_ended, 0.0)
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(POLL_SECONDS)
    return None


def _resumed(run: Run) -> float | None:
    """Seconds from the fault's end to the first execution that started after it (None: none did)."""
    assert run.fault_ended is not None
    end = run.fault_ended
    return min((e.at - end for e in run.log.refresh() if e.at >= end), default=None)


def _describe_fault_window(row: Row, run: Run) -> None:
    """How many executions of each kind fell before, during and after the fault: did the fault meet the load?"""
    if run.fault_started is None or run.fault_ended is None:
        return
    start, end = run.fault_started, run.fault_ended
    spread: Counter[str] = Counter()
    for execution in run.log.refresh():
        when = "before" if execution.at < start else "during" if execution.at <= end else "after"
        spread[f"{execution.kind} {when}"] += 1
    row.notes.append(f"fault window {end - start:.1f} s; executions {dict(sorted(spread.items()))}")


async def blocking(function: Callable[[], object]) -> None:
    """Run a blocking step (restart a process, stop a redis) without stalling the load."""
    await asyncio.to_thread(function)


async def outage(run: Run, what: str, down: Callable[[], object], up: Callable[[], object],
                 seconds: float) -> None:
    """`down()`, wait `seconds`, `up()`; the fault's window spans all three."""
    run.fault_began(what)
    await blocking(down)
    await asyncio.sleep(seconds)
    await blocking(up)
    run.fault_over()
