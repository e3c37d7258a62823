"""AdminService: queues, workers, task inspection, dead letters, schedules and the repair of lost
messages, for operators."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import admin_service_pb2_grpc

from ..backends.task_index import TaskQuery
from ..brokers.base import QueueDeletionUnsupported
from ..core.admin import Admin
from ..core.limits import RateLimit, rate_limit
from ..core.task_index import ListingUnsupported
from .status import Refusal, refuse, unary

# ErrorInfo.reason of a call the configured broker or index cannot serve.
UNSUPPORTED = "NOT_SUPPORTED_BY_BACKEND"

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    @unary
    async def ListQueues(self, request: a.ListQueuesRequest, context: Context) -> a.ListQueuesResponse:
        return a.ListQueuesResponse(queues=await self.admin.queues(request.active_only))

    @unary
    async def PurgeQueue(self, request: a.PurgeQueueRequest, context: Context) -> a.PurgeQueueResponse:
        return a.PurgeQueueResponse(purged=await self.admin.purge(request.queue))

    @unary
    async def PauseQueue(self, request: a.PauseQueueRequest, context: Context) -> a.PauseQueueResponse:
        """Stop handing out the queue's tasks (on every replica, within a second); it still accepts tasks."""
        await self.admin.pause(request.queue)
        return a.PauseQueueResponse()

    @unary
    async def ResumeQueue(self, request: a.ResumeQueueRequest, context: Context) -> a.ResumeQueueResponse:
        """Hand out the queue's tasks again; resuming a queue that is not paused is fine."""
        await self.admin.resume(request.queue)
        return a.ResumeQueueResponse()

    @unary
    async def CreateSchedule(self, request: a.CreateScheduleRequest, context: Context) -> a.CreateScheduleResponse:
        """Store a schedule; a schedule with the same name is replaced."""
        return a.CreateScheduleResponse(schedule=await self.admin.schedules.create(request.schedule))

    @unary
    async def ListSchedules(self, request: a.ListSchedulesRequest, context: Context) -> a.ListSchedulesResponse:
        return a.ListSchedulesResponse(schedules=await self.admin.schedules.all())

    @unary
    async def DeleteSchedule(self, request: a.DeleteScheduleRequest, context: Context) -> a.DeleteScheduleResponse:
        await self.admin.schedules.delete(request.name)
        return a.DeleteScheduleResponse()

    @unary
    async def ListWorkers(self, request: a.ListWorkersRequest, context: Context) -> a.ListWorkersResponse:
        return a.ListWorkersResponse(workers=self.admin.workers())

    @unary
    async def ListRegisteredTasks(
        self, request: a.ListRegisteredTasksRequest, context: Context
    ) -> a.ListRegisteredTasksResponse:
        """The task registry: every task name workers registered on any replica, with its schema."""
        return a.ListRegisteredTasksResponse(tasks=await self.admin.registered_tasks())

    @unary
    async def InspectTask(self, request: a.InspectTaskRequest, context: Context) -> a.InspectTaskResponse:
        return await self.admin.inspection(request.task_id)

    @unary
    async def ListDeadLetters(
        self, request: a.ListDeadLettersRequest, context: Context
    ) -> a.ListDeadLettersResponse:
        return a.ListDeadLettersResponse(tasks=await self.admin.dead_letters(request.queue, request.limit))

    @unary
    async def ReplayDeadLetters(
        self, request: a.ReplayDeadLettersRequest, context: Context
    ) -> a.ReplayDeadLettersResponse:
        replayed = await self.admin.replay(list(request.task_ids), request.queue)
        return a.ReplayDeadLettersResponse(task_ids=replayed)

    @unary
    async def DeleteDeadLetter(
        self, request: a.DeleteDeadLetterRequest, context: Context
    ) -> a.DeleteDeadLetterResponse:
        await self.admin.delete_dead_letter(request.task_id)
        return a.DeleteDeadLetterResponse()

    @unary
    async def DeleteQueue(self, request: a.DeleteQueueRequest, context: Context) -> a.DeleteQueueResponse:
        """Delete an empty queue; with force, purge its ready and delayed tasks first."""
        try:
            purged = await self.admin.delete_queue(request.queue, request.force)
        except QueueDeletionUnsupported as exc:
            await refuse(context, Refusal(grpc.StatusCode.UNIMPLEMENTED, str(exc), reason=UNSUPPORTED))
        return a.DeleteQueueResponse(purged=purged)

    @unary
    async def RepairTasks(self, request: a.RepairTasksRequest, context: Context) -> a.RepairTasksResponse:
        """Republish tasks whose messages look lost; with dry_run, only list them."""
        older_than = _seconds(request.older_than) if request.HasField("older_than") else None
        report = await self.admin.repair(older_than, request.queue, request.dry_run, request.force)
        response = a.RepairTasksResponse(checked=report.checked, held=report.held, dry_run=request.dry_run)
        for repaired in report.repaired:
            result = repaired.record.result
            item = response.tasks.add(task_id=result.task_id, name=result.name, queue=result.queue, state=result.state)
            item.age.FromNanoseconds(int(repaired.age * 1e9))
        return response

    @unary
    async def SetRateLimit(self, request: a.SetRateLimitRequest, context: Context) -> a.SetRateLimitResponse:
        """Store a rate limit on a task name; every replica applies it within a second."""
        given = request.limit
        stored = await self.admin.set_rate_limit(rate_limit(given.name, given.rate, given.burst, given.per_key))
        return a.SetRateLimitResponse(limit=_rate_limit(stored))

    @unary
    async def ListRateLimits(self, request: a.ListRateLimitsRequest, context: Context) -> a.ListRateLimitsResponse:
        return a.ListRateLimitsResponse(limits=[_rate_limit(limit) for limit in await self.admin.list_rate_limits()])

    @unary
    async def DeleteRateLimit(
        self, request: a.DeleteRateLimitRequest, context: Context
    ) -> a.DeleteRateLimitResponse:
        await self.admin.delete_rate_limit(request.name)
        return a.DeleteRateLimitResponse()

    @unary
    async def ListTasks(self, request: a.ListTasksRequest, context: Context) -> a.ListTasksResponse:
        """A page of tasks matching the filters, through the backend's task index."""
        try:
            page = await self.admin.list_tasks(task_query(request), request.page_token)
        except ListingUnsupported as exc:
            await refuse(context, Refusal(grpc.StatusCode.UNIMPLEMENTED, str(exc), reason=UNSUPPORTED))
        return a.ListTasksResponse(tasks=[r.result for r in page.records], next_page_token=page.next_page_token)


def task_query(request: a.ListTasksRequest) -> TaskQuery:
    return TaskQuery(
        states=frozenset(request.states), queue=request.queue, name=request.name, id_prefix=request.id_prefix,
        since_us=_micros(request.submitted_after) if request.HasField("submitted_after") else None,
        until_us=_micros(request.submitted_before) if request.HasField("submitted_before") else None,
        limit=request.page_size, oldest_first=request.oldest_first,
    )


def _micros(stamp: Timestamp) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1_000


def _rate_limit(limit: RateLimit) -> a.RateLimit:
    return a.RateLimit(name=limit.name, rate=limit.rate, burst=limit.burst, per_key=limit.per_key,
                       source=limit.source.value)


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9
