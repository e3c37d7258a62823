'use strict';
// What a worker reports about its tasks, batched: Started, Reject and Results messages, and the
// results the server has not acked yet (kept to send again after a reconnect).
//
// The Python worker keeps the same parts in sdk/python/conveyor/reports.py: a change to how
// reports are batched or acked is made in both. One part has no counterpart here: the Python
// worker holds a result up to 20 ms while its window keeps a backlog of prefetched tasks; this
// worker's window is its concurrency (no prefetch), so a slot that ends waits for its refill
// and results go out in the event-loop turn they are ready.

/**
 * Whatever becomes ready in one turn of the event loop goes out together: one message per kind.
 * `send(message)` writes on the current stream (and drops the message between streams).
 */
class ReportBatcher {
  constructor(send) {
    this._send = send;
    this._started = [];
    this._rejects = [];
    this._results = [];
    this._scheduled = false;
  }

  started(leaseRef) {
    this._started.push(leaseRef);
    this._schedule();
  }

  reject(rejectedTask) {
    this._rejects.push(rejectedTask);
    this._schedule();
  }

  result(outcome) {
    this._results.push(outcome);
    this._schedule();
  }

  /** A stream ended: its leases' Started and Reject mean nothing to the next one (results stay unacked). */
  clear() {
    this._started = [];
    this._rejects = [];
    this._results = [];
  }

  flush() {
    this._scheduled = false;
    const results = this._results.splice(0);
    const started = this._started.splice(0);
    const rejects = this._rejects.splice(0);
    if (rejects.length) this._send({ reject: { tasks: rejects } });
    // A task that already finished reports its start in its outcome (started_at).
    const finished = new Set(results.map((o) => o.lease_token));
    const starts = started.filter((ref) => !finished.has(ref.lease_token));
    if (starts.length) this._send({ started: { tasks: starts } });
    if (results.length) this._send({ results: { outcomes: results } });
  }

  _schedule() {
    if (this._scheduled) return;
    this._scheduled = true;
    setImmediate(() => this.flush());
  }
}

/** Results sent and not acked yet; after a reconnect they are sent again (the server decides whether they still count). */
class UnackedResults {
  constructor() {
    this._held = new Map(); // task id -> TaskOutcome
  }

  get size() {
    return this._held.size;
  }

  hold(outcome) {
    this._held.set(outcome.task_id, outcome);
  }

  /** Let go of the acked results (of the lease that sent them); returns the acks that did not accept theirs. */
  acked(acks) {
    const refused = [];
    for (const ack of acks) {
      const held = this._held.get(ack.task_id);
      if (held && held.lease_token === ack.lease_token) this._held.delete(ack.task_id);
      if (ack.status !== 'ACK_STATUS_ACCEPTED') refused.push(ack);
    }
    return refused;
  }

  /** The message that sends every unacked result again, or null when there is none. */
  resend() {
    return this._held.size ? { results: { outcomes: [...this._held.values()] } } : null;
  }

  clear() {
    this._held.clear();
  }
}

module.exports = { ReportBatcher, UnackedResults };
