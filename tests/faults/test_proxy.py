"""The fault-injection TCP proxy itself: it forwards, and cut / restore / reset / delay do what they say."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import redis

from tests.support.proxy import TcpProxy
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded TCP echo server on a free loopback port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve(conn: socket.socket) -> None:
        with closing(conn):
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(4096)


def closed_at_once(port: int) -> bool:
    """The proxy accepted and closed the connection: EOF, or a reset when our bytes were unread."""
    try:
        return roundtrip(port) == b""
    except ConnectionResetError:
        return True


def test_it_forwards_both_ways_on_a_free_port(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        assert proxy.port not in (0, echo_port)
        assert roundtrip(proxy.port, b"hello") == b"hello"
        assert proxy.accepted == 1


def test_cut_closes_open_links_and_refuses_new_ones_until_restored(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"

        proxy.cut()
        assert proxy.is_cut
        assert sock.recv(10) == b"", "the open link was closed"
        assert closed_at_once(proxy.port), "a new connection is closed at once"

        proxy.restore()
        assert roundtrip(proxy.port, b"back") == b"back"
        sock.close()


def test_reset_drops_current_links_but_keeps_accepting(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"
        proxy.reset()
        assert sock.recv(10) == b""
        assert roundtrip(proxy.port, b"again") == b"again"
        sock.close()


def test_delay_adds_latency_per_chunk_and_zero_removes_it(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        proxy.delay(0.2)
        began = time.monotonic()
        assert roundtrip(proxy.port) == b"ping"
        assert time.monotonic() - began >= 0.4, "0.2 s each way"
        proxy.delay(0)
        began = time.monotonic()
        assert roundtrip(proxy.port) == b"ping"
        assert time.monotonic() - began < 0.2


async def test_an_async_test_drives_it_without_blocking_its_own_loop(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        assert await reader.read(10) == b"x"
        await asyncio.to_thread(proxy.cut)
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        writer.close()


def test_stop_is_idempotent_and_frees_the_port(echo_port: int) -> None:
    proxy = TcpProxy("127.0.0.1", echo_port).start()
    port = proxy.port
    proxy.stop()
    proxy.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_a_redis_client_through_the_proxy_recovers_after_a_cut_and_a_private_redis_keeps_its_aof(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        with TcpProxy("127.0.0.1", server.port) as proxy:
            client = redis.Redis(port=proxy.port, socket_timeout=2, socket_connect_timeout=2)
            client.set("k", "v")
            proxy.cut()
            with pytest.raises(redis.ConnectionError):
                client.get("k")
            proxy.restore()
            server.stop(signal.SIGKILL)
            server.start()
            assert client.get("k") == b"v", "written with appendfsync always, replayed after the crash"
            client.close()
    finally:
        server.stop()
