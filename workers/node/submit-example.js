#!/usr/bin/env node
'use strict';
// Submit one task and print its result stream:
//   node workers/node/submit-example.js --address 127.0.0.1:50051 add 2 3
// Arguments are JSON where they parse as JSON (2, 2.5, true, [1,2]), else strings.
const { parseArgs } = require('node:util');
const { Client } = require('./lib');
const { show } = require('./lib/values');

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    address: { type: 'string', default: process.env.CONVEYOR_ADDRESS || '127.0.0.1:50051' },
    queue: { type: 'string', default: '' },
    kw: { type: 'string', multiple: true, default: [] },
  },
});

const parse = (text) => {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
};

async function main() {
  const [name = 'node.add', ...rest] = positionals;
  const kwargs = Object.fromEntries(opts.kw.map((item) => {
    const at = item.indexOf('=');
    return [item.slice(0, at), parse(item.slice(at + 1))];
  }));
  const client = new Client(opts.address);
  try {
    const { taskId } = await client.submit(name, rest.map(parse), kwargs, { queue: opts.queue });
    console.log(`submitted ${name} ${taskId}`);
    let last = null;
    for await (const event of client.watch([taskId])) {
      last = event;
      let line = `${event.at.toISOString()} ${event.taskId} ${event.state}`;
      if (event.state === 'SUCCESS') line += ` result=${show(event.result.value)}`;
      if (event.result.error && ['FAILURE', 'RETRY', 'CANCELLED'].includes(event.state)) {
        line += ` error=${event.result.error.type}: ${event.result.error.message}`;
      }
      console.log(line);
    }
    process.exitCode = last && last.state === 'SUCCESS' ? 0 : 1;
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`submit-example: ${err.message}`);
  process.exitCode = 2;
});
