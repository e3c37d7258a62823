"""Operator views and actions: queue depths, pause/resume, connected workers, the task
registry, dead letters and replay, periodic schedules, repair of lost messages."""

from __future__ import annotations

import math

from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, task_service_pb2
from conveyor.values import micros_of

from ..backends.task_index import TaskQuery
from ..brokers.base import Broker
from ..config import Settings
from . import withdrawn
from .cancellation import Canceller
from .dead_letters import DeadLetters
from .errors import InvalidArgument
from .inspection import Inspector
from .limits import RateLimit, RateLimitTable
from .page_tokens import decode_place, encode_place
from .pauses import QueuePauses, check_queue
from .queue_deletion import active_queue, delete_queue
from .records import DEAD_LETTERS_GROUP, TaskStates
from .repair import Repairer, RepairReport
from .results import ResultReader
from .schedules import Schedules, schedule_not_found
from .sessions import SessionRegistry
from .store import TaskStore
from .submission import Submitter
from .task_index import TaskIndexer, TaskPage
from .task_registry import TaskRegistry

DEFAULT_LIST_LIMIT = 100
# Dead letters read from their index per backend call.
DEAD_LETTER_PAGE = 1_000
# Purged tasks ended per batch of record reads and writes.
PURGE_END_BATCH = 500


class Admin:
    def __init__(
        self, broker: Broker, store: TaskStore, registry: SessionRegistry, reader: ResultReader,
        submitter: Submitter, server_id: str, pauses: QueuePauses, schedules: Schedules,
        canceller: Canceller, repairer: Repairer, tasks: TaskRegistry | None = None,
        rate_limits: RateLimitTable | None = None, indexer: TaskIndexer | None = None,
        inspector: Inspector | None = None,
    ) -> None:
        self.inspector = inspector or Inspector(store, reader, registry, Settings().lease_seconds)
        self.indexer = indexer or TaskIndexer(store.backend, None)
        self.rate_limits = rate_limits or RateLimitTable(store.backend)
        self.tasks = tasks
        self.broker = broker
        self.store = store
        self.registry = registry
        self.reader = reader
        self.submitter = submitter
        self.server_id = server_id
        self.pauses = pauses
        self.schedules = schedules
        self.canceller = canceller
        self.repairer = repairer
        self.dead = DeadLetters(store, submitter)

    async def queues(self, active_only: bool = False) -> list[admin_service_pb2.QueueInfo]:
        """Every queue the broker knows of, every paused queue and every queue a live worker
        serves (even an empty one); with `active_only`, those with tasks, a pause or a live
        worker (see active_queue)."""
        served = await self._served_queues()
        infos = await self._all_queues(served)
        return [info for info in infos if active_queue(info, served)] if active_only else infos

    async def _served_queues(self) -> set[str]:
        """Queues a live worker serves: this replica's, and any replica's the registry knows."""
        served = {queue for session in self.registry.sessions.values() for queue in session.queues}
        for task in await self.registered_tasks():
            if task.worker_ids:
                served.update(task.queues)
        return served

    async def delete_queue(self, queue: str, force: bool) -> int:
        """Forget an empty queue (see core/queue_deletion.py); returns how many tasks `force` purged."""
        return await delete_queue(self.broker, self.pauses, self.purge, queue, force)

    async def _all_queues(self, served: set[str]) -> list[admin_service_pb2.QueueInfo]:
        paused = await self.pauses.refresh()
        known = set(await self.broker.queues())
        cancelled = await withdrawn.counts(self.store.backend)
        infos = []
        for name in sorted(known | paused | served):
            info = admin_service_pb2.QueueInfo(
                name=name, paused=name in paused, unroutable=self.registry.unroutable.count(name)
            )
            if name in known:
                stats = await self.broker.stats(name)
                info.ready, info.delayed, info.in_flight = stats.ready, stats.delayed, stats.in_flight
                withdrawn.count_out(info, cancelled.get(name))
            infos.append(info)
        return infos

    async def purge(self, queue: str) -> int:
        """Drop the queue's ready and delayed tasks and end them (CANCELLED, error type "Purged",
        follow-ups run), so no wait, chain or chord on them is left hanging; returns how many."""
        check_queue(queue)
        dropped = await self.broker.purge(queue)
        unique = list(dict.fromkeys(dropped))
        for start in range(0, len(unique), PURGE_END_BATCH):
            await self.canceller.end_purged(unique[start:start + PURGE_END_BATCH], queue)
        await withdrawn.purged(self.store.backend, queue)
        return len(dropped)

    async def pause(self, queue: str) -> None:
        await self.pauses.pause(queue)

    async def resume(self, queue: str) -> None:
        await self.pauses.resume(queue)

    async def registered_tasks(self) -> list[admin_service_pb2.RegisteredTask]:
        """The task registry, as every replica's workers declared it (core/task_registry.py)."""
        return await self.tasks.listed() if self.tasks is not None else []

    def workers(self) -> list[admin_service_pb2.WorkerInfo]:
        return [
            admin_service_pb2.WorkerInfo(
                worker_id=s.worker_id, language=s.hello.language, queues=s.queues, max_in_flight=s.window,
                in_flight=s.in_flight, connected_at=s.connected_at, server_id=self.server_id,
                hostname=s.hello.hostname,
            )
            for s in self.registry.sessions.values()
        ]

    async def inspect(self, task_id: str) -> result_pb2.TaskResult:
        return await self.reader.get(task_id)

    async def inspection(self, task_id: str) -> admin_service_pb2.InspectTaskResponse:
        """The result and what the server knows beyond it: lease, deliveries, node, follow-ups."""
        return await self.inspector.inspect(task_id)

    async def dead_letters(self, queue: str, limit: int) -> list[result_pb2.TaskResult]:
        """The first `limit` dead letters (of `queue`), oldest first (see dead_letter_page)."""
        return (await self.dead_letter_page(queue, limit))[0]

    async def dead_letter_page(
        self, queue: str, limit: int, page_token: str = ""
    ) -> tuple[list[result_pb2.TaskResult], str]:
        """Tasks that failed for good, oldest first (by finish time, then id), `limit` after the
        place `page_token` names; and the token of the next page ("" after the last). The index
        is read a page at a time, and entries whose record has expired (the result TTL) are
        dropped from it as they are met, so the index keeps only what can still be shown."""
        start = decode_place(page_token) if page_token else None
        backend = self.store.backend
        found: list[result_pb2.TaskResult] = []
        after = ""
        while page := await backend.members(DEAD_LETTERS_GROUP, after=after, limit=DEAD_LETTER_PAGE):
            after = max(page)
            loaded = await self.store.load(list(page))
            for task_id, member_queue in page.items():
                if task_id not in loaded:
                    await backend.remove_member(DEAD_LETTERS_GROUP, task_id)
                    continue
                result = loaded[task_id].record.result
                if result.state == TaskStates.TASK_STATE_FAILURE and (not queue or member_queue.decode() == queue):
                    found.append(result)
        ordered = sorted((r for r in found if start is None or _finish_place(r) > start), key=_finish_place)
        shown = ordered[: limit or DEFAULT_LIST_LIMIT]
        return shown, encode_place(*_finish_place(shown[-1])) if len(ordered) > len(shown) else ""

    async def replay(self, task_ids: list[str], queue: str) -> list[str]:
        """Submit dead letters again as new tasks (same call) and take them off the list: those
        named (each must be one; see core/dead_letters.py), else every one (of `queue`)."""
        if task_ids:
            return await self.dead.replay(task_ids)
        listed = [r.task_id for r in await self.dead_letters(queue, 10_000)]
        return await self.dead.replay(listed, checked=True)

    async def delete_dead_letter(self, task_id: str) -> None:
        await self.dead.delete(task_id)

    async def resubmit(self, task_ids: list[str]) -> list[str]:
        """Submit ended tasks' calls again as new tasks (fresh ids), whatever their state, and
        take them off the dead letters; unknown ids are skipped."""
        loaded = await self.store.load(task_ids)
        requests = []
        for task_id in task_ids:
            if task_id not in loaded:
                continue
            signature = task_pb2.Signature()
            signature.CopyFrom(loaded[task_id].record.result.signature)
            signature.id = ""
            signature.idempotency_key = ""
            signature.ClearField("eta")
            signature.ClearField("countdown")
            requests.append(task_service_pb2.SubmitRequest(task=signature))
        if not requests:
            return []
        responses = await self.submitter.submit(requests)
        for task_id in task_ids:
            await self.store.backend.remove_member(DEAD_LETTERS_GROUP, task_id)
        return [r.task_id for r in responses]

    async def repair(self, older_than: float | None, queue: str, dry_run: bool, force: bool) -> RepairReport:
        """Republish live tasks with no sign of life for `older_than` seconds (see core/repair.py)."""
        if older_than is None:
            raise InvalidArgument("older_than is required: how long a task must show no sign of life, e.g. 600s")
        if not math.isfinite(older_than) or older_than < 0:
            raise InvalidArgument(f"older_than must be a duration of 0 s or more, got {older_than:g} s")
        if queue:
            check_queue(queue)
        return await self.repairer.repair_now(older_than, queue, dry_run, force)

    # -- rate limits (core/limits/) -------------------------------------------------------

    async def set_rate_limit(self, limit: RateLimit) -> RateLimit:
        """Store a checked rate limit (core.limits.rate_limit), replacing the name's earlier one."""
        return await self.rate_limits.set(limit)

    async def list_rate_limits(self) -> list[RateLimit]:
        return await self.rate_limits.all()

    async def delete_rate_limit(self, name: str) -> None:
        await self.rate_limits.delete(name)

    # -- listing tasks, dead letters and schedules by hand (core/task_index.py) -------------

    async def list_tasks(self, query: TaskQuery, page_token: str = "") -> TaskPage:
        """A page of tasks through the backend's task index (ListingUnsupported without one)."""
        return await self.indexer.find(query, page_token)

    async def forget_dead_letters(self, task_ids: list[str]) -> None:
        """Take tasks off the dead-letter list without replaying them (their records stay until
        they expire). Ids that are not on it are ignored."""
        for task_id in dict.fromkeys(task_ids):
            await self.store.backend.remove_member(DEAD_LETTERS_GROUP, task_id)

    async def run_schedule_now(self, name: str) -> str:
        """Submit a schedule's task once, now, outside its cron; returns the new task's id."""
        schedule = next((s for s in await self.schedules.all() if s.name == name), None)
        if schedule is None:
            raise schedule_not_found(name)
        signature = task_pb2.Signature()
        signature.CopyFrom(schedule.task)
        signature.id = ""
        signature.idempotency_key = ""
        (response,) = await self.submitter.submit([task_service_pb2.SubmitRequest(task=signature)])
        return response.task_id


def _finish_place(result: result_pb2.TaskResult) -> tuple[int, str]:
    """A dead letter's place in the list: its finish time in microseconds, then its id."""
    return micros_of(result.finished_at), result.task_id
