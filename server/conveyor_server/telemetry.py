"""Tracing setup for the server process. Spans are created where the work happens (see
conveyor.tracing); this only decides where they go: nowhere by default, to an OTLP collector
when `otlp_endpoint` (or the standard OTEL_EXPORTER_OTLP_ENDPOINT) is set."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)


def configure_tracing(otlp_endpoint: str, server_id: str) -> TracerProvider | None:
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    except ImportError:
        log.error("otlp_endpoint is set but the exporter is missing: pip install 'conveyor[otlp]'")
        return None
    provider = TracerProvider(resource=Resource.create({
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "conveyor-server"), "service.instance.id": server_id,
    }))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", endpoint)
    return provider
