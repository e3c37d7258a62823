// Type test: the main API used as example.js and submit-example.js use it, checked against
// lib/index.d.ts by `npm run typecheck` (tsc --strict; nothing here runs).
import { setTimeout as sleep } from 'node:timers/promises';
import {
  Client, ConveyorError, Reject, ResultIgnored, Retry, SignatureOptions, TaskContext, TaskEvent, TaskFailed, Worker, chain, chord,
  fromValue, group, link, linkError, map, si, sig, toValue,
} from '../../lib';

export function worker(): Worker {
  const w = new Worker({ address: '127.0.0.1:50051', queues: ['default'], concurrency: 8 });
  w.task('node.add', async ([x, y]) => x + y)
    .task('node.upper', async ([text]) => String(text).toUpperCase(), { description: 'upper-cases its argument' });
  w.task('node.headers', async (args, kwargs, ctx) => ctx.headers);
  w.task('node.sleep', async ([seconds]: number[], kwargs, ctx: TaskContext) => {
    await sleep(seconds * 1000, undefined, { signal: ctx.signal });
    ctx.progress({ slept: seconds });
    return seconds;
  });
  w.task('node.flaky', async (args, kwargs, ctx) => {
    if (ctx.attempt < 2) throw new Retry(0.1, 'not yet');
    return ctx.attempt;
  });
  w.task('node.thumbnail', async ([path]: string[], kwargs, ctx) => {
    if (!path.endsWith('.png')) throw new Reject(`not an image: ${path}`);
    if (ctx.deliveries > 3) throw new Reject('busy', { requeue: true });
    return path.replace(/\.png$/, '.thumb.png');
  });
  w.task('node.replace', async ([x, y], kwargs, ctx) => ctx.replace(
    chain(sig('node.mul', [x, y], {}, { queue: ctx.queue }), sig('node.add', [1], {}, { queue: ctx.queue })),
  ));
  w.task('add', async ([x, y]) => x + y, {
    schema: { properties: { args: { prefixItems: [{ type: 'integer' }, { type: 'integer' }], minItems: 2 } } },
  });
  w.setConcurrency(4);
  process.on('SIGTERM', () => w.stop());
  return w;
}

export async function submit(client: Client): Promise<number> {
  const { taskId } = await client.submit('node.add', [2, 3], {}, { queue: 'default', retry: { maxAttempts: 5 } });
  let last: TaskEvent | null = null;
  for await (const event of client.watch([taskId])) {
    last = event;
    const line = `${event.at?.toISOString()} ${event.taskId} ${event.state}`;
    if (event.state === 'SUCCESS') console.log(line, event.result.value);
    else if (event.result.error) console.log(line, event.result.error.type, event.result.error.message);
  }
  const canvas = link(
    chord(group(sig('a', [1]), sig('b', [2])), si('sum'), { failurePolicy: 'continue' }),
    sig('notify'),
  );
  const submitted = await client.submitWorkflow(canvas, { queue: 'math', countdown: 1 });
  const batch = await client.submitBatch([sig('x'), linkError(map(sig('double'), [1, 2, 3]), sig('log'))]);
  try {
    return (await client.result(submitted.resultId, 30)) + batch.length;
  } catch (err) {
    if (err instanceof TaskFailed) console.log(err.taskId, err.state, err.errorType, err.errorMessage);
    throw err;
  } finally {
    const result = await client.getResult(taskId);
    console.log(result.state, result.finishedAt, await client.cancel(submitted.workflowId), last?.state);
    client.close();
  }
}

export async function ignored(client: Client): Promise<string> {
  const options = { expires: new Date(Date.now() + 30_000), ignoreResult: true };
  const { taskId } = await client.submit('node.add', [1, 2], {}, options);
  try {
    return String(await client.result(taskId));
  } catch (err) {
    if (err instanceof ResultIgnored) return (await client.getResult(err.taskId, 30)).state;
    throw err;
  }
}

export function rejected(err: unknown): string {
  return err instanceof Reject ? `${err.name} ${err.reason} requeue=${err.requeue}` : String(err);
}

export function refused(err: ConveyorError): string {
  return `${err.code} ${err.reason} ${err.retryAfter ?? '-'} ${err.fieldViolations.map((v) => v.field).join(',')}`;
}

export const roundTrip: unknown = fromValue(toValue({ a: [1, 2n] }));

function* members() {
  for (let i = 0; i < 3; i += 1) yield sig('node.add', [i, 1]);
}
export const streamed = group(members());

export async function dispatched(client: Client, customer: string): Promise<string> {
  const options: SignatureOptions = {
    uniqueFor: 60, uniqueKey: `charge-${customer}`, rateLimitKey: customer,
    concurrencyKey: `account:${customer}`, concurrencyLimit: 2, routingTimeout: 30,
  };
  return (await client.submit('charge', [customer], {}, options)).taskId;
}
