#!/usr/bin/env node
'use strict';
// A Node worker whose tasks declare a description and a call schema, for the task registry's
// end-to-end tests (tests/e2e/test_task_registry.py):
//   node tests/e2e/node_typed_tasks.js --address 127.0.0.1:50051 --queue default
const { workerFromArgs, serve } = require('./node_worker');

const worker = workerFromArgs();

// args: a number, then an integer factor; no kwargs.
worker.task('node.scale', async ([x, factor]) => x * factor, {
  description: 'Multiplies a number by an integer factor.',
  schema: {
    type: 'object',
    properties: {
      args: { type: 'array', prefixItems: [{ type: 'number' }, { type: 'integer' }], minItems: 2, items: false },
      kwargs: { type: 'object', maxProperties: 0 },
    },
  },
});
worker.task('node.untyped', async (args) => args); // registered without a schema: any call

serve(worker);
