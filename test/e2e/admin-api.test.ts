/**
 * The admin HTTP API against two real gateway nodes sharing Redis and PostgreSQL: devices,
 * sessions, revoke and kick across nodes, the delivery state of events through their life,
 * dead letters and their retry, auth and bad inputs. Every 2xx answer is checked against
 * docs/openapi.yaml.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { assertDocumented } from '../helpers/openapi.ts';

const ADMIN_KEY = 'admin-key-for-tests-7f3a9c';
const API_KEY = 'publish-key-for-tests-41d2e8';
const deployment = deploymentEnv();
const SHARED = {
  GW_ADMIN_KEY: ADMIN_KEY,
  GW_API_KEY: API_KEY,
  GW_ACK_TIMEOUT_MS: '300',
  GW_RETRY_BASE_MS: '100',
  GW_RETRY_MAX_MS: '200',
  GW_MAX_ATTEMPTS: '2',
  GW_SWEEP_INTERVAL_MS: '300',
  GW_DEFAULT_ROOM: '',
  GW_REGISTER_PER_MINUTE: '1000',
  ...deployment,
};

let a: GatewayProcess;
let b: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  a = await startGateway(SHARED);
  b = await startGateway(SHARED);
});
after(async () => {
  await Promise.allSettled(clients.map((c) => c.close()));
  await Promise.allSettled([a?.stop(), b?.stop()]);
  await dropDeployment(deployment);
});

interface Answer {
  status: number;
  body: Record<string, unknown> & { error?: { code: string; field?: string } };
}

/** An admin request; `route` is the documented pattern the answer is checked against. */
async function admin(
  g: GatewayProcess,
  method: string,
  path: string,
  route?: string,
  init: { body?: unknown; key?: string | null } = {},
): Promise<Answer> {
  const key = init.key === undefined ? ADMIN_KEY : init.key;
  const res = await fetchWithin(`http://127.0.0.1:${g.httpPort}${path}`, {
    method,
    headers: {
      ...(key !== null ? { authorization: `Bearer ${key}` } : {}),
      ...(init.body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(init.body !== undefined ? { body: JSON.stringify(init.body) } : {}),
  });
  const body = (await res.json()) as Answer['body'];
  if (route) assertDocumented(method, route, res.status, body);
  return { status: res.status, body };
}

async function client(url: string, options: { autoAck?: boolean } = {}): Promise<GatewayClient> {
  const c = await connected(url, options);
  clients.push(c);
  return c;
}

async function publish(g: GatewayProcess, body: unknown): Promise<string> {
  const res = await fetchWithin(`http://127.0.0.1:${g.httpPort}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 202, await res.clone().text());
  return ((await res.json()) as { eids: string[] }).eids[0];
}

describe('auth', () => {
  test('no key or a wrong key is 401 unauthenticated, the publish key 403 forbidden, on every route', async () => {
    const routes: [string, string][] = [
      ['GET', '/v1/devices'],
      ['GET', '/v1/devices/d1'],
      ['POST', '/v1/devices/d1/kick'],
      ['GET', '/v1/users/someone/sessions'],
      ['POST', '/v1/sessions/s1/revoke'],
      ['GET', '/v1/events/e1?session=s1'],
      ['GET', '/v1/dead-letters'],
      ['POST', '/v1/dead-letters/x-y/retry'],
    ];
    for (const [method, path] of routes) {
      const none = await admin(a, method, path, undefined, { key: null });
      assert.equal(none.status, 401, `${method} ${path} without a key`);
      assert.equal(none.body.error?.code, 'unauthenticated');
      const wrong = await admin(a, method, path, undefined, { key: `${ADMIN_KEY}x` });
      assert.equal(wrong.status, 401, `${method} ${path} with a wrong key`);
      assert.equal(wrong.body.error?.code, 'unauthenticated');
      const publishKey = await admin(a, method, path, undefined, { key: API_KEY });
      assert.equal(publishKey.status, 403, `${method} ${path} with the publish key`);
      assert.equal(publishKey.body.error?.code, 'forbidden');
    }
  });

  test('the admin key does not open the publish API', async () => {
    const res = await fetchWithin(`http://127.0.0.1:${a.httpPort}/v1/events`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${ADMIN_KEY}` },
      body: JSON.stringify({ target: { username: 'nobody' }, name: 'x' }),
    });
    assert.equal(res.status, 401);
    assert.equal(((await res.json()) as Answer['body']).error?.code, 'unauthenticated');
  });

  test('without GW_ADMIN_KEY the admin routes are 404, and the gateway refuses one key for both APIs', async () => {
    const g = await startGateway({ GW_API_KEY: API_KEY });
    try {
      for (const [method, path] of [
        ['GET', '/v1/devices'],
        ['POST', '/v1/sessions/s1/revoke'],
      ]) {
        const r = await admin(g, method, path);
        assert.equal(r.status, 404, `${method} ${path}`);
        assert.equal(r.body.error?.code, 'not_found');
      }
    } finally {
      await g.stop();
    }
    const same = await startGateway({ GW_API_KEY: API_KEY, GW_ADMIN_KEY: API_KEY }).then(
      (x) => x.stop().then(() => 'started'),
      (e: Error) => e.message,
    );
    assert.match(same, /GW_ADMIN_KEY: must differ from GW_API_KEY/);
  });
});

describe('devices and sessions', () => {
  test('a device on node B, seen through node A: owner, online, node, usage; lists by owner and online', async () => {
    const username = newName();
    const dev = `dev-${randomUUID().slice(0, 8)}`;
    const c = await client(b.tcpUrl);
    const node = c.welcome?.node;
    assert.ok(node, 'node');
    await signUp(c, { id: dev }, username);
    await c.request('publish', { name: 'telemetry', data: { t: 21.5 } });
    await c.request('publish', { name: 'telemetry', data: { t: 21.6 } });

    const d = await until('usage counters flushed', async () => {
      const r = await admin(a, 'GET', `/v1/devices/${dev}`, '/v1/devices/{id}');
      const usage = r.body.usage as { eventsIn: number };
      return r.status === 200 && usage.eventsIn === 2 ? r.body : undefined;
    });
    assert.equal((d.owner as { username: string }).username, username);
    assert.equal(d.online, true);
    assert.equal(d.node, node);
    assert.equal(typeof d.connectedSince, 'number');
    assert.equal(d.outboxDepth, 0);
    assert.ok((d.usage as { bytesIn: number }).bytesIn > 0, '(d.usage as { bytesIn: number }).bytesIn > 0');

    // Two more devices of the same owner, one of them offline: pages of 2, then by online.
    const c2 = await client(a.tcpUrl);
    await c2.request('login', { username, password: PASSWORD, device: { id: `${dev}-2` } });
    const c3 = await client(a.tcpUrl);
    await c3.request('login', { username, password: PASSWORD, device: { id: `${dev}-3` } });
    await c3.close();
    const first = await admin(a, 'GET', `/v1/devices?owner=${username}&limit=2`, '/v1/devices');
    assert.deepEqual(
      (first.body.devices as { id: string }[]).map((x) => x.id),
      [dev, `${dev}-2`],
    );
    assert.equal(typeof first.body.nextCursor, 'string');
    const second = await admin(
      a,
      'GET',
      `/v1/devices?owner=${username}&limit=2&cursor=${first.body.nextCursor}`,
      '/v1/devices',
    );
    assert.deepEqual(
      (second.body.devices as { id: string }[]).map((x) => x.id),
      [`${dev}-3`],
    );
    assert.equal(second.body.nextCursor, null);
    const offline = await until('the closed device offline', async () => {
      const r = await admin(a, 'GET', `/v1/devices?owner=${username}&online=false`, '/v1/devices');
      const ids = (r.body.devices as { id: string }[]).map((x) => x.id);
      return ids.length === 1 ? ids : undefined;
    });
    assert.deepEqual(offline, [`${dev}-3`]);
    const online = await admin(a, 'GET', `/v1/devices?owner=${username}&online=true`, '/v1/devices');
    assert.deepEqual((online.body.devices as { id: string }[]).map((x) => x.id).sort(), [dev, `${dev}-2`]);
    const nobody = await admin(a, 'GET', `/v1/devices?owner=${newName()}`, '/v1/devices');
    assert.deepEqual(nobody.body, { devices: [], nextCursor: null });

    // The user's sessions, joined to presence.
    const s = await admin(b, 'GET', `/v1/users/${username}/sessions`, '/v1/users/{name}/sessions');
    const sessions = s.body.sessions as { online: boolean; node: string | null; device: { id: string } }[];
    assert.equal(sessions.length, 3);
    const byDevice = new Map(sessions.map((x) => [x.device.id, x]));
    assert.equal(byDevice.get(dev)?.online, true);
    assert.equal(byDevice.get(dev)?.node, node);
    assert.equal(byDevice.get(`${dev}-3`)?.online, false);

    // Ids stay out of metric labels and access lines: route patterns only.
    const metrics = await (await fetchWithin(`http://127.0.0.1:${a.metricsPort}/metrics`)).text();
    assert.ok(metrics.includes('route="/v1/devices/:id"'), 'admin requests are counted by pattern');
    for (const id of [dev, username]) assert.ok(!metrics.includes(id), `${id} in a metric label`);
    // Access lines are written in blocks, at least every GW_ACCESS_LOG_FLUSH_MS.
    const access = await until('the access lines of the admin requests', () => {
      const routes = a.logs.filter((l) => l.msg === 'http').map((l) => String(l.route));
      return routes.includes('/v1/users/:name/sessions') || routes.includes('/v1/devices/:id')
        ? routes
        : undefined;
    });
    assert.ok(!access.some((r) => r.includes(dev) || r.includes(username)), 'ids in access lines');
  });

  test('unknown devices and users are 404; bad parameters are 400 naming the field', async () => {
    const cases: [string, string, number, string, string?][] = [
      ['GET', '/v1/devices/no-such-device', 404, 'not_found'],
      ['GET', `/v1/users/${newName()}/sessions`, 404, 'not_found'],
      ['POST', '/v1/sessions/no-such-session/revoke', 404, 'not_found'],
      ['POST', '/v1/devices/no-such-device/kick', 404, 'not_found'],
      ['POST', '/v1/dead-letters/no-such-letter/retry', 404, 'not_found'],
      ['GET', '/v1/devices?limit=0', 400, 'bad_message', 'limit'],
      ['GET', '/v1/devices?limit=101', 400, 'bad_message', 'limit'],
      ['GET', '/v1/devices?limit=ten', 400, 'bad_message', 'limit'],
      ['GET', '/v1/devices?online=maybe', 400, 'bad_message', 'online'],
      ['GET', '/v1/devices?cursor=not-a-cursor', 400, 'bad_message', 'cursor'],
      ['GET', '/v1/dead-letters?cursor=bad', 400, 'bad_message', 'cursor'],
      ['GET', '/v1/events/e1', 400, 'bad_message', 'session'],
      ['GET', '/v1/devices/%E0%A4%A', 400, 'bad_message', 'id'],
      ['GET', `/v1/devices/${'x'.repeat(300)}`, 400, 'bad_message', 'id'],
    ];
    for (const [method, path, status, code, field] of cases) {
      const r = await admin(a, method, path);
      assert.equal(r.status, status, `${method} ${path}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error?.code, code, `${method} ${path}`);
      if (field) assert.equal(r.body.error?.field, field, `${method} ${path}`);
    }
    const dev = `dev-${randomUUID().slice(0, 8)}`;
    const c = await client(a.tcpUrl);
    await signUp(c, { id: dev });
    for (const retryAfter of [-1, 1.5, 'soon', 3_600_001]) {
      const r = await admin(a, 'POST', `/v1/devices/${dev}/kick`, undefined, { body: { retryAfter } });
      assert.equal(r.status, 400, `retryAfter ${retryAfter}`);
      assert.equal(r.body.error?.field, 'retryAfter');
    }
  });

  test('revoke through node A ends a session connected to node B at once', async () => {
    const c = await client(b.tcpUrl);
    const s = await signUp(c, { id: `dev-${randomUUID().slice(0, 8)}` });
    const kicked = nextEvent<{ code: string }>(c, 'kick', 'the revoked session kicked');
    const r = await admin(a, 'POST', `/v1/sessions/${s.sessionId}/revoke`, '/v1/sessions/{id}/revoke');
    assert.equal(r.status, 200);
    assert.equal((await kicked).code, 'session_revoked');
    const again = await admin(a, 'POST', `/v1/sessions/${s.sessionId}/revoke`, '/v1/sessions/{id}/revoke');
    assert.equal(again.status, 404);
    const resume = await client(a.tcpUrl);
    await assert.rejects(resume.request('resume', { token: s.token }), { code: 'session_revoked' });
  });

  test('kick through node A disconnects a device on node B; its session stays and resumes', async () => {
    const dev = `dev-${randomUUID().slice(0, 8)}`;
    const c = await client(b.tcpUrl);
    const s = await signUp(c, { id: dev });
    // The login is answered before its presence record is written (the node's binding call of
    // that tick): a kick before it finds the device not connected.
    await until('the device online', async () => {
      const d = await admin(a, 'GET', `/v1/devices/${dev}`, '/v1/devices/{id}');
      return d.body.online === true;
    });
    const kicked = nextEvent<{ code: string; retryAfter?: number }>(c, 'kick', 'the device kicked');
    const r = await admin(a, 'POST', `/v1/devices/${dev}/kick`, '/v1/devices/{id}/kick', {
      body: { retryAfter: 1234 },
    });
    assert.equal(r.status, 202);
    assert.equal(r.body.sessionId, s.sessionId);
    const k = await kicked;
    assert.equal(k.code, 'going_away');
    assert.equal(k.retryAfter, 1234);
    await until('the kicked device offline', async () => {
      const d = await admin(a, 'GET', `/v1/devices/${dev}`, '/v1/devices/{id}');
      return d.body.online === false;
    });
    const back = await client(a.tcpUrl);
    await back.request('resume', { token: s.token, device: { id: dev } });
    const d = await until('the device online again, on node A', async () => {
      const x = await admin(b, 'GET', `/v1/devices/${dev}`, '/v1/devices/{id}');
      return x.body.online === true ? x.body : undefined;
    });
    assert.equal(d.sessionId, s.sessionId);
  });
});

/**
 * Closes a device's connection and waits until the gateway has let it go: an event published
 * before that may still be sent (and acked) on the closing connection.
 */
async function closeAndWaitOffline(c: GatewayClient, username: string): Promise<void> {
  await c.close();
  await until('the session offline', async () => {
    const r = await admin(a, 'GET', `/v1/users/${username}/sessions`, '/v1/users/{name}/sessions');
    return (r.body.sessions as { online: boolean }[]).every((x) => !x.online);
  });
}

describe('events and dead letters', () => {
  test('an event through its life: queued, in flight at attempt n, acked', async () => {
    const c = await client(a.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    await closeAndWaitOffline(c, s.username);
    const eid = await publish(b, { target: { session: s.sessionId }, name: 'cmd', receipt: true });
    const state = (g: GatewayProcess) =>
      admin(g, 'GET', `/v1/events/${eid}?session=${s.sessionId}`, '/v1/events/{eid}').then((r) => r.body);
    assert.equal((await state(a)).state, 'queued');
    assert.equal((await state(a)).attempt, 0);

    const r = await client(b.tcpUrl, { autoAck: false });
    const got = collect(r);
    await r.request('resume', { token: s.token });
    await until('the event delivered', () => got.length > 0);
    const first = await until('in flight at attempt 1 or later', async () => {
      const x = await state(a);
      return x.state === 'in_flight' ? x : undefined;
    });
    assert.ok((first.attempt as number) >= 1, '(first.attempt as number) >= 1');
    // Not acked: the retry sends it again with a higher attempt, which the state shows.
    await until('a second attempt', () => got.length >= 2);
    const later = await state(b);
    assert.equal(later.state, 'in_flight');
    assert.equal(later.attempt, 2);
    r.ack([eid]);
    const acked = await until('acked', async () => {
      const x = await state(a);
      return x.state === 'acked' ? x : undefined;
    });
    assert.equal(acked.name, 'cmd');
    const unknown = await state(a).then(() =>
      admin(a, 'GET', `/v1/events/${randomUUID()}?session=${s.sessionId}`, '/v1/events/{eid}'),
    );
    assert.equal(unknown.body.state, 'unknown');
  });

  test('an event whose ttl passes while its device is offline is expired', async () => {
    const c = await client(a.tcpUrl);
    const s = await signUp(c);
    await closeAndWaitOffline(c, s.username);
    const eid = await publish(a, { target: { session: s.sessionId }, name: 'short', ttl: 100 });
    const x = await until('expired', async () => {
      const r = await admin(b, 'GET', `/v1/events/${eid}?session=${s.sessionId}`, '/v1/events/{eid}');
      return r.body.state === 'expired' ? r.body : undefined;
    });
    assert.equal(x.name, 'short');
  });

  test('a dead event is listed, retried once (concurrent and repeated retries publish nothing more), delivered once', async () => {
    const c = await client(b.tcpUrl, { autoAck: false });
    const s = await signUp(c);
    const got = collect(c);
    const eid = await publish(a, { target: { session: s.sessionId }, name: 'doomed', data: { n: 1 } });
    const dead = await until('dead after its attempts', async () => {
      const r = await admin(a, 'GET', `/v1/events/${eid}?session=${s.sessionId}`, '/v1/events/{eid}');
      return r.body.state === 'dead' ? r.body : undefined;
    });
    assert.equal(dead.attempts, 2);
    assert.equal(dead.reason, 'max_attempts');
    assert.equal(got.filter((e) => e.eid === eid).length, 2);

    // Listed, in pages of one.
    const id = `${s.sessionId}-${eid}`;
    const seen: string[] = [];
    let cursor: string | null = null;
    for (let i = 0; i < 50; i++) {
      const q: string = cursor ? `&cursor=${cursor}` : '';
      const page = await admin(a, 'GET', `/v1/dead-letters?limit=1${q}`, '/v1/dead-letters');
      const items = page.body.deadLetters as { id: string; eid: string }[];
      assert.ok(items.length <= 1, 'items.length <= 1');
      seen.push(...items.map((x) => x.id));
      cursor = page.body.nextCursor as string | null;
      if (!cursor) break;
    }
    assert.ok(seen.includes(id), `dead letter ${id} listed in ${JSON.stringify(seen)}`);

    // The device acks from now on; two retries at once, then a third later.
    const ackNow = (e: EventMsg) => c.ack([e.eid]);
    c.on('event', ackNow);
    const before = got.length;
    const path = `/v1/dead-letters/${id}/retry`;
    const route = '/v1/dead-letters/{id}/retry';
    const both = await Promise.all([admin(a, 'POST', path, route), admin(b, 'POST', path, route)]);
    assert.deepEqual(both.map((r) => r.body.status).sort(), ['already_retried', 'requeued']);
    assert.deepEqual(both.map((r) => r.status).sort(), [200, 202]);
    await until('the retried event delivered', () => got.slice(before).some((e) => e.eid === eid));
    const third = await admin(b, 'POST', path, route);
    assert.equal(third.status, 200);
    assert.equal(third.body.status, 'already_retried');
    // A marker published after the retries arrives after anything they could have queued.
    const marker = await publish(a, { target: { session: s.sessionId }, name: 'marker' });
    await until('the marker delivered', () => got.some((e) => e.eid === marker));
    assert.equal(got.slice(before).filter((e) => e.eid === eid).length, 1, 'delivered once');
    const page = await admin(a, 'GET', '/v1/dead-letters?limit=100', '/v1/dead-letters');
    assert.ok(!(page.body.deadLetters as { id: string }[]).some((x) => x.id === id), 'the letter left');
  });
});
