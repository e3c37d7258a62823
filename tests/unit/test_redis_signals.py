"""Which pub/sub signals wake the Redis broker's fetches (RedisBroker._news): a cluster delivers
each signal once per master, and each late copy woke every waiting fetch to look at a queue the
first copy's look had drained (tests/conformance/test_redis_broker_wakeups.py counts the looks
on a real cluster). No Redis needed: the broker is not connected."""

from __future__ import annotations

from conveyor_server.brokers import redis as redis_broker
from conveyor_server.brokers.redis import RedisBroker


def broker() -> RedisBroker:
    return RedisBroker.from_url("redis://127.0.0.1:1/0")


def test_a_signal_is_news_once_however_many_masters_deliver_it() -> None:
    here, there = broker(), broker()
    signal = there._signal().encode()
    assert [here._news(signal) for _ in range(3)] == [True, False, False]
    assert here._news(there._signal().encode())  # the next one of the same sender is news


def test_a_brokers_own_signals_are_never_news_to_it() -> None:
    here = broker()
    assert not here._news(here._signal().encode())


def test_signals_without_a_number_always_wake() -> None:
    """A recovery's signal ('1'), and a replica's of an earlier version (its bare sender id)."""
    here = broker()
    assert [here._news(b"1") for _ in range(2)] == [True, True]
    assert [here._news(b"0123456789abcdef0123456789abcdef") for _ in range(2)] == [True, True]


def test_the_signals_remembered_are_bounded() -> None:
    here, there = broker(), broker()
    signals = [there._signal().encode() for _ in range(redis_broker.HEARD_SIGNALS + 1)]
    for signal in signals:
        assert here._news(signal)
    assert len(here._heard) == redis_broker.HEARD_SIGNALS
    assert here._news(signals[0])  # the oldest was forgotten
