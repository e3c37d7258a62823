"""One worker's stream: pulls work for it within its window, records what it reports,
keeps its leases alive, and hands its tasks back when it leaves.

A short engine outage does not end the stream: fetching pauses and retries, reports that
could not be recorded are retried with backoff (the worker waits for their acks), and
heartbeats that fail are skipped; the broker's own leases cover the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration

from conveyor.internal.v1 import records_pb2
from conveyor.v1 import worker_service_pb2
from conveyor.values import set_seconds

from ..background import stop_tasks
from ..backoff import Backoff
from ..brokers.base import Broker, Delivery
from ..config import Settings
from ..engine_errors import is_transient
from .clock import SYSTEM_CLOCK, Clock
from .dispatch import REPAIR_RETRY_SECONDS, Claim, Dispatcher, Lease
from .errors import InvalidArgument
from .outcomes import OutcomeRecorder, Recorded
from .pauses import QueuePauses
from .records import TaskStates, error, is_terminal
from .repair import stamp_live_leases
from .routing import bounce_delay
from .routing_timeout import past_routing_timeout
from .sessions import SessionRegistry, WorkerSession
from .sizing import DEFAULT_WORKER_RECEIVE_BYTES, split_to_fit
from .store import Loaded, TaskStore
from .takeover import take_over, withdraw_unmoved
from .task_registry import TaskRegistry

log = logging.getLogger(__name__)
# How long one fetch waits for work before re-checking the session.
FETCH_WAIT_SECONDS = 1.0
# RECEIVED is written this long after dispatch unless the task's result (or a report about
# it) comes first and takes it along; the worker's STARTED report waits 20 ms likewise.
RECEIVED_DELAY_SECONDS = 0.02
# Extra time past a task's time limit before the server itself gives up on the attempt.
TIME_LIMIT_GRACE_SECONDS = 5.0
# A task too large for the worker it was fetched for waits this long before another try.
OVERSIZED_RETRY_SECONDS = 1.0
# A fetch or a results write that an engine refused is tried again after a jittered backoff from
# the first delay up to the cap: the cap bounds how long after the engine's return the worker
# waits for work again (results not yet recorded hold their slots in its window).
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 0.5


def _duration(seconds: float) -> Duration:
    duration = Duration()
    set_seconds(duration, seconds)
    return duration


def _recorded(leases: Iterable[Lease]) -> None:
    """The write of these leases' RECEIVED has ended: wake whoever waits for it."""
    for lease in leases:
        if not lease.recorded.done():
            lease.recorded.set_result(None)


async def _until_recorded(leases: Iterable[Lease]) -> None:
    waiting = [lease.recorded for lease in leases if not lease.recorded.done()]
    if waiting:
        await asyncio.gather(*waiting)


async def settle(broker: Broker, leases: Sequence[Lease], requeue: Mapping[str, float]) -> None:
    """Ack the messages of leases whose outcome and follow-ups are durable; hand the others
    back to the broker with their delay (a retry's wait, or a repair's)."""
    await settle_messages(broker, {lease.task_id: lease.delivery for lease in leases}, requeue)


async def settle_messages(broker: Broker, messages: Mapping[str, Delivery], requeue: Mapping[str, float]) -> None:
    """`settle` for messages by task id."""
    done = [delivery for task_id, delivery in messages.items() if task_id not in requeue]
    if done:
        await broker.ack(done)
    by_delay: dict[float, list[Delivery]] = {}
    for task_id, delivery in messages.items():
        if task_id in requeue:
            by_delay.setdefault(requeue[task_id], []).append(delivery)
    for delay, deliveries in by_delay.items():
        await broker.nack(deliveries, delay)


class WorkerConnections:
    """Everything the server does for connected workers; one instance per server."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        store: TaskStore,
        dispatcher: Dispatcher,
        recorder: OutcomeRecorder,
        registry: SessionRegistry,
        pauses: QueuePauses,
        tasks: TaskRegistry | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.store = store
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.registry = registry
        self.pauses = pauses
        # The task registry across replicas: what each worker's Hello declares.
        self.tasks = tasks
        self.clock = clock
        self._background: set[asyncio.Task[None]] = set()

    def open(self, hello: worker_service_pb2.Hello, allowed_queues: Sequence[str] = ()) -> WorkerSession:
        """A session for `hello`; `allowed_queues`: those its token is limited to (empty: any)."""
        if hello.max_in_flight < 1:
            raise InvalidArgument(f"hello.max_in_flight must be at least 1, got {hello.max_in_flight}")
        for queue in hello.queues:
            if not queue or len(queue) > 64:
                raise InvalidArgument(f"hello.queues: invalid queue name {queue[:80]!r}")
        session = WorkerSession(
            worker_id=hello.worker_id or f"worker-{uuid.uuid4().hex[:12]}",
            hello=hello,
            queues=list(dict.fromkeys(hello.queues)) or [self.settings.default_queue],
            window=max(hello.max_in_flight, 1),
            connected_at=self.clock.timestamp(),
            last_seen=self.clock.monotonic(),
            allowed_queues=tuple(allowed_queues),
        )
        if self.tasks is not None:
            self.tasks.joined(session)  # first: a Hello it refuses leaves nothing behind
        self.registry.add(session)
        if adopted := self.registry.adopt(session, hello.held):
            log.info("worker %s reconnected holding %d tasks: their leases stay with it", session.worker_id,
                     len(adopted))
        session.send(worker_service_pb2.ConnectResponse(welcome=worker_service_pb2.Welcome(
            worker_id=session.worker_id,
            heartbeat_interval=_duration(self.settings.heartbeat_interval_seconds),
            lease_duration=_duration(self.settings.lease_seconds),
            max_message_bytes=self.settings.limits.max_message_bytes,
            server_id=self.settings.server_id,
        )))
        return session

    async def run(self, session: WorkerSession, requests: AsyncIterator[worker_service_pb2.ConnectRequest]) -> None:
        """Serve the session until the worker's stream ends; then hand back what it held."""
        await self._take_over(session)  # before the pumps fill the window these leases share
        tasks = [asyncio.create_task(self._pump(session, queue)) for queue in session.queues]
        tasks.append(asyncio.create_task(self._watchdog(session)))
        tasks.append(asyncio.create_task(self._keep_leases(session)))
        try:
            async for request in requests:
                session.last_seen = self.clock.monotonic()
                # While the server handles a report (an engine outage can hold it for seconds), the
                # reports behind it wait in the stream: that is the server's delay, not the worker's
                # silence, so the watchdog counts silence only from when the server reads again.
                session.handling = True
                try:
                    await self._handle_through_outages(session, request)
                finally:
                    session.handling = False
                    session.last_seen = self.clock.monotonic()
        finally:
            # Shielded: when the call is cancelled again while this cleanup awaits, the leases must
            # still leave the dead session and go back to the queue after the grace.
            await asyncio.shield(self._spawn(self._leave(session, tasks)))

    async def _take_over(self, session: WorkerSession) -> None:
        """Take over the leases the reconnected worker holds that this replica does not keep
        (another replica, or this one before a restart, handed them out: core/takeover.py)."""
        unknown = [ref for ref in session.hello.held if ref.lease_token not in session.leases]
        if not unknown:
            return
        try:
            leases = await take_over(self.store, self.broker, unknown, self.settings.server_id,
                                     self.settings.lease_seconds, session.allowed_queues, clock=self.clock)
        except Exception as exc:  # they lapse and run again, as without a takeover
            log.warning("taking over the %d leases worker %s holds failed: %s: %s", len(unknown), session.worker_id,
                        type(exc).__name__, exc)
            return
        if leases:
            await session.settle(0, leases)
            self.dispatcher.taken_over(leases)
            log.info("worker %s reconnected holding %d tasks another replica handed out: their leases move here",
                     session.worker_id, len(leases))

    async def _leave(self, session: WorkerSession, tasks: list[asyncio.Task[None]]) -> None:
        await session.close()
        await stop_tasks(*tasks)
        leases = self.registry.remove(session)
        if self.tasks is not None:
            self.tasks.left(session)
        if leases:
            self._spawn(self._requeue_after_grace(session, leases))

    async def _handle_through_outages(self, session: WorkerSession, request: worker_service_pb2.ConnectRequest) -> None:
        """Handle one message; an engine error does not end the stream. Results are retried
        until recorded (the worker waits for their acks), in the background: the stream reads
        on meanwhile, so heartbeats keep extending the worker's leases and show it alive (a
        results write held up inline made leases lapse and tasks run twice). Other reports are
        best effort."""
        try:
            await self._handle(session, request)
        except Exception as exc:
            if not is_transient(exc):
                raise
            if request.WhichOneof("message") != "results" or session.closed:
                log.warning("worker %s: %s report skipped, an engine is unreachable (%s: %s)",
                            session.worker_id, request.WhichOneof("message"), type(exc).__name__, exc)
                return
            log.warning("worker %s: recording results failed, an engine is unreachable (%s: %s); "
                        "retrying in the background", session.worker_id, type(exc).__name__, exc)
            self._spawn(self._retry_results(session, request))

    async def _retry_results(self, session: WorkerSession, request: worker_service_pb2.ConnectRequest) -> None:
        """Record results an engine outage refused, with backoff, while the session lasts (after
        it, the worker sends them again on its next stream)."""
        failures = Backoff(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
        while not session.closed:
            await asyncio.sleep(failures.next())
            try:
                await self._handle(session, request)
                return
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("worker %s: recording results failed; ending its stream so that it "
                                  "reconnects and sends them again", session.worker_id)
                    session.end_outbox()
                    return
                log.warning("worker %s: recording results failed again (%s: %s); retrying",
                            session.worker_id, type(exc).__name__, exc)

    async def _handle(self, session: WorkerSession, request: worker_service_pb2.ConnectRequest) -> None:
        kind = request.WhichOneof("message")
        if kind == "results":
            await self._results(session, request.results)
        elif kind == "started":
            self._clock_starts(session, request.started.tasks)
            await self._ensure_recorded(session, (ref.lease_token for ref in request.started.tasks))
            await self.recorder.started(request.started.tasks, session.worker_id)
        elif kind == "heartbeat":
            await self._heartbeat(session)
        elif kind == "credit":
            await session.set_window(request.credit.max_in_flight)
        elif kind == "progress":
            await self._ensure_recorded(session, (item.lease_token for item in request.progress.items))
            await self.recorder.progress(request.progress.items)
        elif kind == "reject":
            await self._reject(session, request.reject)
        elif kind == "goodbye":
            await session.set_draining()
        elif kind == "hello":
            raise InvalidArgument("hello may be sent only once, as the first message")

    async def _pump(self, session: WorkerSession, queue: str) -> None:
        """Fetch work for one queue whenever the window has room, and send it."""
        batch = self.settings.assignment_batch
        # While its queue is empty, a pump waits in fetch holding only its share of the window:
        # holding all of it starved the worker's other queues for as long as this one was empty.
        idle = False
        turned_away = 0  # fetches in a row that brought only tasks this worker cannot run
        failures = Backoff(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
        while not session.closed:
            if turned_away:
                await asyncio.sleep(bounce_delay(turned_away))
            if await self.pauses.is_paused(queue):
                await self.pauses.wait_for_change()
                continue
            share = max(1, session.window // max(len(session.queues), 1))
            reserved = await session.reserve(min(batch, share) if idle else batch)
            if reserved == 0:
                return
            claim = None
            deliveries: list[Delivery] = []
            try:
                deliveries = await self.broker.fetch(
                    queue, reserved, self.settings.lease_seconds, FETCH_WAIT_SECONDS
                )
                # Paused (or the worker left, or said goodbye) while this fetch waited: hand the tasks back.
                if deliveries and (session.closed or session.draining or await self.pauses.is_paused(queue)):
                    await self.broker.nack(deliveries)
                    deliveries = []
                if deliveries:
                    claim = await self.dispatcher.claim(
                        deliveries, session.worker_id, self.clock.monotonic(), session.can_run
                    )
                failures.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_transient(exc):
                    log.warning("fetching from queue %s for worker %s failed (%s: %s); retrying",
                                queue, session.worker_id, type(exc).__name__, exc)
                else:
                    log.exception("fetching from queue %s for worker %s failed; retrying", queue, session.worker_id)
                if deliveries:  # fetched but not claimed: hand them back now, not after a whole lease
                    with contextlib.suppress(Exception):
                        await self.broker.nack(deliveries)
                await asyncio.sleep(failures.next())
            finally:
                await session.settle(reserved, claim.leases if claim else [])
            idle = not deliveries
            if idle:
                await asyncio.sleep(0)  # the other queues' pumps take the freed slots first
            if claim is not None:
                await self._send_claimed(session, claim)
                if claim.elsewhere:
                    await self._pass_on(queue, claim.elsewhere)
                if claim.limited:
                    await self._hold_back(claim.limited)
                turned_away = turned_away + 1 if claim.elsewhere and not claim.claimed else 0

    async def _pass_on(self, queue: str, elsewhere: list[tuple[Delivery, records_pb2.TaskMessage]]) -> None:
        """Hand back tasks this worker cannot run, for a worker that registered their names;
        the longer one has waited for such a worker, the later it is offered again."""
        delayed: list[tuple[Delivery, float]] = []
        nobody: list[tuple[Delivery, records_pb2.TaskMessage]] = []  # with a routing_timeout
        for delivery, message in elsewhere:
            if self.registry.runner_for(queue, message.signature.name):
                # At once: it wakes the fetch of the worker that can run it, while this pump
                # pauses. (Handed back with a delay, it came due just as this pump woke again,
                # and two workers passed each other's tasks back and forth for good.)
                delay = 0.0
            else:
                self.registry.unroutable.turned_away(queue, message.signature.id)
                delay = round(bounce_delay(delivery.delivery_count) * random.uniform(0.5, 1.5), 3)
                if message.signature.HasField("routing_timeout"):
                    nobody.append((delivery, message))
            delayed.append((delivery, delay))
        timed_out = await self._past_routing_timeout(queue, nobody)
        ending = {id(delivery) for _, delivery in timed_out.values()}
        await self._hand_back([(d, delay) for d, delay in delayed if id(d) not in ending], "tasks for other workers")
        if timed_out:
            for task_id in timed_out:  # it ends now: no longer waiting for a worker
                self.registry.unroutable.routed(queue, task_id)
            await self._end_unsent(timed_out, self.recorder.fail_unroutable, "failing unroutable tasks")

    async def _past_routing_timeout(
        self, queue: str, waiting: list[tuple[Delivery, records_pb2.TaskMessage]]
    ) -> dict[str, tuple[str, Delivery]]:
        """Of tasks no worker here can run, those past their routing_timeout that no live worker
        of another replica registered either (core/routing_timeout.py), with their lease tokens."""
        if not waiting:
            return {}
        try:
            if self.tasks is not None:
                snapshot = await self.tasks.current()
                waiting = [(d, m) for d, m in waiting if not snapshot.runner_on(queue, m.signature.name)]
            loaded = await self.store.load([message.signature.id for _, message in waiting])
        except Exception as exc:  # they wait, and are looked at again when they come back
            log.warning("checking the routing timeouts of %d tasks failed: %s: %s", len(waiting),
                        type(exc).__name__, exc)
            return {}
        wall = self.clock.wall()
        timed_out: dict[str, tuple[str, Delivery]] = {}
        for delivery, message in waiting:
            found = loaded.get(message.signature.id)
            if found is not None and not is_terminal(found.record) and past_routing_timeout(found.record, wall):
                timed_out[message.signature.id] = (found.record.lease_token, delivery)
        return timed_out

    async def _hold_back(self, limited: list[tuple[Delivery, float]]) -> None:
        """Hand back tasks over a rate limit or without a slot of their concurrency key, each to
        be offered again after its delay (core/limits/)."""
        await self._hand_back(limited, "tasks held by limits")

    async def _hand_back(self, delayed: list[tuple[Delivery, float]], what: str) -> None:
        """Nack each delivery with its delay, one broker call per distinct delay."""
        by_delay: dict[float, list[Delivery]] = {}
        for delivery, delay in delayed:
            by_delay.setdefault(delay, []).append(delivery)
        try:
            for delay, deliveries in by_delay.items():
                await self.broker.nack(deliveries, delay)
        except Exception as exc:  # their leases lapse and bring them back
            log.warning("handing back %d %s failed: %s: %s", len(delayed), what, type(exc).__name__, exc)

    def _attempts_ended(self, leases: Iterable[Lease]) -> None:
        """These leases' attempts ended (or never began): free their concurrency slots, in the background."""
        leases = list(leases)
        self.dispatcher.released(leases)
        held = [lease for lease in leases if lease.concurrency_key]
        if held and self.dispatcher.limits is not None:
            self._spawn(self.dispatcher.limits.release(held))

    async def _send_claimed(self, session: WorkerSession, claim: Claim) -> None:
        """Send the assignments; RECEIVED follows with their results, or after a moment."""
        if claim.claimed:
            for claimed in claim.claimed:
                self.registry.unroutable.routed(claimed.assignment.task.queue, claimed.lease.task_id)
            batches, oversized = split_to_fit([c.assignment for c in claim.claimed], session.hello.max_receive_bytes)
            if oversized:
                await self._hand_back_oversized(session, claim, {a.lease_token for a in oversized})
            for batch in batches:
                session.send(worker_service_pb2.ConnectResponse(assignments=worker_service_pb2.Assignments(items=batch)))
            await self._record_receipts(session, claim.replacing, claim.read)
            self._spawn(self._record_later(session, claim))
        try:
            await self.dispatcher.drop_unrunnable(claim)
        except Exception:  # their leases expire and bring them back
            log.exception("dropping %d ended or duplicate messages failed", len(claim.ended) + len(claim.duplicates))
        if claim.exhausted:
            await self._give_up(claim.exhausted)
        if claim.expired:
            await self._expire(claim.expired)

    async def _hand_back_oversized(self, session: WorkerSession, claim: Claim, tokens: set[str]) -> None:
        """Tasks too large for this worker's receive limit go back to the queue for another."""
        leases = [lease for lease in claim.leases if lease.token in tokens]
        for lease in leases:
            lease.receipt_pending = False
        _recorded(leases)
        claim.replacing = [lease for lease in claim.replacing if lease.token not in tokens]
        log.warning("worker %s receives at most %d bytes: tasks %s are larger; handing them back for another worker",
                    session.worker_id, session.hello.max_receive_bytes or DEFAULT_WORKER_RECEIVE_BYTES,
                    ", ".join(lease.task_id for lease in leases[:5]))
        await session.resolve(tokens)
        self._attempts_ended(leases)
        await self.broker.nack([lease.delivery for lease in leases], OVERSIZED_RETRY_SECONDS)

    async def _give_up(self, exhausted: dict[str, tuple[str, Delivery]]) -> None:
        """Fail for good the tasks whose deliveries were all lost, and settle their messages."""
        log.warning("failing %d tasks whose last %d deliveries were lost with their workers: %s",
                    len(exhausted), self.dispatcher.max_deliveries, ", ".join(list(exhausted)[:5]))
        max_deliveries = self.dispatcher.max_deliveries
        await self._end_unsent(exhausted, lambda tokens: self.recorder.give_up(tokens, max_deliveries),
                               "failing exhausted tasks")

    async def _expire(self, expired: dict[str, tuple[str, Delivery]]) -> None:
        """End EXPIRED the tasks dispatch found past their expiry, and settle their messages."""
        await self._end_unsent(expired, self.recorder.expire, "expiring tasks")

    async def _end_unsent(
        self, tasks: dict[str, tuple[str, Delivery]], end: Callable[[dict[str, str]], Awaitable[Recorded]], what: str
    ) -> None:
        """End tasks dispatch did not send (task id -> lease token, message) with `end`, and
        settle their messages; when that fails, they come back a little later and end then."""
        messages = {task_id: delivery for task_id, (_, delivery) in tasks.items()}
        try:
            recorded = await end({task_id: token for task_id, (token, _) in tasks.items()})
        except Exception as exc:
            log.warning("%s (%d): %s: %s; trying again later", what, len(tasks), type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await self.broker.nack(list(messages.values()), REPAIR_RETRY_SECONDS)
            return
        await settle_messages(self.broker, messages, recorded.requeue)

    async def _record_later(self, session: WorkerSession, claim: Claim) -> None:
        await asyncio.sleep(RECEIVED_DELAY_SECONDS)
        await self._record_receipts(session, [lease for lease in claim.leases if lease.receipt_pending], claim.read)

    async def _record_receipts(
        self, session: WorkerSession, leases: list[Lease], known: dict[str, Loaded] | None = None
    ) -> None:
        """Write RECEIVED for leases whose result has not come yet."""
        if not leases:
            return
        for lease in leases:
            lease.receipt_pending = False
        try:
            withdrawn = await self.dispatcher.record(leases, session.worker_id, known)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transient(exc):
                # The engine is away: the tasks run on, and their results bring RECEIVED along.
                for lease in leases:
                    lease.receipt_pending = True
                log.warning("recording %d assignments for worker %s failed (%s: %s); their results will",
                            len(leases), session.worker_id, type(exc).__name__, exc)
                return
            log.exception("recording %d assignments for worker %s failed; handing them back",
                          len(leases), session.worker_id)
            withdrawn = await session.resolve(lease.token for lease in leases)
            with contextlib.suppress(Exception):
                await self.broker.nack([lease.delivery for lease in withdrawn])
        else:
            withdrawn = await session.resolve(lease.token for lease in withdrawn)
        finally:
            _recorded(leases)
        self._attempts_ended(withdrawn)
        if withdrawn:
            session.send(
                worker_service_pb2.ConnectResponse(
                    cancel=worker_service_pb2.CancelTasks(task_ids=[lease.task_id for lease in withdrawn])
                )
            )

    async def _ensure_recorded(self, session: WorkerSession, tokens: Iterable[str]) -> None:
        """Before a report is checked against the record: its lease's RECEIVED is written."""
        leases = [lease for token in tokens if (lease := session.leases.get(token)) is not None]
        await self._record_receipts(session, [lease for lease in leases if lease.receipt_pending])
        await _until_recorded(leases)

    async def _results(self, session: WorkerSession, results: worker_service_pb2.Results) -> None:
        # A result that comes before its lease's RECEIVED was written brings it along: one write.
        # The lease may be a closed session's, when the worker reconnected and resent it.
        receipts: dict[str, Lease] = {}
        being_recorded: list[Lease] = []
        for outcome in results.outcomes:
            lease = session.leases.get(outcome.lease_token) or self.registry.orphan(outcome.lease_token)
            if lease is None:
                continue
            if lease.receipt_pending:
                lease.receipt_pending = False
                receipts[outcome.task_id] = lease
            else:
                being_recorded.append(lease)
        await _until_recorded(being_recorded)
        try:
            recorded = await self.recorder.record(
                results.outcomes, session.worker_id, receipts, allowed_queues=session.allowed_queues
            )
        except BaseException:
            for lease in receipts.values():  # not written: a retry of this report writes it
                lease.receipt_pending = True
            raise
        finally:
            _recorded(receipts.values())
        resolved = await session.resolve(o.lease_token for o in results.outcomes)
        resolved_tokens = {lease.token for lease in resolved}
        for outcome in results.outcomes:
            if outcome.lease_token not in resolved_tokens:
                orphan = self.registry.resolve_orphan(outcome.lease_token)
                if orphan is not None:
                    resolved.append(orphan)
        self._attempts_ended(resolved)
        # A result that finds its task ended may be a report resent after a failed write whose
        # follow-ups never ran: its message goes back through dispatch, which repairs them.
        requeue = {task_id: 0.0 for task_id, status in recorded.statuses.items()
                   if status == worker_service_pb2.ACK_STATUS_ALREADY_DONE}
        await settle(self.broker, resolved, {**requeue, **recorded.requeue})
        statuses = recorded.statuses
        session.ack(
            worker_service_pb2.ResultAck(task_id=o.task_id, lease_token=o.lease_token, status=statuses[o.task_id])
            for o in results.outcomes
        )

    async def _reject(self, session: WorkerSession, reject: worker_service_pb2.Reject) -> None:
        await self._ensure_recorded(session, (task.lease_token for task in reject.tasks))
        recorded = await self.recorder.reject(reject.tasks, session.worker_id)
        resolved = await session.resolve(t.lease_token for t in reject.tasks)
        self._attempts_ended(resolved)
        await settle(self.broker, resolved, recorded.requeue)

    async def _heartbeat(self, session: WorkerSession) -> None:
        """Extend the worker's leases, stop tasks cancelled elsewhere, enforce time limits."""
        leases = list(session.leases.values())
        if not leases:
            return
        await self._extend(leases)
        loaded = await self.store.load([lease.task_id for lease in leases])
        cancelled = [
            lease.task_id for lease in leases
            if (found := loaded.get(lease.task_id)) is not None
            and found.record.result.state == TaskStates.TASK_STATE_CANCELLED
        ]
        if cancelled:
            session.send(worker_service_pb2.ConnectResponse(cancel=worker_service_pb2.CancelTasks(task_ids=cancelled)))
        await self._enforce_time_limits(session, leases)
        # Long tasks show their lease live on the record, so the repair of lost messages leaves them be.
        await stamp_live_leases(self.store, [(lease.task_id, lease.token) for lease in leases], loaded,
                                self.settings.repair_after_seconds, self.clock.wall())

    def _clock_starts(self, session: WorkerSession, refs: Sequence[worker_service_pb2.LeaseRef]) -> None:
        now = self.clock.monotonic()
        for ref in refs:
            lease = session.leases.get(ref.lease_token)
            if lease is not None and lease.started_at is None:
                lease.started_at = now

    async def _enforce_time_limits(self, session: WorkerSession, leases: list[Lease]) -> None:
        """Fail attempts running past their limit that the worker did not stop. The clock starts
        at the worker's Started report: before it, a prefetched task is waiting for a slot."""
        now = self.clock.monotonic()
        overdue = [
            lease for lease in leases
            if lease.time_limit > 0 and lease.started_at is not None
            and now - lease.started_at > lease.time_limit + TIME_LIMIT_GRACE_SECONDS
        ]
        if not overdue:
            return
        cause = error("TimeLimitExceeded", "the attempt ran past its time limit and the worker did not stop it")
        await self._ensure_recorded(session, (lease.token for lease in overdue))
        recorded: Recorded = await self.recorder.fail_leased(
            [(lease.task_id, lease.token) for lease in overdue], cause, session.worker_id
        )
        resolved = await session.resolve(lease.token for lease in overdue)
        self._attempts_ended(resolved)
        await settle(self.broker, resolved, recorded.requeue)
        session.send(
            worker_service_pb2.ConnectResponse(
                cancel=worker_service_pb2.CancelTasks(task_ids=[lease.task_id for lease in overdue])
            )
        )

    async def _watchdog(self, session: WorkerSession) -> None:
        """A worker silent for a whole lease is hung: stop sending it work."""
        while not session.closed:
            await asyncio.sleep(self.settings.heartbeat_interval_seconds)
            silent = not session.handling and self.clock.monotonic() - session.last_seen > self.settings.lease_seconds
            if silent and not session.draining:  # tell it once
                log.warning("worker %s sent nothing for %.0f s; draining it", session.worker_id,
                            self.settings.lease_seconds)
                await session.set_draining()
                session.send(
                    worker_service_pb2.ConnectResponse(
                        drain=worker_service_pb2.Drain(reason="no heartbeat within the lease")
                    )
                )

    async def _keep_leases(self, session: WorkerSession) -> None:
        """While the server is held up handling one of the worker's reports (an engine slow or
        away), the heartbeats behind it wait in the stream: extend the worker's leases meanwhile,
        as its heartbeats would. Otherwise they lapse and another worker runs its tasks again."""
        interval = self.settings.heartbeat_interval_seconds
        while not session.closed:
            await asyncio.sleep(interval)
            # While a report is handled, last_seen is when it was read.
            held_up = session.handling and self.clock.monotonic() - session.last_seen >= interval
            if not held_up or not session.leases:
                continue
            try:
                await self._extend(list(session.leases.values()))
            except Exception as exc:  # the broker is away too: the next round tries again
                log.warning("extending the leases of worker %s, held up behind one of its reports, failed (%s: %s)",
                            session.worker_id, type(exc).__name__, exc)

    async def _extend(self, leases: list[Lease]) -> None:
        await self.broker.extend([lease.delivery for lease in leases], self.settings.lease_seconds)

    async def _requeue_after_grace(self, session: WorkerSession, leases: list[Lease]) -> None:
        await asyncio.sleep(self.settings.stream_grace_seconds)
        ended_here = self.registry.take_orphans(leases)
        self.dispatcher.released(ended_here)
        orphans = await withdraw_unmoved(self.store, self.broker, ended_here, self.settings.server_id)
        if orphans:
            log.info("worker %s left; returning %d tasks to their queues", session.worker_id, len(orphans))
            await self.broker.nack([lease.delivery for lease in orphans])

    async def cancel_running(self, task_ids: list[str]) -> list[str]:
        """Tell the workers of this replica holding any of these tasks to stop them; returns the ids held."""
        stopped: list[str] = []
        for session, held in self.registry.holding(task_ids).items():
            session.send(worker_service_pb2.ConnectResponse(cancel=worker_service_pb2.CancelTasks(task_ids=held)))
            stopped.extend(held)
        return stopped

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def shutdown(self) -> None:
        """The server is stopping: its workers' leases stay with the broker, not handed back.

        Their workers keep running those tasks and report them to another replica, or to this
        one restarted (the record still holds the lease, so the result counts); handing them
        back here made every task running during a restart or a rolling deploy run twice. A
        lease nobody reports on expires (`lease_seconds`) and lease recovery returns its task.
        (RabbitMQ returns a closed connection's deliveries by itself, whatever is done here.)"""
        await stop_tasks(*self._background)
        if orphans := self.registry.take_all_orphans():
            log.info("stopping: leaving %d leases to their workers' results (or to their expiry)", len(orphans))
