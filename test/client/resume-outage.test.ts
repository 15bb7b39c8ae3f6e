/**
 * The reconnection's resume against a gateway whose Redis is frozen (a private server of this
 * file): the gateway answers `resume` with `overloaded` and `retryAfter`, and the client keeps
 * its session and tries the resume again after it, until Redis is back. Only a definitive
 * answer (here `session_revoked`) drops the session, and the client says so. (A resume needs no
 * PostgreSQL: this file froze PostgreSQL until a resume stopped waiting for it.)
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { GatewayClient, type Session } from '../../client/client.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

let redis: OwnRedis;
let gw: GatewayProcess;

before(async () => {
  redis = await startOwnRedis();
  gw = await startGateway({ REDIS_URL: redis.url, GW_REDIS_TIMEOUT_MS: '500' });
});
after(async () => {
  await gw?.stop();
  await redis?.remove();
});

test('a resume answered overloaded (Redis frozen) is tried again, and the session comes back after the thaw', async () => {
  const c = new GatewayClient({ url: gw.tcpUrl, reconnect: { initialDelayMs: 100, maxDelayMs: 1000 } });
  await within('the handshake', c.connect());
  try {
    const s = await signUp(c);
    const errors: string[] = [];
    c.on('reconnectError', (e: { code?: string; message: string }) => errors.push(e.code ?? e.message));
    let lost = false;
    c.on('sessionLost', () => {
      lost = true;
    });
    const reconnected = nextEvent<Session | undefined>(
      c,
      'reconnected',
      'the session resumed once Redis is back',
      40_000,
    );
    redis.freeze();
    try {
      c.destroy();
      // Redis stays frozen until a resume was answered overloaded: a fixed 6 s could end
      // before a busy machine had reconnected and had the answer.
      await until('a resume answered overloaded while Redis is frozen', () => errors.includes('overloaded'));
    } finally {
      redis.thaw();
    }
    const resumed = await reconnected;
    assert.equal(resumed?.sessionId, s.sessionId, `the original session resumed (errors: ${errors})`);
    assert.ok(
      errors.includes('overloaded'),
      `the resume was answered overloaded while Redis was frozen: ${errors}`,
    );
    assert.equal(lost, false, 'the session was never reported lost');
    const sessions = await within(
      'an authenticated request after the resume',
      c.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
    );
    assert.equal(
      sessions.sessions.find((x) => x.current)?.sessionId,
      s.sessionId,
      'authenticated as the original session',
    );
  } finally {
    await c.close().catch(() => {});
    c.destroy();
  }
});

test('a definitive refusal of the resume (session revoked meanwhile) drops the session and says so', async () => {
  const c = new GatewayClient({ url: gw.tcpUrl, reconnect: { initialDelayMs: 100, maxDelayMs: 100 } });
  await within('the handshake', c.connect());
  const other = await connected(gw.tcpUrl);
  try {
    const s = await signUp(c);
    // The reconnection's resume waits until the session has ended elsewhere: before, the test
    // counted on a login and a revoke taking less than the reconnection's delay (1.5-3 s).
    let revoked!: () => void;
    const gate = new Promise<void>((r) => {
      revoked = r;
    });
    const request = c.request.bind(c);
    c.request = ((type: string, fields?: Record<string, unknown>, options?: { timeoutMs?: number }) =>
      type === 'resume'
        ? gate.then(() => request(type, fields, options))
        : request(type, fields, options)) as typeof c.request;
    const lost = nextEvent<{ sessionId?: string; error: { code?: string } }>(
      c,
      'sessionLost',
      'the sessionLost event after the refused resume',
    );
    const dropped = nextEvent(c, 'close', 'the dropped connection');
    c.destroy();
    await dropped;
    // While the client's resume waits, the session ends elsewhere.
    await other.request('login', { username: s.username, password: 'correct horse battery' });
    await other.request('revoke', { sessionId: s.sessionId });
    revoked();
    const event = await lost;
    assert.equal(event.sessionId, s.sessionId, 'the lost session named');
    assert.equal(event.error.code, 'session_revoked', 'with the answer that ended it');
    assert.equal(c.session, undefined, 'the session is dropped');
    assert.equal(c.isOpen, true, 'the connection stays, unauthenticated');
  } finally {
    await other.close().catch(() => {});
    await c.close().catch(() => {});
    c.destroy();
  }
});
