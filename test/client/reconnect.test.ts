/**
 * The client library's reconnection: after the gateway goes away, it waits (at least the kick's
 * retryAfter, with backoff), reconnects, and resumes its session on the new gateway process.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GatewayClient, type Session } from '../../client/client.ts';
import { newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { nextEvent, within } from '../helpers/deadline.ts';
import { deploymentEnv, dropDeployment, startGateway } from '../helpers/gateway-process.ts';
import { freePort } from '../helpers/net.ts';

test('reconnects with backoff after going_away and resumes the session on the next process', async () => {
  const port = await freePort();
  const deployment = deploymentEnv();
  const env = { ...deployment, GW_TCP_PORT: String(port), GW_RECONNECT_JITTER_MS: '300' };
  const a = await startGateway(env);
  const c = new GatewayClient({
    url: `tcp://127.0.0.1:${port}`,
    pinnedFingerprint: a.fingerprint,
    reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
  });
  try {
    await c.connect();
    const name = newName();
    await c.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
    const s = await c.request<Session>('login', { username: name, password: PASSWORD });
    const kicked = nextEvent<{ code: string; retryAfter?: number }>(c, 'kick');
    const attempts: number[] = [];
    c.on('reconnecting', (r: { attempt: number; delayMs: number }) => attempts.push(r.delayMs));
    const reconnected = nextEvent<Session>(c, 'reconnected', 'the client to reconnect and resume', 60_000);
    await a.stop();
    const kick = await kicked;
    assert.equal(kick.code, 'going_away');
    const b = await startGateway(env);
    try {
      assert.equal(b.fingerprint, a.fingerprint, 'same identity file, same pin');
      const resumed = await reconnected;
      assert.equal(resumed.sessionId, s.sessionId, 'the same session, resumed');
      assert.ok(attempts.length >= 1, 'attempts.length >= 1');
      assert.ok(attempts[0] >= (kick.retryAfter ?? 0), 'waited at least retryAfter');
      const sessions = await c.request<{ sessions: { current: boolean }[] }>('sessions');
      assert.equal(sessions.sessions.filter((x) => x.current).length, 1);
      await c.close();
    } finally {
      await b.stop();
    }
  } finally {
    c.destroy();
    await dropDeployment(deployment);
  }
});

test('no reconnection after a takeover or a revoke: it would take the session back, or fail', async () => {
  const gw = await startGateway();
  try {
    for (const code of ['session_takeover', 'session_revoked']) {
      const c = new GatewayClient({ url: gw.tcpUrl, reconnect: { initialDelayMs: 50 } });
      await c.connect();
      const name = newName();
      await c.request('register', { username: name, email: `${name}@example.com`, password: PASSWORD });
      const mine = await c.request<Session>('login', {
        username: name,
        password: PASSWORD,
        device: { id: `d-${name}` },
      });
      let reconnecting = 0;
      c.on('reconnecting', () => reconnecting++);
      const closed = nextEvent<{ code?: string }>(c, 'close', `the close after ${code}`);
      const other = new GatewayClient({ url: gw.tcpUrl });
      await other.connect();
      if (code === 'session_takeover') {
        await other.request('login', { username: name, password: PASSWORD, device: { id: `d-${name}` } });
      } else {
        await other.request('login', { username: name, password: PASSWORD });
        await other.request('revoke', { sessionId: mine.sessionId });
      }
      assert.equal((await closed).code, code);
      // A reconnection is scheduled (and announced) in the same tick as the close.
      await new Promise((r) => setImmediate(r));
      assert.equal(reconnecting, 0, `no reconnection after ${code}`);
      await other.close();
      c.destroy();
    }
  } finally {
    await gw.stop();
  }
});

/**
 * Makes the connection drop right after the client's next `resume` has been sent, before its
 * answer: the reviewer's way to cut a reconnection in the middle (a real drop, no mock).
 */
function dropAfterNextResume(c: GatewayClient): void {
  const request = c.request.bind(c);
  let armed = true;
  c.request = ((type: string, fields?: Record<string, unknown>, options?: { timeoutMs?: number }) => {
    const p = request(type, fields, options);
    if (type === 'resume' && armed) {
      armed = false;
      c.destroy();
    }
    return p;
  }) as typeof c.request;
}

/** A reconnecting client logged in with a new account, and a log of its reconnection events. */
async function reconnectingClient(url: string): Promise<{ c: GatewayClient; s: Session; log: string[] }> {
  const c = new GatewayClient({ url, reconnect: { initialDelayMs: 100, maxDelayMs: 400 } });
  await c.connect();
  const s = await signUp(c);
  const log: string[] = [];
  c.on('reconnecting', (r: { attempt: number }) => log.push(`reconnecting ${r.attempt}`));
  c.on('reconnected', (x: Session | undefined) => log.push(`reconnected ${x?.sessionId ?? 'none'}`));
  return { c, s, log };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('a drop during the reconnection’s resume: one reconnection at a time, and the session is resumed on the next', async () => {
  const gw = await startGateway();
  const { c, s, log } = await reconnectingClient(gw.tcpUrl);
  try {
    dropAfterNextResume(c);
    const reconnected = nextEvent<Session | undefined>(
      c,
      'reconnected',
      'the reconnection after the cut resume',
    );
    c.destroy();
    const resumed = await reconnected;
    assert.equal(resumed?.sessionId, s.sessionId, 'the session kept through the cut resume, and resumed');
    // Long enough for a second reconnection (backoff at most 400 ms) to show itself.
    await sleep(1500);
    assert.deepEqual(
      log,
      ['reconnecting 1', 'reconnecting 2', `reconnected ${s.sessionId}`],
      'one reconnection at a time: the cut resume scheduled one more attempt, not two',
    );
    const sessions = await c.request<{ sessions: { current: boolean }[] }>('sessions');
    assert.equal(sessions.sessions.filter((x) => x.current).length, 1, 'authenticated as the session');
    await c.close();
  } finally {
    c.destroy();
    await gw.stop();
  }
});

test('close() while a reconnection is scheduled or under way is final: the client stays closed', async () => {
  const gw = await startGateway();
  try {
    // Closed after the cut resume has failed (both of its schedulers have run).
    const first = await reconnectingClient(gw.tcpUrl);
    try {
      dropAfterNextResume(first.c);
      const failed = nextEvent(first.c, 'reconnectError', 'the cut resume to fail');
      first.c.destroy();
      await failed;
      await new Promise((r) => setImmediate(r));
      await within('close() of the reconnecting client', first.c.close());
      await sleep(2000);
      assert.equal(first.c.isOpen, false, 'still closed 2 s after close(), with backoff at most 400 ms');
      assert.ok(!first.log.some((l) => l.startsWith('reconnected')), `no reconnection: ${first.log}`);
    } finally {
      first.c.destroy();
    }
    // Closed while the reconnection's handshake is under way.
    const second = await reconnectingClient(gw.tcpUrl);
    try {
      const dialing = nextEvent(second.c, 'transportOpen', 'the reconnection to open its socket');
      second.c.destroy();
      await dialing;
      await within('close() during the handshake', second.c.close());
      await sleep(2000);
      assert.equal(second.c.isOpen, false, 'still closed 2 s after close() during the handshake');
      assert.deepEqual(second.log, ['reconnecting 1'], 'the attempt ended by close(), no other');
    } finally {
      second.c.destroy();
    }
  } finally {
    await gw.stop();
  }
});
