/**
 * Reports owed by a node that dies between removing events and reporting them. Node A's every
 * Redis connection goes through a proxy that lets no more of a connection's commands through
 * from the report's queueing on (the process killed before its write left), and A is then
 * killed with SIGKILL: the removal ran, the report never left. Node B, of the same deployment,
 * finds the receipt the removal wrote in the owed reports (Keys.owedReports) a stale time later
 * and queues the report from its sweep, once.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { pack } from 'msgpackr';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { QueueReader } from '../helpers/queues.ts';
import { type RedisProxy, startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'test-api-key-0123456789';
const SHARED = {
  GW_API_KEY: API_KEY,
  GW_RETRY_BASE_MS: '100',
  GW_RETRY_MAX_MS: '300',
  GW_SWEEP_INTERVAL_MS: '300',
  GW_PRESENCE_STALE_MS: '1500',
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
};

let deployment: DeploymentEnv;
let b: GatewayProcess;
let q: QueueReader;

before(async () => {
  deployment = deploymentEnv();
  // B sweeps: its Redis is the shared one, directly.
  b = await startGateway({ ...SHARED, ...deployment });
  q = new QueueReader(deployment.GW_REDIS_PREFIX);
});

after(async () => {
  await q.close();
  await b.stop();
  await dropDeployment(deployment);
});

/**
 * Node A behind a proxy, with a device of its own (acking by hand) and a way to publish to it;
 * `run` arms the proxy and kills A. A is stopped and the proxy closed after, whatever happened.
 */
async function withDyingNode(
  env: Record<string, string>,
  run: (t: {
    a: GatewayProcess;
    proxy: RedisProxy;
    c: GatewayClient;
    got: EventMsg[];
    post: (event: Record<string, unknown>) => Promise<void>;
  }) => Promise<void>,
): Promise<void> {
  const shared = new URL(REDIS_URL);
  const proxy = await startRedisProxy({ host: shared.hostname, port: Number(shared.port || 6379) });
  const a = await startGateway({ ...SHARED, ...deployment, REDIS_URL: proxy.url, ...env });
  try {
    const c = await connected(a.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    const post = async (event: Record<string, unknown>) => {
      const res = await postEvents(a.httpPort, API_KEY, [{ target: { session: s.sessionId }, ...event }]);
      assert.equal(res.status, 202, await res.text());
    };
    await run({ a, proxy, c, got, post });
    c.destroy();
  } finally {
    if (a.proc.exitCode === null && a.proc.signalCode === null) await a.stop();
    await proxy.close();
  }
}

/** Kills `a` with SIGKILL once `seen` resolves (the proxy stopped its connection there). */
async function killAt(a: GatewayProcess, seen: Promise<void>, what: string): Promise<void> {
  await within(what, seen, 20_000);
  a.proc.kill('SIGKILL');
  await within('node A killed', a.exited, 10_000);
}

/** B's log lines saying its sweep queued owed reports, and the receipts they counted. */
const sweptReceipts = () =>
  b.logs
    .filter((l) => l.msg === 'presence sweep queued the reports of removed events a node left owed')
    .reduce((n, l) => n + Number(l.receipts), 0);

async function assertNothingOwed(): Promise<void> {
  const r = redisClient();
  try {
    assert.deepEqual(
      await r.zrange(`${deployment.GW_REDIS_PREFIX}owedreports`, '0', '-1'),
      [],
      'no report left owed',
    );
  } finally {
    r.disconnect();
  }
}

test('an ack of a receipt: true event whose node dies before it queues delivery.acked: the sweep of another node queues it, once', async () => {
  const before = sweptReceipts();
  await withDyingNode({ GW_ACK_TIMEOUT_MS: '20000' }, async ({ a, proxy, c, got, post }) => {
    const eid = `acked-${randomUUID()}`;
    await post({ eid, name: 'r', data: 1, receipt: true });
    await until('the event at the device', () => got.some((e) => e.eid === eid), 10_000);
    // The report's queueing (a BullMQ add naming the report and the eid); the pump call that
    // applies the ack names the eid but not the report.
    const stopped = proxy.stopAtCommand((cmd) => cmd.includes(eid) && cmd.includes('delivery.acked'));
    const ackedAt = Date.now();
    c.ack([eid]);
    await killAt(a, stopped, "node A's queueing of delivery.acked");
    const killedAt = Date.now();
    const acked = await q.backendEvent('delivery.acked', eid, 30_000);
    assert.equal(acked.data.eid, eid);
    const ts = Number(acked.data.ts);
    assert.ok(ts >= ackedAt && ts <= killedAt, `the time of the ack's removal (${ts}), not of the sweep`);
    await until("B's line for the owed receipt", () => sweptReceipts() > before, 10_000);
    assert.equal(sweptReceipts() - before, 1, 'one receipt');
    const jobs = await q.waitFor('gw-backend', (js) => js.some((j) => j.data.eid === eid), 5_000);
    assert.equal(
      jobs.filter((j) => j.name === 'delivery.acked' && j.data.eid === eid).length,
      1,
      'reported once',
    );
    await assertNothingOwed();
  });
});

test('a take to the dead letters whose node dies before it queues them: the sweep of another node dead-letters the event and reports delivery.failed', async () => {
  const before = sweptReceipts();
  await withDyingNode({ GW_ACK_TIMEOUT_MS: '300', GW_MAX_ATTEMPTS: '2' }, async ({ a, proxy, got, post }) => {
    const eid = `doomed-${randomUUID()}`;
    // The dead letter's queueing (a BullMQ add on the dead-letter queue naming the eid); the
    // take before it names the eid but no queue.
    const stopped = proxy.stopAtCommand((cmd) => cmd.includes(eid) && cmd.includes('gw-dead-letters'));
    await post({ eid, name: 'doomed', data: 'x' });
    await killAt(a, stopped, "node A's queueing of the dead letter");
    assert.equal(got.filter((e) => e.eid === eid).length, 2, 'both attempts sent before the take');
    const failed = await q.backendEvent('delivery.failed', eid, 30_000);
    assert.equal(failed.data.reason, 'max_attempts');
    assert.equal(failed.data.attempts, 2);
    const dead = await q.waitFor('gw-dead-letters', (js) => js.some((j) => j.data.event.eid === eid), 10_000);
    assert.equal(dead.filter((j) => j.data.event.eid === eid).length, 1, 'dead-lettered once');
    await until("B's line for the owed receipt", () => sweptReceipts() > before, 10_000);
    await assertNothingOwed();
  });
});

test('a publish that drops the oldest event of a full outbox, whose node dies before it queues delivery.dropped: the sweep of another node queues it', async () => {
  const before = sweptReceipts();
  await withDyingNode(
    { GW_OUTBOX_MAX: '2', GW_OUTBOX_POLICY: 'drop-oldest', GW_ACK_TIMEOUT_MS: '20000' },
    async ({ a, proxy, c, got, post }) => {
      const oldest = `oldest-${randomUUID()}`;
      await post({ eid: oldest, name: 'o', data: 1 });
      await post({ eid: `next-${randomUUID()}`, name: 'o', data: 2 });
      await until('both events at the device', () => got.length === 2, 10_000);
      const stopped = proxy.stopAtCommand((cmd) => cmd.includes(oldest) && cmd.includes('delivery.dropped'));
      // Not answered: its node dies before it reports the drop, which its answer waits for.
      const third = post({ eid: `third-${randomUUID()}`, name: 'o', data: 3 }).catch(() => {});
      await killAt(a, stopped, "node A's queueing of delivery.dropped");
      await third;
      c.destroy();
      const dropped = await q.backendEvent('delivery.dropped', oldest, 30_000);
      assert.equal(dropped.data.reason, 'outbox_full');
      await until("B's line for the owed receipt", () => sweptReceipts() > before, 10_000);
      await assertNothingOwed();
    },
  );
});

test('an owed receipt the sweep cannot read is logged and no longer owed, and holds up none of the others', async () => {
  const prefix = deployment.GW_REDIS_PREFIX;
  const sid = randomUUID();
  const eid = `kept-${randomUUID()}`;
  // A retry's receipt of an event it removed as expired, as resend.lua keeps it, owed since long
  // ago; and a pump's receipt whose bytes do not decode, owed longer still.
  const good = `${prefix}rsrcpt:${randomUUID()}:${sid}`;
  const garbled = `${prefix}pumprcpt:${randomUUID()}:1:0`;
  const r = redisClient();
  try {
    await r.set(good, pack({ eid, name: 'kept', data: 1, ts: Date.now() }));
    await r.set(garbled, Buffer.from([0xc1]));
    await r.zadd(`${prefix}owedreports`, '1', garbled, '2', good);
    const expired = await q.backendEvent('delivery.expired', eid, 30_000);
    assert.equal(expired.data.sessionId, sid);
    assert.equal(expired.data.ts, 2, 'reported with the time the receipt was written');
    const line = await b.waitForLog(
      (l) =>
        l.msg === 'an owed receipt could not be read: left in Redis, no longer owed' && l.receipt === garbled,
      10_000,
      'the unreadable receipt named',
    );
    assert.equal(line.level, 50, 'error');
    assert.equal(await r.exists(garbled), 1, 'left for an operator');
    assert.equal(await r.exists(good), 0, 'the reported one removed');
    await assertNothingOwed();
  } finally {
    await r.del(garbled);
    r.disconnect();
  }
});
