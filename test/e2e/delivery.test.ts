/**
 * At-least-once delivery end to end: real gateway processes, Redis, PostgreSQL and BullMQ.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import { connectPublisher, type GatewayPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { ProtocolError, unpack } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { fetchWithin, nextEvent, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { QueueReader } from '../helpers/queues.ts';
import { type RedisProxy, startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'test-api-key-0123456789';
const FAST = {
  GW_API_KEY: API_KEY,
  GW_ACK_TIMEOUT_MS: '300',
  GW_RETRY_BASE_MS: '100',
  GW_RETRY_MAX_MS: '300',
  GW_MAX_ATTEMPTS: '3',
  GW_SWEEP_INTERVAL_MS: '300',
  GW_PRESENCE_STALE_MS: '1500',
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
};
const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

let gw: GatewayProcess;
let reader: QueueReader;
let pub: GatewayPublisher;

before(async () => {
  gw = await startGateway(FAST);
  reader = new QueueReader(gw.prefix);
  pub = await connectPublisher({ redisUrl: REDIS_URL, prefix: gw.prefix });
});
after(async () => {
  await pub.close();
  await reader.close();
  await gw.stop();
});

/** Collects a client's events. */
async function until(
  pred: () => boolean | Promise<boolean>,
  timeoutMs = 10000,
  what = 'condition',
): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`${what} not met within ${timeoutMs} ms`);
    await wait(20);
  }
}

/**
 * Closes a client whose session is bound on `g` and waits until the node let the session go
 * (its node key released): what is published after is stored for a resume, not sent to the
 * closed connection. A fixed wait raced the node's reading of the close.
 */
async function disconnect(g: GatewayProcess, c: GatewayClient, sessionId: string): Promise<void> {
  const r = redisClient();
  const node = `${g.prefix}{s:${sessionId}}:node`;
  try {
    await until(async () => (await r.exists(node)) === 1, 10000, 'the session bound to the node');
    c.destroy();
    await until(async () => (await r.exists(node)) === 0, 10000, 'the node to let the closed session go');
  } finally {
    r.disconnect();
  }
}

/**
 * Publishes a marker event to a session and waits for it: a session's events arrive in publish
 * order, so nothing published before it can still come after (a fixed wait could end before a
 * late duplicate or a wrongly stored event arrived).
 */
/**
 * A gateway whose Redis is behind a proxy that can hold a reply past the node's timeout (300
 * ms), and a device on it (acking by hand) signed up: `run` gets them, what the device receives,
 * and `post`, which publishes one event to its session through the events API.
 */
async function withSlowReplies(
  env: Record<string, string>,
  run: (t: {
    g: GatewayProcess;
    q: QueueReader;
    proxy: RedisProxy;
    c: GatewayClient;
    s: Session;
    got: EventMsg[];
    post: (event: Record<string, unknown>) => Promise<void>;
  }) => Promise<void>,
): Promise<void> {
  const shared = new URL(REDIS_URL);
  const proxy = await startRedisProxy({ host: shared.hostname, port: Number(shared.port || 6379) });
  // A stale time well past the node's own read of a lost reply's receipt (its next sweep tick):
  // the cluster-wide sweep would otherwise queue the reports of a receipt owed longer than it
  // (FAST's 1.5 s; a check pair's load delayed the node's read that long), and these cases are
  // about the node's read (test/e2e/owed-reports.test.ts is about the sweep's).
  const g = await startGateway({
    ...FAST,
    GW_PRESENCE_STALE_MS: '15000',
    REDIS_URL: proxy.url,
    GW_REDIS_TIMEOUT_MS: '300',
    ...env,
  });
  const q = new QueueReader(g.prefix);
  try {
    const c = await connected(g.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    const post = async (event: Record<string, unknown>) => {
      const res = await postEvents(g.httpPort, API_KEY, [{ target: { session: s.sessionId }, ...event }]);
      assert.equal(res.status, 202, await res.text());
    };
    await run({ g, q, proxy, c, s, got, post });
    c.destroy();
  } finally {
    await q.close();
    await g.stop();
    await proxy.close();
  }
}

async function marker(sessionId: string, got: EventMsg[]): Promise<void> {
  const { eid } = await pub.publish({ session: sessionId }, { name: 'marker', data: null });
  await until(() => got.some((e) => e.eid === eid), 10000, 'the marker event');
}

function httpPublish(g: GatewayProcess, body: unknown, key = API_KEY) {
  return fetchWithin(`http://127.0.0.1:${g.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify(body),
  });
}

describe('qos 1 on one node', () => {
  test('first deliveries arrive in publish order; acks empty the outbox', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const got = collect(c);
    const eids: string[] = [];
    for (let i = 0; i < 60; i++)
      eids.push((await pub.publish({ session: s.sessionId }, { name: 'n', data: { i } })).eid);
    await until(() => got.length >= 60, 10000, '60 events');
    assert.deepEqual(
      got.map((e) => e.eid),
      eids,
    );
    assert.ok(
      got.every((e) => e.qos === 1 && e.attempt === 1 && e.name === 'n'),
      "got.every((e) => e.qos === 1 && e.attempt === 1 && e.name === 'n')",
    );
    assert.deepEqual(
      got.map((e) => (e.data as { i: number }).i),
      [...Array(60).keys()],
    );
    const r = redisClient();
    await until(
      async () => (await r.zcard(`${gw.prefix}{s:${s.sessionId}}:q`)) === 0,
      10000,
      'acked events to leave the outbox',
    );
    r.disconnect();
    c.destroy();
  });

  test('publishes of one tick (one script call) each behave as if alone', async () => {
    const a = await connected(gw.tcpUrl);
    const b = await connected(gw.wsUrl);
    const sa = await signUp(a);
    const sb = await signUp(b);
    const gotA = collect(a);
    const gotB = collect(b);
    const dup = `dup-${randomUUID()}`;
    // All started in one tick: the publisher sends them to Redis in one call.
    const settled = await Promise.allSettled([
      ...Array.from({ length: 40 }, (_, i) =>
        pub.publish({ session: i % 2 ? sb.sessionId : sa.sessionId }, { name: 'batch', data: { i } }),
      ),
      pub.publish({ session: sa.sessionId }, { name: 'batch', data: { i: 'dup-1' }, eid: dup }),
      pub.publish({ session: sa.sessionId }, { name: 'batch', data: { i: 'dup-2' }, eid: dup }),
      pub.publish({ session: randomUUID() }, { name: 'batch', data: { i: 'nobody' } }),
    ]);
    const failed = settled.filter((r) => r.status === 'rejected');
    assert.equal(failed.length, 1, 'only the publish to a session that does not exist fails');
    assert.ok(
      (failed[0] as PromiseRejectedResult).reason instanceof ProtocolError &&
        (failed[0] as PromiseRejectedResult).reason.code === 'not_found',
      "(failed[0] as PromiseRejectedResult).reason instanceof ProtocolError && (failed[0] as PromiseRejectedResult).reason.code === 'not_found'",
    );
    const even = [...Array(20).keys()].map((k) => 2 * k);
    await until(() => gotA.length >= 21 && gotB.length >= 20, 10000, 'both sessions served');
    await Promise.all([marker(sa.sessionId, gotA), marker(sb.sessionId, gotB)]);
    assert.deepEqual(
      gotA.filter((e) => e.name === 'batch').map((e) => (e.data as { i: number | string }).i),
      [...even, 'dup-1'],
      'session A: its events in publish order; the same eid stored once, the first one',
    );
    assert.deepEqual(
      gotB.filter((e) => e.name === 'batch').map((e) => (e.data as { i: number }).i),
      even.map((k) => k + 1),
    );
    a.destroy();
    b.destroy();
  });

  test('an unacked event comes again with the same eid and a higher attempt; stray acks drop nothing', async () => {
    const c = await connected(gw.wsUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    // A redelivery is acked as it arrives (twice: the duplicate is ignored). The attempt after it
    // is sent unless the ack reaches the node within the ack timeout (300 ms), which a busy
    // machine does not promise: a third attempt before the ack applied is allowed, none after.
    c.on('event', (e: EventMsg) => {
      if (e.attempt! >= 2) c.ack([e.eid, e.eid]);
    });
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'cfg', data: 1 });
    await until(() => got.length >= 1);
    // stray acks are ignored and never remove another event
    c.ack([randomUUID(), randomUUID()]);
    await until(() => got.length >= 2, 10000, 'redelivery');
    assert.equal(got[1].eid, eid);
    assert.equal(got[0].attempt, 1);
    assert.equal(got[1].attempt, 2);
    // The ack applied (the event gone from the outbox: no retry can find it any more), a round
    // trip on the connection after what the node sent before that, then every retry job of the
    // event run, and another round trip after what they made the node send.
    const r = redisClient();
    try {
      await until(
        async () => (await r.zcard(`${gw.prefix}{s:${s.sessionId}}:q`)) === 0,
        10000,
        'the ack applied to the outbox',
      );
    } finally {
      r.disconnect();
    }
    await c.ping();
    const sent = got.length;
    const pending = async () =>
      (await reader.queue('gw-retry').getJobs(['waiting', 'active', 'delayed', 'prioritized'])).filter(
        (j) => j?.data.eid === eid,
      );
    await until(async () => (await pending()).length === 0, 10000, 'the retry jobs of the event to run');
    await c.ping();
    assert.deepEqual(
      got.map((e) => [e.eid, e.attempt]),
      Array.from({ length: sent }, (_, i) => [eid, i + 1]),
      'one event, its attempts in order',
    );
    assert.ok(sent <= 3, `${sent} attempts`);
    assert.equal(got.length, sent, 'no more attempts after the ack was applied');
    c.destroy();
  });

  test('a retry whose job cannot reach the node (no node key) is sent by the node itself', async () => {
    const c = await connected(gw.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'cfg', data: 1 });
    await until(() => got.length >= 1, 5000, 'the first attempt');
    // The key naming the session's node is lost (a Redis that lost writes, an operator): the
    // retry job finds no node to tell, and the connection stays open and holds the event.
    const r = redisClient();
    try {
      await r.del(`${gw.prefix}{s:${s.sessionId}}:node`);
    } finally {
      r.disconnect();
    }
    await until(() => got.length >= 2, 10000, 'the second attempt');
    assert.equal(got[1].eid, eid);
    assert.equal(got[1].attempt, 2);
    c.ack([eid]);
    c.destroy();
  });

  test('a session taken over by its own second connection on the node, then closed, leaves the node delivering to none', async () => {
    // The node's count of the sessions it delivers to, by user: it must come back to where it
    // was once both connections are gone (a replaced delivery state stayed in it, holding its
    // closed connection, for good).
    const g = await startGateway(FAST);
    try {
      const bound = async () => (await scrapeMetrics(g.metricsPort)).value('gateway_delivery_sessions');
      const first = await connected(g.tcpUrl);
      const s = await signUp(first);
      await until(async () => (await bound()) === 1, 10000, 'the session delivered to');
      const kicked = nextEvent<{ code: string }>(first, 'kick', 'the first connection kicked');
      const second = await connected(g.tcpUrl);
      await second.request('resume', { token: s.token });
      assert.equal((await kicked).code, 'session_takeover');
      assert.equal(await bound(), 1, 'one session, on its second connection');
      await second.close();
      await first.close().catch(() => {});
      await until(async () => (await bound()) === 0, 10000, 'no session delivered to by the node');
    } finally {
      await g.stop();
    }
  });

  test("a take to the dead letters whose reply is lost (Redis slow past the node's timeout): the event is dead-lettered and reported from the take's receipt, once", async () => {
    // The proxy holds the take's reply 1.5 s; the node waits 300 ms.
    await withSlowReplies({}, async ({ g, q, proxy, c, got, post }) => {
      // The take's mode ("kept", or "some" before the receipts) is an argument of its own.
      const held = proxy.holdReplyOf(/\$4\r\n(?:kept|some)\r\n/, 1500);
      const eid = `doomed-${randomUUID()}`;
      await post({ eid, name: 'doomed', data: 'x' });
      await within('the take of the event to the dead letters', held, 20_000);
      const f = await q.backendEvent('delivery.failed', eid, 20_000);
      assert.equal(f.data.reason, 'max_attempts');
      assert.equal(f.data.attempts, 3);
      const dead = await q.waitFor('gw-dead-letters', (j) => j.some((x) => x.data.event.eid === eid), 10_000);
      assert.equal(dead.filter((x) => x.data.event.eid === eid).length, 1, 'dead-lettered once');
      const receiptLines = () =>
        g.logs.filter((l) => /dead letters taken by a take whose reply was lost/.test(String(l.msg))).length;
      // Logged before the dead letter is queued, the line can still reach the test after it.
      await until(() => receiptLines() >= 1, 10_000, 'the receipt line');
      assert.equal(receiptLines(), 1, 'read from its receipt');
      await c.ping();
      assert.equal(got.length, 3, 'not delivered again');
    });
  });

  test("an ack whose pump call's reply is lost (Redis slow past the node's timeout): delivery.acked is reported from the call's receipt, once", async () => {
    // No retry of the event before the test acks it (its job would name the eid).
    await withSlowReplies({ GW_ACK_TIMEOUT_MS: '20000' }, async ({ g, q, proxy, c, s, got, post }) => {
      const eid = `acked-${randomUUID()}`;
      await post({ eid, name: 'r', data: 1, receipt: true });
      await until(() => got.some((e) => e.eid === eid), 10_000, 'the event at the device');
      // The next command naming the eid: the pump call that applies the ack (its sessions and
      // acked eids are one MessagePack argument).
      const held = proxy.holdReplyOf(new RegExp(eid), 1500);
      c.ack([eid]);
      await within("the ack's pump call", held, 20_000);
      const acked = await q.backendEvent('delivery.acked', eid, 20_000);
      assert.equal(acked.data.sessionId, s.sessionId);
      const receiptLines = () =>
        g.logs.filter((l) =>
          /an outbox pump whose reply was lost, reported from its receipt/.test(String(l.msg)),
        ).length;
      await until(() => receiptLines() >= 1, 10_000, 'the receipt line');
      assert.equal(receiptLines(), 1, 'read from its receipt, once');
      const reports = (await q.jobs('gw-backend')).filter(
        (j) => j.name === 'delivery.acked' && j.data.eid === eid,
      );
      assert.equal(reports.length, 1, 'reported once');
      await c.ping();
      assert.equal(got.filter((e) => e.eid === eid).length, 1, 'not delivered again');
    });
  });

  test("events a pump call took, its reply lost (Redis slow past the node's timeout), come as the attempt that call made: the lost calls count none", async () => {
    // A window of one: the second and third events wait in the outbox, and the ack of the first
    // is applied by the call that takes the second (and the second's ack by the one that takes
    // the third). No retry job before the test acks (its resend would count an attempt).
    await withSlowReplies(
      { GW_ACK_TIMEOUT_MS: '20000', GW_MAX_INFLIGHT: '1', GW_MAX_ATTEMPTS: '10' },
      async ({ proxy, c, got, post }) => {
        const tag = randomUUID();
        const eids = [0, 1, 2].map((i) => `take-${i}-${tag}`);
        for (const eid of eids) await post({ eid, name: 'w', data: 1 });
        await until(() => got.some((e) => e.eid === eids[0]), 10_000, 'the first event at the device');
        // The call naming the first eid (its ack) takes the second: its reply is held 1.5 s past
        // the node's 300 ms timeout, and the calls after it on that connection wait behind it,
        // so the pump's retry in 500 ms is lost too.
        const held = proxy.holdReplyOf(new RegExp(eids[0]), 1500);
        c.ack([eids[0]]);
        await within("the first ack's pump call", held, 20_000);
        await until(() => got.some((e) => e.eid === eids[1]), 20_000, 'the second event at the device');
        c.ack([eids[1]]);
        await until(() => got.some((e) => e.eid === eids[2]), 20_000, 'the third event at the device');
        c.ack([eids[2]]);
        await c.ping();
        assert.deepEqual(
          got.filter((e) => eids.includes(e.eid)).map((e) => [e.eid, e.attempt]),
          eids.map((eid) => [eid, 1]),
          'each event once, as its first attempt',
        );
      },
    );
  });

  test("a retry's resend whose reply is lost (Redis slow past the node's timeout) counts no attempt: the next one sends the attempt it took", async () => {
    await withSlowReplies(
      { GW_ACK_TIMEOUT_MS: '1000', GW_MAX_ATTEMPTS: '10' },
      async ({ proxy, c, got, post }) => {
        const eid = `resent-${randomUUID()}`;
        await post({ eid, name: 'r', data: 1 });
        await until(() => got.some((e) => e.eid === eid), 10_000, 'the first attempt at the device');
        // The resend of the retry after the missed ack: the only command naming the eid and a
        // retry's receipt. Held 1.5 s against the node's 300 ms timeout; the node tries again
        // a second after the failure.
        const held = proxy.holdReplyOf((cmd) => cmd.includes(eid) && cmd.includes('rsrcpt:'), 1500);
        await within('the first resend', held, 20_000);
        await until(() => got.some((e) => e.eid === eid && e.attempt! >= 2), 20_000, 'a second attempt');
        c.ack([eid]);
        await c.ping();
        assert.deepEqual(
          got.filter((e) => e.eid === eid).map((e) => e.attempt),
          [1, 2],
          'the first attempt, then the second: the lost resend counted none',
        );
      },
    );
  });

  test("a retry that finds its event expired, its reply lost (Redis slow past the node's timeout): delivery.expired is reported from the retry's receipt", async () => {
    // Retried until it expires: more attempts than fit in its ttl.
    await withSlowReplies({ GW_MAX_ATTEMPTS: '100' }, async ({ g, q, proxy, c, s, got, post }) => {
      const eid = `short-${randomUUID()}`;
      const TTL = 1500;
      await post({ eid, name: 'short', data: 1, ttl: TTL });
      // Expired at the latest here (the gateway stamped it before it answered).
      const expiredBy = Date.now() + TTL;
      // The expiry sweep is not to find it first: only a retry's take does.
      const r = redisClient();
      try {
        assert.equal(
          await r.zrem(`${g.prefix}expiries`, `${s.sessionId}|${eid}`),
          1,
          'indexed for the sweep',
        );
      } finally {
        r.disconnect();
      }
      await until(() => got.some((e) => e.eid === eid), 10_000, 'the first attempt');
      // The first retry's take (resend.lua: its eid, then its clock) past the expiry.
      const take = new RegExp(`\\$${eid.length}\\r\\n${eid}\\r\\n\\$13\\r\\n(\\d{13})\\r\\n`);
      const held = proxy.holdReplyOf((command) => Number(take.exec(command)?.[1] ?? 0) >= expiredBy, 1500);
      await within('a retry of the event past its expiry', held, 20_000);
      const expired = await q.backendEvent('delivery.expired', eid, 20_000);
      assert.equal(expired.data.sessionId, s.sessionId);
      const receiptLines = () =>
        g.logs.filter((l) => /a retry removed as expired, its reply lost/.test(String(l.msg))).length;
      await until(() => receiptLines() >= 1, 10_000, 'the receipt line');
      assert.equal(receiptLines(), 1, 'read from its receipt, once');
      const sent = got.filter((e) => e.eid === eid).length;
      await c.ping();
      await wait(1000); // a retry would come within it (GW_RETRY_MAX_MS 300)
      await c.ping();
      assert.equal(got.filter((e) => e.eid === eid).length, sent, 'not sent after it expired');
    });
  });

  test('after the attempt limit: dead letter and delivery.failed on the back-end queue', async () => {
    const c = await connected(gw.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'doomed', data: 'x' });
    await until(() => got.length >= 3, 8000, 'three attempts');
    assert.deepEqual(
      got.map((e) => e.attempt),
      [1, 2, 3],
    );
    const f = await reader.backendEvent('delivery.failed', eid);
    assert.equal(f.data.sessionId, s.sessionId);
    assert.equal(f.data.attempts, 3);
    assert.equal(f.data.reason, 'max_attempts');
    const dead = await reader.waitFor('gw-dead-letters', (j) => j.some((x) => x.data.event.eid === eid));
    assert.equal(dead.find((x) => x.data.event.eid === eid)!.data.event.name, 'doomed');
    const retries = await reader.jobs('gw-retry');
    assert.ok(
      retries.some((j) => j.data.eid === eid),
      'retries are BullMQ jobs',
    );
    // Every retry job of the event ran, then a round trip after what they made the node send.
    await until(
      async () =>
        (await reader.queue('gw-retry').getJobs(['waiting', 'active', 'delayed', 'prioritized'])).every(
          (j) => j?.data.eid !== eid,
        ),
      10000,
      'the retry jobs of the event to run',
    );
    await c.ping();
    assert.equal(got.length, 3, 'not delivered again');
    c.destroy();
  });

  test('receipt: true reports delivery.acked', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'r', data: null, receipt: true });
    assert.equal((await reader.backendEvent('delivery.acked', eid, 5000)).data.sessionId, s.sessionId);
    c.destroy();
  });

  test('disconnect, publish, resume: everything unacked arrives in order', async () => {
    const c = await connected(gw.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got1 = collect(c);
    const first = await pub.publish({ session: s.sessionId }, { name: 'm', data: 0 });
    await until(() => got1.length === 1);
    c.destroy(); // never acked
    await wait(100);
    const eids = [first.eid];
    for (let i = 1; i <= 20; i++)
      eids.push((await pub.publish({ session: s.sessionId }, { name: 'm', data: i })).eid);
    const d = await connected(gw.wsUrl);
    const got = collect(d);
    await d.request('resume', { token: s.token });
    await until(() => got.length >= 21, 5000, '21 events');
    assert.deepEqual(
      got.slice(0, 21).map((e) => e.eid),
      eids,
    );
    assert.ok(got[0].attempt! >= 2, 'the one sent before counts as an attempt');
    d.destroy();
  });

  test('ttl: an event past its ttl is not delivered and is reported delivery.expired', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    await disconnect(gw, c, s.sessionId);
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'short', data: 1, ttl: 200 });
    assert.equal((await reader.backendEvent('delivery.expired', eid, 5000)).data.name, 'short');
    const d = await connected(gw.tcpUrl);
    const got = collect(d);
    await d.request('resume', { token: s.token });
    await marker(s.sessionId, got);
    assert.equal(got.filter((e) => e.eid === eid).length, 0);
    d.destroy();
  });

  test('ttl of an event waiting behind the window expires when it comes up', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const got = collect(c);
    await disconnect(gw, c, s.sessionId);
    const { eid } = await pub.publish({ session: s.sessionId }, { name: 'short', data: 1, ttl: 100 });
    await wait(150);
    const d = await connected(gw.tcpUrl);
    const got2 = collect(d);
    await d.request('resume', { token: s.token });
    await reader.waitFor('gw-backend', (j) => j.some((x) => x.data.eid === eid), 5000, 'delivery.expired');
    assert.equal([...got, ...got2].filter((e) => e.eid === eid).length, 0);
    d.destroy();
  });
});

describe('sending from the publish', () => {
  test('a device on the publishing node gets its events from the publish: in order, attempt 1, once each', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const got = collect(c);
    const redis = redisClient();
    const sent = async () => {
      const text = await (await fetchWithin(`http://127.0.0.1:${gw.metricsPort}/metrics`)).text();
      return Number(/^gateway_events_sent_from_publish_total (\d+)/m.exec(text)?.[1] ?? 0);
    };
    try {
      // The node key (set as the session binds) is what lets the script grant the send.
      await until(async () => (await redis.exists(`${gw.prefix}{s:${s.sessionId}}:node`)) === 1);
      const before = await sent();
      const n = 40;
      // One batch (one script call) and then one request per event.
      const batch = Array.from({ length: n / 2 }, (_, i) => ({
        target: { session: s.sessionId },
        name: 'fast.test',
        data: { i },
      }));
      assert.equal((await httpPublish(gw, { events: batch })).status, 202);
      for (let i = n / 2; i < n; i++) {
        const res = await httpPublish(gw, {
          target: { session: s.sessionId },
          name: 'fast.test',
          data: { i },
        });
        assert.equal(res.status, 202);
      }
      await until(() => got.length >= n, 10000, `${n} events`);
      await marker(s.sessionId, got);
      assert.deepEqual(
        got.filter((e) => e.name === 'fast.test').map((e) => (e.data as { i: number }).i),
        Array.from({ length: n }, (_, i) => i),
        'each event once, in publish order',
      );
      assert.ok(
        got.filter((e) => e.name === 'fast.test').every((e) => e.attempt === 1),
        'first deliveries',
      );
      const fromPublish = (await sent()) - before;
      console.log(`${fromPublish} of ${n} events sent from the publish`);
      assert.ok(fromPublish > 0, 'some events went out from the publish');
      await until(async () => (await redis.zcard(`${gw.prefix}{s:${s.sessionId}}:q`)) === 0, 10000, 'acks');
    } finally {
      redis.disconnect();
      c.destroy();
    }
  });
});

describe('the three publish paths', () => {
  test('TypeScript function, POST /v1/events and the gw-publish BullMQ queue all deliver', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c, { id: `dev-${randomUUID()}` });
    const got = collect(c);
    const viaFn = await pub.publish({ user: s.userId }, { name: 'via.fn', data: { a: 1 } });
    const res = await httpPublish(gw, {
      target: { device: (s as unknown as { deviceId?: string }).deviceId ?? '' },
      name: 'x',
    });
    assert.equal(res.status, 400, 'an empty device id is bad_message');
    const http = await httpPublish(gw, {
      events: [
        { target: { username: s.username }, name: 'via.http', data: { b: 2 } },
        { target: { session: s.sessionId }, name: 'via.http0', data: 0, qos: 0 },
      ],
    });
    assert.equal(http.status, 202);
    const body = (await http.json()) as { eids: string[] };
    assert.equal(body.eids.length, 2);
    const conn = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
    const q = new Queue('gw-publish', { connection: conn, prefix: `${gw.prefix}bull` });
    const job = await q.add('publish', {
      target: { session: s.sessionId },
      name: 'via.queue',
      data: { c: 3 },
    });
    await until(() => got.length >= 4, 8000, 'four events');
    const names = got.map((e) => e.name).sort();
    assert.deepEqual(names, ['via.fn', 'via.http', 'via.http0', 'via.queue']);
    assert.equal(got.find((e) => e.name === 'via.fn')!.eid, viaFn.eid);
    assert.equal(got.find((e) => e.name === 'via.http')!.eid, body.eids[0]);
    assert.equal(got.find((e) => e.name === 'via.http0')!.qos, 0);
    assert.equal(got.find((e) => e.name === 'via.queue')!.eid, `job-${job.id}`);
    // Eids the gateway made (gateway/delivery/eid.ts): 16 random bytes in 22 base64url characters.
    for (const eid of [viaFn.eid, ...body.eids]) assert.match(eid, /^[A-Za-z0-9_-]{22}$/);
    // the queue job's return value tells the publisher what happened
    await until(() => job.isCompleted(), 10000, 'the gw-publish job completed');
    // errors are stable codes
    assert.equal(
      (await httpPublish(gw, { target: { session: s.sessionId }, name: 'x' }, 'wrong-key')).status,
      401,
    );
    const unknown = await httpPublish(gw, { target: { session: randomUUID() }, name: 'x' });
    assert.equal(unknown.status, 404);
    assert.equal(((await unknown.json()) as { error: { code: string } }).error.code, 'not_found');
    const bad = await httpPublish(gw, { target: { session: s.sessionId }, name: 'bad name!' });
    assert.equal(((await bad.json()) as { error: { code: string; field: string } }).error.field, 'name');
    await q.close();
    conn.disconnect();
    c.destroy();
  });
});

describe('POST /v1/events batches', () => {
  test('items succeed or fail on their own, in order; a bad item fails the request before any publish', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const got = collect(c);
    const res = await httpPublish(gw, {
      events: [
        ...Array.from({ length: 10 }, (_, i) => ({ target: { session: s.sessionId }, name: 'b', data: i })),
        { target: { session: randomUUID() }, name: 'b', data: 'lost' },
        { target: { username: s.username }, name: 'b', data: 10 },
        { target: { username: `nobody_${randomUUID().slice(0, 6)}` }, name: 'b', data: 'lost' },
      ],
    });
    assert.equal(res.status, 202);
    const body = (await res.json()) as {
      eids: string[];
      results: { eid: string; accepted?: number; error?: { code: string } }[];
    };
    assert.equal(body.results.length, 13);
    assert.deepEqual(
      body.eids,
      body.results.map((r) => r.eid),
    );
    assert.deepEqual(
      body.results.map((r) => r.error?.code ?? r.accepted),
      [...Array(10).fill(1), 'not_found', 1, 'not_found'],
    );
    await until(() => got.length >= 11, 8000, 'eleven events');
    await marker(s.sessionId, got);
    assert.deepEqual(
      got.filter((e) => e.name === 'b').map((e) => e.data),
      [...Array(11).keys()],
      'delivered in the order of the batch, the failed items left out',
    );
    assert.deepEqual(
      got.filter((e) => e.name === 'b').map((e) => e.eid),
      body.eids.filter((_, i) => i !== 10 && i !== 12),
    );

    const bad = await httpPublish(gw, {
      events: [
        { target: { session: s.sessionId }, name: 'never', data: 0 },
        { target: { session: s.sessionId }, name: 'bad name!' },
      ],
    });
    assert.equal(bad.status, 400);
    const err = ((await bad.json()) as { error: { code: string; field: string } }).error;
    assert.deepEqual([err.code, err.field], ['bad_message', 'events[1].name']);
    // Published after the refused batch: the first item, had it been stored, would come before.
    await marker(s.sessionId, got);
    assert.ok(!got.some((e) => e.name === 'never'), 'nothing of a refused batch is published');
    c.destroy();
  });
});

describe('data nested too deep', () => {
  /** `data` nested `depth` arrays deep, as JSON text: JSON.stringify would recurse as deep. */
  const nested = (depth: number) => `${'['.repeat(depth)}1${']'.repeat(depth)}`;
  const post = (body: string) =>
    fetchWithin(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
      body,
    });
  /** The bound of docs/BACKEND.md: objects and arrays nested at most 64 deep. */
  const MAX_DATA_DEPTH = 64;
  const errorOf = async (res: Response) =>
    [res.status, ((await res.json()) as { error: { code: string; field?: string } }).error] as const;

  test('POST /v1/events: 400 bad_message naming data (events[i].data in a batch), not 500', async () => {
    const errors = () => gw.logs.filter((l) => (l.level as number) >= 50 || l.level === 'error').length;
    const errorsBefore = errors();
    const deep = nested(100_000); // about 200 KB
    const [status, err] = await errorOf(
      await post(`{"target": {"session": "s1"}, "name": "deep", "data": ${deep}}`),
    );
    assert.deepEqual([status, err.code, err.field], [400, 'bad_message', 'data'], JSON.stringify(err));
    const [bStatus, bErr] = await errorOf(
      await post(
        `{"events": [{"target": {"session": "s1"}, "name": "ok", "data": 1}, {"target": {"session": "s1"}, "name": "deep", "data": ${deep}}]}`,
      ),
    );
    assert.deepEqual(
      [bStatus, bErr.code, bErr.field],
      [400, 'bad_message', 'events[1].data'],
      JSON.stringify(bErr),
    );
    // At the bound it is taken (no live session here: not_found, past the check).
    const [okStatus, okErr] = await errorOf(
      await post(`{"target": {"session": "s1"}, "name": "deep", "data": ${nested(MAX_DATA_DEPTH)}}`),
    );
    assert.deepEqual([okStatus, okErr.code], [404, 'not_found'], JSON.stringify(okErr));
    const [overStatus, overErr] = await errorOf(
      await post(`{"target": {"session": "s1"}, "name": "deep", "data": ${nested(MAX_DATA_DEPTH + 1)}}`),
    );
    assert.deepEqual(
      [overStatus, overErr.code, overErr.field],
      [400, 'bad_message', 'data'],
      JSON.stringify(overErr),
    );
    assert.equal(errors(), errorsBefore, 'no error logged for a bad request');
  });

  test('the publisher library: bad_message naming data', async () => {
    let data: unknown = 1;
    for (let i = 0; i < 100_000; i++) data = [data];
    await assert.rejects(
      pub.publish({ session: 's1' }, { name: 'deep', data }),
      (e: unknown) => e instanceof ProtocolError && e.code === 'bad_message' && e.field === 'data',
    );
  });
});

describe('outbox bound', () => {
  test('reject: the publisher is told; drop-oldest: the dropped event is reported', async () => {
    for (const policy of ['reject', 'drop-oldest'] as const) {
      const g = await startGateway({ ...FAST, GW_OUTBOX_MAX: '5', GW_OUTBOX_POLICY: policy });
      const r = new QueueReader(g.prefix);
      try {
        const c = await connected(g.tcpUrl);
        const s = await signUp(c);
        await disconnect(g, c, s.sessionId);
        const outcomes = [];
        for (let i = 0; i < 7; i++) {
          const res = await httpPublish(g, { target: { session: s.sessionId }, name: 'e', data: i });
          outcomes.push(
            ((await res.json()) as { results: { accepted: number; rejected: number }[] }).results[0],
          );
        }
        if (policy === 'reject') {
          assert.deepEqual(
            outcomes.map((o) => o.rejected),
            [0, 0, 0, 0, 0, 1, 1],
          );
          // The access lines of the seven requests come after anything their publishes logged.
          await g.waitForLog(
            () => g.logs.filter((l) => l.msg === 'http' && l.route === '/v1/events').length >= 7,
            10000,
            'the access lines of the seven publishes',
          );
          const warned = g.logs.filter((l) => l.msg === 'outbox full: publish rejected');
          // One line a minute at most, not one per event: an offline device under a steady back
          // end would fill the log.
          assert.equal(warned.length, 1, JSON.stringify(warned));
        } else {
          assert.ok(
            outcomes.every((o) => o.accepted === 1),
            'outcomes.every((o) => o.accepted === 1)',
          );
          const dropped = await r.waitFor('gw-backend', (j) => j.length >= 2, 5000, 'delivery.dropped');
          assert.equal(dropped.length, 2);
        }
        const d = await connected(g.tcpUrl);
        const got = collect(d);
        await d.request('resume', { token: s.token });
        await until(() => got.length >= 5);
        // Once the outbox is empty (acked), a marker published after: anything else stored for
        // the session would come before it.
        const redis = redisClient();
        try {
          await until(
            async () => (await redis.zcard(`${g.prefix}{s:${s.sessionId}}:q`)) === 0,
            10000,
            'the outbox acked empty',
          );
        } finally {
          redis.disconnect();
        }
        assert.equal(
          (await httpPublish(g, { target: { session: s.sessionId }, name: 'marker', data: 'end' })).status,
          202,
        );
        await until(() => got.some((e) => e.name === 'marker'), 10000, 'the marker event');
        assert.deepEqual(
          got.filter((e) => e.name === 'e').map((e) => e.data),
          policy === 'reject' ? [0, 1, 2, 3, 4] : [2, 3, 4, 5, 6],
        );
        d.destroy();
      } finally {
        await r.close();
        await g.stop();
      }
    }
  });
  test('a takeover moves events within the bound: reject reports what does not fit, drop-oldest the oldest', async () => {
    for (const policy of ['reject', 'drop-oldest'] as const) {
      const g = await startGateway({ ...FAST, GW_OUTBOX_MAX: '5', GW_OUTBOX_POLICY: policy });
      const r = new QueueReader(g.prefix);
      const redis = redisClient();
      try {
        const device = { id: `bound-${randomUUID().slice(0, 8)}` };
        const c1 = await connected(g.tcpUrl);
        const a = await signUp(c1, device);
        c1.destroy();
        const c2 = await connected(g.tcpUrl);
        const b = await c2.request<Session>('login', { username: a.username, password: PASSWORD });
        c2.destroy();
        await wait(100);
        const publish = async (sid: string, eid: string) =>
          assert.equal((await httpPublish(g, { target: { session: sid }, name: 'e', eid })).status, 202);
        for (const n of [0, 1, 2, 3]) await publish(a.sessionId, `a${n}`);
        for (const n of [0, 1, 2]) await publish(b.sessionId, `b${n}`);
        // Resuming b with a's device takes a over: its 4 events join b's 3, bound 5.
        const d = await connected(g.tcpUrl, { autoAck: false });
        await d.request('resume', { token: b.token, device });
        const q = `${g.prefix}{s:${b.sessionId}}:q`;
        const want = policy === 'reject' ? ['b0', 'b1', 'b2', 'a0', 'a1'] : ['b2', 'a0', 'a1', 'a2', 'a3'];
        const end = Date.now() + 10000;
        let held: string[] = [];
        while ((held = await redis.zrange(q, '0', '-1')).join() !== want.join()) {
          if (Date.now() > end) throw new Error(`b's outbox holds ${held.join()}, not ${want.join()}`);
          await wait(50);
        }
        const reported = policy === 'reject' ? 'delivery.failed' : 'delivery.dropped';
        const jobs = await r.waitFor('gw-backend', (j) => j.length >= 2, 10000, reported);
        assert.deepEqual(
          jobs.map((j) => j.data.eid).sort(),
          policy === 'reject' ? ['a2', 'a3'] : ['b0', 'b1'],
        );
        if (policy === 'reject')
          assert.ok(
            jobs.every((j) => j.data.reason === 'outbox_full'),
            "jobs.every((j) => j.data.reason === 'outbox_full')",
          );
        d.destroy();
      } finally {
        redis.disconnect();
        await r.close();
        await g.stop();
      }
    }
  });
});

describe('devices to the back end', () => {
  test('publish answers ok {eid} once the job is on gw-backend; usage counters count it', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c, { id: `meter-${randomUUID().slice(0, 8)}` });
    const { eid } = await c.request<{ eid: string }>('publish', { name: 'reading', data: { kwh: 1.5 } });
    assert.match(eid, /^[A-Za-z0-9_-]{22}$/, 'an eid the gateway made');
    const jobs = await reader.jobs('gw-backend', 'device.event');
    const job = jobs.find((j) => j.data.eid === eid);
    assert.ok(job, 'the job exists when the device has its ok');
    assert.deepEqual(Object.keys(job!.data).sort(), [
      'data',
      'device',
      'eid',
      'name',
      'session',
      'ts',
      'user',
      'username',
    ]);
    assert.equal(job!.data.session, s.sessionId);
    assert.equal(job!.data.user, s.userId);
    assert.deepEqual(job!.data.data, { kwh: 1.5 });
    await assert.rejects(
      c.request('publish', { name: 'bad name', data: 1 }),
      (e: unknown) => e instanceof ProtocolError && e.code === 'bad_message',
    );
    await c.close();
    const r = redisClient();
    const device = job!.data.device as string;
    let usage: Record<string, string> = {};
    await until(
      async () => !!(usage = await r.hgetall(`${gw.prefix}usage:${device}`)).events_in,
      10000,
      "the device's usage counters written",
    );
    assert.equal(usage.events_in, '1');
    assert.ok(
      Number(usage.bytes_in) > 0 && Number(usage.bytes_out) > 0,
      'Number(usage.bytes_in) > 0 && Number(usage.bytes_out) > 0',
    );
    r.disconnect();
  });
});

describe('rooms and direct messages', () => {
  test('join, say to members on the node, history replay, leave, rooms, users', async () => {
    const a = await connected(gw.tcpUrl);
    const sa = await signUp(a);
    const b = await connected(gw.wsUrl);
    const sb = await signUp(b);
    const room = `#r${randomUUID().slice(0, 6)}`;
    const gotA = collect(a);
    const gotB = collect(b);
    assert.deepEqual(await a.request('join', { room: room.slice(1).toUpperCase() }), { room, members: 1 });
    await a.request('say', { room, body: 'before b came' });
    const joined = await b.request('join', { room });
    assert.deepEqual(joined, { room, members: 2 });
    await until(() => gotB.some((e) => e.history));
    const hist = gotB.find((e) => e.history)!;
    assert.equal(hist.name, 'room.message');
    assert.deepEqual(hist.data, { body: 'before b came' });
    await until(() => gotA.some((e) => e.name === 'room.joined' && e.from === sb.username));
    await b.request('say', { room, body: 'hello' });
    await until(() => gotA.some((e) => e.name === 'room.message' && e.from === sb.username));
    await until(
      () => gotB.some((e) => e.name === 'room.message' && !e.history),
      3000,
      'the sender gets it too',
    );
    const rooms = (await a.request<{ rooms: { room: string; members: number }[] }>('rooms')).rooms;
    assert.deepEqual(
      rooms.find((r) => r.room === room),
      { room, members: 2 },
    );
    const users = (await a.request<{ users: string[] }>('users', { room })).users;
    assert.deepEqual(users, [sa.username, sb.username].sort());
    assert.ok(
      (await a.request<{ users: string[] }>('users')).users.includes(sb.username),
      "(await a.request<{ users: string[] }>('users')).users.includes(sb.username)",
    );
    assert.deepEqual(await b.request('leave', { room }), { room, members: 1 });
    await until(() => gotA.some((e) => e.name === 'room.left' && e.from === sb.username));
    const bad = (code: string) => (e: unknown) => e instanceof ProtocolError && e.code === code;
    await assert.rejects(b.request('say', { room, body: 'x' }), bad('forbidden'));
    await assert.rejects(b.request('leave', { room }), bad('not_found'));
    await assert.rejects(a.request('join', { room: '#Bad Room!' }), bad('bad_message'));
    await assert.rejects(a.request('say', { room, body: 'x'.repeat(1025) }), bad('bad_message'));
    a.destroy();
    b.destroy();
  });

  test("send: a qos-1 direct.message to each of the target's sessions; not_found without one", async () => {
    const a = await connected(gw.tcpUrl);
    const sa = await signUp(a);
    const b1 = await connected(gw.tcpUrl);
    const sb = await signUp(b1);
    const b2 = await connected(gw.wsUrl);
    await b2.request('login', { username: sb.username, password: PASSWORD });
    const g1 = collect(b1);
    const g2 = collect(b2);
    const { eid } = await a.request<{ eid: string }>('send', { to: sb.username.toUpperCase(), body: 'psst' });
    await until(() => g1.length > 0 && g2.length > 0);
    assert.equal(g1.length + g2.length, 2, JSON.stringify([...g1, ...g2]));
    for (const e of [g1[0], g2[0]]) {
      assert.equal(e.eid, eid);
      assert.equal(e.name, 'direct.message');
      assert.equal(e.from, sa.username);
      assert.equal(e.qos, 1);
      assert.deepEqual(e.data, { body: 'psst' });
    }
    await assert.rejects(
      a.request('send', { to: 'nobody_here', body: 'x' }),
      (e: unknown) => e instanceof ProtocolError && e.code === 'not_found',
    );
    for (const c of [a, b1, b2]) c.destroy();
  });
  test("send and publish with a key, answered overloaded after Redis ran them (the reply lost past the node's timeout), sent again with the key: stored and queued once, the same eid; without a key twice", async () => {
    // No retry of an unacked event within the case: the recipient's outbox holds what was stored.
    await withSlowReplies({ GW_ACK_TIMEOUT_MS: '20000' }, async ({ g, q, proxy, c: sender }) => {
      const recipient = await connected(g.tcpUrl, { autoAck: false });
      const sb = await signUp(recipient);
      const tag = randomUUID();
      /** A request whose Redis call (the one naming `marker`) is run and its reply held 1.5 s. */
      const lost = async (type: 'send' | 'publish', fields: Record<string, unknown>, marker: string) => {
        const held = proxy.holdReplyOf(new RegExp(marker), 1500);
        await assert.rejects(
          sender.request(type, fields),
          (e: unknown) => e instanceof ProtocolError && e.code === 'overloaded',
          `${type} answered overloaded`,
        );
        await within(`the held reply of the ${type}`, held, 10_000);
        await wait(1600); // the hold over: the connection answers again
      };
      await lost('send', { to: sb.username, body: `keyed-${tag}`, key: `k-${tag}` }, `keyed-${tag}`);
      const again = await sender.request<{ eid: string }>('send', {
        to: sb.username,
        body: `keyed-${tag}`,
        key: `k-${tag}`,
      });
      await lost('send', { to: sb.username, body: `plain-${tag}` }, `plain-${tag}`);
      await sender.request('send', { to: sb.username, body: `plain-${tag}` });
      // What the recipient's outbox holds (nothing acked): each event's body.
      const r = redisClient();
      try {
        const base = `${g.prefix}{s:${sb.sessionId}}:`;
        const eids = await r.zrange(`${base}q`, '0', '-1');
        const bodies = new Map<string, string[]>();
        for (const eid of eids) {
          const stored = unpack((await r.hgetBuffer(`${base}ev`, eid))!) as { data: { body: string } };
          bodies.set(stored.data.body, [...(bodies.get(stored.data.body) ?? []), eid]);
        }
        assert.deepEqual(
          bodies.get(`keyed-${tag}`),
          [again.eid],
          'the keyed message stored once, under the eid answered',
        );
        assert.equal(bodies.get(`plain-${tag}`)?.length, 2, 'the plain one stored twice, under two eids');
      } finally {
        r.disconnect();
      }

      // The BullMQ add of the job names the event's name.
      await lost('publish', { name: 'keyed.pub', data: { tag }, key: `p-${tag}` }, 'keyed[.]pub');
      const pub = await sender.request<{ eid: string }>('publish', {
        name: 'keyed.pub',
        data: { tag },
        key: `p-${tag}`,
      });
      await q.backendEvent('device.event', pub.eid, 10_000);
      const jobs = (await q.jobs('gw-backend')).filter(
        (j) => j.name === 'device.event' && j.data.name === 'keyed.pub',
      );
      assert.equal(jobs.length, 1, 'the keyed publish queued once');
      assert.equal(jobs[0].data.eid, pub.eid);
      recipient.destroy();
    });
  });

  test('send: twenty sends of one key at once, from two connections of the sender, store one event, every answer its eid', async () => {
    const a1 = await connected(gw.tcpUrl);
    const sa = await signUp(a1);
    const a2 = await connected(gw.tcpUrl);
    await a2.request('login', { username: sa.username, password: PASSWORD });
    const b = await connected(gw.tcpUrl, { autoAck: false });
    const sb = await signUp(b);
    const key = `race-${randomUUID()}`;
    const answers = await within(
      'the twenty sends',
      Promise.all(
        Array.from({ length: 20 }, (_, i) =>
          (i % 2 ? a2 : a1).request<{ eid: string }>('send', { to: sb.username, body: 'once', key }),
        ),
      ),
    );
    const eids = new Set(answers.map((x) => x.eid));
    assert.equal(eids.size, 1, `one eid answered: ${[...eids].join(', ')}`);
    const r = redisClient();
    try {
      const stored = await r.zrange(`${gw.prefix}{s:${sb.sessionId}}:q`, '0', '-1');
      assert.deepEqual(stored, [...eids], 'the outbox holds the one event');
    } finally {
      r.disconnect();
    }
    for (const c of [a1, a2, b]) c.destroy();
  });

  test('send: a session of the recipient that expired is skipped and forgotten; none left is not_found', async () => {
    const a = await connected(gw.tcpUrl);
    await signUp(a);
    const b1 = await connected(gw.tcpUrl);
    const sb1 = await signUp(b1);
    const b2 = await connected(gw.tcpUrl);
    const sb2 = await b2.request<Session>('login', { username: sb1.username, password: PASSWORD });
    const g2 = collect(b2);
    const redis = redisClient();
    try {
      // What Redis does when the session's TTL runs out: the session record goes, the id stays
      // in the user's set.
      await redis.del(`${gw.prefix}{s:${sb1.sessionId}}:sess`);
      const { eid } = await a.request<{ eid: string }>('send', { to: sb1.username, body: 'one' });
      await until(() => g2.length > 0, 10000, 'the live session gets the message');
      assert.equal(g2[0].eid, eid);
      const users = `${gw.prefix}user:${sb1.userId}:sess`;
      const end = Date.now() + 5000;
      while ((await redis.sismember(users, sb1.sessionId)) === 1) {
        if (Date.now() > end) throw new Error('the expired session id was not forgotten');
        await wait(20);
      }
      assert.equal(await redis.sismember(users, sb2.sessionId), 1);
      await redis.del(`${gw.prefix}{s:${sb2.sessionId}}:sess`);
      await assert.rejects(
        a.request('send', { to: sb1.username, body: 'two' }),
        (e: unknown) => e instanceof ProtocolError && e.code === 'not_found',
      );
    } finally {
      redis.disconnect();
      for (const c of [a, b1, b2]) c.destroy();
    }
  });

  test('send: a username not found a moment ago is found once it registers', async () => {
    const a = await connected(gw.tcpUrl);
    await signUp(a);
    const name = `late_${randomUUID().slice(0, 8)}`;
    const notFound = (e: unknown) => e instanceof ProtocolError && e.code === 'not_found';
    await assert.rejects(a.request('send', { to: name, body: 'early' }), notFound);
    const b = await connected(gw.tcpUrl);
    await signUp(b, undefined, name);
    const got = collect(b);
    const { eid } = await a.request<{ eid: string }>('send', { to: name.toUpperCase(), body: 'now' });
    await until(() => got.length > 0, 10000, 'the message');
    assert.equal(got[0].eid, eid);
    for (const c of [a, b]) c.destroy();
  });
});

describe('two gateway processes', () => {
  test('cross-node events and rooms; SIGKILL with events in flight loses none; the sweep removes the dead node', async () => {
    const deployment = deploymentEnv();
    const shared = {
      ...FAST,
      GW_ACK_TIMEOUT_MS: '2000',
      GW_MAX_ATTEMPTS: '10',
      GW_DEFAULT_ROOM: '#general',
      ...deployment,
    };
    const a = await startGateway(shared);
    const b = await startGateway(shared);
    const qr = new QueueReader(shared.GW_REDIS_PREFIX);
    try {
      const dev = await connected(a.tcpUrl);
      const s = (await signUp(dev, { id: 'dev-x' })) as Session & { username: string };
      const got = collect(dev);
      const other = await connected(b.wsUrl);
      const so = await signUp(other);
      await other.request('say', { room: '#general', body: 'from node B' });
      await until(
        () => got.some((e) => e.name === 'room.message' && e.from === so.username),
        5000,
        'room message across nodes',
      );
      const first = await httpPublish(b, { target: { device: 'dev-x' }, name: 'hello.from.b' });
      assert.equal(first.status, 202);
      await until(() => got.some((e) => e.name === 'hello.from.b'), 5000, 'event published through B');

      // stream events through B while the device acks on A; kill A mid-stream
      const published: string[] = [];
      const total = 300;
      const publisher = (async () => {
        for (let i = 0; i < total; i++) {
          const res = await httpPublish(b, { target: { session: s.sessionId }, name: 'stream', data: i });
          published.push(((await res.json()) as { eids: string[] }).eids[0]);
        }
      })();
      await until(() => got.filter((e) => e.name === 'stream').length >= 40, 10000, 'streaming started');
      a.proc.kill('SIGKILL');
      await a.exited;
      await publisher;
      // the device reconnects to B and resumes its session
      const again = await connected(b.tcpUrl);
      const got2 = collect(again);
      await again.request('resume', { token: s.token });
      await until(
        () => new Set([...got, ...got2].filter((e) => e.name === 'stream').map((e) => e.eid)).size >= total,
        15000,
        'every event after the resume',
      );
      const all = [...got, ...got2].filter((e) => e.name === 'stream');
      const received = new Set(all.map((e) => e.eid));
      const lost = published.filter((eid) => !received.has(eid));
      assert.deepEqual(lost, [], 'none lost');
      const duplicates = all.length - received.size;
      assert.ok(duplicates <= 32, `duplicates ${duplicates} within the in-flight window (32)`);
      // the cluster-wide sweep removes node A's presence and room membership
      const r = redisClient();
      const stale = async () => {
        const pres = await r.hvals(`${shared.GW_REDIS_PREFIX}presence`);
        return pres.some((p) => JSON.parse(p).node === a.logs.find((l) => l.msg === 'gateway ready')?.node);
      };
      for (
        let i = 0;
        i < 100 && (await r.zscore(`${shared.GW_REDIS_PREFIX}nodes`, String(a.logs[0].node)));
        i++
      ) {
        await wait(100);
      }
      assert.equal(
        await r.zscore(`${shared.GW_REDIS_PREFIX}nodes`, String(a.logs[0].node)),
        null,
        'dead node swept',
      );
      assert.equal(await stale(), false);
      r.disconnect();
      again.destroy();
      other.destroy();
    } finally {
      await qr.close();
      await Promise.all([a.stop(), b.stop()]);
      await dropDeployment(deployment);
    }
  });
});
