import random

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.v1 import task_pb2
from conveyor_server.core.retry import attempts_allowed, base_delay, next_delay, seconds


def policy(
    kind: task_pb2.BackoffKind.ValueType, initial: float = 1.0, cap: float = 100.0, jitter: float = 0.0
) -> task_pb2.RetryPolicy:
    p = task_pb2.RetryPolicy(max_attempts=10, backoff=kind, jitter=jitter)
    p.initial.CopyFrom(Duration(seconds=int(initial), nanos=int((initial % 1) * 1e9)))
    p.max.CopyFrom(Duration(seconds=int(cap)))
    return p


@pytest.mark.parametrize(("kind", "expected"), [
    (task_pb2.BACKOFF_KIND_EXPONENTIAL, [1, 2, 4, 8, 16, 32, 64, 100]),
    (task_pb2.BACKOFF_KIND_FIBONACCI, [1, 1, 2, 3, 5, 8, 13, 21]),
    (task_pb2.BACKOFF_KIND_FIXED, [1] * 8),
    (task_pb2.BACKOFF_KIND_UNSPECIFIED, [1, 2, 4, 8, 16, 32, 64, 100]),
])
def test_backoff_kinds(kind: task_pb2.BackoffKind.ValueType, expected: list[float]) -> None:
    assert [base_delay(policy(kind), attempt) for attempt in range(1, 9)] == expected


def test_jitter_stays_within_its_fraction() -> None:
    rng = random.Random(7)
    p = policy(task_pb2.BACKOFF_KIND_FIXED, initial=10, jitter=0.2)
    delays = [next_delay(p, 1, rng) for _ in range(500)]
    assert min(delays) >= 8.0
    assert max(delays) <= 12.0
    assert max(delays) - min(delays) > 2.0  # it does vary


def test_attempts_allowed_counts_the_first() -> None:
    assert attempts_allowed(task_pb2.RetryPolicy()) == 1
    assert attempts_allowed(task_pb2.RetryPolicy(max_attempts=1)) == 1
    assert attempts_allowed(task_pb2.RetryPolicy(max_attempts=5)) == 5


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert base_delay(policy(task_pb2.BACKOFF_KIND_EXPONENTIAL), 10_000) == 100


def test_durations_count_their_nanoseconds() -> None:
    assert seconds(Duration(seconds=1, nanos=500_000_000)) == 1.5
    assert base_delay(policy(task_pb2.BACKOFF_KIND_FIXED, initial=0.25), 1) == 0.25


def test_the_exponent_stops_growing_at_62() -> None:
    tiny = task_pb2.RetryPolicy(backoff=task_pb2.BACKOFF_KIND_EXPONENTIAL)
    tiny.initial.CopyFrom(Duration(nanos=1))
    tiny.max.CopyFrom(Duration(seconds=10**11))  # a cap far above 2**63 ns
    assert base_delay(tiny, 63) == base_delay(tiny, 100) == 2**62 * 1e-9


def test_jitter_adds_the_generators_draw_to_the_base_delay() -> None:
    p = policy(task_pb2.BACKOFF_KIND_FIXED, initial=10, jitter=0.5)
    assert next_delay(p, 1, random.Random(7)) == 10 + random.Random(7).uniform(-5, 5)


def test_a_delay_below_a_second_is_kept() -> None:
    assert next_delay(policy(task_pb2.BACKOFF_KIND_FIXED, initial=0.1), 1) == 0.1
