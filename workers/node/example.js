#!/usr/bin/env node
'use strict';
// A Node worker with a few tasks:
//   node workers/node/example.js --address 127.0.0.1:50051 --queue default
const { parseArgs } = require('node:util');
const { setTimeout: sleep } = require('node:timers/promises');
const { Worker, Retry, chain, sig } = require('./lib');

const { values: opts } = parseArgs({
  options: {
    address: { type: 'string', default: process.env.CONVEYOR_ADDRESS || '127.0.0.1:50051' },
    queue: { type: 'string', multiple: true, default: ['default'] },
    concurrency: { type: 'string', default: '8' },
  },
});

const worker = new Worker({ address: opts.address, queues: opts.queue, concurrency: Number(opts.concurrency) });

worker.task('node.add', async ([x, y]) => x + y);
worker.task('node.mul', async ([x, y]) => x * y);
worker.task('node.upper', async ([text]) => String(text).toUpperCase());
worker.task('node.echo', async ([value]) => value); // returns its argument unchanged (codec round trip)
worker.task('node.headers', async (args, kwargs, ctx) => ctx.headers); // e.g. the W3C traceparent

// Sleeps `seconds`; ctx.signal aborts it when the task is cancelled.
worker.task('node.sleep', async ([seconds], kwargs, ctx) => {
  try {
    await sleep(seconds * 1000, undefined, { signal: ctx.signal });
  } catch (err) {
    console.log(`node.sleep ${ctx.taskId} stopped: ${ctx.signal.reason?.name}`);
    throw err;
  }
  return seconds;
});

// Fails on the first attempt and asks to run again in 0.1 s.
worker.task('node.flaky', async (args, kwargs, ctx) => {
  if (ctx.attempt < 2) throw new Retry(0.1, 'not yet');
  return ctx.attempt;
});

worker.task('node.fail', async ([message]) => { throw new TypeError(message || 'boom'); });
// Replaced by node.mul(x, y) then node.add(.., 1), on this worker's queue (Celery's self.replace).
worker.task('node.replace', async ([x, y], kwargs, ctx) => ctx.replace(
  chain(sig('node.mul', [x, y], {}, { queue: ctx.queue }), sig('node.add', [1], {}, { queue: ctx.queue })),
));

process.on('SIGINT', () => worker.stop());
process.on('SIGTERM', () => worker.stop());
worker.run().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
