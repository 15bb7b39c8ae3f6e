/**
 * The cluster-wide sweep keeps running when its schedule loses its next job. BullMQ schedules
 * a job scheduler's next job from the worker that fetched the current one, in a call after the
 * fetch: a node killed between the two (or Redis losing its last writes) leaves no next job,
 * and nothing swept dead nodes until the stalled-job check ran, 30 s or more later. Here the
 * pending sweep jobs are deleted from Redis directly (that state), then a dead node is planted:
 * the gateway must sweep it. The second test takes Redis away while the schedule is being set
 * again (the call waits in BullMQ's connection, and no second one is queued behind it), and
 * brings it back empty (no persistence: everything BullMQ had is gone). Once, in CI, the worker
 * then took no job at all: the gateway replaces such a worker (gateway/worker-guard.ts, checked
 * here every 5 s; test/gateway/worker-guard.test.ts makes one on purpose).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { Redis } from 'ioredis';
import { redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

/** The command that sizes a key of each type (a string counts 1). */
const SIZE_OF: Record<string, string> = {
  zset: 'ZCARD',
  list: 'LLEN',
  hash: 'HLEN',
  stream: 'XLEN',
  set: 'SCARD',
};

let env: DeploymentEnv;
let gw: GatewayProcess;
const redis = redisClient();

before(async () => {
  env = deploymentEnv();
  gw = await startGateway({
    ...env,
    GW_DEFAULT_ROOM: '',
    GW_SWEEP_INTERVAL_MS: '300',
    GW_PRESENCE_STALE_MS: '1500',
  });
});
after(async () => {
  await gw?.stop();
  redis.disconnect();
  if (env) await dropDeployment(env);
});

test('a sweep schedule that lost its next job runs again, and sweeps a dead node', async () => {
  const q = `${env.GW_REDIS_PREFIX}bull:gw-maintenance:`;
  const pendingSweeps = async () => {
    const [delayed, waiting] = await within(
      'the pending sweep jobs',
      Promise.all([redis.zrange(`${q}delayed`, '0', '-1'), redis.lrange(`${q}wait`, 0, -1)]),
    );
    return [...delayed, ...waiting].filter((id) => id.startsWith('repeat:sweep:'));
  };
  await until('a first sweep job', async () => (await pendingSweeps()).length > 0);

  // Delete every pending sweep job (one that is running schedules its next as it starts, which
  // the next pass deletes): what a node killed between fetching a sweep job and scheduling the
  // next leaves behind, but for the fetched job itself.
  await until('no sweep job pending', async () => {
    const ids = await pendingSweeps();
    for (const id of ids) {
      await within(
        `deleting ${id}`,
        redis.multi().zrem(`${q}delayed`, id).lrem(`${q}wait`, 0, id).del(`${q}${id}`).exec(),
      );
    }
    return ids.length === 0 && (await pendingSweeps()).length === 0;
  });

  // A node that stopped beating long ago.
  const dead = `dead-${Date.now()}`;
  await within('the dead node planted', redis.zadd(`${env.GW_REDIS_PREFIX}nodes`, 1, dead));
  await until(
    'the dead node swept',
    async () => (await within('the nodes', redis.zscore(`${env.GW_REDIS_PREFIX}nodes`, dead))) === null,
    15_000,
  );
  // Polled: at the instant the sweep ran, its job may be the only one (active, not pending) with
  // its successor not added yet (BullMQ adds it in a call after the fetch).
  await until('the schedule has a next job again', async () => (await pendingSweeps()).length > 0);
});

test('an outage while the schedule is set again, and a Redis that comes back empty: one call waits, the sweep runs again, nothing on stderr', async () => {
  // A private Redis without persistence, so that a restart loses every job and the scheduler.
  const own = await startOwnRedis(['--save', '', '--appendonly', 'no']);
  const g = await startGateway({
    REDIS_URL: own.url,
    GW_DEFAULT_ROOM: '',
    GW_LOG_LEVEL: 'debug',
    GW_SWEEP_INTERVAL_MS: '300',
    GW_PRESENCE_STALE_MS: '1500',
    // A worker that takes no job after the restart (seen once) is replaced within the deadline
    // below (two checks of the least period GW_WORKER_CHECK_MS takes).
    GW_WORKER_CHECK_MS: '5000',
  });
  // What the gateway prints outside its log: nothing, even while Redis is away (BullMQ prints a
  // queue's connection errors with console.error unless the queue has a listener).
  let stderr = '';
  g.proc.stderr!.on('data', (d) => {
    stderr += d;
  });
  // Every read of the private Redis under a deadline naming it.
  const read = <T>(what: string, fn: (r: Redis) => Promise<T>) => within(what, own.with(fn));
  try {
    const nodes = `${g.prefix}nodes`;
    const schedulerKey = `${g.prefix}bull:gw-maintenance:repeat`;
    await until(
      'the sweep scheduled',
      async () => (await read('the scheduler', (r) => r.zcard(schedulerKey))) > 0,
    );

    // A key of the test's own: gone after the restart, whatever the gateway writes again at once.
    const marker = `${g.prefix}test:marker`;
    await read('the marker set', (r) => r.set(marker, '1'));
    await own.kill('SIGKILL');
    // BullMQ's connection holds the first re-set of the schedule until Redis is back; the next
    // ones are not piled up behind it.
    await g.waitForLog((l) => l.msg === 'sweep schedule still being set; not set again', 10_000);
    await own.start();
    assert.equal(await read('the marker', (r) => r.exists(marker)), 0, 'Redis came back empty');

    // A node that stopped beating long ago: only a sweep removes it.
    const dead = `dead-${Date.now()}`;
    await read('the dead node planted', (r) => r.zadd(nodes, 1, dead));
    await until(
      'the dead node swept',
      async () => (await read('the nodes', (r) => r.zscore(nodes, dead))) === null,
      30_000,
    ).catch(async (e: Error) => {
      // Say what the gateway was doing (its last log lines) and where the maintenance queue's
      // jobs are: whether the schedule was set again, and whether its jobs wait, are delayed or
      // are held active.
      const queue = await read('the maintenance queue', async (r) => {
        const all = await r.keys(`${g.prefix}bull:gw-maintenance:*`);
        // The jobs' own hashes, counted rather than listed.
        const jobs = all.filter((k) => /:repeat:sweep:\d+$/.test(k));
        const sizes: Record<string, string> = { 'job hashes': String(jobs.length) };
        for (const k of all.filter((k) => !jobs.includes(k)).sort()) {
          const type = await r.type(k);
          const size = SIZE_OF[type];
          const n = size ? await r.call(size, k) : 1;
          sizes[k.slice(`${g.prefix}bull:gw-maintenance:`.length)] = `${type} ${n}`;
        }
        return sizes;
      }).catch((x: Error) => x.message);
      throw new Error(
        `${e.message}; the gateway's last lines: ${JSON.stringify(g.logs.slice(-8))}; the maintenance queue's keys: ${JSON.stringify(queue)}`,
      );
    });
    assert.ok((await read('the scheduler', (r) => r.zcard(schedulerKey))) > 0, 'the schedule is set again');
    assert.equal(stderr, '', 'the gateway wrote to stderr');
  } finally {
    await g.stop();
    await own.remove();
  }
});
