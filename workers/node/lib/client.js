'use strict';
// The Node client: submit tasks and workflows, read, watch and cancel them (TaskService).
//
//   const client = new Client('127.0.0.1:50051');
//   const { taskId } = await client.submit('add', [1, 2]);
//   for await (const event of client.watch([taskId])) console.log(event.state, event.result.value);
//   client.close();

const { load, metadataFor, defaultAddress, grpc } = require('./proto');
const { withErrorDetails } = require('./errors');
const {
  toValues, toValueMap, fromValue, toDate, duration, timestamp,
} = require('./values');
const { injectHeaders } = require('./tracing');
const { isLazy, opening, streamedGroup, submitStream } = require('./streaming');

const TERMINAL = new Set(['SUCCESS', 'FAILURE', 'CANCELLED', 'EXPIRED']);
// GetResult waits server-side at most this long per call; longer waits loop.
const WAIT_SLICE_SECONDS = 60;
// Events per watch response asked of the server: the events ready together come in one message.
const WATCH_EVENTS_PER_RESPONSE = 512;
const BACKOFF_KINDS = {
  exponential: 'BACKOFF_KIND_EXPONENTIAL', fibonacci: 'BACKOFF_KIND_FIBONACCI', fixed: 'BACKOFF_KIND_FIXED',
};
const FAILURE_POLICIES = { fail: 'CHORD_FAILURE_POLICY_FAIL', continue: 'CHORD_FAILURE_POLICY_CONTINUE' };

/** A task ended in FAILURE, CANCELLED or EXPIRED (thrown by client.result()). */
class TaskFailed extends Error {
  constructor(result) {
    const error = result.error || {};
    super(`task ${result.taskId} ended ${result.state}: ${error.type || ''}: ${error.message || ''}`);
    this.name = 'TaskFailed';
    this.taskId = result.taskId;
    this.state = result.state;
    this.errorType = error.type || '';
    this.errorMessage = error.message || '';
    this.traceback = error.traceback || '';
    this.result = result;
  }
}

/** A task submitted with ignoreResult succeeded, but its value was not stored (thrown by client.result()). */
class ResultIgnored extends Error {
  constructor(taskId) {
    super(`task ${taskId} ignores its result (submitted with ignoreResult): its value was not stored; `
      + 'wait for its state with getResult() instead');
    this.name = 'ResultIgnored';
    this.taskId = taskId;
  }
}

/** "SUCCESS" for "TASK_STATE_SUCCESS". */
function stateName(state) {
  return String(state).replace(/^TASK_STATE_/, '');
}

// -- canvas -------------------------------------------------------------------------------------

/**
 * One task call. options: id, queue, priority (0-9), countdown (s), eta (Date), timeLimit (s), softTimeLimit (s),
 * retry {maxAttempts, backoff: 'exponential'|'fibonacci'|'fixed', initial, max, jitter},
 * immutable, idempotencyKey, headers, messageGroup, onSuccess [sig], onError [sig],
 * expires (s from submit, or a Date: not started by then, it ends EXPIRED), ignoreResult (its value is not stored),
 * uniqueFor (s) and uniqueKey, rateLimitKey, concurrencyKey and concurrencyLimit, routingTimeout (s).
 */
function sig(name, args = [], kwargs = {}, options = {}) {
  return { kind: 'task', name, args, kwargs, options };
}

/** An immutable signature: it ignores the previous chain step's result. */
function si(name, args = [], kwargs = {}, options = {}) {
  return sig(name, args, kwargs, { ...options, immutable: true });
}

const chain = (...steps) => ({ kind: 'chain', steps: steps.flat() });
/**
 * group(a, b) or group([a, b]). One generator or async iterable, group(gen), is read only at
 * submit: at the root (or as a root chord's header) it is streamed to the server in pieces.
 */
function group(...members) {
  if (members.length === 1 && isLazy(members[0])) return { kind: 'group', members: [], lazy: members[0] };
  return { kind: 'group', members: members.flat() };
}
/** chord(group(...), [members] or a generator, callback, {failurePolicy: 'fail' | 'continue'}) */
function chord(header, callback, { failurePolicy = 'fail' } = {}) {
  const headerGroup = Array.isArray(header) || isLazy(header) ? group(header) : header;
  return { kind: 'chord', members: headerGroup.members, header: headerGroup, callback, failurePolicy };
}

// Items per chunk task of map() and starmap() (the server's default too).
const DEFAULT_CHUNK_SIZE = 100;

/**
 * `task` (a sig() without args) called once per item, as Celery's task.map: the result is one value
 * per item. The server runs the calls in chunk tasks of `chunkSize` items (each message holds its own).
 */
function map(task, items, { chunkSize = DEFAULT_CHUNK_SIZE } = {}) {
  return mapNode(task, items, { star: false, chunkSize, nested: false });
}

/** As map(), each item being an array of positional args (Celery's task.starmap). */
function starmap(task, items, { chunkSize = DEFAULT_CHUNK_SIZE } = {}) {
  return mapNode(task, items, { star: true, chunkSize, nested: false });
}

/** Celery's task.chunks(items, n): items (arrays of args) in tasks of n; the result is one array per chunk. */
function chunks(task, items, n) {
  return mapNode(task, items, { star: true, chunkSize: n, nested: true });
}

function mapNode(task, items, { star, chunkSize, nested }) {
  if (!task || task.kind !== 'task') throw new TypeError('map, starmap and chunks take a sig()');
  if (task.args.length) throw new TypeError("a mapped task takes no args of its own: the items are its calls' args");
  if (!Number.isInteger(chunkSize) || chunkSize < 1) {
    throw new RangeError(`chunkSize must be an integer of at least 1, not ${chunkSize}`);
  }
  return { kind: 'map', task, items: [...items], star, chunkSize, nested };
}

/**
 * A copy of `node` that runs `callback` with its result on success: a task's, a chain's (its last
 * step's), a group's (the list, once every member succeeded); a chord's goes to its callback.
 */
function link(node, callback) {
  if (node.kind === 'task') {
    const options = node.options || {};
    return { ...node, options: { ...options, onSuccess: [...(options.onSuccess || []), callback] } };
  }
  if (node.kind === 'chord') return { ...node, callback: link(node.callback, callback) };
  if (node.kind === 'map') return link(chain(node), callback); // a map carries no callbacks itself
  return { ...node, onSuccess: [...(node.onSuccess || []), callback] };
}

/**
 * A copy of `node` that runs `callback` with the error (a JSON object: task_id, type, message,
 * traceback) on failure. For a group, once (default) or with {perMember: true} once per failed member.
 */
function linkError(node, callback, { perMember = false } = {}) {
  if (node.kind === 'task') {
    const options = node.options || {};
    return { ...node, options: { ...options, onError: [...(options.onError || []), callback] } };
  }
  if (node.kind === 'chord') return { ...node, callback: linkError(node.callback, callback) };
  if (node.kind === 'map') return linkError(chain(node), callback);
  if (perMember && node.kind === 'group') {
    return { ...node, onMemberError: [...(node.onMemberError || []), callback] };
  }
  return { ...node, onError: [...(node.onError || []), callback] };
}

function toSignature(node) {
  const o = node.options || {};
  const signature = {
    id: o.id || '',
    name: node.name,
    queue: o.queue || '',
    args: toValues(node.args),
    kwargs: toValueMap(node.kwargs),
    headers: injectHeaders({ ...(o.headers || {}) }),
    priority: o.priority || 0,
    immutable: Boolean(o.immutable),
    idempotency_key: o.idempotencyKey || '',
    message_group: o.messageGroup || '',
    on_success: (o.onSuccess || []).map(toSignature),
    on_error: (o.onError || []).map(toSignature),
    ignore_result: Boolean(o.ignoreResult),
    unique_key: o.uniqueKey || '',
    rate_limit_key: o.rateLimitKey || '',
    concurrency_key: o.concurrencyKey || '',
    concurrency_limit: o.concurrencyLimit || 0,
  };
  if (o.uniqueFor != null) signature.unique_for = duration(o.uniqueFor);
  if (o.routingTimeout != null) signature.routing_timeout = duration(o.routingTimeout);
  if (o.expires != null) {
    signature.expires_at = timestamp(o.expires instanceof Date ? o.expires : Date.now() + o.expires * 1000);
  }
  if (o.countdown != null) signature.countdown = duration(o.countdown);
  if (o.eta != null) signature.eta = timestamp(o.eta);
  if (o.timeLimit != null) signature.time_limit = duration(o.timeLimit);
  if (o.softTimeLimit != null) signature.soft_time_limit = duration(o.softTimeLimit);
  if (o.retry) {
    const r = o.retry;
    signature.retry = {
      max_attempts: r.maxAttempts ?? 3,
      backoff: BACKOFF_KINDS[r.backoff || 'exponential'],
      initial: duration(r.initial ?? 1),
      max: duration(r.max ?? 3600),
      jitter: r.jitter ?? 0,
    };
  }
  return signature;
}

function toWorkflow(node) {
  switch (node.kind) {
    case 'task':
      return { task: toSignature(node) };
    case 'chain':
      return { chain: { steps: node.steps.map(toWorkflow), ...callbacksOf(node) } };
    case 'group':
      return { group: toGroup(node) };
    case 'chord':
      return {
        chord: {
          header: toGroup(node.header || { members: node.members }),
          callback: toWorkflow(node.callback),
          failure_policy: FAILURE_POLICIES[node.failurePolicy] || FAILURE_POLICIES.fail,
        },
      };
    case 'map':
      return {
        map: {
          // Immutable: its chunks ignore a previous chain step's result.
          task: toSignature({ ...node.task, options: { ...(node.task.options || {}), immutable: true } }),
          items: toValues(node.star ? node.items.map((item) => [...item]) : node.items),
          star: node.star,
          chunk_size: node.chunkSize,
          nested: node.nested,
        },
      };
    default:
      throw new TypeError(`not a task or workflow: ${JSON.stringify(node)}`);
  }
}

function callbacksOf(node) {
  return { on_success: (node.onSuccess || []).map(toSignature), on_error: (node.onError || []).map(toSignature) };
}

function toGroup(node) {
  if (node.lazy && typeof node.lazy[Symbol.iterator] !== 'function') {
    throw new TypeError('an async iterable group is streamed only as the submitted canvas or its chord header');
  }
  const members = node.lazy ? [...node.members, ...node.lazy] : node.members; // nested: read whole
  return {
    members: members.map(toWorkflow),
    ...callbacksOf(node),
    on_member_error: (node.onMemberError || []).map(toSignature),
  };
}

/**
 * Options for a whole submission, as Celery's apply_async(args, kwargs, **options): args (prepended)
 * and kwargs (merged) for its first tasks, queue and priority for every task that sets none, and
 * countdown (s) or eta (Date) for its start.
 */
function toCanvasOptions(o) {
  const options = {
    args: toValues(o.args || []), kwargs: toValueMap(o.kwargs || {}), queue: o.queue || '', priority: o.priority || 0,
  };
  if (o.countdown != null) options.countdown = duration(o.countdown);
  if (o.eta != null) options.eta = timestamp(o.eta);
  return options;
}

// -- results ------------------------------------------------------------------------------------

function toError(error) {
  return error ? { type: error.type, message: error.message, traceback: error.traceback } : null;
}

/** A TaskResult as plain JavaScript: state names without prefix, `value` decoded, Dates. */
function toResult(r) {
  if (!r) return null;
  const state = stateName(r.state);
  return {
    taskId: r.task_id,
    name: r.name,
    queue: r.queue,
    state,
    value: state === 'SUCCESS' ? fromValue(r.result) : undefined,
    error: toError(r.error),
    attempts: r.attempts,
    workerId: r.worker_id,
    workflowId: r.workflow_id,
    submittedAt: toDate(r.submitted_at),
    startedAt: toDate(r.started_at),
    finishedAt: toDate(r.finished_at),
    progress: fromValue(r.progress),
    history: (r.history || []).map((h) => ({
      state: stateName(h.state), at: toDate(h.at), attempt: h.attempt, workerId: h.worker_id, error: toError(h.error),
    })),
    raw: r,
  };
}

function toEvent(e) {
  return {
    taskId: e.task_id, state: stateName(e.state), at: toDate(e.at), workflowId: e.workflow_id, result: toResult(e.result),
  };
}

function toSubmitted(r) {
  // resultId reads the whole result of any submission (the workflow id for a workflow).
  return { taskId: r.task_id, workflowId: r.workflow_id, taskIds: [...r.task_ids], resultId: r.workflow_id || r.task_id };
}

class Client {
  /**
   * @param {string} [address] host:port (default CONVEYOR_ADDRESS or 127.0.0.1:50051)
   * @param {object} [options] {token, credentials, channelOptions}
   */
  constructor(address, options = {}) {
    this.address = address || defaultAddress();
    const { TaskService } = load();
    this._stub = new TaskService(this.address, options.credentials || grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      ...(options.channelOptions || {}),
    });
    this._token = options.token;
  }

  close() {
    this._stub.close();
  }

  _unary(method, request, deadlineSeconds) {
    const callOptions = deadlineSeconds ? { deadline: new Date(Date.now() + deadlineSeconds * 1000) } : {};
    return new Promise((resolve, reject) => {
      this._stub[method](request, metadataFor(this._token), callOptions, (err, response) => {
        if (err) reject(withErrorDetails(err));
        else resolve(response);
      });
    });
  }

  /** Submit one task: submit('add', [1, 2], {}, {queue: 'math'}) -> {taskId, workflowId, taskIds}. */
  async submit(name, args = [], kwargs = {}, options = {}) {
    const target = typeof name === 'string' ? sig(name, args, kwargs, options) : name;
    return this.submitWorkflow(target);
  }

  /**
   * Submit a sig(), chain(), group() or chord(); `options` ({args, kwargs, queue, priority, countdown, eta})
   * apply to the whole of it (see toCanvasOptions).
   */
  async submitWorkflow(node, options = null) {
    const streamed = streamedGroup(node) !== null;
    const target = streamed ? opening(node) : node;
    const request = target.kind === 'task' ? { task: toSignature(target) } : { workflow: toWorkflow(target) };
    if (options) request.options = toCanvasOptions(options);
    if (streamed) return submitStream(this._stub, metadataFor(this._token), node, request, toWorkflow);
    return toSubmitted(await this._unary('Submit', request));
  }

  /** Submit many in one round trip; all are accepted or none. */
  async submitBatch(nodes) {
    const requests = nodes.map((node) => (node.kind === 'task' ? { task: toSignature(node) } : { workflow: toWorkflow(node) }));
    const response = await this._unary('SubmitBatch', { requests });
    return response.responses.map(toSubmitted);
  }

  /** The task's record; with waitSeconds, waits up to that long for a terminal state. */
  async getResult(taskId, waitSeconds = 0) {
    const deadline = Date.now() + waitSeconds * 1000;
    for (;;) {
      const remaining = Math.max((deadline - Date.now()) / 1000, 0);
      const slice = Math.min(remaining, WAIT_SLICE_SECONDS);
      const response = await this._unary('GetResult', { task_id: taskId, wait: duration(slice) }, slice + 30);
      const result = toResult(response.result);
      if (TERMINAL.has(result.state) || remaining <= WAIT_SLICE_SECONDS) return result;
    }
  }

  /**
   * Wait for the task and return its value; throws TaskFailed, or an Error on timeout. A workflow id
   * gives the whole workflow's value (a group's list, a chain's last value, a chord's callback's).
   */
  async result(taskId, waitSeconds = 60) {
    const result = await this.getResult(taskId, waitSeconds);
    if (!TERMINAL.has(result.state)) throw new Error(`task ${taskId} is still ${result.state} after ${waitSeconds} s`);
    if (result.state !== 'SUCCESS') throw new TaskFailed(result);
    if (result.raw.signature && result.raw.signature.ignore_result) throw new ResultIgnored(result.taskId);
    return result.value;
  }

  /**
   * Stream state changes (what happened so far first) as an async iterator of
   * {taskId, state, at, workflowId, result}. Ends when every watched task is finished unless
   * untilDone is false; leaving the loop early cancels the stream.
   */
  async* watch(taskIds = [], { workflowId = '', untilDone = true } = {}) {
    const request = {
      task_ids: [...taskIds], workflow_id: workflowId, until_done: untilDone,
      max_events_per_response: WATCH_EVENTS_PER_RESPONSE,
    };
    const call = this._stub.WatchResults(request, metadataFor(this._token));
    try {
      for await (const response of call) {
        // A server that predates batches sends one event per response, in `event`.
        const events = response.events && response.events.length ? response.events : [response.event];
        for (const event of events) yield toEvent(event);
      }
    } catch (error) {
      throw withErrorDetails(error);
    } finally {
      call.cancel();
    }
  }

  /** Cancel a task or a whole workflow; returns the ids that moved to CANCELLED. */
  async cancel(id) {
    const response = await this._unary('Cancel', { id });
    return [...response.cancelled_task_ids];
  }

  async getWorkflow(workflowId) {
    return this._unary('GetWorkflow', { workflow_id: workflowId });
  }
}

module.exports = {
  Client, TaskFailed, ResultIgnored, sig, si, chain, group, chord, map, starmap, chunks, link, linkError, toResult, toEvent, toSignature, toWorkflow,
  toCanvasOptions, stateName, TERMINAL,
};
