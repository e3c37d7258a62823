#!/usr/bin/env node
'use strict';
// The conformance task set (docs/conformance.md) on this package, for `conveyor conformance`:
//   conveyor conformance --worker-cmd "node workers/node/conformance-worker.js"
// The Worker reads CONVEYOR_ADDRESS and CONVEYOR_TOKEN itself; the queue is CONVEYOR_QUEUE.
const { setTimeout: sleep } = require('node:timers/promises');
const { Worker, Retry } = require('./lib');

class ConformanceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConformanceError'; // the error type the kit expects
  }
}

const worker = new Worker({ queues: [process.env.CONVEYOR_QUEUE || 'default'] });

worker.task('conformance.echo', async ([value]) => value);
worker.task('conformance.bytes', async ([data]) => Buffer.from(data).reverse());
worker.task('conformance.fail', async ([message]) => { throw new ConformanceError(message); });

worker.task('conformance.retry', async ([times], kwargs, ctx) => {
  if (ctx.attempt <= times) throw new Retry(0.1, `attempt ${ctx.attempt} of ${times + 1}`);
  return ctx.attempt;
});

// ctx.signal is aborted by a cancel or the time limit, which ends the sleep.
worker.task('conformance.sleep', async ([seconds], kwargs, ctx) => {
  await sleep(seconds * 1000, undefined, { signal: ctx.signal });
  return seconds;
});

worker.task('conformance.progress', async ([steps], kwargs, ctx) => {
  for (let step = 1; step <= steps; step += 1) {
    ctx.progress(step);
    await sleep(50, undefined, { signal: ctx.signal });
  }
  return steps;
});

process.on('SIGINT', () => worker.stop());
process.on('SIGTERM', () => worker.stop());
worker.run().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
