"""Messages cut to fit what the peer can receive.

A worker announces its largest receivable message in Hello (`max_receive_bytes`); a batch of
legal tasks (each under the submit limits) can still add up to more, and a message over the
worker's limit kills its stream, so every Assignments message is cut to fit. A single task too
large for the worker is left out, for another worker to take. Watch responses carry a batch of
events each, cut by count and by size the same way (chunks_within).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from conveyor.v1 import worker_service_pb2

M = TypeVar("M", bound=Message)

# What a worker that says nothing accepts: gRPC's default receive limit.
DEFAULT_WORKER_RECEIVE_BYTES = 4 * 1024 * 1024
# Room for the ConnectResponse and Assignments framing around the items.
ENVELOPE_BYTES = 64


def _encoded_item_size(item: Message) -> int:
    """Bytes one item adds to a repeated field of a message: tag, length prefix, body."""
    size = item.ByteSize()
    return 1 + (size.bit_length() + 6) // 7 + size


def split_to_fit(
    assignments: Sequence[worker_service_pb2.Assignment], max_bytes: int
) -> tuple[list[list[worker_service_pb2.Assignment]], list[worker_service_pb2.Assignment]]:
    """Batches in order, each encoding to at most `max_bytes` (0: the gRPC default), and the
    assignments that do not fit even alone."""
    budget = (max_bytes or DEFAULT_WORKER_RECEIVE_BYTES) - ENVELOPE_BYTES
    batches: list[list[worker_service_pb2.Assignment]] = []
    oversized: list[worker_service_pb2.Assignment] = []
    current: list[worker_service_pb2.Assignment] = []
    used = 0
    for assignment in assignments:
        size = _encoded_item_size(assignment)
        if size > budget:
            oversized.append(assignment)
            continue
        if current and used + size > budget:
            batches.append(current)
            current, used = [], 0
        current.append(assignment)
        used += size
    if current:
        batches.append(current)
    return batches, oversized


def chunks_within(items: Sequence[M], max_count: int, max_bytes: int) -> list[Sequence[M]]:
    """`items` in order, in chunks of at most `max_count` items that encode to at most
    `max_bytes` together; an item larger than that goes alone."""
    chunks: list[Sequence[M]] = []
    start, used = 0, 0
    for index, item in enumerate(items):
        size = _encoded_item_size(item)
        if index > start and (index - start >= max_count or used + size > max_bytes):
            chunks.append(items[start:index])
            start, used = index, 0
        used += size
    if start < len(items):
        chunks.append(items[start:])
    return chunks
