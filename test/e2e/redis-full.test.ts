/**
 * A Redis that answers but refuses writes: `maxmemory` reached under `noeviction` (the setting
 * docs/OPERATIONS.md asks for). Every request that needs a write is answered `overloaded`
 * with retryAfter (HTTP 503), the node says once that Redis is down and is not ready, acks
 * still drain the outboxes (deletes are allowed), the BullMQ workers wait between fetches
 * instead of fetching in a loop, and once memory is freed nothing accepted is lost and nothing
 * refused was half done. The Redis is a private server of this file.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Queue } from 'bullmq';
import type { GatewayClient } from '../../client/client.ts';
import { QueueName } from '../../gateway/keys.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  assertNoErrorLines,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

const API_KEY = 'api-key-for-redis-full-7f3a';
let redis: OwnRedis;
let gw: GatewayProcess;
const closers: (() => Promise<unknown>)[] = [];

before(async () => {
  redis = await startOwnRedis(['--maxmemory-policy', 'noeviction']);
  gw = await startGateway({
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_REGISTER_PER_MINUTE: '1000',
    GW_DEFAULT_ROOM: '',
    // A sweep job due every 200 ms: the maintenance worker always has one to fetch.
    GW_SWEEP_INTERVAL_MS: '200',
    // The workers' failed fetches are logged at debug: counted below.
    GW_LOG_LEVEL: 'debug',
  });
});
after(async () => {
  for (const c of closers.reverse()) await c().catch(() => {});
  await redis?.with((r) => r.config('SET', 'maxmemory', '0')).catch(() => {});
  await gw?.stop();
  await redis?.remove();
});

function publish(target: object, eid: string): Promise<Response> {
  return postEvent(gw.httpPort, API_KEY, target, eid, 'full.test');
}

/** The wire error a request ended with (it must fail). */
async function refusal(what: string, p: Promise<unknown>): Promise<{ code?: string; retryAfter?: number }> {
  try {
    await within(what, p);
  } catch (e) {
    return e as { code?: string; retryAfter?: number };
  }
  assert.fail(`${what} succeeded while Redis refused writes`);
}

async function commandsProcessed(): Promise<number> {
  const info = await redis.with((r) => r.info('stats'));
  return Number(/total_commands_processed:(\d+)/.exec(info)?.[1]);
}

test('Redis at maxmemory: writes answered overloaded, acks still drain, the workers do not spin, and nothing is lost or half done once memory is freed', async (t) => {
  const device = await connected(gw.tcpUrl, { autoAck: true });
  closers.push(() => device.close());
  const deviceId = `full-${randomUUID().slice(0, 8)}`;
  const session = await signUp(device, { id: deviceId });
  const got = collect(device);
  // A device that holds an event unacked until Redis is full.
  const holder: GatewayClient = await connected(gw.tcpUrl, { autoAck: false });
  closers.push(() => holder.close());
  const holderId = `fullh-${randomUUID().slice(0, 8)}`;
  const held = await signUp(holder, { id: holderId });
  const heldEvents = collect(holder);
  assert.equal((await publish({ device: holderId }, 'e-held')).status, 202);
  await until('e-held at its device', () => heldEvents.some((e) => e.eid === 'e-held'));
  const other = await connected(gw.tcpUrl, { autoAck: true });
  closers.push(() => other.close());
  const otherSession = await signUp(other);
  const revoker = await connected(gw.tcpUrl, { autoAck: true });
  closers.push(() => revoker.close());
  const revokerSession = await signUp(revoker);
  const outbox = `${gw.prefix}{s:${held.sessionId}}:q`;
  assert.equal(await redis.with((r) => r.zcard(outbox)), 1, 'the held event waits in its outbox');

  const since = gw.logs.length;
  await redis.with((r) => r.config('SET', 'maxmemory', '1'));
  const c0 = await commandsProcessed();
  const t0 = Date.now();

  // Writes: answered overloaded with retryAfter.
  const res = await publish({ device: deviceId }, 'e-refused');
  assert.equal(res.status, 503, await res.clone().text());
  assert.ok(Number(res.headers.get('retry-after')) > 0, 'a Retry-After');
  assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'overloaded');
  const newcomer = await connected(gw.tcpUrl);
  closers.push(() => newcomer.close());
  const username = `u${randomUUID().replace(/-/g, '').slice(0, 12)}`;
  for (const [what, p] of [
    ['a send', () => other.request('send', { to: session.username, body: 'refused' })],
    ['a join', () => other.request('join', { room: '#full' })],
    // A session's end is one MULTI, refused whole (EXECABORT, its OOMs beside it).
    ['a logout', () => other.request('logout', {})],
    ['a revoke of its own session', () => revoker.request('revoke', { sessionId: revokerSession.sessionId })],
    ['a login', () => newcomer.request('login', { username: session.username, password: PASSWORD })],
    [
      'a registration',
      () => newcomer.request('register', { username, email: `${username}@example.com`, password: PASSWORD }),
    ],
  ] as const) {
    const e = await refusal(what, p());
    assert.equal(e.code, 'overloaded', `${what}: ${JSON.stringify(e)}`);
    assert.ok((e.retryAfter ?? 0) > 0, `${what}: a retryAfter`);
  }

  // An ack is a delete, which a full Redis still takes: the outbox drains.
  holder.ack(['e-held']);
  await until(
    'the acked event out of its outbox while Redis is full',
    async () => (await redis.with((r) => r.zcard(outbox))) === 0,
  );

  // The node says Redis is down, once, and is not ready.
  const down = await within(
    'the dependency down line',
    gw.waitForLog(
      (l) => gw.logs.indexOf(l) >= since && l.msg === 'dependency down' && l.dependency === 'redis',
      10000,
    ),
    11000,
  );
  assert.match(String(down.err), /^OOM/, 'it names the refusal');
  const ready = await fetchWithin(`http://127.0.0.1:${gw.httpPort}/health/ready`);
  assert.equal(ready.status, 503, `not ready: ${await ready.text()}`);

  // The workers (sweep, retries, gw-publish) rest between failed fetches: each fetches about
  // once a second. In a loop they made thousands of failed calls a second.
  await sleep(3000);
  const seconds = (Date.now() - t0) / 1000;
  const rate = ((await commandsProcessed()) - c0) / seconds;
  const failures = new Map<string, number>();
  for (const l of gw.logs.slice(since)) {
    if (l.msg === 'queue worker error')
      failures.set(String(l.queue), (failures.get(String(l.queue)) ?? 0) + 1);
  }
  t.diagnostic(
    `while full: ${rate.toFixed(0)} Redis commands/s over ${seconds.toFixed(1)} s; failed fetches ${JSON.stringify([...failures])}`,
  );
  for (const [queue, n] of failures) {
    assert.ok(n <= 2 * Math.ceil(seconds) + 2, `${queue}: ${n} failed fetches in ${seconds.toFixed(1)} s`);
  }
  assert.ok(rate < 500, `Redis took ${rate.toFixed(0)} commands a second from one idle node while full`);
  assertNoErrorLines(gw, since);

  // Memory freed: the node recovers, and what was refused was not half done.
  const back = gw.logs.length;
  await redis.with((r) => r.config('SET', 'maxmemory', '0'));
  await within(
    'the dependency recovered line',
    gw.waitForLog(
      (l) => gw.logs.indexOf(l) >= back && l.msg === 'dependency recovered' && l.dependency === 'redis',
      10000,
    ),
    11000,
  );
  assert.equal((await publish({ device: deviceId }, 'e-after')).status, 202);
  await until('e-after at its device', () => got.some((e) => e.eid === 'e-after'));
  assert.ok(!got.some((e) => e.eid === 'e-refused'), 'the refused publish was not applied');
  assert.ok(
    !got.some((e) => (e.data as { body?: string })?.body === 'refused'),
    'the refused send was not applied',
  );
  // The refused logout left the session whole, and the device's retry on its connection ends it.
  const otherKey = `${gw.prefix}{s:${otherSession.sessionId}}:sess`;
  assert.equal(await redis.with((r) => r.exists(otherKey)), 1, 'the session of the refused logout lives');
  await within('the logout tried again', other.request('logout', {}));
  assert.equal(await redis.with((r) => r.exists(otherKey)), 0, 'ended by the retry');
  const revokerKey = `${gw.prefix}{s:${revokerSession.sessionId}}:sess`;
  assert.equal(await redis.with((r) => r.exists(revokerKey)), 1, 'the session of the refused revoke lives');
  await within('the revoke tried again', revoker.request('revoke', { sessionId: revokerSession.sessionId }));
  assert.equal(await redis.with((r) => r.exists(revokerKey)), 0, 'ended by the retry');
  await assert.rejects(
    within('a request after the revoke', revoker.request('sessions', {})),
    (e: { code?: string }) => e.code === 'unauthenticated',
    'the connection is unauthenticated once its revoke is done',
  );
  await within(
    'the refused registration made again',
    newcomer.request('register', { username, email: `${username}@example.com`, password: PASSWORD }),
  );
  const m = await scrapeMetrics(gw.metricsPort);
  assert.equal(
    m.value('gateway_queue_worker_restarts_total{queue="gw-maintenance"}'),
    0,
    'no worker replaced',
  );
});

test('Redis full past GW_PRESENCE_STALE_MS under two nodes: once it takes writes again no node is swept as dead (each sweeper was silent too), no room hears room.left, and events still arrive', async () => {
  const deployment = deploymentEnv();
  const env = {
    ...deployment,
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    // Beats every 3 s (a fifth of it, the default), three times as long as a worker resting
    // after a refused fetch waits to fetch again (FAULT_PAUSE_MS): the first sweep after the
    // refusals mostly comes before a node's first beat, as it did in a fleet run
    // (bench/RESULTS.md).
    GW_PRESENCE_STALE_MS: '15000',
    GW_SWEEP_INTERVAL_MS: '200',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
  };
  const nodes: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  try {
    nodes.push(await startGateway(env), await startGateway(env));
    const [a, b] = nodes;
    const device = await connected(a.tcpUrl, { autoAck: true });
    open.push(device);
    const deviceId = `fullst-${randomUUID().slice(0, 8)}`;
    await signUp(device, { id: deviceId });
    const got = collect(device);
    await device.request('join', { room: '#stall' });
    const member = await connected(b.tcpUrl, { autoAck: true });
    open.push(member);
    await signUp(member);
    const heard = collect(member);
    await member.request('join', { room: '#stall' });
    const marks = nodes.map((g) => g.logs.length);
    await redis.with((r) => r.config('SET', 'maxmemory', '1'));
    // Every beat refused for longer than the stale time.
    await sleep(16000);
    await redis.with((r) => r.config('SET', 'maxmemory', '0'));
    // The sweep's schedule set again at once, as a node does every fifth beat (the jobs fetched
    // while Redis refused writes could not schedule their next): the first sweep comes within a
    // worker's rest, before most nodes' first beat.
    const schedule = new Queue(QueueName.maintenance, {
      connection: { host: '127.0.0.1', port: redis.port },
      prefix: `${deployment.GW_REDIS_PREFIX}bull`,
    });
    await schedule.upsertJobScheduler('sweep', { every: 200 }, { name: 'sweep' });
    await schedule.close();
    // Each node beats again and sees its silence; a sweep that judged by the beats' age alone
    // removed both nodes' sessions meanwhile.
    for (const [i, g] of nodes.entries()) {
      await within(
        `node ${i + 1}'s silence line`,
        g.waitForLog(
          (l) =>
            g.logs.indexOf(l) >= marks[i] && String(l.msg).startsWith('this node was silent long enough'),
          10000,
        ),
        11000,
      );
    }
    // Time for any sweep to run and judge: the sweeper that beat again judges from a stale time
    // after its silence (within which every live node beats).
    await sleep(4000);
    const sweeps = nodes.flatMap((g, i) =>
      g.logs.slice(marks[i]).filter((l) => l.msg === 'presence sweep removed a dead node'),
    );
    assert.deepEqual(sweeps, [], 'no live node swept');
    assert.ok(!heard.some((e) => e.name === 'room.left'), 'no room.left heard');
    const eid = `fullst-${randomUUID().slice(0, 8)}`;
    const res = await postEvent(b.httpPort, API_KEY, { device: deviceId }, eid, 'full.test');
    assert.equal(res.status, 202, await res.text());
    await until(`${eid} at the device`, () => got.some((e) => e.eid === eid));
  } finally {
    for (const c of open) c.destroy();
    await redis.with((r) => r.config('SET', 'maxmemory', '0')).catch(() => {});
    await within('the nodes stopped', Promise.all(nodes.map((g) => g.stop())));
    await dropDeployment(deployment);
  }
});

test('a Redis that evicts keys at maxmemory is named in an error line at start and after a reconnect; one under noeviction is not', async () => {
  assert.equal(
    gw.logs.filter((l) => l.code === 'redis_eviction_policy').length,
    0,
    'no eviction line for a noeviction server',
  );
  const evicting = await startOwnRedis(['--maxmemory-policy', 'allkeys-lru']);
  const deployment = deploymentEnv();
  const g = await startGateway({ ...deployment, REDIS_URL: evicting.url });
  try {
    const line = (since: number) =>
      g.waitForLog((l) => g.logs.indexOf(l) >= since && l.code === 'redis_eviction_policy', 15_000);
    const first = await within('the eviction line at start', line(0), 16_000);
    assert.equal(first.policy, 'allkeys-lru');
    assert.equal(first.level, 50, 'an error line');
    // A failover to a server set up another way: the node's connections are cut and come back.
    await evicting.with((r) => r.call('CONFIG', 'SET', 'maxmemory-policy', 'volatile-lru'));
    const since = g.logs.length;
    await evicting.with((r) => r.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes'));
    const again = await within('the eviction line after the reconnect', line(since), 16_000);
    assert.equal(again.policy, 'volatile-lru');
  } finally {
    await g.stop();
    await evicting.remove();
    await dropDeployment(deployment);
  }
});
