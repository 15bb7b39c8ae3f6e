/**
 * Runtime limits of the admin API on two real gateway nodes: a limit set through one node while
 * devices send is enforced on both without a restart (`rate_limited` with `retryAfter`), per
 * device and per user, on events and bytes, for `publish`, `send` and `say`; DELETE lifts it.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { isProtocolError } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, until } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { assertDocumented } from '../helpers/openapi.ts';

const ADMIN_KEY = 'admin-key-for-limit-tests-5be1';
const deployment = deploymentEnv();
const SHARED = {
  GW_ADMIN_KEY: ADMIN_KEY,
  GW_DEFAULT_ROOM: '#general',
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

async function admin(
  g: GatewayProcess,
  method: string,
  path: string,
  route?: string,
  body?: unknown,
): Promise<{ status: number; body: Record<string, unknown> & { error?: { code: string; field?: string } } }> {
  const res = await fetchWithin(`http://127.0.0.1:${g.httpPort}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${ADMIN_KEY}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const json = (await res.json()) as Record<string, unknown> & { error?: { code: string; field?: string } };
  if (route) assertDocumented(method, route, res.status, json);
  return { status: res.status, body: json };
}

async function device(
  g: GatewayProcess,
  username?: string,
): Promise<{ c: GatewayClient; id: string; username: string }> {
  const c = await connected(g.tcpUrl);
  clients.push(c);
  const id = `dev-${randomUUID().slice(0, 8)}`;
  if (username) {
    await c.request('login', { username, password: PASSWORD, device: { id } });
    return { c, id, username };
  }
  const s = await signUp(c, { id });
  return { c, id, username: s.username };
}

/** Runs `request` until it is refused; returns the refusal (a deadline bounds the wait). */
async function untilRefused(
  what: string,
  request: () => Promise<unknown>,
): Promise<{ code: string; retryAfter?: number }> {
  return until(
    what,
    async () => {
      try {
        await request();
        return undefined;
      } catch (e) {
        if (!isProtocolError(e)) throw e;
        return { code: e.code, ...(e.retryAfter !== undefined ? { retryAfter: e.retryAfter } : {}) };
      }
    },
    20_000,
    0,
  );
}

/** A burst of `n` requests that all succeed (after a lift, eventually). */
function untilBurstPasses(what: string, n: number, request: () => Promise<unknown>): Promise<true> {
  return until(what, async () => {
    const r = await Promise.allSettled(Array.from({ length: n }, request));
    return r.every((x) => x.status === 'fulfilled') || undefined;
  });
}

test('device and user limits on publish, set through one node, hold on both while devices send, and DELETE lifts them', async () => {
  const d1 = await device(a);
  const d2 = await device(b, d1.username); // same user, the other node
  const d3 = await device(b); // another user
  const pub = (d: { c: GatewayClient }) => () => d.c.request('publish', { name: 'tick', data: { v: 1 } });

  // Sending freely first: a burst of 10 passes.
  await untilBurstPasses('unlimited burst', 10, pub(d3));

  // A device limit for d3 (on B), set through A.
  const put = await admin(a, 'PUT', `/v1/limits/devices/${d3.id}`, '/v1/limits/devices/{id}', {
    publish: { events: 3 },
  });
  assert.equal(put.status, 200);
  const r3 = await untilRefused('d3 refused', pub(d3));
  assert.equal(r3.code, 'rate_limited');
  assert.ok(r3.retryAfter! > 0 && r3.retryAfter! <= 1000, `retryAfter ${r3.retryAfter}`);

  // A user limit for d1/d2's user, set through B: both of its devices, on A and on B.
  const user = await admin(b, 'PUT', `/v1/limits/users/${d1.username}`, '/v1/limits/users/{name}', {
    publish: { events: 2 },
  });
  assert.equal(user.status, 200);
  assert.equal((await untilRefused('d1 (node A) refused', pub(d1))).code, 'rate_limited');
  assert.equal((await untilRefused('d2 (node B) refused', pub(d2))).code, 'rate_limited');

  const got = await admin(a, 'GET', `/v1/limits/users/${d1.username}`, '/v1/limits/users/{name}');
  assert.deepEqual(got.body.limits, { publish: { events: 2 } });
  const list = await admin(b, 'GET', '/v1/limits', '/v1/limits');
  const scopes = (list.body.limits as { scope: string; id: string }[]).map((l) => `${l.scope}:${l.id}`);
  assert.ok(scopes.includes(`device:${d3.id}`), JSON.stringify(list.body));
  assert.ok(
    scopes.some((s) => s.startsWith('user:')),
    "scopes.some((s) => s.startsWith('user:'))",
  );

  // Lifted, through the other node each time.
  assert.equal(
    (await admin(b, 'DELETE', `/v1/limits/devices/${d3.id}`, '/v1/limits/devices/{id}')).status,
    200,
  );
  assert.equal(
    (await admin(a, 'DELETE', `/v1/limits/users/${d1.username}`, '/v1/limits/users/{name}')).status,
    200,
  );
  await untilBurstPasses('d3 free again', 10, pub(d3));
  await untilBurstPasses('d1 free again', 10, pub(d1));
  await untilBurstPasses('d2 free again', 10, pub(d2));
  const gone = await admin(a, 'GET', `/v1/limits/devices/${d3.id}`, '/v1/limits/devices/{id}');
  assert.equal(gone.status, 404);
});

test('bytes per second, and the limits of send and say, per user', async () => {
  const d = await device(a);
  const peer = await device(b);
  await admin(b, 'PUT', `/v1/limits/users/${d.username}`, '/v1/limits/users/{name}', {
    publish: { bytes: 64 },
    send: { events: 1 },
    say: { events: 1 },
  });
  // A publish larger than the budget of a whole second is always refused.
  const big = await untilRefused('a 200-byte publish refused', () =>
    d.c.request('publish', { name: 'blob', data: 'x'.repeat(200) }),
  );
  assert.equal(big.code, 'rate_limited');
  const send = await untilRefused('send refused', () =>
    d.c.request('send', { to: peer.username, body: 'hello' }),
  );
  assert.equal(send.code, 'rate_limited');
  const say = await untilRefused('say refused', () => d.c.request('say', { room: '#general', body: 'hi' }));
  assert.equal(say.code, 'rate_limited');
  // Another user is not limited.
  await untilBurstPasses('the peer says freely', 5, () =>
    peer.c.request('say', { room: '#general', body: 'yo' }),
  );
  await admin(a, 'DELETE', `/v1/limits/users/${d.username}`, '/v1/limits/users/{name}');
  await untilBurstPasses('d says freely again', 5, () =>
    d.c.request('say', { room: '#general', body: 'ok' }),
  );
});

test('bad limit bodies are 400 naming the field; unknown users and absent limits are 404', async () => {
  const dev = `dev-${randomUUID().slice(0, 8)}`;
  const cases: [unknown, string][] = [
    [{}, 'body'],
    [[], 'body'],
    [{ publish: { events: 0 } }, 'publish.events'],
    [{ publish: { events: 1.5 } }, 'publish.events'],
    [{ publish: { bytes: '10' } }, 'publish.bytes'],
    [{ publish: { events: 1, rate: 2 } }, 'publish.rate'],
    [{ publish: {} }, 'publish'],
    [{ join: { events: 1 } }, 'join'],
  ];
  for (const [body, field] of cases) {
    const r = await admin(a, 'PUT', `/v1/limits/devices/${dev}`, '/v1/limits/devices/{id}', body);
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.equal(r.body.error?.code, 'bad_message');
    assert.equal(r.body.error?.field, field, JSON.stringify(body));
  }
  const nobody = newName();
  for (const method of ['GET', 'PUT', 'DELETE']) {
    const r = await admin(
      a,
      method,
      `/v1/limits/users/${nobody}`,
      '/v1/limits/users/{name}',
      method === 'PUT' ? { say: { events: 1 } } : undefined,
    );
    assert.equal(r.status, 404, method);
    assert.equal(r.body.error?.code, 'not_found');
  }
  assert.equal((await admin(a, 'GET', `/v1/limits/devices/${dev}`)).status, 404);
  assert.equal((await admin(a, 'DELETE', `/v1/limits/devices/${dev}`)).status, 404);
  const badCursor = await admin(a, 'GET', '/v1/limits?cursor=abc');
  assert.equal(badCursor.body.error?.field, 'cursor');
});

test('limiters of figures no longer set are dropped: many PUTs in turn, and concurrently, keep a bounded few, and the last figure applies', async () => {
  const d = await device(a);
  const pub = () => d.c.request('publish', { name: 'tick', data: { v: 1 } });
  const limiters = async () => (await scrapeMetrics(a.metricsPort)).value('gateway_rate_limiters');
  /** Waits for the node to hold `want` limiters; a timeout says how many it held. */
  const settlesAt = async (what: string, want: number) => {
    let held = Number.NaN;
    try {
      await until(what, async () => {
        held = await limiters();
        return held === want || undefined;
      });
    } catch (e) {
      throw new Error(`${(e as Error).message}; the node held ${held} limiters`);
    }
  };
  const path = `/v1/limits/devices/${d.id}`;
  const route = '/v1/limits/devices/{id}';
  // One figure after another, each used by requests of the device (a limiter is made on use).
  for (let i = 0; i < 25; i++) {
    assert.equal((await admin(a, 'PUT', path, route, { publish: { events: 1000 + i } })).status, 200);
    for (let j = 0; j < 3; j++) await pub();
  }
  // PUTs racing each other and requests.
  await Promise.all([
    ...Array.from({ length: 10 }, (_, i) => admin(a, 'PUT', path, route, { publish: { events: 2000 + i } })),
    ...Array.from({ length: 20 }, () => pub().catch(() => undefined)),
  ]);
  assert.equal((await admin(a, 'PUT', path, route, { publish: { events: 2 } })).status, 200);
  assert.equal((await untilRefused('the last figure (2 a second) refuses', pub)).code, 'rate_limited');
  // The full reload (every 5 s) settles any race: then only the figure in force has a limiter.
  await settlesAt('one limiter left on the node (the figure in force)', 1);
  assert.equal((await untilRefused('the last figure still refuses', pub)).code, 'rate_limited');
  // DELETE leaves none.
  assert.equal((await admin(a, 'DELETE', path, route)).status, 200);
  await settlesAt('no limiter left once the limit is deleted', 0);
  await untilBurstPasses('free again', 10, pub);
});
