"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once

from conveyor_server.backends.memory import MemoryBackend


@pytest.fixture
def no_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenTelemetry SDK installed (whatever another test of this process set up is set aside).

    Spans then carry their parent's context unchanged, so a test can predict a traceparent.
    """
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    """A connected memory backend (a test module may define its own `backend` in its place)."""
    engine = MemoryBackend()
    await engine.connect()
    yield engine
    await engine.close()
