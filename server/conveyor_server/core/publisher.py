"""Turns signatures into broker messages and publishes them, one batch per queue."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.internal.v1 import records_pb2
from conveyor.v1 import task_pb2
from conveyor.values import seconds_of

from ..brokers.base import Broker, OutgoingMessage


@dataclass(frozen=True, slots=True)
class Publication:
    signature: task_pb2.Signature
    attempt: int = 1
    workflow_id: str = ""
    # Seconds before the task may run; None means "as the signature's eta/countdown say".
    delay: float | None = None
    # A repair's copy of a running task: the stale lease it may replace (core/repair.py).
    repairs_lease: str = ""


def scheduled_delay(signature: task_pb2.Signature, now: float) -> float:
    """Seconds until the signature's eta (from `now`, wall seconds) or countdown; 0 when it has
    neither."""
    if signature.HasField("countdown"):
        return max(seconds_of(signature.countdown), 0.0)
    if signature.HasField("eta"):
        eta = seconds_of(signature.eta)
        return max(eta - now, 0.0)
    return 0.0


def encode_message(publication: Publication) -> bytes:
    return records_pb2.TaskMessage(
        signature=publication.signature, attempt=publication.attempt, workflow_id=publication.workflow_id,
        repairs_lease=publication.repairs_lease,
    ).SerializeToString()


def decode_message(body: bytes) -> records_pb2.TaskMessage:
    message = records_pb2.TaskMessage()
    message.ParseFromString(body)
    return message


# Told of each publish call, whether it succeeded or not: its task ids by queue, and the seconds
# before the first of them may run. A task whose publish failed is one the repair of lost
# messages must be able to find: a claimed follow-up whose publish met an outage may have no
# other way back (its cause's message can be lost with the queue it was handed back to).
# Must not block: the publish index (core/publish_index.py) buffers.
PublishListener = Callable[[Mapping[str, Sequence[str]], float], None]


class Publisher:
    def __init__(
        self, broker: Broker, on_published: PublishListener | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.broker = broker
        self.on_published = on_published
        # Wall seconds: an eta is a point in wall time.
        self.clock = clock

    async def publish(self, publications: Sequence[Publication]) -> None:
        by_queue: dict[str, list[OutgoingMessage]] = defaultdict(list)
        earliest = float("inf")
        for publication in publications:
            signature = publication.signature
            delay = publication.delay if publication.delay is not None else scheduled_delay(signature, self.clock())
            earliest = min(earliest, delay)
            by_queue[signature.queue].append(
                OutgoingMessage(
                    message_id=signature.id,
                    body=encode_message(publication),
                    delay=delay,
                    priority=signature.priority,
                    group=signature.message_group,
                )
            )
        if not by_queue:
            return
        try:
            await asyncio.gather(*(self._publish(q, m) for q, m in by_queue.items()))
        finally:
            if self.on_published is not None:
                self.on_published({q: [m.message_id for m in ms] for q, ms in by_queue.items()}, earliest)

    async def _publish(self, queue: str, messages: list[OutgoingMessage]) -> None:
        attributes: dict[str, str | int] = {
            "messaging.system": "conveyor", "messaging.operation.type": tracing.OPERATION_TYPES["enqueue"],
            "messaging.operation.name": "enqueue", "messaging.destination.name": queue,
            "messaging.batch.message_count": len(messages),
        }
        with tracing.span(f"enqueue {queue}", kind=SpanKind.PRODUCER, attributes=attributes):
            await self.broker.publish(queue, messages)
