"""One queue's figures as the server reports them (AdminService.ListQueues), for the benches
that wait on a queue through the server (its CPU then counts the asking)."""

from __future__ import annotations

from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc


async def queue_info(
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub, name: str, rpc_timeout: float | None = None
) -> admin_service_pb2.QueueInfo | None:
    """The queue's QueueInfo; None while the server knows no such queue."""
    queues = (await admin.ListQueues(admin_service_pb2.ListQueuesRequest(), timeout=rpc_timeout)).queues
    return next((queue for queue in queues if queue.name == name), None)
