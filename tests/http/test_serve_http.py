"""`conveyor serve --http` and the dashboard's exposure rule."""

from __future__ import annotations

import hashlib
import re
import socket

import pytest

from conveyor_server.app import ConveyorServer
from conveyor_server.cli import http_address, main
from conveyor_server.config import ConfigError, Security, Settings, Token
from conveyor_server.http.server import DEFAULT_PORT


@pytest.mark.parametrize(("text", "expected"), [
    ("0", ("127.0.0.1", 0)), ("9090", ("127.0.0.1", 9090)), (":9090", ("127.0.0.1", 9090)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:8081", ("::1", 8081)), ("localhost:8080", ("localhost", 8080)),
])
def test_http_addresses(text: str, expected: tuple[str, int]) -> None:
    assert http_address(text, "127.0.0.1") == expected


@pytest.mark.parametrize("text", ["", "host", "host:http", "1:99999", "-1"])
def test_bad_http_addresses_are_refused(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--broker", "memory://", "--backend", "memory://", "--http", text]) == 2
    assert "--http expects [HOST:]PORT" in capsys.readouterr().err


async def test_a_public_dashboard_needs_tokens() -> None:
    public = Settings(port=0, broker_url="memory://", backend_url="memory://", http_host="0.0.0.0")
    with pytest.raises(ConfigError, match=re.escape("refusing to serve the dashboard on 0.0.0.0")):
        ConveyorServer(public)
    token = Token("ops", "admin", hashlib.sha256(b"s").hexdigest())
    ConveyorServer(public.replace(security=Security(tokens=(token,))))
    ConveyorServer(public.replace(http_port=0))


async def test_a_port_in_use_stops_the_start_with_its_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ConveyorServer(Settings(port=0, broker_url="memory://", backend_url="memory://", http_port=port))
        reason = f"cannot serve the dashboard on 127.0.0.1:{port}: address already in use"
        with pytest.raises(OSError, match=re.escape(reason)):
            await server.start()
        await server.core.stop()


async def test_the_default_port_in_use_leaves_the_server_without_a_dashboard(caplog: pytest.LogCaptureFixture) -> None:
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", DEFAULT_PORT))
        holder.listen()
    except OSError:
        pass  # something else holds it already: the same situation
    try:
        server = ConveyorServer(Settings(port=0, broker_url="memory://", backend_url="memory://"))
        await server.start()
        try:
            assert server.http_port == 0
            assert "default port 127.0.0.1:8080 is in use" in caplog.text
        finally:
            await server.stop()
    finally:
        holder.close()
