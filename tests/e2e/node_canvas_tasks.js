#!/usr/bin/env node
'use strict';
// A Node worker for the Node canvas tests (tests/e2e/test_node_canvas.py): plain tasks, callbacks
// that log their runs, and tasks that reject or requeue themselves (Reject):
//   node tests/e2e/node_canvas_tasks.js --address 127.0.0.1:50051 --queue default
//
// Each logging task appends a line to the file named by CONVEYOR_TEST_LOG, so a test can count
// runs, also across requeues (appends of short lines are atomic).
const fs = require('node:fs');
const { conveyor: { Reject }, workerFromArgs, serve } = require('./node_worker');

const LOG = process.env.CONVEYOR_TEST_LOG;

function log(line) {
  fs.appendFileSync(LOG, `${line}\n`);
}

/** Runs of tasks labelled `label` so far, this one included (it logged itself first). */
function runs(label) {
  return fs.readFileSync(LOG, 'utf8').split('\n').filter((line) => line === `run ${label}`).length;
}

class ExpectedError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ExpectedError';
  }
}

const worker = workerFromArgs();

worker.task('node.add', async ([x, y]) => x + y);
worker.task('node.fail', async ([message]) => { throw new ExpectedError(message); });
// Returns how it was called: the canvas options' args come first, their kwargs are merged in.
worker.task('node.called', async (args, kwargs) => ({ args, kwargs }));

// A callback: the linked task's result comes first, then the label.
worker.task('node.note', async ([value, label]) => {
  log(`note ${label} ${JSON.stringify(value)}`);
  return value;
});
// An error callback: the error (task_id, type, message, traceback) comes first, then the label.
worker.task('node.note_error', async ([error, label]) => {
  log(`error ${label} ${error.task_id} ${error.type}`);
  return error.type;
});

worker.task('node.reject', async ([label]) => {
  log(`run ${label}`);
  throw new Reject(`refused ${label}`);
});
// Requeues itself `requeues` times, then returns how many runs it took and its attempt.
worker.task('node.requeue_then_succeed', async ([label, requeues], kwargs, ctx) => {
  log(`run ${label}`);
  const count = runs(label);
  if (count <= requeues) throw new Reject(`not yet (${count})`, { requeue: true });
  return { runs: count, attempt: ctx.attempt };
});

serve(worker);
