"""Connected workers: their windows, their leases, and what happens when they leave.

The window invariant: leases held + slots reserved by in-progress fetches never exceed the
worker's max_in_flight, so the server never has more unresolved tasks on a worker than
its window. `high_water` records the most it ever held, for tests and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import worker_service_pb2

from .dispatch import Lease
from .routing import Unroutable

log = logging.getLogger(__name__)

# A result's ack waits this long for the acks of other results to share its message: at light
# load each result had a ResultAcks message of its own, and reading it was about a sixth of the
# Python worker's CPU per task (bench/latency.py). Nothing waits for an ack but the worker's copy
# of the result (kept to send again after a reconnect) and the end of its drain.
ACK_LINGER_SECONDS = 0.01


@dataclass(eq=False)
class WorkerSession:
    worker_id: str
    hello: worker_service_pb2.Hello
    queues: list[str]
    window: int
    connected_at: Timestamp
    # When the worker was last heard from (monotonic, on the clock of its WorkerConnections).
    last_seen: float
    # The queues the worker's token is limited to (empty: any); its replacements may use only these.
    allowed_queues: tuple[str, ...] = ()
    # Messages for the worker; None marks the end of the stream.
    outbox: asyncio.Queue[worker_service_pb2.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    leases: dict[str, Lease] = field(default_factory=dict)
    reserved: int = 0
    high_water: int = 0
    draining: bool = False
    closed: bool = False
    # The server is handling one of the worker's messages (the watchdog does not count that time).
    handling: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task_names: frozenset[str] = field(init=False)
    # Acks not sent yet (ack()), and the timer that sends them.
    _acks: list[worker_service_pb2.ResultAck] = field(default_factory=list, init=False, repr=False)
    _acks_due: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    def __post_init__(self) -> None:
        # The names this worker registered; empty: it takes any task.
        self.task_names = frozenset(self.hello.task_names)

    def can_run(self, name: str) -> bool:
        return not self.task_names or name in self.task_names

    def free(self) -> int:
        return self.window - len(self.leases) - self.reserved

    async def reserve(self, most: int) -> int:
        """Wait for free window slots and reserve up to `most`; 0 once the session ends."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.closed or (not self.draining and self.free() > 0))
            if self.closed:
                return 0
            granted = min(self.free(), most)
            self.reserved += granted
            return granted

    async def settle(self, reserved: int, leases: Iterable[Lease]) -> None:
        """Turn a reservation into leases (as many as were delivered) and free the rest."""
        async with self._changed:
            for lease in leases:
                self.leases[lease.token] = lease
            self.reserved -= reserved
            self.high_water = max(self.high_water, len(self.leases) + self.reserved)
            self._changed.notify_all()

    async def resolve(self, tokens: Iterable[str]) -> list[Lease]:
        async with self._changed:
            resolved = [lease for token in tokens if (lease := self.leases.pop(token, None)) is not None]
            self._changed.notify_all()
            return resolved

    async def set_window(self, window: int) -> None:
        async with self._changed:
            self.window = max(window, 1)
            self._changed.notify_all()

    async def set_draining(self) -> None:
        async with self._changed:
            self.draining = True
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    def send(self, message: worker_service_pb2.ConnectResponse) -> None:
        self.outbox.put_nowait(message)

    def ack(self, acks: Iterable[worker_service_pb2.ResultAck]) -> None:
        """Send these acks within ACK_LINGER_SECONDS, in one message with the others due by then."""
        self._acks.extend(acks)
        if self._acks_due is None and self._acks:
            self._acks_due = asyncio.get_running_loop().call_later(ACK_LINGER_SECONDS, self.send_acks)

    def send_acks(self) -> None:
        """Send the lingering acks now."""
        if self._acks_due is not None:
            self._acks_due.cancel()
            self._acks_due = None
        if self._acks:
            self.send(worker_service_pb2.ConnectResponse(acks=worker_service_pb2.ResultAcks(acks=self._acks)))
            self._acks = []

    def end_outbox(self) -> None:
        """No more messages: the stream's writer sends what is queued (acks still lingering
        included), then finishes."""
        self.send_acks()
        self.outbox.put_nowait(None)


class SessionRegistry:
    """Sessions of this server replica, and leases of recently closed ones (their grace)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions: dict[int, WorkerSession] = {}
        self._orphans: dict[str, Lease] = {}
        self.unroutable = Unroutable(clock)

    def runner_for(self, queue: str, name: str) -> bool:
        """True when a live worker of this replica on `queue` can run tasks named `name`."""
        return any(
            not s.closed and not s.draining and queue in s.queues and s.can_run(name) for s in self.sessions.values()
        )

    def add(self, session: WorkerSession) -> None:
        self.sessions[id(session)] = session

    def remove(self, session: WorkerSession) -> list[Lease]:
        """Forget a closed session; its leases become orphans until the grace ends."""
        self.sessions.pop(id(session), None)
        leases = list(session.leases.values())
        session.leases.clear()
        for lease in leases:
            self._orphans[lease.token] = lease
        return leases

    def adopt(self, session: WorkerSession, held: Iterable[worker_service_pb2.LeaseRef]) -> list[Lease]:
        """Move the leases a reconnected worker says it still holds to its new session, so they
        are extended there and not handed back after the grace (the tasks are still running):
        orphans of its earlier stream, or leases of that stream when this replica has not seen
        it end yet (a connection that died without a word)."""
        adopted = []
        for ref in held:
            lease = self._orphans.get(ref.lease_token)
            if lease is not None and lease.task_id == ref.task_id:
                del self._orphans[ref.lease_token]
            elif (lease := self._live_lease(ref, session)) is None:
                continue
            session.leases[lease.token] = lease
            adopted.append(lease)
        return adopted

    def _live_lease(self, ref: worker_service_pb2.LeaseRef, taker: WorkerSession) -> Lease | None:
        """Take this lease from the other open session holding it (the worker's earlier stream)."""
        for other in self.sessions.values():
            lease = other.leases.get(ref.lease_token)
            if other is not taker and lease is not None and lease.task_id == ref.task_id:
                del other.leases[ref.lease_token]
                return lease
        return None

    def take_orphans(self, leases: Iterable[Lease]) -> list[Lease]:
        """Claim orphans that nobody resolved during the grace."""
        return [lease for lease in leases if self._orphans.pop(lease.token, None) is not None]

    def take_all_orphans(self) -> list[Lease]:
        """Every orphan still waiting for its grace (the server is stopping)."""
        orphans = list(self._orphans.values())
        self._orphans.clear()
        return orphans

    def orphan(self, token: str) -> Lease | None:
        """The closed session's lease with this token, still in its grace."""
        return self._orphans.get(token)

    def resolve_orphan(self, token: str) -> Lease | None:
        """A result for a lease of a closed session (the worker reconnected in time)."""
        return self._orphans.pop(token, None)

    def holding(self, task_ids: Iterable[str]) -> dict[WorkerSession, list[str]]:
        wanted = set(task_ids)
        found: dict[WorkerSession, list[str]] = {}
        for session in self.sessions.values():
            hits = [lease.task_id for lease in session.leases.values() if lease.task_id in wanted]
            if hits:
                found[session] = hits
        return found
