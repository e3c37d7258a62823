"""Two server replicas over one pair of memory engines, with scripted interleavings.

Builds on tests/unit/test_durability.py's engines (FlakyBroker, FlakyBackend, `build`). A real
deployment runs N replicas over one broker and one backend; here two `Core`s share the same
memory engines, and a test decides where their engine calls interleave:

- `SharedBackend.meet_on_add(prefix, parties)`: each `add_member` on a group whose name starts
  with `prefix` holds its answer until `parties` adds have reached that group, then returns the
  member count as it is then (the contract: "how many distinct members the group has after the
  call"). Two members recorded at once on two replicas then both see their group complete, as
  they may on an engine where the count is read after the add.
- `SharedBackend.hold_after_insert(prefix, gate)`: an insert of a key starting with `prefix`
  returns only once `gate` is set (a slow round trip for that one caller).

No sleeps, no processes: concurrency is `asyncio.gather` plus these gates.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass

import pytest

from conveyor.v1 import result_pb2, task_pb2, worker_service_pb2
from conveyor_server.app import Core
from conveyor_server.backends.base import Changes
from conveyor_server.backends.memory import MemoryBackend
from conveyor_server.core import dispatch, outcomes
from conveyor_server.core.connection import settle
from conveyor_server.core.dispatch import Claim
from conveyor_server.core.sessions import WorkerSession
from tests.unit.test_durability import QUEUE, Clock, FlakyBackend, FlakyBroker, build


class SharedBackend(FlakyBackend):
    """The flaky memory backend, plus meeting points, slow inserts and a count of group reads."""

    def __init__(self, ttl_seconds: float = 86_400.0) -> None:
        super().__init__(ttl_seconds)
        self.member_reads: Counter[str] = Counter()
        self._meetings: dict[str, int] = {}
        self._arrived: Counter[str] = Counter()
        self._met: dict[str, asyncio.Event] = {}
        self._insert_gates: dict[str, asyncio.Event] = {}
        self.watches = 0

    def meet_on_add(self, prefix: str, parties: int) -> None:
        self._meetings[prefix] = parties

    def hold_after_insert(self, prefix: str, gate: asyncio.Event) -> None:
        self._insert_gates[prefix] = gate

    async def add_member(self, group: str, member: str, payload: bytes, keep: bool = False) -> int:
        count = await super().add_member(group, member, payload, keep)
        parties = next((n for prefix, n in self._meetings.items() if group.startswith(prefix)), 0)
        if not parties:
            return count
        self._arrived[group] += 1
        met = self._met.setdefault(group, asyncio.Event())
        if self._arrived[group] >= parties:
            met.set()
        await met.wait()
        return len(await MemoryBackend.members(self, group))

    async def members(self, group: str, after: str = "", limit: int = 0) -> dict[str, bytes]:
        self.member_reads[group] += 1
        return await super().members(group, after, limit)

    async def insert(self, records: Mapping[str, bytes], keep: bool = False) -> list[str]:
        existing = await super().insert(records, keep)
        for prefix, gate in list(self._insert_gates.items()):
            if any(key.startswith(prefix) for key in records):
                del self._insert_gates[prefix]  # holds one caller only
                await gate.wait()
        return existing

    def watch(self, keys: Collection[str]) -> AsyncIterator[Changes]:
        self.watches += 1
        return super().watch(keys)

    def group_reads(self, prefix: str) -> int:
        return sum(n for group, n in self.member_reads.items() if group.startswith(prefix))


@dataclass
class Replicas:
    a: Core
    b: Core
    broker: FlakyBroker
    backend: SharedBackend
    clock: Clock


@pytest.fixture(autouse=True)
def quick_repairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages handed back for repair come back at once (a second in production)."""
    monkeypatch.setattr(outcomes, "REPAIR_DELAY_SECONDS", 0.0)
    monkeypatch.setattr(dispatch, "REPAIR_RETRY_SECONDS", 0.0)


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    broker, backend, clock = FlakyBroker(), SharedBackend(), Clock()
    await broker.connect()
    await backend.connect()
    yield Replicas(build(broker, backend, clock), build(broker, backend, clock), broker, backend, clock)
    await broker.close()
    await backend.close()


@pytest.fixture
async def short_lived() -> AsyncIterator[Replicas]:
    """Replicas over engines whose unkept records, groups and claims expire at once (TTL 0):
    whatever must outlive a running workflow has to be written to be kept."""
    broker, backend, clock = FlakyBroker(), SharedBackend(ttl_seconds=0.0), Clock()
    await broker.connect()
    await backend.connect()
    yield Replicas(build(broker, backend, clock), build(broker, backend, clock), broker, backend, clock)
    await broker.close()
    await backend.close()


async def lease_all(core: Core, worker_id: str = "w1") -> Claim:
    """Fetch what is ready and lease it to `worker_id` through `core`, RECEIVED written."""
    deliveries = await core.broker.fetch(QUEUE, 100, 30.0)
    claim = await core.connections.dispatcher.claim(deliveries, worker_id, time.monotonic())
    await core.connections.dispatcher.record(claim.leases, worker_id, claim.read)
    for lease in claim.leases:
        lease.receipt_pending = False
        lease.recorded.set_result(None)
    return claim


def outcome(
    claim: Claim,
    task_id: str,
    kind: worker_service_pb2.Outcome.ValueType = worker_service_pb2.OUTCOME_SUCCESS,
    **fields: object,
) -> worker_service_pb2.TaskOutcome:
    """The worker's report for `task_id` under the lease `claim` gave it."""
    [lease] = [lease for lease in claim.leases if lease.task_id == task_id]
    return worker_service_pb2.TaskOutcome(task_id=task_id, lease_token=lease.token, outcome=kind, **fields)  # type: ignore[arg-type]


def sent(session: WorkerSession) -> list[worker_service_pb2.ConnectResponse]:
    """Everything queued on the session's stream so far (taken off it), acks still lingering
    included."""
    session.send_acks()
    messages: list[worker_service_pb2.ConnectResponse] = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None:
            messages.append(message)
    return messages


def cancels(messages: list[worker_service_pb2.ConnectResponse]) -> list[str]:
    return [t for m in messages if m.WhichOneof("message") == "cancel" for t in m.cancel.task_ids]


async def run_ready(
    core: Core, fail: Collection[str] = (), results: Mapping[str, task_pb2.Value] | None = None,
    worker_id: str = "w1",
) -> dict[str, worker_service_pb2.Assignment]:
    """One pass of a worker through `core`: run every ready task, failing those in `fail`
    (error type "Boom") and returning `results[task_id]` (default: the task id as a string)
    for the others; returns the assignments it got, by task id."""
    claim = await lease_all(core, worker_id)
    results = results or {}
    reports = [
        (
            outcome(
                claim,
                lease.task_id,
                worker_service_pb2.OUTCOME_FAILURE,
                error=result_pb2.TaskError(type="Boom", message=lease.task_id),
            )
            if lease.task_id in fail
            else outcome(
                claim, lease.task_id, result=results.get(lease.task_id, task_pb2.Value(string_value=lease.task_id))
            )
        )
        for lease in claim.leases
    ]
    recorded = await core.connections.recorder.record(reports, worker_id) if reports else None
    await settle(core.broker, claim.leases, recorded.requeue if recorded else {})
    await core.connections.dispatcher.drop_unrunnable(claim)
    return {c.lease.task_id: c.assignment for c in claim.claimed}


async def run_all(
    core: Core, fail: Collection[str] = (), results: Mapping[str, task_pb2.Value] | None = None, rounds: int = 20,
) -> dict[str, worker_service_pb2.Assignment]:
    """Run until nothing is ready (a repair may make something ready without running anything);
    every assignment handed out, by task id (the last one wins)."""
    ran: dict[str, worker_service_pb2.Assignment] = {}
    for _ in range(rounds):
        assignments = await run_ready(core, fail, results)
        if not assignments and not (await core.broker.stats(QUEUE)).ready:
            return ran
        ran.update(assignments)
    return ran
