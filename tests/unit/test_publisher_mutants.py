"""Publishing: what the broker is handed for each task (priority, message group, the delay a
caller set over the signature's own), found unpinned by mutation testing."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import task_pb2
from conveyor_server.brokers.base import OutgoingMessage
from conveyor_server.brokers.memory import MemoryBroker
from conveyor_server.core.publisher import Publication, Publisher


class Capturing(MemoryBroker):
    """The memory broker, keeping every message it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[OutgoingMessage] = []

    async def publish(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        self.handed.extend(messages)
        await super().publish(queue, messages)


async def test_the_broker_gets_each_tasks_priority_group_and_the_delay_the_caller_set() -> None:
    broker = Capturing()
    await broker.connect()
    later = task_pb2.Signature(name="n", id="later", queue="q", priority=7, message_group="g",
                               countdown=Duration(seconds=60))
    await Publisher(broker).publish([Publication(later), Publication(later, delay=0.0)])
    assert [(m.priority, m.group, m.delay) for m in broker.handed] == [(7, "g", 60.0), (7, "g", 0.0)]
    await broker.close()
