'use strict';
// The Node worker runtime: the same protocol as sdk/python/conveyor/worker.py.
//
//   const worker = new Worker({ address: '127.0.0.1:50051', queues: ['default'], concurrency: 8 });
//   worker.task('add', async ([x, y]) => x + y);
//   process.on('SIGTERM', () => worker.stop());
//   await worker.run();
//
// One bidirectional stream (WorkerService.Connect, lib/worker_stream.js, which also sends the
// heartbeats) carries everything: Hello/Welcome, batched Assignments in, batched Started/Results/
// Reject out (lib/reports.js: whatever is ready in one event-loop turn goes out as one message per
// kind), Cancel, ResultAck and Drain. Results stay buffered until the server acks them and are sent
// again after a reconnect. How one attempt runs and what it reports is lib/execution.js.

const os = require('node:os');
const { load, defaultAddress, grpc } = require('./proto');
const { timestamp } = require('./values');
const tracing = require('./tracing');
const {
  Retry, Reject, Replacement, TaskCancelled, TimeLimitExceeded, SoftTimeLimitExceeded,
} = require('./task_errors');
const { newEntry, taskContext, execute, callTask, endedBy } = require('./execution');
const { ReportBatcher, UnackedResults } = require('./reports');
const { WorkerStream } = require('./worker_stream');

const SDK_VERSION = require('../package.json').version;

const RECONNECT_INITIAL_SECONDS = 0.2;
const RECONNECT_MAX_SECONDS = 5.0;
const DEFAULT_DRAIN_SECONDS = 30.0;
// After the last results of a graceful stop, wait this long at most for their acks.
const ACK_WAIT_MS = 1000;
// Status codes that reconnecting cannot fix.
const FATAL_CODES = new Set([
  grpc.status.INVALID_ARGUMENT, grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED, grpc.status.FAILED_PRECONDITION,
]);

const DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024;

function defaultLogger() {
  const quiet = ['warn', 'error'].includes(String(process.env.CONVEYOR_LOG_LEVEL || '').toLowerCase());
  const line = (level, args) => `${new Date().toISOString()} ${level} conveyor.worker ${args.join(' ')}`;
  return {
    debug: () => {},
    info: (...args) => { if (!quiet) console.log(line('INFO', args)); },
    warn: (...args) => console.warn(line('WARNING', args)),
    error: (...args) => console.error(line('ERROR', args)),
  };
}

class Worker {
  /**
   * @param {object} [options]
   * @param {string} [options.address]      host:port (default CONVEYOR_ADDRESS or 127.0.0.1:50051)
   * @param {string[]} [options.queues]     queues to pull from (default ["default"])
   * @param {number} [options.concurrency]  tasks run at once; also the window (max_in_flight)
   * @param {string} [options.workerId]     stable id; the server assigns one when empty
   * @param {number} [options.drainTimeout] seconds stop() waits for in-flight tasks
   * @param {string} [options.token]        bearer token (default CONVEYOR_TOKEN)
   * @param {object} [options.credentials]  grpc.credentials.createSsl(...) for TLS
   * @param {object} [options.logger]       {debug, info, warn, error}
   */
  constructor(options = {}) {
    const { address, queues, concurrency = 8, workerId = '', drainTimeout = DEFAULT_DRAIN_SECONDS } = options;
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError('concurrency must be an integer >= 1');
    this.address = address || defaultAddress();
    this.queues = queues && queues.length ? [...queues] : ['default'];
    this.concurrency = concurrency;
    this.workerId = workerId;
    this.drainTimeout = drainTimeout;
    this.tasks = new Map();
    this.taskInfos = new Map(); // name -> TaskInfo sent in Hello
    this.log = options.logger || defaultLogger();
    this._credentials = options.credentials || grpc.credentials.createInsecure();
    this._token = options.token;
    this._channelOptions = options.channelOptions || {};

    this._stub = null;
    this._stream = null; // the live WorkerStream, or null between connections
    this._running = new Map(); // task id -> entry
    this._waiting = []; // assignments beyond `concurrency` (only after a reconnect)
    this._unacked = new UnackedResults();
    this._reports = new ReportBatcher((message) => this._send(message));
    this._stopping = false;
    this._runningLoop = false;
    this._wake = null; // resolves the reconnect backoff sleep
    this._idleWaiters = [];
  }

  // -- registration ---------------------------------------------------------------------------

  /**
   * Register `fn(args, kwargs, ctx)` under `name`; it may be async. ctx has taskId, name,
   * attempt, deliveries, queue, priority, headers, workflowId, parentId, timeLimit and
   * softTimeLimit (seconds or null), signal (an AbortSignal: cancel or time limit), softSignal
   * (aborted at the soft time limit), cancelled and progress(value). Its return value is the result.
   *
   * options, for the server's task registry (`conveyor tasks`, strict submits):
   *   description  what the task does, for people;
   *   schema       a JSON Schema (an object, or its JSON text) of one call: the object
   *                {args: [...], kwargs: {...}} that fn receives, e.g.
   *                {properties: {args: {prefixItems: [{type: 'integer'}, {type: 'integer'}], minItems: 2}}}.
   */
  task(name, fn, options = {}) {
    if (typeof name === 'function') [name, fn, options] = [name.name, name, fn || {}];
    if (!name || typeof fn !== 'function') throw new TypeError('worker.task(name, fn) needs a name and a function');
    if (this.tasks.has(name)) throw new Error(`task ${JSON.stringify(name)} is registered twice`);
    const { description = '', schema = null } = options;
    let callSchema = '';
    if (schema != null) {
      callSchema = typeof schema === 'string' ? schema : JSON.stringify(schema);
      const parsed = JSON.parse(callSchema); // throws on text that is not JSON
      if (typeof parsed !== 'boolean' && (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed))) {
        throw new TypeError(`the schema of task ${JSON.stringify(name)} must be a JSON Schema object`);
      }
    }
    this.tasks.set(name, fn);
    this.taskInfos.set(name, { name, description: String(description), call_schema: callSchema });
    return this;
  }

  /** Change the window (and local concurrency) while running. */
  setConcurrency(concurrency) {
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError('concurrency must be an integer >= 1');
    this.concurrency = concurrency;
    this._send({ credit: { max_in_flight: concurrency } });
    this._startWaiting();
  }

  // -- lifecycle ------------------------------------------------------------------------------

  /** Connect (and reconnect after failures) until stop() is called and work is drained. */
  async run() {
    if (this._runningLoop) throw new Error('worker.run() is already running');
    this._runningLoop = true;
    this._stopping = false;
    tracing.startFromEnv(); // spans go where the standard OTEL_* variables say
    const { WorkerService } = load();
    this._stub = new WorkerService(this.address, this._credentials, {
      'grpc.max_receive_message_length': DEFAULT_MAX_RECEIVE_BYTES,
      ...this._channelOptions,
    });
    let delay = RECONNECT_INITIAL_SECONDS;
    try {
      while (!this._stopping) {
        let welcomed = false;
        try {
          welcomed = await this._session();
        } catch (err) {
          welcomed = err.welcomed;
          if (FATAL_CODES.has(err.code)) throw err;
          if (!this._stopping) {
            this.log.warn(`stream to ${this.address} broke (${grpc.status[err.code] ?? err.code}: ${err.details || err.message});`,
              `reconnecting in ${(welcomed ? RECONNECT_INITIAL_SECONDS : delay).toFixed(1)} s`);
          }
        }
        if (this._stopping) break;
        if (welcomed) delay = RECONNECT_INITIAL_SECONDS;
        await this._sleep(delay);
        delay = Math.min(delay * 2, RECONNECT_MAX_SECONDS);
      }
    } finally {
      for (const entry of this._running.values()) entry.abort('shutdown', new TaskCancelled('the worker stopped'));
      this._running.clear();
      this._waiting = [];
      this._stub.close();
      this._stub = null;
      this._runningLoop = false;
      await tracing.shutdown(); // flushes the spans still batched
      this.log.info('worker stopped');
    }
  }

  /** Graceful stop: Goodbye, finish in-flight tasks (up to drainTimeout), report them, disconnect. */
  stop() {
    if (this._stopping) return;
    this._stopping = true;
    if (this._wake) this._wake();
    if (this._stream) this._drain(this._stream).catch((err) => this.log.error(`drain failed: ${err.stack || err}`));
  }

  _sleep(seconds) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, seconds * 1000);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this._wake = done;
    }).finally(() => { this._wake = null; });
  }

  /** One stream; resolves (true when welcomed) when the server ends it, rejects when it breaks. */
  async _session() {
    const stream = new WorkerStream(this._stub, this._token, this.log);
    const opening = [{ hello: this._hello() }];
    const resend = this._unacked.resend(); // results from before a reconnect
    if (resend) opening.push(resend);
    this._stream = stream;
    const ended = stream.run(opening, (message) => this._onMessage(message));
    if (this._stopping) this._drain(stream).catch((err) => this.log.error(`drain failed: ${err.stack || err}`));
    try {
      return await ended;
    } finally {
      if (this._stream === stream) this._stream = null;
      this._reports.clear();
    }
  }

  _hello() {
    return {
      worker_id: this.workerId,
      language: 'node',
      sdk_version: `conveyor-node/${SDK_VERSION} node/${process.versions.node}`,
      queues: this.queues,
      task_names: [...this.tasks.keys()].sort(),
      tasks: [...this.taskInfos.keys()].sort().map((name) => this.taskInfos.get(name)),
      max_in_flight: this.concurrency,
      hostname: os.hostname(),
      pid: process.pid,
      // The server splits assignment batches to fit what this channel accepts.
      max_receive_bytes: this._channelOptions['grpc.max_receive_message_length'] || DEFAULT_MAX_RECEIVE_BYTES,
      // After a reconnect: the tasks still running or waiting here, so the server keeps their leases with this
      // stream instead of handing them out again when the old stream's grace ends.
      held: [...this._running.values()].map((entry) => entry.assignment)
        .concat(this._waiting)
        .map((assignment) => ({ task_id: assignment.task.id, lease_token: assignment.lease_token })),
    };
  }

  _send(message) {
    if (this._stream) this._stream.send(message);
  }

  async _drain(stream) {
    stream.send({ goodbye: {} });
    const busy = this._running.size + this._waiting.length;
    if (busy) {
      this.log.info(`draining: waiting for ${busy} tasks`);
      const idle = await this._idle(this.drainTimeout * 1000);
      if (!idle) {
        this.log.warn(`${this._running.size} tasks did not finish in ${this.drainTimeout} s; handing them back`);
        for (const entry of this._running.values()) entry.abort('shutdown', new TaskCancelled('the worker stopped'));
      }
    }
    this._reports.flush();
    const deadline = Date.now() + ACK_WAIT_MS;
    while (this._unacked.size && this._stream === stream && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    if (this._stream === stream) stream.end(); // the server then ends its side and run() returns
  }

  _idle(timeoutMs) {
    if (this._running.size + this._waiting.length === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this._idleWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  // -- messages from the server -----------------------------------------------------------------

  _onMessage(message) {
    switch (message.message) {
      case 'welcome': { // the stream has taken the heartbeat interval
        const { welcome } = message;
        this.workerId = welcome.worker_id;
        this.log.info(`connected to ${this.address} as ${this.workerId}`,
          `(queues ${this.queues.join(',')}; tasks ${[...this.tasks.keys()].join(',')})`);
        break;
      }
      case 'assignments':
        for (const assignment of message.assignments.items) this._accept(assignment);
        break;
      case 'cancel':
        for (const taskId of message.cancel.task_ids) {
          const entry = this._running.get(taskId);
          if (entry) entry.abort('request', new TaskCancelled(`task ${taskId} was cancelled`));
          const queued = this._waiting.findIndex((a) => a.task.id === taskId);
          if (queued >= 0) {
            const [assignment] = this._waiting.splice(queued, 1);
            const now = timestamp();
            this._report({ task_id: taskId, lease_token: assignment.lease_token, outcome: 'OUTCOME_CANCELLED', started_at: now, finished_at: now });
          }
        }
        break;
      case 'acks':
        for (const ack of this._unacked.acked(message.acks.acks)) {
          this.log.info(`result of ${ack.task_id} not recorded: ${ack.status}`);
        }
        break;
      case 'drain':
        this.log.info(`server asked to drain: ${message.drain.reason}`);
        this.stop();
        break;
      default:
        this.log.debug(`ignoring unknown message ${message.message}`);
    }
  }

  _accept(assignment) {
    const { task } = assignment;
    if (!this.tasks.has(task.name)) {
      const known = [...this.tasks.keys()].sort().map((n) => `'${n}'`).join(', ');
      this._reports.reject({
        task_id: task.id,
        lease_token: assignment.lease_token,
        reason: `no task named '${task.name}' is registered on this worker (node; has [${known}])`,
      });
      return;
    }
    if (this._running.size >= this.concurrency) {
      this._waiting.push(assignment); // only after a reconnect can the server send past our window
      return;
    }
    this._start(assignment);
  }

  _startWaiting() {
    while (this._waiting.length && this._running.size < this.concurrency) this._start(this._waiting.shift());
  }

  _start(assignment) {
    const entry = newEntry(assignment);
    const ctx = taskContext(entry, this, (progress) => this._send({ progress: { items: [progress] } }));
    this._running.set(assignment.task.id, entry);
    this._reports.started({ task_id: assignment.task.id, lease_token: assignment.lease_token });
    execute(this.tasks.get(assignment.task.name), entry, ctx)
      .then((outcome) => this._finish(entry, outcome))
      .catch((err) => {
        this.log.error(`task ${assignment.task.id} broke the runtime: ${err.stack || err}`);
        this._finish(entry, null);
      });
  }

  _finish(entry, outcome) {
    const taskId = entry.assignment.task.id;
    if (this._running.get(taskId) === entry) this._running.delete(taskId);
    if (outcome) this._report(outcome);
    this._startWaiting();
    if (this._running.size + this._waiting.length === 0) {
      const waiters = this._idleWaiters.splice(0);
      for (const wake of waiters) wake();
    }
  }

  _report(outcome) {
    this._unacked.hold(outcome);
    this._reports.result(outcome);
  }
}

module.exports = {
  Worker, Retry, Reject, Replacement, TaskCancelled, TimeLimitExceeded, SoftTimeLimitExceeded, callTask, endedBy,
};
