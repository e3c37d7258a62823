"""Commands packed by hiredis (conveyor_server/redis_packing.py) are the bytes redis-py packs,
and refuse what redis-py refuses. No Redis needed: packing happens before a connection is used
(tests/conformance/test_redis_packing.py sends them to real Redis and a real cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from conveyor_server.redis_packing import packing_in_c

pytestmark = pytest.mark.skipif(packing_in_c(Connection) is Connection, reason="hiredis is not installed")

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "conveyor:{q}:task:1", "conveyor:{q}:task:2", b"\x00\xff\r\n", 1.5, -3),
    ("SET", "clé", "välue ✓"),  # text goes out as UTF-8
    ("SCRIPT LOAD", "return 1"),  # a command name with spaces is several arguments
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "big", b"x" * 100_000),  # past redis-py's buffer cutoff, where it chunks
    ("SET", "view", memoryview(b"from a view")),
    ("SET", "array", bytearray(b"from an array")),
    ("ZADD", "due", 1700000000.123456, "m", 0.1, "n", 10**30, "o"),
]


def packed(connection: Connection, *args: Any) -> bytes:
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: str(args[0])[:12])
def test_a_command_is_packed_to_the_bytes_redis_py_packs(args: tuple[Any, ...]) -> None:
    assert packed(packing_in_c(Connection)(), *args) == packed(Connection(), *args)


def test_a_pipeline_is_packed_to_the_bytes_redis_py_packs() -> None:
    ours = b"".join(packing_in_c(Connection)().pack_commands(COMMANDS))
    theirs = b"".join(bytes(chunk) for chunk in Connection().pack_commands(COMMANDS))
    assert ours == theirs


@pytest.mark.parametrize("value", [True, None, object()], ids=["bool", "None", "object"])
def test_what_redis_py_refuses_is_refused_with_its_error(value: Any) -> None:
    with pytest.raises(DataError, match=type(value).__name__):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError, match=type(value).__name__):
        packing_in_c(Connection)().pack_command("SET", "k", value)


def test_another_encoding_keeps_redis_py_packing() -> None:
    """hiredis encodes text as UTF-8 only."""
    latin = packing_in_c(Connection)(encoding="latin-1")
    assert packed(latin, "SET", "clé", "é") == packed(Connection(encoding="latin-1"), "SET", "clé", "é")
    assert b"cl\xe9" in packed(latin, "SET", "clé", "é")


def test_each_connection_class_keeps_its_own_transport() -> None:
    for connection_class in (Connection, SSLConnection, UnixDomainSocketConnection):
        packing = packing_in_c(connection_class)
        assert issubclass(packing, connection_class) and packing is not connection_class
        assert packing_in_c(connection_class) is packing  # one subclass per class
        assert packing_in_c(packing) is packing  # not wrapped twice
