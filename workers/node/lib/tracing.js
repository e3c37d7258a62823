'use strict';
// Optional OpenTelemetry glue. With @opentelemetry/api installed, a task runs in a span
// "execute <name>" whose parent is the W3C `traceparent` found in the task's headers (and which
// links to the spans listed in its `conveyor-trace-links` header: a chord's members), and the
// client injects the active context into the headers it submits. Without an SDK registered the
// API is a no-op; without the package these functions just call through. startFromEnv() sets up
// @opentelemetry/sdk-node from the standard OTEL_* variables, as Worker.run() does.

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

// Same as conveyor.tracing in Python: the header, and how many links a span gets at most.
const LINKS_HEADER = 'conveyor-trace-links';
const MAX_LINKS = 128;

/** Span links to the span contexts a task's LINKS_HEADER lists (a chord callback's members). */
function linksFrom(headers) {
  const listed = String(headers[LINKS_HEADER] || '').split(/\s+/).filter(Boolean).slice(0, MAX_LINKS);
  return listed.map((traceparent) => parseTraceparent({ traceparent })).filter(Boolean).map((context) => ({ context }));
}

// messaging.operation.type of each span Conveyor makes, by messaging.operation.name.
const OPERATION_TYPES = { submit: 'send', enqueue: 'send', dispatch: 'receive', execute: 'process', result: 'settle' };

/** The attributes every Conveyor span of a task carries, in every language (see docs/tracing.md). */
function taskAttributes(operation, task, attempt) {
  return {
    'messaging.system': 'conveyor',
    'messaging.operation.type': OPERATION_TYPES[operation],
    'messaging.operation.name': operation,
    'messaging.message.id': task.id,
    'messaging.destination.name': task.queue || 'default',
    'conveyor.task.name': task.name,
    'conveyor.attempt': attempt,
  };
}

/** Run `fn` inside a span "execute <name>" continuing the trace found in `headers`. */
function inTaskSpan(name, headers, attributes, fn) {
  if (!api) return fn();
  const tracer = api.trace.getTracer('conveyor-node', VERSION);
  const options = { kind: api.SpanKind.CONSUMER, attributes, links: linksFrom(headers || {}) };
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

/** The trace exporters the OTEL_* variables ask for (none: tracing is not configured). */
function exporterNames(env = process.env) {
  if (String(env.OTEL_SDK_DISABLED || '').trim().toLowerCase() === 'true') return [];
  let names = String(env.OTEL_TRACES_EXPORTER || '').split(',').map((n) => n.trim()).filter(Boolean);
  if (!names.length && (env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)) names = ['otlp'];
  return names.filter((n) => n !== 'none');
}

let sdk = null;

/** Start @opentelemetry/sdk-node as OTEL_* says (it reads them itself: exporter, endpoint,
 * protocol, headers, service name, resource attributes, sampler...). Does nothing when they ask
 * for no exporter, or when the application registered a tracer provider itself. */
function startFromEnv(defaultServiceName = 'conveyor-node-worker') {
  if (!api || sdk || !exporterNames().length) return;
  const current = api.trace.getTracerProvider();
  const delegate = typeof current.getDelegate === 'function' ? current.getDelegate() : current;
  if (delegate?.constructor?.name !== 'NoopTracerProvider') return; // set up in code already
  let NodeSDK;
  try {
    ({ NodeSDK } = require('@opentelemetry/sdk-node')); // eslint-disable-line global-require
  } catch {
    console.warn('conveyor: OTEL_* asks for traces but @opentelemetry/sdk-node is not installed');
    return;
  }
  sdk = new NodeSDK(process.env.OTEL_SERVICE_NAME ? {} : { serviceName: defaultServiceName });
  sdk.start();
}

/** Flush and stop what startFromEnv() started. */
async function shutdown() {
  const started = sdk;
  sdk = null;
  if (!started) return;
  try {
    await started.shutdown();
  } catch (err) {
    console.warn(`conveyor: flushing spans failed: ${err?.message ?? err}`);
  }
}

module.exports = {
  inTaskSpan, injectHeaders, parseTraceparent, linksFrom, taskAttributes, exporterNames, startFromEnv, shutdown,
  LINKS_HEADER, MAX_LINKS, enabled: api !== null,
};
