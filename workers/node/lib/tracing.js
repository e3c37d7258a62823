'use strict';
// Optional OpenTelemetry glue. With @opentelemetry/api installed, a task runs in a span
// "execute <name>" whose parent is the W3C `traceparent` found in the task's headers, and the
// client injects the active context into the headers it submits. Without an SDK registered the
// API is a no-op; without the package these functions just call through.

let api = null;
try {
  api = require('@opentelemetry/api'); // eslint-disable-line global-require
} catch {
  api = null;
}

const VERSION = require('../package.json').version;

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/** The W3C trace-context format, for when no global propagator is registered. */
function parseTraceparent(headers) {
  const match = TRACEPARENT.exec(String(headers.traceparent || '').trim());
  if (!match || match[1] === 'ff' || (match[1] === '00' && match[5])) return null;
  const spanContext = { traceId: match[2], spanId: match[3], traceFlags: parseInt(match[4], 16), isRemote: true };
  if (!api.isSpanContextValid(spanContext)) return null;
  if (headers.tracestate && typeof api.createTraceState === 'function') {
    spanContext.traceState = api.createTraceState(String(headers.tracestate));
  }
  return spanContext;
}

function parentContext(headers) {
  let parent = api.propagation.extract(api.ROOT_CONTEXT, headers);
  if (!api.trace.getSpanContext(parent)) {
    const remote = parseTraceparent(headers);
    if (remote) parent = api.trace.setSpanContext(api.ROOT_CONTEXT, remote);
  }
  return parent;
}

/** Run `fn` inside a span "execute <name>" continuing the trace found in `headers`. */
function inTaskSpan(name, headers, attributes, fn) {
  if (!api) return fn();
  const tracer = api.trace.getTracer('conveyor-node', VERSION);
  const options = { kind: api.SpanKind.CONSUMER, attributes };
  return tracer.startActiveSpan(`execute ${name}`, options, parentContext(headers || {}), async (span) => {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof Error) span.recordException(err);
      span.setStatus({ code: api.SpanStatusCode.ERROR, message: String(err?.message ?? err) });
      throw err;
    } finally {
      span.end();
    }
  });
}

/** Add the active trace context (if any) to outgoing headers. */
function injectHeaders(headers) {
  if (api) api.propagation.inject(api.context.active(), headers);
  return headers;
}

module.exports = { inTaskSpan, injectHeaders, parseTraceparent, enabled: api !== null };
