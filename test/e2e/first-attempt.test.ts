/**
 * An event sent from its publish writes no attempt counter: the session's sent mark records its
 * first attempt (publish.lua). Everything that counts attempts must still see it as sent once:
 * a retry, the pump after a reconnect, the report when the session ends, a takeover's move, and
 * the admin API. Each test publishes through the gateway's own `POST /v1/events` to a connected
 * device that does not ack, so the event goes out from the publish (checked on the metric).
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { Redis } from 'ioredis';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, deviceWithEvents, PASSWORD } from '../helpers/accounts.ts';
import { redisClient } from '../helpers/cleanup.ts';
import { fetchWithin, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { QueueReader } from '../helpers/queues.ts';

const API_KEY = 'first-attempt-api-key-5c1e';
const ADMIN_KEY = 'first-attempt-admin-key-9b2d';

const COMMON = {
  GW_API_KEY: API_KEY,
  GW_ADMIN_KEY: ADMIN_KEY,
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
};
/** Retries within a second: for the retry test. */
let fast: GatewayProcess;
/** No retry within a test (a minute's ack timeout): every other test knows the attempts exactly. */
let slow: GatewayProcess;
let redis: Redis;
let reader: QueueReader;
const clients: GatewayClient[] = [];

before(async () => {
  [fast, slow] = await Promise.all([
    startGateway({
      ...COMMON,
      GW_ACK_TIMEOUT_MS: '400',
      GW_RETRY_BASE_MS: '100',
      GW_RETRY_MAX_MS: '200',
      GW_SWEEP_INTERVAL_MS: '200',
    }),
    startGateway({ ...COMMON, GW_ACK_TIMEOUT_MS: '60000' }),
  ]);
  redis = redisClient();
  reader = new QueueReader(slow.prefix);
});
after(async () => {
  for (const c of clients) c.destroy();
  await reader?.close();
  redis?.disconnect();
  await Promise.allSettled([fast?.stop(), slow?.stop()]);
});

async function sentFromPublish(gw: GatewayProcess): Promise<number> {
  const text = await (await fetchWithin(`http://127.0.0.1:${gw.metricsPort}/metrics`)).text();
  return Number(/^gateway_events_sent_from_publish_total (\d+)/m.exec(text)?.[1] ?? 0);
}

async function api(
  gw: GatewayProcess,
  method: string,
  path: string,
  key: string,
  body?: unknown,
): Promise<Record<string, unknown>> {
  const res = await fetchWithin(`http://127.0.0.1:${gw.httpPort}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${key}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const answer = (await res.json()) as Record<string, unknown>;
  assert.ok(res.status < 300, `${method} ${path}: ${res.status} ${JSON.stringify(answer)}`);
  return answer;
}

/** A device that does not ack, with an event published to it from the gateway and seen once. */
async function deviceWithUnackedEvent(gw: GatewayProcess, tag: string) {
  const d = await deviceWithEvents(gw.tcpUrl, tag, { autoAck: false });
  clients.push(d.device);
  const got: EventMsg[] = [];
  d.device.on('event', (e: EventMsg) => got.push(e));
  const before = await sentFromPublish(gw);
  const { results } = (await api(gw, 'POST', '/v1/events', API_KEY, {
    target: { device: d.id },
    name: 'fa.test',
    data: { tag },
  })) as { results: { eid: string }[] };
  const eid = results[0].eid;
  await until(`${eid} at the device`, () => got.some((e) => e.eid === eid));
  assert.equal(got[0].attempt, 1);
  assert.equal((await sentFromPublish(gw)) - before, 1, 'sent from its publish');
  const base = `${gw.prefix}{s:${d.session.sessionId}}:`;
  return { ...d, got, eid, base };
}

test('no attempt counter is written for it; the admin API shows it in flight at attempt 1, a retry sends attempt 2', async () => {
  const { id, session, got, eid, base } = await deviceWithUnackedEvent(fast, 'fa-retry');
  assert.equal(
    await within('the attempt counter', redis.hexists(`${base}att`, eid)),
    0,
    'attempt counter written',
  );
  const state = () => api(fast, 'GET', `/v1/events/${eid}?session=${session.sessionId}`, ADMIN_KEY);
  const first = await state();
  // A retry may already have gone: the state is at whatever attempt the device last saw.
  assert.equal(first.state, 'in_flight');
  assert.ok((first.attempt as number) >= 1, '(first.attempt as number) >= 1');
  assert.equal((await api(fast, 'GET', `/v1/devices/${id}`, ADMIN_KEY)).inFlight, 1, 'events in flight');

  await until('a retry', () => got.length >= 2);
  assert.deepEqual(
    got.slice(0, 2).map((e) => [e.eid, e.attempt]),
    [
      [eid, 1],
      [eid, 2],
    ],
  );
  const later = await state();
  assert.equal(later.state, 'in_flight');
  assert.ok((later.attempt as number) >= 2, `attempt ${later.attempt}`);
});

test('after a reconnect the pump sends it again with the next attempt', async () => {
  const { device, session, got, eid } = await deviceWithUnackedEvent(slow, 'fa-resume');
  await device.close();
  assert.equal(got.length, 1);
  const again = await connected(slow.tcpUrl, { autoAck: true });
  clients.push(again);
  const next: EventMsg[] = [];
  again.on('event', (e: EventMsg) => next.push(e));
  await again.request('resume', { token: session.token });
  await until(`${eid} again`, () => next.some((e) => e.eid === eid));
  assert.equal(next.find((e) => e.eid === eid)!.attempt, 2);
});

test('when its session ends it is reported failed with the attempts it had', async () => {
  const { device, session, got, eid } = await deviceWithUnackedEvent(slow, 'fa-logout');
  await device.request('logout', {});
  assert.equal(got.length, 1);
  const f = await reader.backendEvent('delivery.failed', eid);
  assert.equal(f.data.sessionId, session.sessionId);
  assert.equal(f.data.reason, 'session_logout');
  assert.equal(f.data.attempts, 1);
});

test('moved to a new session of the device (takeover), it goes out with the next attempt', async () => {
  const { id, session, got, eid } = await deviceWithUnackedEvent(slow, 'fa-move');
  const taker = await connected(slow.tcpUrl, { autoAck: true });
  clients.push(taker);
  const next: EventMsg[] = [];
  taker.on('event', (e: EventMsg) => next.push(e));
  const s2 = await taker.request<{ sessionId: string }>('login', {
    username: session.username,
    password: PASSWORD,
    device: { id },
  });
  assert.notEqual(s2.sessionId, session.sessionId);
  await until(`${eid} in the new session`, () => next.some((e) => e.eid === eid));
  assert.equal(got.length, 1);
  assert.equal(next.find((e) => e.eid === eid)!.attempt, 2);
});

test('100 events published by 4 racing requests, part sent from their publish, part waiting for a slot: after a reconnect each goes out with the next attempt', async () => {
  const d = await deviceWithEvents(slow.tcpUrl, 'fa-race', { autoAck: false });
  clients.push(d.device);
  const got: EventMsg[] = [];
  d.device.on('event', (e: EventMsg) => got.push(e));
  const before = await sentFromPublish(slow);
  const answers = await Promise.all(
    [0, 1, 2, 3].map((r) =>
      api(slow, 'POST', '/v1/events', API_KEY, {
        events: Array.from({ length: 25 }, (_, i) => ({
          target: { device: d.id },
          name: 'fa.race',
          data: { r, i },
        })),
      }),
    ),
  );
  const eids = answers.flatMap((a) => (a as { eids: string[] }).eids);
  assert.equal(eids.length, 100);
  // The window (GW_MAX_INFLIGHT, 32) fills, from publishes and the pump; the rest wait for a slot.
  await until('a full window at the device', () => got.length >= 32);
  assert.ok((await sentFromPublish(slow)) - before > 0, 'some sent from their publish');
  await d.device.close();
  const seen = new Map<string, number>();
  for (const e of got) {
    assert.equal(e.attempt, 1, `${e.eid} first seen at attempt ${e.attempt}`);
    seen.set(e.eid, (seen.get(e.eid) ?? 0) + 1);
  }

  const again = await connected(slow.tcpUrl, { autoAck: true });
  clients.push(again);
  const next = new Map<string, number>();
  again.on('event', (e: EventMsg) => {
    if (!next.has(e.eid)) next.set(e.eid, e.attempt ?? 0);
  });
  await again.request('resume', { token: d.session.token });
  await until('all 100 events on the new connection', () => eids.every((eid) => next.has(eid)));
  const wrong = eids.filter((eid) => next.get(eid) !== (seen.get(eid) ?? 0) + 1);
  assert.deepEqual(wrong, [], 'events whose attempt is not the next one');
});

test('Redis killed and restarted from its AOF: the mark came back with the event, which goes out again as attempt 2', async () => {
  // Private Redis with every write in the AOF before it answers, and its own gateway.
  const own = await startOwnRedis(['--appendonly', 'yes', '--appendfsync', 'always']);
  const g = await startGateway({ ...COMMON, REDIS_URL: own.url, GW_ACK_TIMEOUT_MS: '60000' });
  try {
    const { device, session, got, eid } = await deviceWithUnackedEvent(g, 'fa-aof');
    await own.kill('SIGKILL');
    await device.close();
    await own.start();
    const again = await connected(g.tcpUrl, { autoAck: true });
    clients.push(again);
    const next: EventMsg[] = [];
    again.on('event', (e: EventMsg) => next.push(e));
    // The gateway's Redis connections come back on their own: a resume may first be refused.
    await until('a resume after the restart', () =>
      again.request('resume', { token: session.token }).then(
        () => true,
        () => false,
      ),
    );
    await until(`${eid} again`, () => next.some((e) => e.eid === eid));
    assert.equal(got.length, 1);
    assert.equal(next.find((e) => e.eid === eid)!.attempt, 2);
  } finally {
    await g.stop();
    await own.remove();
  }
});
