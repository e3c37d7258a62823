"""Tracing set up from the standard OTEL_* environment variables, so that `conveyor worker`
exports spans without code changes.

Honoured: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (`otlp`, `console`, `none`; `otlp` is implied
when an OTLP endpoint is set), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _HEADERS / _INSECURE /
_PROTOCOL (`grpc`; `http/protobuf` when its exporter is installed), OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG] and OTEL_BSP_* (the last ones are read by the
OpenTelemetry SDK itself). Tracing set up in code first is left alone.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from conveyor import tracing

log = logging.getLogger(__name__)


def exporter_names() -> list[str]:
    """The trace exporters the environment asks for (none when tracing is not configured)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    listed = [name.strip() for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not listed and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                       or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        listed = ["otlp"]
    return [name for name in listed if name != "none"]


def _otlp_exporter() -> SpanExporter | None:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcExporter,
            )
            return GrpcExporter()  # reads the endpoint, headers and TLS settings from OTEL_*
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
                OTLPSpanExporter as HttpExporter,
            )
            exporter: SpanExporter = HttpExporter()
            return exporter
    except ImportError:
        log.error("OTEL_* asks for OTLP over %s but its exporter is missing: pip install 'conveyor[otlp]'", protocol)
        return None
    log.error("OTLP protocol %r is not supported (use grpc or http/protobuf); no spans are exported", protocol)
    return None


def configure_from_env(default_service_name: str) -> TracerProvider | None:
    """Install a TracerProvider exporting as OTEL_* says; None when they ask for nothing, or
    when a provider is installed already. Shut the provider down at exit to flush its spans."""
    names = exporter_names()
    if not names or tracing.enabled():
        return None
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            otlp = _otlp_exporter()
            if otlp is not None:
                exporters.append(otlp)
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.error("OTEL_TRACES_EXPORTER %r is not supported (use otlp, console or none)", name)
    if not exporters:
        return None
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; attributes given here win over it, so the
    # default service name applies only when OTEL_SERVICE_NAME is unset.
    service_name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("exporting traces (%s) as service %s", ", ".join(names), service_name)
    return provider
