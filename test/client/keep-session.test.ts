/**
 * A gateway ends a session `SESSION_TTL` after its login or its last resume or refresh, and
 * kicks its connections `session_revoked` (test/e2e/session-expiry.test.ts). A device that
 * stays connected keeps its session with the client's `keepSession` (on by default): once 70-90%
 * of the access token's life has passed it refreshes the token pair, which extends the session.
 * Here tokens live 10 s and sessions 20 s: a client with `keepSession: false` is kicked about
 * 20 s after its login, while one with the default is still connected then, still reached by a
 * back end's event, and resumes at once on a new connection with the token it holds.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { GatewayClient, type Session, tokenLifeMs } from '../../client/client.ts';
import { signUp } from '../helpers/accounts.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

const API_KEY = 'keep-session-api-key-0123456789';
let gw: GatewayProcess;
const clients: GatewayClient[] = [];

before(async () => {
  gw = await startGateway({
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    ACCESS_TOKEN_TTL: '10',
    SESSION_TTL: '20',
    GW_SWEEP_INTERVAL_MS: '200',
  });
});
after(async () => {
  for (const c of clients) c.destroy();
  await gw?.stop();
});

async function device(keepSession?: boolean) {
  const c = new GatewayClient({ url: gw.tcpUrl, ...(keepSession === undefined ? {} : { keepSession }) });
  clients.push(c);
  await within('the handshake', c.connect());
  const id = `keep-${randomUUID().slice(0, 8)}`;
  const session = await within('the sign-up', signUp(c, { id }));
  const kicks: string[] = [];
  c.on('kick', (k: { code: string }) => kicks.push(k.code));
  let refreshes = 0;
  c.on('refreshed', () => refreshes++);
  return { c, id, session, kicks, refreshes: () => refreshes };
}

test("a token's life is read from its claims", () => {
  const claims = Buffer.from(JSON.stringify({ iat: 1000, exp: 1900 })).toString('base64url');
  assert.equal(tokenLifeMs(`e30.${claims}.sig`), 900_000);
  assert.equal(tokenLifeMs('not a token'), undefined);
  assert.equal(tokenLifeMs(undefined), undefined);
});

test('a connected client keeps its session past SESSION_TTL by refreshing; one without keepSession is kicked at its end', async () => {
  const kept = await device();
  const dropped = await device(false);
  await until('the session without keepSession ended and kicked', () => dropped.kicks.length > 0, 40_000);
  assert.deepEqual(dropped.kicks, ['session_revoked']);
  assert.equal(dropped.refreshes(), 0);
  // Past its login's SESSION_TTL (the other was logged in after it): still connected, still
  // reached by a device-targeted event (a session ended has no device to target).
  assert.ok(kept.refreshes() >= 1, `refreshed ${kept.refreshes()} times`);
  const eid = `keep-${randomUUID().slice(0, 8)}`;
  const got = nextEvent<{ eid: string }>(kept.c, 'event', 'the event at the kept session');
  const res = await postEvents(gw.httpPort, API_KEY, [
    { target: { device: kept.id }, eid, name: 'keep.test', data: {} },
  ]);
  assert.equal(res.status, 202, await res.text());
  assert.equal((await got).eid, eid);
  assert.deepEqual(kept.kicks, [], 'the kept session was not ended');
  // The token it holds is still valid: a new connection resumes with it at once.
  const held = kept.c.session as Session;
  const again = new GatewayClient({ url: gw.tcpUrl });
  clients.push(again);
  await within('a second connection', again.connect());
  const resumed = await within(
    'a resume with the held token',
    again.request<Session>('resume', { token: held.token }),
  );
  assert.equal(resumed.sessionId, kept.session.sessionId);
});

test('an automatic refresh that Redis refuses while it is frozen is tried again: the session outlives its first end', async () => {
  const redis = await startOwnRedis();
  const g = await startGateway({
    REDIS_URL: redis.url,
    GW_DEFAULT_ROOM: '',
    ACCESS_TOKEN_TTL: '10',
    SESSION_TTL: '20',
    GW_SWEEP_INTERVAL_MS: '200',
    // A frozen Redis answers `overloaded` after a second, not at the thaw.
    GW_REDIS_TIMEOUT_MS: '1000',
  });
  const c = new GatewayClient({ url: g.tcpUrl });
  try {
    await within('the handshake', c.connect());
    const s = await within('the sign-up', signUp(c));
    // The client counts the token's life from when it got it: the login's answer. (Taken before
    // the sign-up, a sign-up slowed by a loaded machine's hashing put the refresh after the thaw.)
    const loginAt = Date.now();
    const kicks: string[] = [];
    c.on('kick', (k: { code: string }) => kicks.push(k.code));
    let refreshes = 0;
    c.on('refreshed', () => refreshes++);
    const failed: unknown[] = [];
    c.on('refreshFailed', (f: unknown) => failed.push(f));
    // Frozen from before the first automatic refresh (at 7 to 9 s of the token's 10) until after.
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, loginAt + 6000 - Date.now())));
    redis.freeze();
    try {
      // Until the gateway refused a refresh (at 7-9 s, answered after its 1 s Redis timeout),
      // not for a set time: a loaded machine can take longer to get the refresh there. The
      // session's life (20 s) is well past the deadline.
      await until(
        'a refresh refused while Redis is frozen',
        async () =>
          (await scrapeMetrics(g.metricsPort)).value(
            'gateway_auth_total{operation="refresh",result="error"}',
          ) >= 1,
        loginAt + 16_000 - Date.now(),
      );
    } finally {
      redis.thaw();
    }
    await until('the automatic refresh done after the thaw', () => refreshes > 0, 30_000);
    assert.deepEqual(failed, [], 'no definitive refusal');
    // Past the login's SESSION_TTL: the session is still there, and the connection with it.
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, loginAt + 21_000 - Date.now())));
    const r = await within(
      'the sessions of the kept session',
      c.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
    );
    assert.equal(r.sessions.find((x) => x.current)?.sessionId, s.sessionId);
    assert.deepEqual(kicks, []);
  } finally {
    c.destroy();
    await g.stop();
    await redis.remove();
  }
});
