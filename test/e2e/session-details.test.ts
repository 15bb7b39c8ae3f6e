/**
 * Session details end to end (the session-manager seed's session list, and the wire's
 * `sessions` extensions): lastActivityAt / lastSeenAt moving with activity no more often than
 * GW_SESSION_ACTIVITY_MS, expiresAt, device info from the User-Agent, `Local` for loopback,
 * newest activity first with totalActiveSessions, /auth/user/me with fullName, and `online`.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, until } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postJson } from '../helpers/http.ts';

const THROTTLE_MS = 1500;
const TTL_S = 3600;
const FIREFOX = 'Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0';

interface SessionItem {
  sessionId: string;
  device: Record<string, unknown> | null;
  deviceInfo: Record<string, unknown> | null;
  ip: string;
  location: string | null;
  createdAt: number;
  lastSeenAt: number;
  lastActivityAt: number;
  expiresAt: number;
  online: boolean;
  current: boolean;
}
interface SessionList {
  sessions: SessionItem[];
  totalActiveSessions: number;
}

let gw: GatewayProcess;
let base: string;

before(async () => {
  gw = await startGateway({
    GW_SESSION_ACTIVITY_MS: String(THROTTLE_MS),
    SESSION_TTL: String(TTL_S),
    GW_REGISTER_PER_MINUTE: '1000',
    GW_GEOIP_DB: fileURLToPath(new URL('../fixtures/geoip-city-test.mmdb', import.meta.url)),
  });
  base = `http://127.0.0.1:${gw.httpPort}`;
});
after(async () => {
  await gw.stop();
});

const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
  postJson(base + path, body, headers);

async function register(fullName?: string): Promise<string> {
  const username = newName();
  const r = await post('/auth/register', {
    username,
    email: `${username}@example.com`,
    password: PASSWORD,
    ...(fullName !== undefined ? { fullName } : {}),
  });
  assert.equal(r.status, 201, await r.clone().text());
  return username;
}

async function httpLogin(username: string, userAgent: string): Promise<{ token: string; sessionId: string }> {
  const r = await post('/auth/login', { username, password: PASSWORD }, { 'user-agent': userAgent });
  assert.equal(r.status, 200);
  return (await r.json()) as { token: string; sessionId: string };
}

async function get<T>(path: string, token: string): Promise<T> {
  const r = await fetchWithin(base + path, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200, await r.clone().text());
  return (await r.json()) as T;
}

test('/auth/user/me has the seed fields, fullName when registered with one (null without)', async () => {
  const named = await register('  Ada Lovelace ');
  const a = await httpLogin(named, FIREFOX);
  const me = await get<Record<string, unknown>>('/auth/user/me', a.token);
  assert.equal(me.username, named);
  assert.equal(me.email, `${named}@example.com`);
  assert.equal(me.fullName, 'Ada Lovelace');
  assert.equal(me.sessionId, a.sessionId);
  assert.equal(typeof me.userId, 'string');
  assert.equal(typeof me.createdAt, 'number');
  assert.equal(typeof me.lastLoginAt, 'number');
  const plain = await register();
  const b = await httpLogin(plain, FIREFOX);
  assert.equal((await get<Record<string, unknown>>('/auth/user/me', b.token)).fullName, null);
  // Over the wire too, and a bad one is refused with its field.
  const c = await connected(gw.tcpUrl);
  const username = newName();
  await c.request('register', {
    username,
    email: `${username}@example.com`,
    password: PASSWORD,
    fullName: 'Grace Hopper',
  });
  const s = await c.request<{ token: string }>('login', { username, password: PASSWORD });
  assert.equal((await get<Record<string, unknown>>('/auth/user/me', s.token)).fullName, 'Grace Hopper');
  const bad = await post('/auth/register', {
    username: newName(),
    email: `${newName()}@example.com`,
    password: PASSWORD,
    fullName: 'x'.repeat(129),
  });
  assert.equal(bad.status, 400);
  assert.match(((await bad.json()) as { error: { message: string } }).error.message, /fullName/);
  await c.close();
});

test('an HTTP session shows device info from its User-Agent, Local for loopback, and its expiry', async () => {
  const username = await register();
  const a = await httpLogin(username, FIREFOX);
  const list = await get<SessionList>('/auth/user/sessions', a.token);
  assert.equal(list.totalActiveSessions, 1);
  const s = list.sessions[0];
  assert.equal(s.sessionId, a.sessionId);
  assert.equal(s.current, true);
  assert.equal(s.device, null);
  assert.equal(s.deviceInfo?.name, 'Firefox 121 on Ubuntu');
  assert.equal(s.deviceInfo?.browser, 'Firefox 121');
  assert.equal(s.deviceInfo?.os, 'Ubuntu');
  assert.equal(s.location, 'Local');
  assert.equal(s.ip, '127.0.0.1');
  assert.equal(s.lastActivityAt, s.lastSeenAt);
  // The session hash's TTL: SESSION_TTL from its start (no resume or refresh since).
  assert.ok(s.expiresAt > Date.now(), `expiresAt ${s.expiresAt} is in the future`);
  assert.ok(s.expiresAt <= s.createdAt + TTL_S * 1000 + 1000, 'at most SESSION_TTL after the start');
  assert.ok(s.expiresAt >= s.createdAt + TTL_S * 1000 - 60_000, 'about SESSION_TTL after the start');
  assert.equal(s.online, false, 'no connection: HTTP only');
});

test('newest activity first, with totalActiveSessions; activity over HTTP moves lastActivityAt', async () => {
  const username = await register();
  const first = await httpLogin(username, 'agent-one/1');
  const second = await httpLogin(username, 'agent-two/1');
  const third = await httpLogin(username, 'agent-three/1');
  const order = (l: SessionList) => l.sessions.map((s) => s.sessionId);
  // No activity since they started: newest first.
  const before = await get<SessionList>('/auth/user/sessions', third.token);
  assert.equal(before.totalActiveSessions, 3);
  assert.deepEqual(order(before), [third.sessionId, second.sessionId, first.sessionId]);
  // The first is used: once its activity is written it is ahead of the second. (Listing with
  // the third's token is activity of the third, so the third may lead or follow the first.)
  const listed = await until('the first session active again, ahead of the second', async () => {
    await get('/auth/user/me', first.token);
    const l = await get<SessionList>('/auth/user/sessions', third.token);
    const ids = order(l);
    return ids.indexOf(first.sessionId) < ids.indexOf(second.sessionId) ? l : undefined;
  });
  assert.equal(
    listed.sessions.at(-1)!.sessionId,
    second.sessionId,
    'the one not used since its start is last',
  );
  const byId = new Map(listed.sessions.map((s) => [s.sessionId, s]));
  assert.ok(
    byId.get(first.sessionId)!.lastActivityAt > byId.get(first.sessionId)!.createdAt,
    'byId.get(first.sessionId)!.lastActivityAt > byId.get(first.sessionId)!.createdAt',
  );
  for (let i = 1; i < listed.sessions.length; i++)
    assert.ok(listed.sessions[i - 1].lastActivityAt >= listed.sessions[i].lastActivityAt, 'sorted');
});

test('wire `sessions`: lastSeenAt moves with activity but not more often than the throttle; online', async () => {
  const a = await connected(gw.tcpUrl);
  const s = await signUp(a, { id: `phone-${newName()}` });
  const b = await connected(gw.wsUrl);
  const other = await b.request<{ sessionId: string }>('login', { username: s.username, password: PASSWORD });
  const list = async () => a.request<SessionList>('sessions');
  let l = await list();
  assert.equal(l.totalActiveSessions, 2);
  const on = (x: SessionList, sid: string) => x.sessions.find((y) => y.sessionId === sid)!;
  assert.equal(on(l, s.sessionId).online, true);
  await until('the second session online', async () => on(await list(), other.sessionId).online);
  // The second disconnects: still a live session, no longer online.
  await b.close();
  l = await until('the disconnected session offline', async () => {
    const x = await list();
    return on(x, other.sessionId).online ? undefined : x;
  });
  assert.equal(l.totalActiveSessions, 2);
  assert.equal(on(l, s.sessionId).online, true);
  assert.equal(on(l, s.sessionId).current, true);
  assert.equal(on(l, other.sessionId).current, false);

  // Requests keep coming (each `sessions` is activity): the value this session shows moves,
  // in steps of at least the throttle.
  const created = on(l, s.sessionId).createdAt;
  const values = new Set<number>([on(l, s.sessionId).lastSeenAt]);
  await until(
    'lastSeenAt written three times',
    async () => {
      values.add(on(await list(), s.sessionId).lastSeenAt);
      return values.size >= 4;
    },
    30_000,
    100,
  );
  const sorted = [...values].sort((x, y) => x - y);
  assert.equal(sorted[0], created, 'at first, the session start');
  for (let i = 2; i < sorted.length; i++)
    assert.ok(
      sorted[i] - sorted[i - 1] >= THROTTLE_MS,
      `steps ${sorted.join(', ')} at least ${THROTTLE_MS} ms`,
    );
  // The wire's lastSeenAt is the HTTP lastActivityAt.
  const viaHttp = await get<SessionList>('/auth/user/sessions', s.token);
  const wire = on(await list(), s.sessionId);
  assert.equal(on(viaHttp, s.sessionId).lastActivityAt >= sorted.at(-1)!, true);
  assert.equal(wire.lastSeenAt, wire.lastActivityAt);
  await a.close();
});
