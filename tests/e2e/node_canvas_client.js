#!/usr/bin/env node
'use strict';
// The Node client's side of the Node canvas tests (tests/e2e/test_node_canvas.py): one scenario
// submits its canvas to CONVEYOR_ADDRESS, waits for it and prints what it saw as one JSON line;
// the test asserts on that and on what the worker's tasks logged.
//   node tests/e2e/node_canvas_client.js SCENARIO LABEL...
const path = require('node:path');
const {
  Client, ResultIgnored, TaskFailed, chain, group, link, linkError, si, sig,
} = require(path.resolve(__dirname, '..', '..', 'workers', 'node', 'lib'));

const WAIT = 60;

/** A result as JSON: its value, or how it failed (TaskFailed, ResultIgnored). */
async function settle(client, id) {
  try {
    return { value: await client.result(id, WAIT) };
  } catch (err) {
    if (err instanceof TaskFailed) {
      return { failed: { taskId: err.taskId, state: err.state, type: err.errorType, message: err.errorMessage } };
    }
    if (err instanceof ResultIgnored) return { ignored: { name: err.name, taskId: err.taskId } };
    throw err;
  }
}

/** The parts of a task's record the tests look at. */
async function record(client, taskId) {
  const r = await client.getResult(taskId, WAIT);
  return {
    state: r.state,
    value: r.value, // left out of the JSON unless SUCCESS
    attempts: r.attempts,
    error: r.error && { type: r.error.type, message: r.error.message },
    history: r.history.map((h) => h.state),
    delayMs: r.startedAt && r.submittedAt ? r.startedAt - r.submittedAt : null,
  };
}

async function submitted(client, canvas, options) {
  const s = await client.submitWorkflow(canvas, options);
  return { taskId: s.taskId, taskIds: s.taskIds, ...(await settle(client, s.resultId)) };
}

const SCENARIOS = {
  // link on a chain: the callback gets the last step's value, once.
  'chain-link': (client, [label]) => submitted(
    client, link(chain(sig('node.add', [1, 2]), sig('node.add', [10])), sig('node.note', [label])),
  ),
  // linkError on a chain: the callback gets the failed step's error, once; later steps never run.
  'chain-link-error': async (client, [errors, after]) => {
    const flow = chain(sig('node.add', [1, 2]), si('node.fail', ['boom']), si('node.note', [null, after]));
    const report = await submitted(client, linkError(flow, sig('node.note_error', [errors])));
    return { ...report, last: await record(client, report.taskIds[2]) };
  },
  // link on a group: the callback gets the list of values once every member succeeded.
  'group-link': (client, [label]) => submitted(
    client, link(group(sig('node.add', [1, 1]), sig('node.add', [2, 2])), sig('node.note', [label])),
  ),
  // linkError on a group, per member and once.
  'group-link-error': (client, [each, once]) => {
    const members = group(sig('node.add', [1, 1]), sig('node.fail', ['a']), sig('node.fail', ['b']));
    const perMember = linkError(members, sig('node.note_error', [each]), { perMember: true });
    return submitted(client, linkError(perMember, sig('node.note_error', [once])));
  },
  // Canvas options: args and kwargs go to the first step only; countdown holds its start back.
  options: async (client) => {
    const flow = chain(sig('node.called', [2], { own: 1 }), sig('node.called', [3]));
    const report = await submitted(client, flow, { args: [1], kwargs: { extra: 'x' }, countdown: 1.5 });
    return { ...report, first: await record(client, report.taskIds[0]) };
  },
  // expires: not started by then (held back by its countdown), it never runs and ends EXPIRED.
  expires: async (client, [label, errors]) => {
    const late = linkError(
      si('node.note', [null, label], {}, { countdown: 1.5, expires: 0.5 }), sig('node.note_error', [errors]),
    );
    const lateReport = await submitted(client, late);
    const past = await client.submit('node.add', [1, 2], {}, { expires: new Date(Date.now() - 1000) });
    const inTime = await client.submit('node.add', [1, 2], {}, { expires: 60 });
    return {
      late: { ...lateReport, record: await record(client, lateReport.taskId) },
      past: await record(client, past.taskId),
      inTime: await settle(client, inTime.taskId),
    };
  },
  // ignoreResult: reading the value throws ResultIgnored, the state is SUCCESS without a value.
  'ignore-result': async (client) => {
    const ignored = await client.submit('node.add', [1, 2], {}, { ignoreResult: true });
    const failing = await client.submit('node.fail', ['still seen'], {}, { ignoreResult: true });
    const flow = chain(sig('node.add', [1, 2], {}, { ignoreResult: true }), sig('node.called'));
    return {
      ignored: { taskId: ignored.taskId, ...(await settle(client, ignored.taskId)) },
      record: await record(client, ignored.taskId),
      failing: await settle(client, failing.taskId),
      chain: await submitted(client, flow),
    };
  },
  // Dispatch options: a unique task submitted twice is one task; a task nobody runs fails past its
  // routing timeout; keys reach the stored signature.
  'dispatch-options': async (client, [label]) => {
    // Held back a second, so it is surely still queued when the second submit comes.
    const unique = { uniqueFor: 60, uniqueKey: `unique-${label}`, countdown: 1 };
    const first = await client.submit('node.add', [5, 5], {}, unique);
    const again = await client.submit('node.add', [5, 5], {}, unique);
    const nobody = await client.submit('nobody.runs', [], {}, { routingTimeout: 0.5 });
    const keyed = await client.submit('node.add', [1, 1], {}, {
      rateLimitKey: `customer-${label}`, concurrencyKey: `account-${label}`, concurrencyLimit: 2,
    });
    const stored = (await client.getResult(keyed.taskId, WAIT)).raw.signature;
    return {
      unique: [first.taskId, again.taskId],
      value: (await settle(client, first.taskId)).value,
      unroutable: await settle(client, nobody.taskId),
      keys: [stored.rate_limit_key, stored.concurrency_key, stored.concurrency_limit],
      keyed: await settle(client, keyed.taskId),
    };
  },
  // Reject: fails for good, once, whatever the retry policy; in a chain, the chain fails there.
  reject: async (client, [label, errors, chained, after]) => {
    const retried = { retry: { maxAttempts: 3, backoff: 'fixed', initial: 0.1 } };
    const task = linkError(sig('node.reject', [label], {}, retried), sig('node.note_error', [errors]));
    const report = await submitted(client, task);
    const flow = chain(sig('node.add', [1, 2]), si('node.reject', [chained]), si('node.note', [null, after]));
    return { ...report, record: await record(client, report.taskId), chain: await submitted(client, flow) };
  },
  // Reject with requeue: the same attempt runs again, without a failure; a chain goes on with its value.
  requeue: async (client, [label, chained]) => {
    const report = await submitted(client, sig('node.requeue_then_succeed', [label, 2]));
    const flow = chain(sig('node.requeue_then_succeed', [chained, 1]), sig('node.called'));
    return { ...report, record: await record(client, report.taskId), chain: await submitted(client, flow) };
  },
};

(async () => {
  const [scenario, ...labels] = process.argv.slice(2);
  if (!SCENARIOS[scenario]) throw new Error(`no scenario ${JSON.stringify(scenario)}`);
  const client = new Client(process.env.CONVEYOR_ADDRESS);
  try {
    console.log(JSON.stringify(await SCENARIOS[scenario](client, labels)));
  } finally {
    client.close();
  }
})().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
