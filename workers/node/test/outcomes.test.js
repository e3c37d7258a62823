'use strict';
// How an attempt that threw ends (lib/worker.js endedBy): the outcome the worker reports. The
// end-to-end checks against a real server are in tests/e2e/test_node_canvas.py.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Reject, Retry, endedBy } = require('../lib');

test('a Reject ends the attempt OUTCOME_REJECTED with a "Rejected" error carrying its reason', () => {
  const ended = endedBy(new Reject('not an image: a.txt'));
  assert.equal(ended.outcome, 'OUTCOME_REJECTED');
  assert.deepEqual([ended.error.type, ended.error.message], ['Rejected', 'not an image: a.txt']);
  assert.match(ended.error.traceback, /Reject: not an image: a\.txt/);
  assert.equal(ended.retry_delay, undefined);
});

test('a Reject with requeue ends the attempt OUTCOME_REQUEUED', () => {
  const ended = endedBy(new Reject('disk nearly full', { requeue: true }));
  assert.equal(ended.outcome, 'OUTCOME_REQUEUED');
  assert.deepEqual([ended.error.type, ended.error.message], ['Rejected', 'disk nearly full']);
});

test('a Reject without a reason says what it asked for', () => {
  const rejected = new Reject();
  assert.deepEqual([rejected.message, rejected.reason, rejected.requeue], ['rejected by the task', '', false]);
  const requeued = new Reject('', { requeue: true });
  assert.deepEqual([requeued.message, requeued.requeue], ['requeued by the task', true]);
  assert.equal(endedBy(requeued).error.message, 'requeued by the task');
});

test('a Retry asks for another attempt after its delay, any other error is a failure', () => {
  const retried = endedBy(new Retry(1.5, 'busy'));
  assert.equal(retried.outcome, 'OUTCOME_RETRY');
  assert.deepEqual([retried.error.type, retried.error.message], ['Retry', 'busy']);
  assert.deepEqual(retried.retry_delay, { seconds: '1', nanos: 500000000 });
  const failed = endedBy(new TypeError('boom'));
  assert.equal(failed.outcome, 'OUTCOME_FAILURE');
  assert.deepEqual([failed.error.type, failed.error.message], ['TypeError', 'boom']);
  assert.deepEqual(endedBy('a string').error, { type: 'Error', message: 'a string', traceback: '' });
});
