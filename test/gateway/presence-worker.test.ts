/**
 * The sweep's BullMQ worker is replaced when it stops taking jobs (gateway/messaging/presence.ts,
 * `checkWorker`). A worker that stalled after a Redis restart was seen once and could not be
 * brought about on purpose since, so a worker that no longer fetches is made here with BullMQ's
 * own `pause`: without the check, nothing sweeps again. A node busy with a long sweep is a
 * worker that takes no job too, rightly, and is left alone. Presence runs in this process
 * against the shared Redis under a prefix of this test's own, with a stand-in for the gateway
 * (what Presence reads of it) and sweep targets the test controls.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { after, test } from 'node:test';
import type { Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { Registry } from 'prom-client';
import { SessionBinding } from '../../gateway/binding.ts';
import type { Gateway } from '../../gateway/gateway.ts';
import { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { Presence, type SweepTargets } from '../../gateway/messaging/presence.ts';
import { dropRedisPrefix, REDIS_URL } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';

const STALE_MS = 600;
const prefixes: string[] = [];
const closers: (() => Promise<unknown>)[] = [];

after(async () => {
  for (const close of closers.reverse()) await close().catch(() => {});
  for (const p of prefixes) await dropRedisPrefix(p);
});

/** A node's Presence on its own prefix; `lines` holds what it logged. */
async function startNode(targets: SweepTargets) {
  const prefix = `gwtest:presence:${randomUUID().slice(0, 8)}:`;
  prefixes.push(prefix);
  const redis = new Redis(REDIS_URL, { commandTimeout: 10_000 });
  const bull = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _enc, done) {
      for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l));
      done();
    },
  });
  const metrics = new Registry();
  // What Presence reads of the gateway: its node id, connections, hooks and metrics.
  const gateway = {
    nodeId: `node-${randomUUID().slice(0, 8)}`,
    connections: [],
    metrics,
    onSessionBound() {},
    onSessionUnbound() {},
  } as unknown as Gateway;
  const keys = new Keys(prefix);
  const presence = new Presence({
    gateway,
    redis,
    bullConnection: bull,
    binding: new SessionBinding(redis),
    keys,
    log: createLogger('debug', {}, sink),
    options: { staleMs: STALE_MS, sweepIntervalMs: 100, sessionTtlSeconds: 60 },
  });
  await within('presence started', presence.start(targets));
  closers.push(async () => {
    await presence.close();
    redis.disconnect();
    bull.disconnect();
  });
  const restarts = async () => {
    const m = (await metrics.getSingleMetric('gateway_sweep_worker_restarts_total')?.get())?.values[0];
    return m?.value ?? 0;
  };
  /** A node silent since the epoch, with `sessions` sessions: only a sweep removes it. */
  const plantDeadNode = async (sessions: string[] = []) => {
    const dead = `dead-${randomUUID().slice(0, 8)}`;
    const m = redis.multi().zadd(keys.nodes, 1, dead);
    if (sessions.length) m.sadd(keys.nodeSessions(dead), ...sessions);
    await within('the dead node planted', m.exec());
    return dead;
  };
  const swept = (dead: string) =>
    until(`${dead} swept`, async () => (await within('the nodes', redis.zscore(keys.nodes, dead))) === null);
  return { presence, lines, restarts, plantDeadNode, swept };
}

const noTargets: SweepTargets = { dropSession: async () => {}, expire: async () => {} };

test('a maintenance worker that stopped taking jobs is replaced, and the sweep runs again', async () => {
  const node = await startNode(noTargets);
  await node.swept(await node.plantDeadNode());
  assert.equal(await node.restarts(), 0, 'no restart while the worker works');

  // A worker that no longer fetches (what BullMQ's stalled worker looked like: idle, the sweep
  // job waiting). The private field is the node's one worker.
  await within('the worker paused', (node.presence as unknown as { worker: Worker }).worker.pause(true));
  // A job it had fetched before the pause still runs: planted after that, the dead node waits
  // for a worker that takes jobs.
  await new Promise((r) => setTimeout(r, 500));
  await node.swept(await node.plantDeadNode()).catch((e: Error) => {
    const said = node.lines.filter((l) => Number(l.level) >= 30 || /worker|sweep/.test(String(l.msg)));
    throw new Error(`${e.message}; what the node logged: ${JSON.stringify(said)}`);
  });
  const replaced = node.lines.find((l) => String(l.msg).includes('maintenance worker replaced'));
  assert.ok(replaced, 'the replacement is logged');
  assert.ok(Number(replaced.lateMs) > STALE_MS, `late by more than a stale time: ${replaced.lateMs}`);
  assert.ok((await node.restarts()) >= 1, 'counted in gateway_sweep_worker_restarts_total');
});

test('a node busy with a sweep longer than the stale time keeps its worker', async () => {
  let dropping = 0;
  let release: () => void = () => {};
  const held = new Promise<void>((r) => {
    release = r;
  });
  const node = await startNode({
    // One session of the dead node is dropped slowly: the sweep holds the node's worker.
    dropSession: async () => {
      dropping++;
      await held;
    },
    expire: async () => {},
  });
  const dead = await node.plantDeadNode(['sid-held']);
  await until('the sweep dropping the dead node session', () => dropping > 0);
  // Sweep jobs come due meanwhile and wait: three checks' worth of time.
  await new Promise((r) => setTimeout(r, 4 * STALE_MS));
  assert.equal(await node.restarts(), 0, 'the worker of a node sweeping was replaced');
  release();
  await node.swept(dead);
  assert.equal(dropping, 1, 'the session was dropped once');
  // And the worker goes on taking sweeps.
  await node.swept(await node.plantDeadNode());
  assert.equal(await node.restarts(), 0);
});
