/**
 * The client library's reconnection: after the gateway goes away, it waits (at least the kick's
 * retryAfter, with backoff), reconnects, and resumes its session on the new gateway process.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GatewayClient, type Session } from '../../client/client.ts';
import { newName, PASSWORD } from '../helpers/accounts.ts';
import { nextEvent } from '../helpers/deadline.ts';
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
