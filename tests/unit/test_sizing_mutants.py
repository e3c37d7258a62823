"""Assignments cut to fit (core/sizing.py), to the byte: each item is counted as exactly what it
adds to the message, at every length-prefix size, and a batch or a lone task that fills the budget
exactly still fits."""

from __future__ import annotations

import pytest

from conveyor.v1 import worker_service_pb2
from conveyor_server.core.sizing import ENVELOPE_BYTES, split_to_fit
from tests.unit.test_sizing import assignment

# Payloads whose items straddle the varint boundaries of the length prefix (1, 2 and 3 bytes),
# and sizes where (bits + 6) is and is not a multiple of 7 or 8.
PAYLOADS = [1, 40, 100, 110, 120, 200, 250, 500, 1_000, 16_300, 16_400, 40_000]


def items_bytes(batch: list[worker_service_pb2.Assignment]) -> int:
    """What `batch` takes inside an Assignments message (its framing aside)."""
    return worker_service_pb2.Assignments(items=batch).ByteSize()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_batches_fill_the_budget_to_the_byte_and_not_one_byte_more(payload: int) -> None:
    items = [assignment(f"t{i}", payload) for i in range(7)]
    exact = items_bytes(items[:3]) + ENVELOPE_BYTES
    batches, oversized = split_to_fit(items, exact)
    assert ([len(b) for b in batches], oversized) == ([3, 3, 1], [])
    batches, oversized = split_to_fit(items, exact - 1)
    assert ([len(b) for b in batches], oversized) == ([2, 2, 2, 1], [])


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_task_that_fills_the_budget_alone_is_sent_and_one_byte_more_is_left_out(payload: int) -> None:
    item = assignment("t", payload)
    exact = items_bytes([item]) + ENVELOPE_BYTES
    assert split_to_fit([item], exact) == ([[item]], [])
    assert split_to_fit([item], exact - 1) == ([], [item])
