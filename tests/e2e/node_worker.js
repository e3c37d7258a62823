'use strict';
// What the Node worker scripts of the end-to-end tests share: the package (workers/node/lib), a
// Worker configured from the command line (--address, --queue, --concurrency) and running it
// until SIGINT or SIGTERM drains it.
const path = require('node:path');
const { parseArgs } = require('node:util');
const conveyor = require(path.resolve(__dirname, '..', '..', 'workers', 'node', 'lib'));

/** A Worker for the options on the command line. */
function workerFromArgs() {
  const { values: opts } = parseArgs({
    options: {
      address: { type: 'string', default: process.env.CONVEYOR_ADDRESS || '127.0.0.1:50051' },
      queue: { type: 'string', multiple: true, default: ['default'] },
      concurrency: { type: 'string', default: '4' },
    },
  });
  return new conveyor.Worker({ address: opts.address, queues: opts.queue, concurrency: Number(opts.concurrency) });
}

/** Run `worker` until a signal stops it; a failure to run sets the exit code. */
function serve(worker) {
  process.on('SIGINT', () => worker.stop());
  process.on('SIGTERM', () => worker.stop());
  worker.run().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}

module.exports = { conveyor, workerFromArgs, serve };
