'use strict';
// What a task throws or returns to say how its attempt ends, and the reasons its signals carry
// (sdk/python/conveyor/errors.py and replacement.py on the Python side).

/** Throw inside a task to run it again after `delay` seconds (bounded by the task's max attempts). */
class Retry extends Error {
  constructor(delay = 0, reason = '') {
    super(reason || `retry requested in ${delay} s`);
    this.name = 'Retry';
    this.delay = delay;
    this.reason = reason;
  }
}

/**
 * Throw inside a task to refuse it (Celery's Reject). By default the task fails for good with a
 * "Rejected" error, never retried (its linkError callbacks run; it is a dead letter). With
 * {requeue: true} it goes back to its queue and the same attempt runs again later, on any worker;
 * not a failure, but a task requeued 10 times fails with "Rejected" (docs/canvas.md).
 */
class Reject extends Error {
  constructor(reason = '', { requeue = false } = {}) {
    super(reason || (requeue ? 'requeued by the task' : 'rejected by the task'));
    this.name = 'Reject';
    this.reason = reason;
    this.requeue = Boolean(requeue);
  }
}

/**
 * What ctx.replace(canvas) returns: a task that returns it is replaced by the canvas (Celery's
 * self.replace), which runs in its place on the server; its result becomes the task's result.
 */
class Replacement {
  constructor(workflow) {
    this.workflow = workflow;
  }
}

/** The reason of ctx.signal when the server cancelled the task. */
class TaskCancelled extends Error {
  constructor(message) {
    super(message);
    this.name = 'TaskCancelled';
  }
}

/** The reason of ctx.signal when the task ran past its time limit. */
class TimeLimitExceeded extends Error {
  constructor(message) {
    super(message);
    this.name = 'TimeLimitExceeded';
  }
}

/** The reason of ctx.softSignal when the task ran past its soft time limit (time to clean up). */
class SoftTimeLimitExceeded extends Error {
  constructor(message) {
    super(message);
    this.name = 'SoftTimeLimitExceeded';
  }
}

module.exports = { Retry, Reject, Replacement, TaskCancelled, TimeLimitExceeded, SoftTimeLimitExceeded };
