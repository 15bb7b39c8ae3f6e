/**
 * The HTTP auth API (the session-manager seed's routes) on uWebSockets.js, end to end.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { createLocalJWKSet, jwtVerify } from 'jose';
import { GatewayClient } from '../../client/client.ts';
import { newName, PASSWORD } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postJson, registerOverHttp } from '../helpers/http.ts';

let gw: GatewayProcess;
let base: string;

before(async () => {
  // Grace period off: a second use of a rotated refresh token is reuse at once.
  gw = await startGateway({
    GW_HTTP_MAX_BODY: '2048',
    GW_LOCKOUT_ATTEMPTS: '2',
    GW_REFRESH_GRACE_SECONDS: '0',
  });
  base = `http://127.0.0.1:${gw.httpPort}`;
});
after(async () => {
  await gw.stop();
});

const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
  postJson(base + path, body, headers);

async function registerAndLogin() {
  const username = await registerOverHttp(base);
  const res = await post(
    '/auth/login',
    { username, password: PASSWORD, device: { id: `browser-${username}` } },
    { 'user-agent': 'test-agent/1' },
  );
  assert.equal(res.status, 200);
  return { username, res, body: (await res.json()) as Record<string, string> };
}

test('register, login with HttpOnly SameSite=Strict cookies, me by bearer and by cookie', async () => {
  const { username, res, body } = await registerAndLogin();
  const cookies = res.headers.getSetCookie();
  assert.equal(cookies.length, 2);
  for (const c of cookies) {
    assert.match(c, /HttpOnly/);
    assert.match(c, /SameSite=Strict/);
    assert.doesNotMatch(c, /Secure/, 'GW_COOKIE_SECURE=false in tests');
  }
  const session = cookies.find((c) => c.startsWith('gw_session='))!.split(';')[0];
  const byBearer = await fetchWithin(`${base}/auth/user/me`, {
    headers: { authorization: `Bearer ${body.token}` },
  });
  assert.equal(byBearer.status, 200);
  const me = (await byBearer.json()) as Record<string, unknown>;
  assert.equal(me.username, username);
  assert.equal(me.email, `${username}@example.com`);
  const byCookie = await fetchWithin(`${base}/auth/user/me`, { headers: { cookie: session } });
  assert.equal(byCookie.status, 200);
  const sessions = (await (
    await fetchWithin(`${base}/auth/user/sessions`, { headers: { cookie: session } })
  ).json()) as {
    sessions: Record<string, unknown>[];
  };
  assert.equal(sessions.sessions.length, 1);
  assert.equal(sessions.sessions[0].current, true);
  assert.deepEqual(sessions.sessions[0].device, { id: `browser-${username}` });
});

test('refresh, logout, and a revoked session is refused', async () => {
  const { body } = await registerAndLogin();
  const r = await post('/auth/refresh', { refresh: body.refresh });
  assert.equal(r.status, 200);
  const t = (await r.json()) as Record<string, string>;
  assert.notEqual(t.refresh, body.refresh);
  const reused = await post('/auth/refresh', { refresh: body.refresh });
  assert.equal(reused.status, 401);
  assert.equal(((await reused.json()) as { error: { code: string } }).error.code, 'refresh_reused');
  const me = await fetchWithin(`${base}/auth/user/me`, { headers: { authorization: `Bearer ${t.token}` } });
  assert.equal(me.status, 401, 'reuse ended the session');

  const second = await registerAndLogin();
  const out = await post('/auth/logout', {}, { authorization: `Bearer ${second.body.token}` });
  assert.equal(out.status, 200);
  assert.ok(
    out.headers.getSetCookie().every((c) => c.includes('Max-Age=0')),
    "out.headers.getSetCookie().every((c) => c.includes('Max-Age=0'))",
  );
  const after = await fetchWithin(`${base}/auth/user/me`, {
    headers: { authorization: `Bearer ${second.body.token}` },
  });
  assert.equal(after.status, 401);
  assert.equal(((await after.json()) as { error: { code: string } }).error.code, 'session_revoked');
});

test('DELETE /auth/user/sessions/:id revokes another session and kicks its device connection', async () => {
  const { username, body } = await registerAndLogin();
  const device = new GatewayClient({ url: gw.tcpUrl });
  await device.connect();
  const s = await device.request<{ sessionId: string }>('login', {
    username,
    password: PASSWORD,
    device: { id: `d2-${username}` },
  });
  const kicked = nextEvent<{ code: string }>(device, 'kick');
  const del = await fetchWithin(`${base}/auth/user/sessions/${s.sessionId}`, {
    method: 'DELETE',
    headers: { authorization: `Bearer ${body.token}` },
  });
  assert.equal(del.status, 200);
  assert.equal((await kicked).code, 'session_revoked');
  const missing = await fetchWithin(`${base}/auth/user/sessions/${s.sessionId}`, {
    method: 'DELETE',
    headers: { authorization: `Bearer ${body.token}` },
  });
  assert.equal(missing.status, 404);
});

test('JWKS verifies an access token offline', async () => {
  const { body } = await registerAndLogin();
  const jwks = await (await fetchWithin(`${base}/.well-known/jwks.json`)).json();
  const { payload, protectedHeader } = await jwtVerify(body.token, createLocalJWKSet(jwks as never), {
    issuer: 'device-gateway',
    audience: 'device-gateway',
  });
  assert.equal(protectedHeader.alg, 'EdDSA');
  assert.equal(payload.sub, body.userId);
  assert.equal(payload.sid, body.sessionId);
  assert.ok(typeof payload.exp === 'number', "typeof payload.exp === 'number'");
});

test('errors: stable codes and statuses 400, 401, 409, 413, 429 with Retry-After', async () => {
  const code = async (r: Response) => ((await r.json()) as { error: { code: string } }).error.code;
  let r = await post('/auth/register', '{not json');
  assert.equal(r.status, 400);
  assert.equal(await code(r), 'bad_message');
  r = await post('/auth/register', { username: 'x', email: 'e@example.com', password: PASSWORD });
  assert.equal(r.status, 400);
  assert.equal(await code(r), 'invalid_username');
  const { username } = await registerAndLogin();
  r = await post('/auth/register', { username, email: `${newName()}@example.com`, password: PASSWORD });
  assert.equal(r.status, 409);
  assert.equal(await code(r), 'username_taken');
  r = await post('/auth/register', {
    username: newName(),
    email: 'e@example.com',
    password: 'x'.repeat(3000),
  });
  assert.equal(r.status, 413);
  r = await fetchWithin(`${base}/auth/user/me`);
  assert.equal(r.status, 401);
  assert.equal(await code(r), 'unauthenticated');
  r = await post('/auth/login', { username, password: 'wrong one' });
  assert.equal(r.status, 401);
  assert.equal(await code(r), 'invalid_credentials');
  await post('/auth/login', { username, password: 'wrong one' });
  r = await post('/auth/login', { username, password: PASSWORD });
  assert.equal(r.status, 429);
  assert.equal(await code(r), 'locked');
  assert.ok(Number(r.headers.get('retry-after')) > 0, "Number(r.headers.get('retry-after')) > 0");
});

test('login validates like the wire request: a bad device is bad_message naming the field', async () => {
  const { username } = await registerAndLogin();
  const r = await post('/auth/login', { username, password: PASSWORD, device: { id: 5 } });
  assert.equal(r.status, 400);
  const e = ((await r.json()) as { error: { code: string; field: string } }).error;
  assert.equal(e.code, 'bad_message');
  assert.equal(e.field, 'device.id');
});
