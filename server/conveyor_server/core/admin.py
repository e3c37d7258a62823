"""Operator views and actions: queue depths, connected workers, dead letters and replay."""

from __future__ import annotations

from conveyor.v1 import admin_service_pb2, result_pb2, task_pb2, task_service_pb2

from ..brokers.base import Broker
from .errors import InvalidArgument
from .records import DEAD_LETTERS_GROUP, S
from .results import ResultReader
from .sessions import SessionRegistry
from .store import TaskStore
from .submission import Submitter
from .validation import QUEUE_NAME

DEFAULT_LIST_LIMIT = 100


class Admin:
    def __init__(
        self, broker: Broker, store: TaskStore, registry: SessionRegistry, reader: ResultReader,
        submitter: Submitter, server_id: str,
    ) -> None:
        self.broker = broker
        self.store = store
        self.registry = registry
        self.reader = reader
        self.submitter = submitter
        self.server_id = server_id

    async def queues(self) -> list[admin_service_pb2.QueueInfo]:
        infos = []
        for name in await self.broker.queues():
            stats = await self.broker.stats(name)
            infos.append(admin_service_pb2.QueueInfo(
                name=name, ready=stats.ready, delayed=stats.delayed, in_flight=stats.in_flight
            ))
        return infos

    async def purge(self, queue: str) -> int:
        if not QUEUE_NAME.match(queue):
            raise InvalidArgument(f"invalid queue name {queue[:80]!r}")
        return await self.broker.purge(queue)

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

    async def dead_letters(self, queue: str, limit: int) -> list[result_pb2.TaskResult]:
        members = await self.store.backend.members(DEAD_LETTERS_GROUP)
        ids = [task_id for task_id, q in members.items() if not queue or q.decode() == queue]
        loaded = await self.store.load(ids)
        found = [
            loaded[t].record.result for t in ids
            if t in loaded and loaded[t].record.result.state == S.TASK_STATE_FAILURE
        ]
        found.sort(key=lambda r: (r.finished_at.seconds, r.finished_at.nanos))
        return found[: limit or DEFAULT_LIST_LIMIT]

    async def replay(self, task_ids: list[str], queue: str) -> list[str]:
        """Submit each dead letter again as a new task (fresh id, same call) and forget it."""
        if not task_ids:
            task_ids = [r.task_id for r in await self.dead_letters(queue, 10_000)]
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
