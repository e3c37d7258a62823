"""AdminService: queues, workers, task inspection, dead letters and schedules for operators."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import admin_service_pb2_grpc

from ..core.admin import Admin
from .status import unary

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    @unary
    async def ListQueues(self, request: a.ListQueuesRequest, context: Context) -> a.ListQueuesResponse:
        return a.ListQueuesResponse(queues=await self.admin.queues())

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
