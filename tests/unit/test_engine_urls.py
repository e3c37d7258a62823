"""engine_urls.py: the one reader of the options Conveyor takes from an engine URL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conveyor_server.brokers.amqp import AmqpBroker
from conveyor_server.brokers.redis import RedisBroker
from conveyor_server.brokers.sqs import SqsBroker
from conveyor_server.engine_urls import DEFAULT_PREFIX, EngineUrl, UrlOptionError, split_prefix
from conveyor_server.redis_cluster import is_cluster_url


def test_typed_options_read_their_value_or_the_default_when_absent_or_empty() -> None:
    url = EngineUrl("redis://h:1/0?poll=0.5&pool_size=8&fifo=Yes&cluster=0&empty=&region=eu-west-1")
    assert url.number("poll", 1.0) == 0.5
    assert url.integer("pool_size", 16) == 8
    assert url.flag("fifo", False) is True
    assert url.flag("cluster", True) is False
    assert url.text("region", "us-east-1") == "eu-west-1"
    assert url.text("empty", "fallback") == "fallback"
    assert url.integer("missing", 3) == 3
    assert url.prefix == DEFAULT_PREFIX


def test_an_option_given_twice_takes_its_last_value() -> None:
    assert EngineUrl("memcached://h?prefix=a&prefix=b").prefix == "b"


@pytest.mark.parametrize(
    ("query", "read", "expected"),
    [
        ("pool_size=many", lambda url: url.integer("pool_size", 16), "pool_size='many' must be a whole number"),
        ("poll=soon", lambda url: url.number("poll", 1.0), "poll='soon' must be a number"),
        ("fifo=maybe", lambda url: url.flag("fifo", False), "fifo='maybe' must be one of 0, 1, false, no, off"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_option_but_not_the_password(
    query: str, read: Callable[[EngineUrl], object], expected: str
) -> None:
    url = EngineUrl(f"redis://user:secret@h:1/0?{query}")
    with pytest.raises(UrlOptionError) as refused:
        read(url)
    assert expected in str(refused.value)
    assert "secret" not in str(refused.value)


def test_without_hands_the_client_library_only_its_own_options() -> None:
    url = EngineUrl("amqp://u:p@h:5672/vh?prefix=x&linger_ms=3&heartbeat=10")
    assert url.without({"prefix", "linger_ms"}) == "amqp://u:p@h:5672/vh?heartbeat=10"
    assert url.without({"prefix", "linger_ms", "heartbeat"}, [("ssl", "1")]) == "amqp://u:p@h:5672/vh?ssl=1"
    assert split_prefix("mongodb://h/db?prefix=p&w=1") == ("mongodb://h/db?w=1", "p")
    assert split_prefix("mongodb://h/db") == ("mongodb://h/db", DEFAULT_PREFIX)


def test_engines_read_their_options_through_it() -> None:
    assert is_cluster_url("redis://h:1/0?cluster=on") and is_cluster_url("redis+cluster://h:1,h:2/")
    assert not is_cluster_url("redis://h:1/0?cluster=off")
    with pytest.raises(UrlOptionError, match="bands='three' must be a whole number"):
        SqsBroker.from_url("sqs://127.0.0.1:1?bands=three")
    with pytest.raises(UrlOptionError, match="poll='x' must be a number"):
        RedisBroker.from_url("redis://127.0.0.1:1/0?poll=x")
    with pytest.raises(UrlOptionError, match="linger_ms='fast' must be a number"):
        AmqpBroker.from_url("amqp://guest:guest@127.0.0.1:1/?linger_ms=fast")
