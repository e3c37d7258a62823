// Type declarations for the public API of lib/index.js (written by hand: the package is plain
// JavaScript). Keep them in step with lib/worker.js, client.js, values.js and errors.js;
// test/types/usage.ts is checked against them by `npm run typecheck`.

/// <reference types="node" />

import type { ChannelCredentials, ChannelOptions, ServiceError } from '@grpc/grpc-js';

// -- values ---------------------------------------------------------------------------------------

/**
 * A conveyor.v1.Value as @grpc/proto-loader reads and writes it (int64 as a decimal string).
 * An empty object is null.
 */
export interface ValueMessage {
  int_value?: string;
  double_value?: number;
  string_value?: string;
  bool_value?: boolean;
  bytes_value?: Uint8Array;
  json_value?: string;
  kind?: string;
}

/** Encode one JavaScript value (null, boolean, string, number, bigint, bytes or JSON data) as a Value. */
export function toValue(obj: unknown): ValueMessage;
/** Decode one Value; an empty Value (or none) is null. Integers beyond 2^53 come back as BigInt. */
export function fromValue(value: ValueMessage | null | undefined): any;

/** A value with no Value form (a function, a symbol, NaN inside JSON, an integer beyond int64). */
export class UnencodableValue extends TypeError {
  constructor(message?: string);
}

// -- errors ---------------------------------------------------------------------------------------

/** One entry of a google.rpc.BadRequest: the request field that was refused and why. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** What withErrorDetails() adds to a refused call's error (docs/errors.md). */
export interface ErrorDetails {
  /** ErrorInfo's stable code; '' without one. */
  reason: string;
  /** ErrorInfo's metadata. */
  errorMetadata: Record<string, string>;
  fieldViolations: FieldViolation[];
  /** The server's retry hint in seconds, or null without one. */
  retryAfter: number | null;
}

/** A failed client call: the grpc-js error (code, details, metadata) with the server's details. */
export type ConveyorError = ServiceError & ErrorDetails;

/** Adds the server's error details to a grpc-js error, in place, and returns it. */
export function withErrorDetails<E extends object>(error: E): E & ErrorDetails;

// -- canvas ---------------------------------------------------------------------------------------

export type BackoffKind = 'exponential' | 'fibonacci' | 'fixed';

export interface RetryPolicy {
  maxAttempts?: number;
  backoff?: BackoffKind;
  /** Seconds before the first retry. */
  initial?: number;
  /** Seconds, at most, between retries. */
  max?: number;
  jitter?: number;
}

/** Options of one task call (sig()'s fourth argument, or client.submit()'s). */
export interface SignatureOptions {
  id?: string;
  queue?: string;
  /** 0-9. */
  priority?: number;
  /** Seconds before it may start. */
  countdown?: number;
  /** When it may start: a Date or epoch milliseconds. */
  eta?: Date | number;
  /** Seconds. */
  timeLimit?: number;
  /** Seconds. */
  softTimeLimit?: number;
  retry?: RetryPolicy;
  /** Ignore the previous chain step's result. */
  immutable?: boolean;
  idempotencyKey?: string;
  headers?: Record<string, string>;
  messageGroup?: string;
  onSuccess?: TaskSignature[];
  onError?: TaskSignature[];
  /** Seconds from submit, or a Date: not started by then, it ends EXPIRED. */
  expires?: number | Date;
  /** Its value is not stored. */
  ignoreResult?: boolean;
  /** Seconds during which a submit of an equal task returns the live one's id instead. */
  uniqueFor?: number;
  /** What makes tasks equal for uniqueFor (default: name, queue and arguments). */
  uniqueKey?: string;
  /** The token bucket to draw from when the name's rate limit is per key (a customer id, say). */
  rateLimitKey?: string;
  /** At most concurrencyLimit tasks with this key run at once, across replicas. */
  concurrencyKey?: string;
  concurrencyLimit?: number;
  /** Seconds a ready task may wait for a worker that registered its name; then it fails Unroutable. */
  routingTimeout?: number;
}

export interface TaskSignature {
  kind: 'task';
  name: string;
  args: unknown[];
  kwargs: Record<string, unknown>;
  options: SignatureOptions;
}

/** Callbacks a chain or group carries (set with link() and linkError()). */
export interface Callbacks {
  onSuccess?: TaskSignature[];
  onError?: TaskSignature[];
}

export interface Chain extends Callbacks {
  kind: 'chain';
  steps: Canvas[];
}

/** Members read only at submit, streamed to the server in pieces. */
export type LazyMembers = Iterable<Canvas> | AsyncIterable<Canvas>;

export interface Group extends Callbacks {
  kind: 'group';
  members: Canvas[];
  lazy?: LazyMembers;
  onMemberError?: TaskSignature[];
}

export type ChordFailurePolicy = 'fail' | 'continue';

export interface Chord {
  kind: 'chord';
  members: Canvas[];
  header: Group;
  callback: Canvas;
  failurePolicy: ChordFailurePolicy;
}

export interface MapNode {
  kind: 'map';
  task: TaskSignature;
  items: unknown[];
  star: boolean;
  chunkSize: number;
  nested: boolean;
}

/** Anything client.submit(), submitWorkflow(), submitBatch() and ctx.replace() accept. */
export type Canvas = TaskSignature | Chain | Group | Chord | MapNode;

export function sig(name: string, args?: unknown[], kwargs?: Record<string, unknown>, options?: SignatureOptions): TaskSignature;
/** An immutable signature: it ignores the previous chain step's result. */
export function si(name: string, args?: unknown[], kwargs?: Record<string, unknown>, options?: SignatureOptions): TaskSignature;
export function chain(...steps: Array<Canvas | Canvas[]>): Chain;
/** group(a, b), group([a, b]), or group(generator) (streamed at submit). */
export function group(...members: Array<Canvas | Canvas[]>): Group;
export function group(lazy: LazyMembers): Group;
export function chord(
  header: Group | Canvas[] | LazyMembers,
  callback: Canvas,
  options?: { failurePolicy?: ChordFailurePolicy },
): Chord;
/** `task` (a sig() without args) called once per item; the result is one value per item. */
export function map(task: TaskSignature, items: Iterable<unknown>, options?: { chunkSize?: number }): MapNode;
/** As map(), each item being an array of positional args. */
export function starmap(task: TaskSignature, items: Iterable<unknown[]>, options?: { chunkSize?: number }): MapNode;
/** Items (arrays of args) in tasks of n; the result is one array per chunk. */
export function chunks(task: TaskSignature, items: Iterable<unknown[]>, n: number): MapNode;
/** A copy of `node` that runs `callback` with its result on success (a map becomes a chain). */
export function link(node: MapNode, callback: TaskSignature): Chain;
export function link<T extends TaskSignature | Chain | Group | Chord>(node: T, callback: TaskSignature): T;
/** A copy of `node` that runs `callback` with the error on failure (perMember: once per failed group member). */
export function linkError(node: MapNode, callback: TaskSignature, options?: { perMember?: boolean }): Chain;
export function linkError<T extends TaskSignature | Chain | Group | Chord>(
  node: T, callback: TaskSignature, options?: { perMember?: boolean },
): T;

/** The conveyor.v1 messages a canvas becomes (as @grpc/proto-loader takes them). */
export function toSignature(node: TaskSignature): Record<string, any>;
export function toWorkflow(node: Canvas): Record<string, any>;

/** Options for a whole submission (Celery's apply_async options). */
export interface CanvasOptions {
  /** Prepended to the first tasks' args. */
  args?: unknown[];
  /** Merged into the first tasks' kwargs. */
  kwargs?: Record<string, unknown>;
  queue?: string;
  priority?: number;
  countdown?: number;
  eta?: Date | number;
}

export function toCanvasOptions(options: CanvasOptions): Record<string, any>;

// -- results --------------------------------------------------------------------------------------

/** A task state without its TASK_STATE_ prefix. */
export type TaskState =
  | 'UNSPECIFIED' | 'PENDING' | 'RECEIVED' | 'STARTED' | 'RETRY' | 'SUCCESS' | 'FAILURE' | 'CANCELLED' | 'EXPIRED';

/** The states a task does not leave. */
export const TERMINAL: ReadonlySet<string>;

/** "SUCCESS" for "TASK_STATE_SUCCESS". */
export function stateName(state: string): string;

export interface TaskErrorInfo {
  type: string;
  message: string;
  traceback: string;
}

export interface HistoryEntry {
  state: TaskState;
  at: Date | null;
  attempt: number;
  workerId: string;
  error: TaskErrorInfo | null;
}

/** A TaskResult as plain JavaScript. */
export interface TaskResult {
  taskId: string;
  name: string;
  queue: string;
  state: TaskState;
  /** The decoded result when state is SUCCESS, else undefined. */
  value: any;
  error: TaskErrorInfo | null;
  attempts: number;
  workerId: string;
  workflowId: string;
  submittedAt: Date | null;
  startedAt: Date | null;
  finishedAt: Date | null;
  /** The last ctx.progress() value, or null. */
  progress: any;
  history: HistoryEntry[];
  /** The conveyor.v1.TaskResult message as received. */
  raw: Record<string, any>;
}

/** One state change streamed by client.watch(). */
export interface TaskEvent {
  taskId: string;
  state: TaskState;
  at: Date | null;
  workflowId: string;
  /** The task's record when the event was read (the server always sends it); use `state`. */
  result: TaskResult;
}

export function toResult(result: Record<string, any> | null | undefined): TaskResult | null;
export function toEvent(event: Record<string, any>): TaskEvent;

/** What a submit resolves to. */
export interface Submitted {
  taskId: string;
  workflowId: string;
  /** Every task id created ([] for a streamed group). */
  taskIds: string[];
  /** The id whose result is the whole submission's (the workflow id for a workflow). */
  resultId: string;
}

/** A task ended in FAILURE, CANCELLED or EXPIRED (thrown by client.result()). */
export class TaskFailed extends Error {
  constructor(result: TaskResult);
  taskId: string;
  state: TaskState;
  errorType: string;
  errorMessage: string;
  traceback: string;
  result: TaskResult;
}

/** A task submitted with ignoreResult succeeded, but its value was not stored (thrown by client.result()). */
export class ResultIgnored extends Error {
  constructor(taskId: string);
  taskId: string;
}

// -- client ---------------------------------------------------------------------------------------

export interface ClientOptions {
  /** Bearer token (default CONVEYOR_TOKEN). */
  token?: string;
  /** e.g. grpc.credentials.createSsl(...) for TLS; insecure by default. */
  credentials?: ChannelCredentials;
  channelOptions?: ChannelOptions;
}

export interface WatchOptions {
  workflowId?: string;
  /** End when every watched task is finished (default true). */
  untilDone?: boolean;
}

export class Client {
  /** address: host:port (default CONVEYOR_ADDRESS or 127.0.0.1:50051). */
  constructor(address?: string, options?: ClientOptions);
  readonly address: string;
  close(): void;
  /** Submit one task: submit('add', [1, 2], {}, {queue: 'math'}), or submit(canvas). */
  submit(name: string, args?: unknown[], kwargs?: Record<string, unknown>, options?: SignatureOptions): Promise<Submitted>;
  submit(canvas: Canvas): Promise<Submitted>;
  /** Submit a canvas; `options` apply to the whole of it. */
  submitWorkflow(node: Canvas, options?: CanvasOptions | null): Promise<Submitted>;
  /** Submit many in one round trip; all are accepted or none. */
  submitBatch(nodes: Canvas[]): Promise<Submitted[]>;
  /** The task's record; with waitSeconds, waits up to that long for a terminal state. */
  getResult(taskId: string, waitSeconds?: number): Promise<TaskResult>;
  /** Wait (default 60 s) and return the value; throws TaskFailed, ResultIgnored, or an Error on timeout. */
  result(taskId: string, waitSeconds?: number): Promise<any>;
  /** Stream state changes; leaving the loop early cancels the stream. */
  watch(taskIds?: string[], options?: WatchOptions): AsyncGenerator<TaskEvent, void, undefined>;
  /** Cancel a task or a whole workflow; resolves to the ids that moved to CANCELLED. */
  cancel(id: string): Promise<string[]>;
  /** The conveyor.v1.GetWorkflowResponse message as received. */
  getWorkflow(workflowId: string): Promise<Record<string, any>>;
}

// -- worker ---------------------------------------------------------------------------------------

export interface Logger {
  debug(...args: unknown[]): void;
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
  error(...args: unknown[]): void;
}

export interface WorkerOptions {
  /** host:port (default CONVEYOR_ADDRESS or 127.0.0.1:50051). */
  address?: string;
  /** Queues to pull from (default ["default"]). */
  queues?: string[];
  /** Tasks run at once, also the window (default 8). */
  concurrency?: number;
  /** A stable id; the server assigns one when empty. */
  workerId?: string;
  /** Seconds stop() waits for in-flight tasks (default 30). */
  drainTimeout?: number;
  /** Bearer token (default CONVEYOR_TOKEN). */
  token?: string;
  credentials?: ChannelCredentials;
  channelOptions?: ChannelOptions;
  logger?: Logger;
}

/** What a task function receives as its third argument. */
export interface TaskContext {
  readonly taskId: string;
  readonly name: string;
  readonly attempt: number;
  readonly deliveries: number;
  readonly queue: string;
  readonly priority: number;
  readonly headers: Record<string, string>;
  /** '' for a task submitted on its own. */
  readonly workflowId: string;
  readonly parentId: string;
  /** Seconds, or null without a limit. */
  readonly timeLimit: number | null;
  readonly softTimeLimit: number | null;
  readonly leaseToken: string;
  /** Aborted when the task is cancelled, runs past its time limit or the worker stops. */
  readonly signal: AbortSignal;
  /** Aborted at the soft time limit (time to clean up). */
  readonly softSignal: AbortSignal;
  readonly cancelled: boolean;
  /** `return ctx.replace(canvas)`: the canvas runs in this task's place; its result becomes the task's. */
  replace(canvas: Canvas): Replacement;
  /** Report progress (any value); readers see it as the result's `progress`. */
  progress(value: unknown): void;
  readonly worker: Worker;
}

/** A task: its return value (or a Replacement) is the result; it may be async. */
export type TaskFunction = (args: any[], kwargs: Record<string, any>, ctx: TaskContext) => unknown;

export interface TaskOptions {
  /** What the task does, for people. */
  description?: string;
  /** A JSON Schema (an object, or its JSON text) of one call: {args: [...], kwargs: {...}}. */
  schema?: object | string | boolean | null;
}

export class Worker {
  constructor(options?: WorkerOptions);
  readonly address: string;
  readonly queues: string[];
  readonly concurrency: number;
  workerId: string;
  drainTimeout: number;
  readonly tasks: Map<string, TaskFunction>;
  log: Logger;
  /** Register `fn` under `name` (or under fn.name). */
  task(name: string, fn: TaskFunction, options?: TaskOptions): this;
  task(fn: TaskFunction, options?: TaskOptions): this;
  /** Change the window (and local concurrency) while running. */
  setConcurrency(concurrency: number): void;
  /** Connect (and reconnect after failures) until stop() is called and work is drained. */
  run(): Promise<void>;
  /** Graceful stop: finish in-flight tasks (up to drainTimeout), report them, disconnect. */
  stop(): void;
}

/** Throw inside a task to run it again after `delay` seconds (bounded by its max attempts). */
export class Retry extends Error {
  constructor(delay?: number, reason?: string);
  delay: number;
  reason: string;
}

export interface RejectOptions {
  /** Back to the queue: the same attempt runs again later (default false: the task fails for good). */
  requeue?: boolean;
}

/**
 * Throw inside a task to refuse it: it fails for good with a "Rejected" error, never retried; with
 * {requeue: true} the same attempt runs again later, on any worker (10 requeues fail it "Rejected").
 */
export class Reject extends Error {
  constructor(reason?: string, options?: RejectOptions);
  reason: string;
  requeue: boolean;
}

/** What ctx.replace() returns. */
export class Replacement {
  constructor(workflow: Record<string, any>);
  workflow: Record<string, any>;
}

/** The reason of ctx.signal when the server cancelled the task. */
export class TaskCancelled extends Error {
  constructor(message?: string);
}

/** The reason of ctx.signal when the task ran past its time limit. */
export class TimeLimitExceeded extends Error {
  constructor(message?: string);
}

/** The reason of ctx.softSignal when the task ran past its soft time limit. */
export class SoftTimeLimitExceeded extends Error {
  constructor(message?: string);
}
