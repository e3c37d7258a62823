'use strict';
// lib/tracing.js: which OTEL_* settings turn exporting on, the shared attributes and chord links.
const test = require('node:test');
const assert = require('node:assert/strict');

const { exporterNames, linksFrom, taskAttributes, LINKS_HEADER, MAX_LINKS } = require('../lib/tracing');

test('exporters follow the standard OTEL_* variables', () => {
  assert.deepEqual(exporterNames({}), []);
  assert.deepEqual(exporterNames({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4317' }), ['otlp']);
  assert.deepEqual(exporterNames({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:4317' }), ['otlp']);
  assert.deepEqual(exporterNames({ OTEL_TRACES_EXPORTER: 'console, otlp' }), ['console', 'otlp']);
  assert.deepEqual(exporterNames({ OTEL_TRACES_EXPORTER: 'none', OTEL_EXPORTER_OTLP_ENDPOINT: 'x' }), []);
  assert.deepEqual(exporterNames({ OTEL_SDK_DISABLED: 'true', OTEL_EXPORTER_OTLP_ENDPOINT: 'x' }), []);
});

test('the execute span carries the attributes Python and the server use', () => {
  assert.deepEqual(taskAttributes('execute', { id: 't1', name: 'node.mul', queue: '' }, 2), {
    'messaging.system': 'conveyor',
    'messaging.operation.type': 'process',
    'messaging.operation.name': 'execute',
    'messaging.message.id': 't1',
    'messaging.destination.name': 'default',
    'conveyor.task.name': 'node.mul',
    'conveyor.attempt': 2,
  });
});

test('links come from the links header, valid ones only, at most MAX_LINKS', () => {
  const traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
  const listed = [...Array(MAX_LINKS + 5).fill(traceparent), 'garbage'].join(' ');
  const links = linksFrom({ [LINKS_HEADER]: listed });
  assert.equal(links.length, MAX_LINKS);
  assert.equal(links[0].context.traceId, '0af7651916cd43dd8448eb211c80319c');
  assert.equal(links[0].context.spanId, 'b7ad6b7169203331');
  assert.deepEqual(linksFrom({ [LINKS_HEADER]: 'garbage' }), []);
  assert.deepEqual(linksFrom({}), []);
});
