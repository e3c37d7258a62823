'use strict';
// How one attempt of a task runs and ends: its context, its time limits, the call (once, or once
// per item of a map's chunk) and the TaskOutcome it reports (sdk/python/conveyor/execution.py on
// the Python side). lib/worker.js decides when an attempt starts and sends what it reports.

const { toValue, fromValues, fromValueMap, timestamp, duration, durationSeconds } = require('./values');
const tracing = require('./tracing');
const { toWorkflow } = require('./client');
const {
  Retry, Reject, Replacement, SoftTimeLimitExceeded, TimeLimitExceeded,
} = require('./task_errors');

function taskError(err, type) {
  if (err instanceof Error) {
    return { type: type || err.name || err.constructor?.name || 'Error', message: String(err.message ?? ''), traceback: err.stack || '' };
  }
  return { type: type || 'Error', message: String(err), traceback: '' };
}

/** How an attempt that threw `err` ends: a retry or a reject it asked for, else a failure. */
function endedBy(err) {
  if (err instanceof Retry) {
    return { outcome: 'OUTCOME_RETRY', error: taskError(err, 'Retry'), retry_delay: duration(err.delay) };
  }
  if (err instanceof Reject) {
    return { outcome: err.requeue ? 'OUTCOME_REQUEUED' : 'OUTCOME_REJECTED', error: taskError(err, 'Rejected') };
  }
  return { outcome: 'OUTCOME_FAILURE', error: taskError(err) };
}

/**
 * A running attempt: its assignment, the signal that stops it (cancel, time limit, shutdown) and
 * what stopped it first ('request' | 'time_limit' | 'shutdown', or null).
 */
function newEntry(assignment) {
  const controller = new AbortController();
  const entry = {
    assignment,
    signal: controller.signal,
    soft: new AbortController(),
    stoppedBy: null,
    abort(by, reason) {
      if (entry.stoppedBy) return;
      entry.stoppedBy = by;
      controller.abort(reason);
    },
  };
  return entry;
}

/** The ctx a task function receives; `sendProgress(item)` sends one progress report. */
function taskContext(entry, worker, sendProgress) {
  const { assignment, signal } = entry;
  const { task } = assignment;
  return {
    taskId: task.id,
    name: task.name,
    attempt: assignment.attempt,
    queue: task.queue,
    headers: { ...task.headers },
    workflowId: assignment.workflow_id,
    parentId: task.parent_id || '',
    deliveries: assignment.deliveries || 0,
    priority: task.priority || 0,
    timeLimit: durationSeconds(task.time_limit) || null,
    softTimeLimit: durationSeconds(task.soft_time_limit) || null,
    leaseToken: assignment.lease_token,
    signal,
    softSignal: entry.soft.signal,
    get cancelled() { return signal.aborted; },
    // `return ctx.replace(canvas)`: run the canvas (sig, chain, group, chord, map) in this task's place.
    replace: (canvas) => new Replacement(toWorkflow(canvas)),
    progress: (value) => sendProgress({ task_id: task.id, lease_token: assignment.lease_token, progress: toValue(value) }),
    worker,
  };
}

/**
 * Run one attempt of `fn` (cancel and time limits through `entry`); resolves to the TaskOutcome to
 * report, or null when the worker stopped it to hand it back (never rejects for what the task did).
 */
async function execute(fn, entry, ctx) {
  const { assignment, signal } = entry;
  const { task } = assignment;
  const outcome = { task_id: task.id, lease_token: assignment.lease_token, started_at: timestamp() };
  const limit = durationSeconds(task.time_limit);
  const softLimit = durationSeconds(task.soft_time_limit);
  let timer = null;
  let softTimer = null;
  let onAbort = null;
  const stopped = new Promise((_, reject) => {
    onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  stopped.catch(() => {});
  try {
    if (softLimit > 0 && !(limit > 0 && softLimit >= limit)) {
      softTimer = setTimeout(
        () => entry.soft.abort(new SoftTimeLimitExceeded(`ran past its soft time limit of ${softLimit} s`)),
        softLimit * 1000,
      );
    }
    if (limit > 0) {
      timer = setTimeout(
        () => entry.abort('time_limit', new TimeLimitExceeded(`ran longer than its time limit of ${limit} s`)),
        limit * 1000,
      );
    }
    const attributes = tracing.taskAttributes('execute', task, assignment.attempt);
    const value = await tracing.inTaskSpan(task.name, ctx.headers, attributes, () => Promise.race([
      callTask(fn, task, ctx),
      stopped,
    ]));
    if (value instanceof Replacement) {
      outcome.outcome = 'OUTCOME_REPLACED';
      outcome.replacement = value.workflow;
    } else {
      outcome.result = toValue(value);
      outcome.outcome = 'OUTCOME_SUCCESS';
    }
  } catch (err) {
    if (entry.stoppedBy === 'shutdown') return null; // not reported: the server hands the task on
    if (entry.stoppedBy === 'request') {
      outcome.outcome = 'OUTCOME_CANCELLED';
    } else if (entry.stoppedBy === 'time_limit') {
      outcome.outcome = 'OUTCOME_FAILURE';
      outcome.error = taskError(signal.reason, 'TimeLimitExceeded');
    } else {
      Object.assign(outcome, endedBy(err));
    }
  } finally {
    if (timer) clearTimeout(timer);
    if (softTimer) clearTimeout(softTimer);
    signal.removeEventListener('abort', onAbort);
  }
  outcome.finished_at = timestamp();
  return outcome;
}

// A chunk task of a map (docs/canvas.md) carries this header: "map" (each arg is one call's arg)
// or "starmap" (each arg is one call's list of args). The task runs once per item, in order.
const MAP_HEADER = 'conveyor-map';

/** Run `fn` as the task asks: once, or once per item of a map's chunk (the result is the list). */
async function callTask(fn, task, ctx) {
  const args = fromValues(task.args);
  const kwargs = fromValueMap(task.kwargs);
  const mode = (task.headers || {})[MAP_HEADER];
  if (mode === undefined) return fn(args, kwargs, ctx);
  const results = [];
  for (const [index, item] of args.entries()) {
    if (mode === 'starmap' && !Array.isArray(item)) {
      throw new TypeError(`starmap item ${index} is ${typeof item}, not a list of args`);
    }
    results.push(await fn(mode === 'starmap' ? item : [item], kwargs, ctx));
  }
  return results;
}

module.exports = { newEntry, taskContext, execute, callTask, endedBy, taskError };
