"""OpenTelemetry glue shared by the client, the worker runtime and the server.

Trace context travels as W3C `traceparent`/`tracestate`: in gRPC metadata from a client to
the server, and in each Signature's headers from there on, so it crosses queues, workflow
steps, retries and languages. Without an OpenTelemetry SDK configured every span is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")
# A chord callback's header: its members' span contexts (space-separated `traceparent` values),
# which become span links. Bounded so a huge chord cannot grow a task's headers without end.
LINKS_HEADER = "conveyor-trace-links"
MAX_LINKS = 128

# messaging.operation.type (OpenTelemetry messaging semantic conventions) of each span Conveyor
# makes, by messaging.operation.name. Shared with the Node worker and documented for others.
OPERATION_TYPES = {
    "submit": "send", "enqueue": "send", "dispatch": "receive", "execute": "process", "result": "settle",
}


def enabled() -> bool:
    """True once an OpenTelemetry SDK is installed; until then spans are skipped entirely
    (not even no-op spans: the hot path should not pay for tracing nobody records)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer(name: str = "conveyor") -> trace.Tracer:
    return trace.get_tracer(name)


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The current context as W3C headers (empty when there is no valid span)."""
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers)
    if carrier is not None:
        carrier.update(headers)
    return headers


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    return _PROPAGATOR.extract({k: v for k, v in headers.items() if k in TRACE_HEADERS})


def task_attributes(
    operation: str, task_id: str, name: str, queue: str = "", attempt: int = 0,
) -> dict[str, str | int]:
    """The attribute scheme every Conveyor span of one task uses, in every language."""
    attributes: dict[str, str | int] = {
        "messaging.system": "conveyor",
        "messaging.operation.type": OPERATION_TYPES[operation],
        "messaging.operation.name": operation,
        "messaging.message.id": task_id,
        "messaging.destination.name": queue or "default",
        "conveyor.task.name": name,
    }
    if attempt:
        attributes["conveyor.attempt"] = attempt
    return attributes


def links_from(headers: Mapping[str, str]) -> list[trace.Link]:
    """Span links to the span contexts listed in a task's LINKS_HEADER (a chord's members)."""
    links: list[trace.Link] = []
    for traceparent in headers.get(LINKS_HEADER, "").split()[:MAX_LINKS]:
        linked = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    return links


# What span() gives when tracing is off: reusable, and cheaper than a generator per call (callers
# that check enabled() once for a batch use it too).
NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def span(
    name: str, parent_headers: Mapping[str, str] | None = None, kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes = None,
) -> AbstractContextManager[Span]:
    """A current span, child of the context in `parent_headers` (or of the current span), linked
    to the span contexts those headers list under LINKS_HEADER."""
    if not enabled():
        return NO_SPAN
    return _recorded_span(name, parent_headers, kind, attributes)


@contextmanager
def _recorded_span(
    name: str, parent_headers: Mapping[str, str] | None, kind: SpanKind, attributes: Attributes
) -> Iterator[Span]:
    parent = extract(parent_headers) if parent_headers else None
    links = links_from(parent_headers) if parent_headers else None
    with tracer().start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes, links=links,
    ) as current:
        yield current
