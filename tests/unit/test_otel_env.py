"""conveyor.otel_env: which OTEL_* settings turn exporting on, and what it installs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once

from conveyor import otel_env, tracing

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_PROTOCOL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process starts with no tracer provider; whatever a test installs is undone."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    yield


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, []),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, []),
])
def test_exporters_follow_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: list[str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert otel_env.exporter_names() == expected


def test_nothing_is_installed_without_otel_variables(no_provider: None) -> None:
    assert otel_env.configure_from_env("conveyor-worker") is None
    assert not tracing.enabled()


def test_an_endpoint_installs_an_otlp_provider_named_by_otel_service_name(
    monkeypatch: pytest.MonkeyPatch, no_provider: None,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-worker")
    provider = otel_env.configure_from_env("conveyor-worker")
    assert provider is not None
    try:
        assert trace.get_tracer_provider() is provider
        assert provider.resource.attributes["service.name"] == "billing-worker"
    finally:
        provider.shutdown()


def test_a_provider_set_up_in_code_is_kept(monkeypatch: pytest.MonkeyPatch, no_provider: None) -> None:
    mine = TracerProvider()
    trace.set_tracer_provider(mine)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert otel_env.configure_from_env("conveyor-worker") is None
    assert trace.get_tracer_provider() is mine


def test_links_come_from_the_links_header_and_are_bounded() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {tracing.LINKS_HEADER: " ".join([traceparent] * (tracing.MAX_LINKS + 5) + ["garbage"])}
    links = tracing.links_from(headers)
    assert len(links) == tracing.MAX_LINKS
    assert links[0].context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert links[0].context.span_id == 0xB7AD6B7169203331
    assert tracing.links_from({tracing.LINKS_HEADER: "garbage"}) == []
