"""What a worker reports about its tasks, batched: STARTED reports, results, and the results the
server has not acked yet (kept to send again after a reconnect).

The Node worker keeps the same parts in workers/node/lib/reports.js: a change to how reports are
batched or acked is made in both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from conveyor.v1 import worker_service_pb2

# Sends one message on the current stream (dropped between streams).
Send = Callable[[worker_service_pb2.ConnectRequest], None]

# Tasks still running this long after they began are reported as STARTED (in one batch);
# quicker ones skip it, their result carries started_at instead.
STARTED_REPORT_SECONDS = 0.02
# While other tasks are running, a result waits this long for theirs to share its message.
RESULT_LINGER_SECONDS = 0.002
# While the window holds a backlog (at least as many tasks as slots, so no slot idles while a
# result waits), a result waits up to this long instead: each Results message costs the server
# a record write, a broker ack and a refill of the window, about twice a task's own cost. At one
# slot and 1,000 tasks/s, 2 ms gathered two results per message and 20 ms gather twenty
# (bench/compare.py, 2 workers x 1 slot: 1,953 -> 3,993 tasks/s, 462 -> 193 µs of server CPU per
# task). Under a backlog each task has already waited its turn in the window for longer.
RESULT_BACKLOG_LINGER_SECONDS = 0.02


def result_batch_size(window: int) -> int:
    """Results per message while other tasks of the window run or wait: half the window, so
    the server refills the other half meanwhile. Not the slot count: at concurrency 1 that sent
    every result alone, and each message costs the server a backend write and a follow-up pass."""
    return max(1, window // 2)


class StartedBatcher:
    """Reports the tasks that began in one STARTED_REPORT_SECONDS window in one Started message,
    leaving out those that ended within it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: dict[str, worker_service_pb2.LeaseRef] = {}
        self._scheduled = False

    def started(self, assignment: worker_service_pb2.Assignment) -> None:
        task_id = assignment.task.id
        self._pending[task_id] = worker_service_pb2.LeaseRef(task_id=task_id, lease_token=assignment.lease_token)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(STARTED_REPORT_SECONDS, self.flush)

    def ended(self, task_id: str) -> None:
        """The task ended: its result says when it started."""
        self._pending.pop(task_id, None)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            self._send(worker_service_pb2.ConnectRequest(started=worker_service_pb2.Started(tasks=list(self._pending.values()))))
            self._pending = {}


class ResultBatcher:
    """Sends results in Results messages, several per message when tasks end close together."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[worker_service_pb2.TaskOutcome] = []
        self._flush_scheduled = False
        self._linger: asyncio.TimerHandle | None = None

    def add(
        self, outcome: worker_service_pb2.TaskOutcome, *, others_running: bool, batch_size: int,
        backlog: bool = False,
    ) -> None:
        """`others_running`: other tasks of the window run or wait; `backlog`: the window holds at
        least as many tasks as there are slots."""
        self._pending.append(outcome)
        loop = asyncio.get_running_loop()
        if not others_running or len(self._pending) >= batch_size:
            # Nothing else is about to finish, or a batch is full: send now, with whatever else
            # finishes in this loop iteration.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self.flush)
            return
        # Other tasks are running: results that end within a moment share one message (and one
        # write on the server) with this one; longer while a backlog keeps every slot busy.
        due = loop.time() + (RESULT_BACKLOG_LINGER_SECONDS if backlog else RESULT_LINGER_SECONDS)
        if self._linger is None or due < self._linger.when():
            if self._linger is not None:
                self._linger.cancel()
            self._linger = loop.call_at(due, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._pending:
            self._send(worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=self._pending)))
            self._pending = []


class UnackedResults:
    """Results sent and not acked yet; after a reconnect they are sent again (the server decides
    whether they still count)."""

    def __init__(self) -> None:
        self._held: dict[str, worker_service_pb2.TaskOutcome] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, outcome: worker_service_pb2.TaskOutcome) -> None:
        self._held[outcome.task_id] = outcome

    def acked(self, acks: Iterable[worker_service_pb2.ResultAck]) -> list[worker_service_pb2.ResultAck]:
        """Let go of the acked results (of the lease that sent them); returns the acks that did
        not accept their result."""
        refused = []
        for ack in acks:
            held = self._held.get(ack.task_id)
            if held is not None and held.lease_token == ack.lease_token:
                del self._held[ack.task_id]
            if ack.status != worker_service_pb2.ACK_STATUS_ACCEPTED:
                refused.append(ack)
        return refused

    def resend(self) -> worker_service_pb2.ConnectRequest | None:
        """The message that sends every unacked result again (None when there is none)."""
        return (
            worker_service_pb2.ConnectRequest(results=worker_service_pb2.Results(outcomes=list(self._held.values())))
            if self._held
            else None
        )

    def clear(self) -> None:
        self._held.clear()
