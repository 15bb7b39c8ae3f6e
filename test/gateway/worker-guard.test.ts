/**
 * BullMQ workers are replaced when they stop taking jobs (gateway/worker-guard.ts). A worker
 * that stalled after a Redis restart was seen once and could not be brought about on purpose
 * since, so a worker that no longer fetches is made here with BullMQ's own `pause`: without the
 * guard, its jobs are never taken. A worker whose slots are all busy takes no job either,
 * rightly, and is left alone. The sweep's worker runs inside Presence, in this process, with a
 * stand-in for the gateway (what Presence reads of it, and a sweep timer) and sweep targets the
 * test controls; a plain guarded worker stands for the retry and `gw-publish` workers. Ten
 * producers add jobs while a worker is paused and replaced (each job runs once), and a private
 * Redis is killed and brought back (a sound worker is kept, one that stops later is replaced).
 * The rest against the shared Redis, under prefixes of this test's own.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, test } from 'node:test';
import { type Job, Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { Registry } from 'prom-client';
import { Keys, WORKER_RETRY_MS } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import type { SweepTargets } from '../../gateway/messaging/presence.ts';
import { GuardedWorker, workerRestarts } from '../../gateway/worker-guard.ts';
import { pack } from '../../protocol/index.ts';
import { dropRedisPrefix, REDIS_URL } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { captureLog } from '../helpers/log-capture.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { testPresence } from '../helpers/presence.ts';

const STALE_MS = 600;
const CHECK_MS = 600;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const prefixes: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

after(async () => {
  for (const close of closers.reverse()) await close().catch(() => {});
  for (const p of prefixes) await dropRedisPrefix(p);
});

/** A logger whose lines are kept in `lines`. */
function capturedLog() {
  const { lines, stream } = captureLog();
  return { lines, log: createLogger('debug', {}, stream) };
}

/**
 * Runs `fn` with a promise held until `release`; released in the end whatever `fn` does (a held
 * job would hold every close).
 */
async function withHold(fn: (held: Promise<void>, release: () => void) => Promise<void>): Promise<void> {
  let release: () => void = () => {};
  const held = new Promise<void>((r) => {
    release = r;
  });
  try {
    await fn(held, release);
  } finally {
    release();
  }
}

/** A node's Presence on its own prefix; `lines` holds what it logged. */
async function startNode(given: Partial<SweepTargets> = {}) {
  const prefix = `gwtest:presence:${randomUUID().slice(0, 8)}:`;
  prefixes.push(prefix);
  const keys = new Keys(prefix);
  const node = testPresence(keys, {
    staleMs: STALE_MS,
    sweepIntervalMs: 100,
    sessionTtlSeconds: 60,
    workerCheckMs: CHECK_MS,
  });
  const { presence, redis, lines, metrics } = node;
  const targets: SweepTargets = {
    roomLeft: (now) => [
      keys.roomChannelPrefix,
      '',
      pack({ name: 'room.left', data: {}, ts: now }).subarray(1),
      3,
    ],
    expire: async () => {},
    owedEnds: async () => ({ done: [], found: 0 }),
    owedReports: async () => ({ found: 0, reported: 0 }),
    expiredSessions: async () => 0,
    auditEnds: async () => ({ found: 0, written: 0 }),
    lostSessions: async () => ({ checked: 0, ended: [], deferred: 0 }),
    resurrectedSessions: async () => [],
    ...given,
  };
  await within('presence started', presence.start(targets));
  const stopSweeping = node.sweeping();
  closers.push(async () => {
    stopSweeping();
    await presence.close();
    node.disconnect();
  });
  const restarts = () => restartsOf(metrics, 'gw-maintenance');
  /**
   * A node silent since the epoch, with `sessions` sessions, each a member of #held there: only
   * a sweep removes it.
   */
  const plantDeadNode = async (sessions: string[] = []) => {
    const dead = `dead-${randomUUID().slice(0, 8)}`;
    const m = redis.multi().zadd(keys.nodes, 1, dead);
    if (sessions.length) m.sadd(keys.nodeSessions(dead), ...sessions);
    for (const sid of sessions) {
      m.hset(keys.sessionMemberships(sid), `#held 1 ${dead}`, 'held');
      m.zadd(keys.roomMembers('#held'), 1, sid);
    }
    await within('the dead node planted', m.exec());
    return dead;
  };
  const swept = (dead: string) =>
    until(`${dead} swept`, async () => (await within('the nodes', redis.zscore(keys.nodes, dead))) === null);
  return { presence, redis, keys, lines, restarts, plantDeadNode, swept };
}

/** gateway_queue_worker_restarts_total{queue} in `metrics`. */
async function restartsOf(metrics: Registry, queue: string): Promise<number> {
  const values = (await metrics.getSingleMetric('gateway_queue_worker_restarts_total')?.get())?.values ?? [];
  return values.find((v) => v.labels.queue === queue)?.value ?? 0;
}

test('a maintenance worker that stopped taking jobs is replaced, and the sweep runs again', async () => {
  const node = await startNode();
  await node.swept(await node.plantDeadNode());
  assert.equal(await node.restarts(), 0, 'no restart while the worker works');

  // A worker that no longer fetches (what BullMQ's stalled worker looked like: idle, the sweep
  // job waiting). The private field is the node's one worker.
  await within(
    'the worker paused',
    (node.presence as unknown as { worker: GuardedWorker }).worker.worker.pause(),
  );
  // (`pause` waits for its fetch and its job, if any, to end: from here it takes nothing.)
  await node.swept(await node.plantDeadNode()).catch((e: Error) => {
    const said = node.lines.filter((l) => Number(l.level) >= 30 || /worker|sweep/.test(String(l.msg)));
    throw new Error(`${e.message}; what the node logged: ${JSON.stringify(said)}`);
  });
  const replaced = node.lines.find((l) => String(l.msg).includes('worker replaced'));
  assert.ok(replaced, 'the replacement is logged');
  assert.equal(replaced.queue, 'gw-maintenance');
  assert.ok(Number(replaced.lateMs) > CHECK_MS, `late by more than a check: ${replaced.lateMs}`);
  assert.ok((await node.restarts()) >= 1, 'counted in gateway_queue_worker_restarts_total');
});

test('a node busy with a sweep longer than the check keeps its worker', async () => {
  let reporting = 0;
  await withHold(async (held, release) => {
    const node: Awaited<ReturnType<typeof startNode>> = await startNode({
      // An expired event is reported slowly: the sweep holds the node's worker. Then it is
      // removed, with its member of the index (SweepTargets.expire).
      expire: async (members) => {
        reporting++;
        await held;
        await node.redis.zrem(node.keys.expiries, ...members);
      },
    });
    await within('an expired event planted', node.redis.zadd(node.keys.expiries, 1, 'sid-held|eid-held'));
    await until('the sweep reporting the expired event', () => reporting > 0);
    // Sweep jobs come due meanwhile and wait: four checks' worth of time.
    await new Promise((r) => setTimeout(r, 4 * CHECK_MS));
    assert.equal(await node.restarts(), 0, 'the worker of a node sweeping was replaced');
    release();
    await until(
      'the expired event taken',
      async () => (await within('the expiries', node.redis.zcard(node.keys.expiries))) === 0,
    );
    assert.equal(reporting, 1, 'the expired event was reported once');
    // And the worker goes on taking sweeps.
    await node.swept(await node.plantDeadNode());
    assert.equal(await node.restarts(), 0);
  });
});

/**
 * A guarded worker on a queue of its own, with concurrency `slots`, on the shared Redis or `url`,
 * checked every `checkMs`; fetching again 1 s after a connection error, as the gateway's.
 */
async function guardedQueue(
  slots: number,
  processor: (job: Job) => Promise<unknown>,
  { url = REDIS_URL, checkMs = CHECK_MS } = {},
) {
  const prefix = `gwtest:guard:${randomUUID().slice(0, 8)}:`;
  prefixes.push(prefix);
  const conn = new Redis(url, { maxRetriesPerRequest: null });
  conn.on('error', () => {}); // a test's own outage
  const queue = new Queue('gw-publish', { connection: conn, prefix });
  const metrics = new Registry();
  const { lines, log } = capturedLog();
  const guard = new GuardedWorker({
    queue,
    processor,
    worker: { connection: conn, prefix, concurrency: slots, runRetryDelay: WORKER_RETRY_MS },
    checkMs,
    log,
    restarts: workerRestarts(metrics),
  });
  const timer = setInterval(() => guard.tick(Date.now()), 50);
  closers.push(async () => {
    clearInterval(timer);
    await guard.close();
    await queue.close();
    conn.disconnect();
  });
  return { queue, guard, lines, restarts: () => restartsOf(metrics, 'gw-publish') };
}

test('a queue worker that stopped taking jobs is replaced, and its jobs run', async () => {
  const done: string[] = [];
  const q = await guardedQueue(50, async (job) => {
    done.push(job.name);
  });
  await within('a first job added', q.queue.add('first', {}));
  await until('the first job run', () => done.includes('first'));
  await within('the worker paused', q.guard.worker.pause());
  await within('a job added to a worker that takes none', q.queue.add('second', {}));
  await until('the second job run by a new worker', () => done.includes('second'));
  assert.equal(await q.restarts(), 1, 'one replacement counted');
  const replaced = q.lines.find((l) => String(l.msg).includes('worker replaced'));
  assert.equal(replaced?.queue, 'gw-publish');
  // The new worker goes on taking jobs, and is not replaced for it.
  await within('a third job added', q.queue.add('third', {}));
  await until('the third job run', () => done.includes('third'));
  await new Promise((r) => setTimeout(r, 3 * CHECK_MS));
  assert.equal(await q.restarts(), 1);
});

test('a queue worker whose slots are all busy past the check keeps its worker', async () => {
  await withHold(async (held, release) => {
    const done: string[] = [];
    const q = await guardedQueue(2, async (job) => {
      if (job.name.startsWith('slow')) await held;
      done.push(job.name);
    });
    await within(
      'two slow jobs and one more added',
      q.queue.addBulk([
        { name: 'slow-1', data: {} },
        { name: 'slow-2', data: {} },
        { name: 'waiting', data: {} },
      ]),
    );
    // The third job waits for a slot through four checks' worth of time.
    await new Promise((r) => setTimeout(r, 4 * CHECK_MS));
    assert.deepEqual(done, [], 'nothing ran while the slow jobs held both slots');
    assert.equal(await q.restarts(), 0, 'a worker with every slot busy was replaced');
    release();
    await until('every job run', () => done.length === 3);
    assert.equal(await q.restarts(), 0);
  });
});

test('jobs added by many producers while the worker is paused and replaced: each runs once', async () => {
  const runs = new Map<string, number>();
  const q = await guardedQueue(50, async (job) => {
    runs.set(job.name, (runs.get(job.name) ?? 0) + 1);
  });
  await within('the worker paused', q.guard.worker.pause());
  // Ten producers add jobs for five checks' worth of time: before, during and after the
  // replacement (which takes two checks).
  let added = 0;
  const end = Date.now() + 5 * CHECK_MS;
  await Promise.all(
    Array.from({ length: 10 }, async (_, p) => {
      for (let i = 0; Date.now() < end; i++) {
        await within(`job ${p}-${i} added`, q.queue.add(`job-${p}-${i}`, {}));
        added++;
        await sleep(20);
      }
    }),
  );
  await until(`all ${added} jobs run`, () => runs.size === added);
  // Some checks later: nothing ran twice, and the new worker was kept.
  await sleep(3 * CHECK_MS);
  assert.deepEqual(
    [...runs].filter(([, n]) => n !== 1),
    [],
    'jobs run more than once',
  );
  assert.equal(runs.size, added);
  assert.equal(await q.restarts(), 1, 'one replacement');
});

test('across a Redis outage a sound worker is kept, and one that stops taking jobs after it is still replaced', async () => {
  const own = await startOwnRedis(['--appendonly', 'yes']);
  closers.push(() => own.remove());
  // The least period the gateway takes (GW_WORKER_CHECK_MS): a sound worker has two checks'
  // time to come back after Redis does.
  const checkMs = 5000;
  const done = new Set<string>();
  const q = await guardedQueue(
    5,
    async (job) => {
      done.add(job.name);
    },
    { url: own.url, checkMs },
  );
  await within('a job added', q.queue.add('before', {}));
  await until('the job before the outage run', () => done.has('before'));
  await own.kill('SIGKILL');
  // Gone for more than two checks: the checks wait in the connection meanwhile.
  await sleep(2.5 * checkMs);
  await own.start();
  await within('a job added after the outage', q.queue.add('after', {}));
  await until('the job after the outage run', () => done.has('after'));
  // Two more checks: the sound worker is not replaced.
  await sleep(2 * checkMs);
  assert.equal(await q.restarts(), 0, 'a sound worker was replaced after the outage');
  await within('the worker paused', q.guard.worker.pause());
  await within('a job for a worker that takes none', q.queue.add('paused', {}));
  await until('the job run by a new worker', () => done.has('paused'), 4 * checkMs);
  assert.equal(await q.restarts(), 1);
});

test('a job that fell due while Redis was frozen: the worker has a check after the thaw to take it', async () => {
  const own = await startOwnRedis();
  closers.push(() => own.remove());
  const checkMs = 2000;
  const done = new Set<string>();
  const q = await guardedQueue(
    5,
    async (job) => {
      done.add(job.name);
    },
    { url: own.url, checkMs },
  );
  // A worker that takes nothing until the test lets it: one slow to fetch again after an
  // outage, as a sound BullMQ worker can be (its blocking read coming back).
  await within('the worker paused', q.guard.worker.pause());
  await within('a job added', q.queue.add('due', {}));
  // Frozen past a check: the check started meanwhile waits in its connection and reads the job
  // only after the thaw, late by more than a check by then.
  own.freeze();
  try {
    await sleep(1.5 * checkMs);
  } finally {
    own.thaw();
  }
  // The worker comes back a tenth of a check after the thaw: within the grace of one check.
  await sleep(checkMs / 10);
  q.guard.worker.resume();
  await until('the job run', () => done.has('due'), 4 * checkMs);
  // Two more checks find nothing late.
  await sleep(2 * checkMs);
  const replaced = q.lines.filter((l) => String(l.msg).includes('worker replaced'));
  assert.deepEqual(replaced, [], 'a worker that took its job within a check of the thaw was replaced');
  assert.equal(await q.restarts(), 0);
});
