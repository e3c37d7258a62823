"""AdminService: queues, workers, task inspection and dead letters for operators."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import admin_service_pb2_grpc

from ..core.admin import Admin
from .status import unary

Context = grpc.aio.ServicerContext[Any, Any]


async def _not_yet(context: Context, what: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not implemented by this server version yet")


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    @unary
    async def ListQueues(self, request: a.ListQueuesRequest, context: Context) -> a.ListQueuesResponse:
        return a.ListQueuesResponse(queues=await self.admin.queues())

    @unary
    async def PurgeQueue(self, request: a.PurgeQueueRequest, context: Context) -> a.PurgeQueueResponse:
        return a.PurgeQueueResponse(purged=await self.admin.purge(request.queue))

    async def PauseQueue(self, request: a.PauseQueueRequest, context: Context) -> a.PauseQueueResponse:
        await _not_yet(context, "pausing queues")
        return a.PauseQueueResponse()

    async def ResumeQueue(self, request: a.ResumeQueueRequest, context: Context) -> a.ResumeQueueResponse:
        await _not_yet(context, "resuming queues")
        return a.ResumeQueueResponse()

    async def CreateSchedule(self, request: a.CreateScheduleRequest, context: Context) -> a.CreateScheduleResponse:
        await _not_yet(context, "periodic schedules")
        return a.CreateScheduleResponse()

    async def ListSchedules(self, request: a.ListSchedulesRequest, context: Context) -> a.ListSchedulesResponse:
        await _not_yet(context, "periodic schedules")
        return a.ListSchedulesResponse()

    async def DeleteSchedule(self, request: a.DeleteScheduleRequest, context: Context) -> a.DeleteScheduleResponse:
        await _not_yet(context, "periodic schedules")
        return a.DeleteScheduleResponse()

    @unary
    async def ListWorkers(self, request: a.ListWorkersRequest, context: Context) -> a.ListWorkersResponse:
        return a.ListWorkersResponse(workers=self.admin.workers())

    @unary
    async def InspectTask(self, request: a.InspectTaskRequest, context: Context) -> a.InspectTaskResponse:
        return a.InspectTaskResponse(result=await self.admin.inspect(request.task_id))

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
