'use strict';
// The worker's reports (lib/reports.js): one message per kind per event-loop turn, and the
// results held until the server acks them.
const test = require('node:test');
const assert = require('node:assert/strict');
const { setImmediate: nextTurn } = require('node:timers/promises');
const { ReportBatcher, UnackedResults } = require('../lib/reports');

const outcome = (taskId, lease = `lease-${taskId}`) => ({ task_id: taskId, lease_token: lease, outcome: 'OUTCOME_SUCCESS' });
const ref = (taskId) => ({ task_id: taskId, lease_token: `lease-${taskId}` });

test('what is ready in one turn goes out as one message per kind, rejects first', async () => {
  const sent = [];
  const batcher = new ReportBatcher((message) => sent.push(message));
  batcher.started(ref('a'));
  batcher.started(ref('b'));
  batcher.result(outcome('c'));
  batcher.reject({ task_id: 'd', lease_token: 'lease-d', reason: 'unknown' });
  assert.deepEqual(sent, []);
  await nextTurn();
  assert.deepEqual(sent.map((m) => Object.keys(m)[0]), ['reject', 'started', 'results']);
  assert.deepEqual(sent[1].started.tasks.map((r) => r.task_id), ['a', 'b']);
  assert.deepEqual(sent[2].results.outcomes.map((o) => o.task_id), ['c']);
});

test('a task that ends in the turn it started reports no Started', async () => {
  const sent = [];
  const batcher = new ReportBatcher((message) => sent.push(message));
  batcher.started(ref('quick'));
  batcher.result(outcome('quick'));
  await nextTurn();
  assert.deepEqual(sent.map((m) => Object.keys(m)[0]), ['results']);
});

test('a cleared batcher sends nothing of what it held', async () => {
  const sent = [];
  const batcher = new ReportBatcher((message) => sent.push(message));
  batcher.started(ref('a'));
  batcher.result(outcome('a'));
  batcher.clear();
  await nextTurn();
  assert.deepEqual(sent, []);
});

test('an ack releases only the result of its own lease, and refused acks are returned', () => {
  const unacked = new UnackedResults();
  assert.equal(unacked.resend(), null);
  unacked.hold(outcome('a'));
  unacked.hold(outcome('b'));
  assert.deepEqual(unacked.acked([{ task_id: 'a', lease_token: 'older', status: 'ACK_STATUS_ACCEPTED' }]), []);
  assert.deepEqual(unacked.resend().results.outcomes.map((o) => o.task_id), ['a', 'b']);
  const refused = { task_id: 'b', lease_token: 'lease-b', status: 'ACK_STATUS_STALE_LEASE' };
  assert.deepEqual(unacked.acked([{ task_id: 'a', lease_token: 'lease-a', status: 'ACK_STATUS_ACCEPTED' }, refused]), [refused]);
  assert.equal(unacked.size, 0);
});
