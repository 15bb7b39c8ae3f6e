/**
 * `users`, `rooms` and `sessions` answer with lists that grow with the fleet, and each costs the
 * node O(list): a session may ask GW_LIST_PER_MINUTE of them a minute, counted in Redis across
 * nodes, connections and the HTTP API; past it `rate_limited` with `retryAfter`. Another session
 * of the same account has a budget of its own. Two gateway processes of one deployment.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { GatewayClient, Session } from '../../client/client.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { fetchWithin, nextEvent, until, within } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';

import { startOwnRedis } from '../helpers/own-redis.ts';

const LIMIT = 5;

async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await within('a list request', p);
    return 'ok';
  } catch (e) {
    if (e instanceof ProtocolError) {
      assert.ok(
        e.code !== 'rate_limited' || (e.retryAfter! > 0 && e.retryAfter! <= 60_000),
        `retryAfter ${e.retryAfter}`,
      );
      assert.ok(e.code !== 'overloaded' || e.retryAfter! > 0, `overloaded without retryAfter`);
      return e.code;
    }
    throw e;
  }
}

test('users, rooms and sessions share one budget per session across nodes and the HTTP API; past it rate_limited with retryAfter', async () => {
  const deployment = deploymentEnv();
  const env = { ...deployment, GW_LIST_PER_MINUTE: String(LIMIT), GW_REGISTER_PER_MINUTE: '1000' };
  const started: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  try {
    const a = await startGateway(env);
    started.push(a);
    const b = await startGateway(env);
    started.push(b);
    const c = await connected(a.tcpUrl);
    open.push(c);
    const s = await signUp(c);
    const sessionsOverHttp = () =>
      fetchWithin(`http://127.0.0.1:${b.httpPort}/auth/user/sessions`, {
        headers: { authorization: `Bearer ${s.token}` },
      });

    // Five of them, over both nodes and the wire and HTTP: all answered.
    assert.equal(await outcome(c.request('users')), 'ok');
    assert.equal(await outcome(c.request('rooms')), 'ok');
    assert.equal(await outcome(c.request('users', { room: '#general' })), 'ok');
    assert.equal((await sessionsOverHttp()).status, 200);
    assert.equal(await outcome(c.request('sessions')), 'ok');
    // The sixth, of any kind, on either node: refused.
    assert.equal(await outcome(c.request('users')), 'rate_limited');
    assert.equal(await outcome(c.request('rooms')), 'rate_limited');
    assert.equal(await outcome(c.request('sessions')), 'rate_limited');
    const refused = await sessionsOverHttp();
    assert.equal(refused.status, 429);
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'rate_limited');
    // Other requests of the session are not limited by it.
    await within('a ping', c.ping());
    await within('a join', c.request('join', { room: '#limited' }));

    // Another session of the same account (a device of its own) has its own budget: twenty of
    // its requests at once (pipelined on one connection) get exactly five answers.
    const d = await connected(b.tcpUrl);
    open.push(d);
    await within(
      'a second session',
      d.request<Session>('login', { username: s.username, password: PASSWORD }),
    );
    const outcomes = await Promise.all(
      Array.from({ length: 20 }, (_, i) => outcome(d.request(i % 3 ? 'users' : 'rooms'))),
    );
    assert.deepEqual(
      [outcomes.filter((o) => o === 'ok').length, outcomes.filter((o) => o === 'rate_limited').length],
      [LIMIT, 20 - LIMIT],
      JSON.stringify(outcomes),
    );
  } finally {
    for (const x of open) x.destroy();
    await within('the gateways stopped', Promise.all(started.map((g) => g.stop())));
    await dropDeployment(deployment);
  }
});

test('with Redis gone, users, rooms and sessions are answered overloaded with retryAfter; Redis back empty: the session went with its data, so the device is kicked, logs in again and is answered', async () => {
  const redis = await startOwnRedis();
  const g = await startGateway({ REDIS_URL: redis.url, GW_LIST_PER_MINUTE: String(LIMIT) });
  const c = await connected(g.tcpUrl);
  let again: GatewayClient | undefined;
  try {
    const { username } = await signUp(c);
    assert.equal(await outcome(c.request('users')), 'ok');
    // The node checks its sessions once its subscriber is back (auth/module.ts): this one's
    // record went with what Redis lost.
    const kicked = nextEvent<{ code: string }>(c, 'kick', 'the kick of the session Redis lost', 60_000);
    kicked.catch(() => {}); // awaited below; a failure before that is the test's
    await redis.kill();
    // Ten at once while the limiter's Redis is gone: each a clean refusal, none `internal`.
    const gone = await Promise.all(
      Array.from({ length: 10 }, (_, i) => outcome(c.request(['users', 'rooms', 'sessions'][i % 3]))),
    );
    assert.deepEqual([...new Set(gone)], ['overloaded'], JSON.stringify(gone));
    await redis.start();
    assert.equal((await kicked).code, 'session_revoked');
    again = await connected(g.tcpUrl);
    const client = again;
    await until('a login once Redis is back', async () =>
      (await outcome(client.request('login', { username, password: PASSWORD }))) === 'ok' ? true : undefined,
    );
    for (const list of ['users', 'rooms', 'sessions'])
      assert.equal(await outcome(client.request(list)), 'ok', list);
  } finally {
    c.destroy();
    again?.destroy();
    await g.stop();
    await redis.remove();
  }
});
