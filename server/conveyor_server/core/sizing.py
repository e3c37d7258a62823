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
    fitting: list[tuple[worker_service_pb2.Assignment, int]] = []
    oversized: list[worker_service_pb2.Assignment] = []
    for assignment in assignments:
        size = _encoded_item_size(assignment)
        if size > budget:
            oversized.append(assignment)
        else:
            fitting.append((assignment, size))
    return _cut(fitting, len(fitting), budget), oversized


def chunks_within(items: Sequence[M], max_count: int, max_bytes: int) -> list[list[M]]:
    """`items` in order, in chunks of at most `max_count` items that encode to at most
    `max_bytes` together; an item larger than that goes alone."""
    return _cut([(item, _encoded_item_size(item)) for item in items], max_count, max_bytes)


def _cut(sized: Sequence[tuple[M, int]], max_count: int, max_bytes: int) -> list[list[M]]:
    """(item, encoded size) pairs cut in order into chunks of at most `max_count` items and
    `max_bytes` together; an item larger than that goes alone."""
    chunks: list[list[M]] = []
    current: list[M] = []
    used = 0
    for item, size in sized:
        if current and (len(current) >= max_count or used + size > max_bytes):
            chunks.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        chunks.append(current)
    return chunks
