"""AdminService: queues, workers, task inspection, dead letters, schedules and the repair of lost
messages, for operators."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from conveyor.values import micros_of, seconds_of, set_seconds

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
    async def ListQueues(
        self, request: admin_service_pb2.ListQueuesRequest, context: Context
    ) -> admin_service_pb2.ListQueuesResponse:
        return admin_service_pb2.ListQueuesResponse(queues=await self.admin.queues(request.active_only))

    @unary
    async def PurgeQueue(
        self, request: admin_service_pb2.PurgeQueueRequest, context: Context
    ) -> admin_service_pb2.PurgeQueueResponse:
        return admin_service_pb2.PurgeQueueResponse(purged=await self.admin.purge(request.queue))

    @unary
    async def PauseQueue(
        self, request: admin_service_pb2.PauseQueueRequest, context: Context
    ) -> admin_service_pb2.PauseQueueResponse:
        """Stop handing out the queue's tasks (on every replica, within a second); it still accepts tasks."""
        await self.admin.pause(request.queue)
        return admin_service_pb2.PauseQueueResponse()

    @unary
    async def ResumeQueue(
        self, request: admin_service_pb2.ResumeQueueRequest, context: Context
    ) -> admin_service_pb2.ResumeQueueResponse:
        """Hand out the queue's tasks again; resuming a queue that is not paused is fine."""
        await self.admin.resume(request.queue)
        return admin_service_pb2.ResumeQueueResponse()

    @unary
    async def CreateSchedule(
        self, request: admin_service_pb2.CreateScheduleRequest, context: Context
    ) -> admin_service_pb2.CreateScheduleResponse:
        """Store a schedule; a schedule with the same name is replaced."""
        return admin_service_pb2.CreateScheduleResponse(schedule=await self.admin.schedules.create(request.schedule))

    @unary
    async def ListSchedules(
        self, request: admin_service_pb2.ListSchedulesRequest, context: Context
    ) -> admin_service_pb2.ListSchedulesResponse:
        return admin_service_pb2.ListSchedulesResponse(schedules=await self.admin.schedules.all())

    @unary
    async def DeleteSchedule(
        self, request: admin_service_pb2.DeleteScheduleRequest, context: Context
    ) -> admin_service_pb2.DeleteScheduleResponse:
        await self.admin.schedules.delete(request.name)
        return admin_service_pb2.DeleteScheduleResponse()

    @unary
    async def PauseSchedule(
        self, request: admin_service_pb2.PauseScheduleRequest, context: Context
    ) -> admin_service_pb2.PauseScheduleResponse:
        """Stop the schedule from firing until it is resumed."""
        return admin_service_pb2.PauseScheduleResponse(
            schedule=await self.admin.schedules.set_paused(request.name, True))

    @unary
    async def ResumeSchedule(
        self, request: admin_service_pb2.ResumeScheduleRequest, context: Context
    ) -> admin_service_pb2.ResumeScheduleResponse:
        """Fire the schedule again from its next tick after now."""
        return admin_service_pb2.ResumeScheduleResponse(
            schedule=await self.admin.schedules.set_paused(request.name, False))

    @unary
    async def ListWorkers(
        self, request: admin_service_pb2.ListWorkersRequest, context: Context
    ) -> admin_service_pb2.ListWorkersResponse:
        return admin_service_pb2.ListWorkersResponse(workers=self.admin.workers())

    @unary
    async def ListRegisteredTasks(
        self, request: admin_service_pb2.ListRegisteredTasksRequest, context: Context
    ) -> admin_service_pb2.ListRegisteredTasksResponse:
        """The task registry: every task name workers registered on any replica, with its schema."""
        return admin_service_pb2.ListRegisteredTasksResponse(tasks=await self.admin.registered_tasks())

    @unary
    async def InspectTask(
        self, request: admin_service_pb2.InspectTaskRequest, context: Context
    ) -> admin_service_pb2.InspectTaskResponse:
        return await self.admin.inspection(request.task_id)

    @unary
    async def ListDeadLetters(
        self, request: admin_service_pb2.ListDeadLettersRequest, context: Context
    ) -> admin_service_pb2.ListDeadLettersResponse:
        tasks, next_page_token = await self.admin.dead_letter_page(request.queue, request.limit, request.page_token)
        return admin_service_pb2.ListDeadLettersResponse(tasks=tasks, next_page_token=next_page_token)

    @unary
    async def ReplayDeadLetters(
        self, request: admin_service_pb2.ReplayDeadLettersRequest, context: Context
    ) -> admin_service_pb2.ReplayDeadLettersResponse:
        replayed = await self.admin.replay(list(request.task_ids), request.queue)
        return admin_service_pb2.ReplayDeadLettersResponse(task_ids=replayed)

    @unary
    async def DeleteDeadLetter(
        self, request: admin_service_pb2.DeleteDeadLetterRequest, context: Context
    ) -> admin_service_pb2.DeleteDeadLetterResponse:
        await self.admin.delete_dead_letter(request.task_id)
        return admin_service_pb2.DeleteDeadLetterResponse()

    @unary
    async def DeleteQueue(
        self, request: admin_service_pb2.DeleteQueueRequest, context: Context
    ) -> admin_service_pb2.DeleteQueueResponse:
        """Delete an empty queue; with force, purge its ready and delayed tasks first."""
        try:
            purged = await self.admin.delete_queue(request.queue, request.force)
        except QueueDeletionUnsupported as exc:
            await refuse(context, Refusal(grpc.StatusCode.UNIMPLEMENTED, str(exc), reason=UNSUPPORTED))
        return admin_service_pb2.DeleteQueueResponse(purged=purged)

    @unary
    async def RepairTasks(
        self, request: admin_service_pb2.RepairTasksRequest, context: Context
    ) -> admin_service_pb2.RepairTasksResponse:
        """Republish tasks whose messages look lost; with dry_run, only list them."""
        older_than = seconds_of(request.older_than) if request.HasField("older_than") else None
        report = await self.admin.repair(older_than, request.queue, request.dry_run, request.force)
        response = admin_service_pb2.RepairTasksResponse(
            checked=report.checked, held=report.held, dry_run=request.dry_run
        )
        for repaired in report.repaired:
            result = repaired.record.result
            item = response.tasks.add(task_id=result.task_id, name=result.name, queue=result.queue, state=result.state)
            set_seconds(item.age, repaired.age)
        return response

    @unary
    async def SetRateLimit(
        self, request: admin_service_pb2.SetRateLimitRequest, context: Context
    ) -> admin_service_pb2.SetRateLimitResponse:
        """Store a rate limit on a task name; every replica applies it within a second."""
        given = request.limit
        stored = await self.admin.set_rate_limit(rate_limit(given.name, given.rate, given.burst, given.per_key))
        return admin_service_pb2.SetRateLimitResponse(limit=_rate_limit(stored))

    @unary
    async def ListRateLimits(
        self, request: admin_service_pb2.ListRateLimitsRequest, context: Context
    ) -> admin_service_pb2.ListRateLimitsResponse:
        return admin_service_pb2.ListRateLimitsResponse(
            limits=[_rate_limit(limit) for limit in await self.admin.list_rate_limits()]
        )

    @unary
    async def DeleteRateLimit(
        self, request: admin_service_pb2.DeleteRateLimitRequest, context: Context
    ) -> admin_service_pb2.DeleteRateLimitResponse:
        await self.admin.delete_rate_limit(request.name)
        return admin_service_pb2.DeleteRateLimitResponse()

    @unary
    async def ListTasks(
        self, request: admin_service_pb2.ListTasksRequest, context: Context
    ) -> admin_service_pb2.ListTasksResponse:
        """A page of tasks matching the filters, through the backend's task index."""
        try:
            page = await self.admin.list_tasks(task_query(request), request.page_token)
        except ListingUnsupported as exc:
            await refuse(context, Refusal(grpc.StatusCode.UNIMPLEMENTED, str(exc), reason=UNSUPPORTED))
        return admin_service_pb2.ListTasksResponse(
            tasks=[r.result for r in page.records], next_page_token=page.next_page_token
        )


def task_query(request: admin_service_pb2.ListTasksRequest) -> TaskQuery:
    return TaskQuery(
        states=frozenset(request.states), queue=request.queue, name=request.name, id_prefix=request.id_prefix,
        since_us=micros_of(request.submitted_after) if request.HasField("submitted_after") else None,
        until_us=micros_of(request.submitted_before) if request.HasField("submitted_before") else None,
        limit=request.page_size, oldest_first=request.oldest_first,
    )


def _rate_limit(limit: RateLimit) -> admin_service_pb2.RateLimit:
    return admin_service_pb2.RateLimit(name=limit.name, rate=limit.rate, burst=limit.burst, per_key=limit.per_key,
                       source=limit.source.value)

