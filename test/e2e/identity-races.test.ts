/**
 * Identity under concurrency (PROTOCOL.md §4 "Ordering, devices and tokens"): brute-force
 * limits that hold for fifty requests at once over TCP, WebSocket and HTTP; email codes; the
 * refresh grace period; device ownership; and takeover keeping the device's qos-1 events.
 * Real gateway processes, PostgreSQL, Redis and an SMTP sink.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import type { GatewayClient, Session } from '../../client/client.ts';
import { connectPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { query, REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { nextEvent } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  SLOW_HASH_ENV,
  startGateway,
} from '../helpers/gateway-process.ts';
import { scrapeMetrics, untilHashJobs } from '../helpers/metrics.ts';
import { QueueReader } from '../helpers/queues.ts';
import { codeOf, type SmtpSink, startSmtpSink } from '../helpers/smtp-sink.ts';

const API_KEY = 'races-api-key-0123456789';
const GRACE_SECONDS = 2;
const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

let gw: GatewayProcess;
let smtp: SmtpSink;

before(async () => {
  smtp = await startSmtpSink();
  gw = await startGateway({
    SMTP_HOST: '127.0.0.1',
    SMTP_PORT: String(smtp.port),
    GW_API_KEY: API_KEY,
    GW_REGISTER_PER_MINUTE: '10000',
    GW_REFRESH_PER_MINUTE: '10000',
    GW_OTP_PER_MINUTE: '1000',
    // Every test connects from 127.0.0.1: the per-IP budget has its own test and gateway.
    GW_IP_FAILURE_BUDGET: '100000',
    GW_REFRESH_GRACE_SECONDS: String(GRACE_SECONDS),
    GW_DEFAULT_ROOM: '',
  });
});
after(async () => {
  await gw.stop();
  await smtp.close();
});

/** An outcome of a request: 'ok' or the error code. */
type Outcome = { code: string; retryAfter?: number; data?: Record<string, unknown> };

async function wire(c: GatewayClient, type: string, fields: Record<string, unknown>): Promise<Outcome> {
  try {
    return { code: 'ok', data: await c.request(type, fields, { timeoutMs: 20000 }) };
  } catch (e) {
    if (e instanceof ProtocolError)
      return { code: e.code, ...(e.retryAfter !== undefined ? { retryAfter: e.retryAfter } : {}) };
    throw e;
  }
}

async function http(g: GatewayProcess, path: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`http://127.0.0.1:${g.httpPort}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(20000),
  });
  const json = (await res.json()) as Record<string, unknown> & { error?: { code: string } };
  if (res.status < 300) return { status: res.status, code: 'ok', data: json };
  const retry = res.headers.get('retry-after');
  return {
    status: res.status,
    code: json.error!.code,
    ...(retry ? { retryAfter: Number(retry) * 1000 } : {}),
  };
}

/** Several TCP and WebSocket connections to spread concurrent requests over. */
async function clients(g: GatewayProcess, n: number): Promise<GatewayClient[]> {
  return Promise.all(Array.from({ length: n }, (_, i) => connected(i % 2 ? g.wsUrl : g.tcpUrl)));
}

/** Request i goes to connection i mod (n + 1), the extra slot being the HTTP API. */
function spread(
  g: GatewayProcess,
  conns: GatewayClient[],
  i: number,
  type: 'login' | 'refresh',
  fields: Record<string, unknown>,
): Promise<Outcome> {
  const slot = i % (conns.length + 1);
  if (slot === conns.length) return http(g, `/auth/${type}`, fields);
  return wire(conns[slot], type, fields);
}

function count(outcomes: Outcome[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const o of outcomes) out[o.code] = (out[o.code] ?? 0) + 1;
  return out;
}

async function register(c: GatewayClient, username = newName()): Promise<string> {
  await c.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
  return username;
}

async function until(pred: () => boolean | Promise<boolean>, what: string, timeoutMs = 15000) {
  const end = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await wait(20);
  }
}

/**
 * What an account's login budget holds once its logins are answered: its failures, and its
 * attempts still in flight (each answered login settled its own, so none).
 */
async function accountBudget(
  g: GatewayProcess,
  username: string,
): Promise<{ failures: number; inFlight: number }> {
  const id = (await query(g.schema, 'SELECT id FROM users WHERE username = $1', [username])).rows[0]
    .id as string;
  const r = redisClient();
  try {
    return {
      failures: Number((await r.get(`${g.prefix}rl:login-account:u:${id}`)) ?? 0),
      inFlight: await r.zcard(`${g.prefix}rl:login-account-flying:u:${id}`),
    };
  } finally {
    r.disconnect();
  }
}

/** What the login budget of 127.0.0.1 holds once its logins are answered. */
async function ipBudget(g: GatewayProcess): Promise<{ failures: number; inFlight: number }> {
  const r = redisClient();
  try {
    const key = (await r.keys(`${g.prefix}rl:login-ip:*`))[0];
    const flying = (await r.keys(`${g.prefix}rl:login-ip-flying:*`))[0];
    return {
      failures: key ? Number(await r.get(key)) : 0,
      inFlight: flying ? await r.zcard(flying) : 0,
    };
  } finally {
    r.disconnect();
  }
}

/** The next kick of a client. */
const kickOf = (c: GatewayClient) => nextEvent<{ code: string }>(c, 'kick', 'a kick', 15000);

describe('brute-force limits under concurrency', () => {
  test('50 concurrent wrong logins over TCP, WS and HTTP against one account: at most 5 verified', async () => {
    const conns = await clients(gw, 8);
    const username = await register(conns[0]);
    const outcomes = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        spread(gw, conns, i, 'login', { username, password: `wrong-${i}-pw` }),
      ),
    );
    const n = count(outcomes);
    console.log('50 concurrent wrong logins:', JSON.stringify(n));
    assert.ok((n.invalid_credentials ?? 0) <= 5, `verified ${n.invalid_credentials} > 5`);
    assert.ok((n.invalid_credentials ?? 0) >= 1, 'some were verified');
    assert.equal((n.invalid_credentials ?? 0) + (n.locked ?? 0), 50, JSON.stringify(n));
    for (const o of outcomes.filter((x) => x.code === 'locked'))
      assert.ok(o.retryAfter! > 0, 'locked carries retryAfter');
    // Every verified failure counted once, every refused attempt nothing, nothing left in flight.
    assert.deepEqual(
      await accountBudget(gw, username),
      { failures: n.invalid_credentials, inFlight: 0 },
      'the budget holds the verified failures and no attempt in flight',
    );
    // the account stays locked for the right password too
    assert.equal((await wire(conns[1], 'login', { username, password: PASSWORD })).code, 'locked');
    for (const c of conns) c.destroy();
  });

  test('the right password sent among 20 wrong concurrent ones, one attempt left: at most one verified', async () => {
    const conns = await clients(gw, 6);
    const username = await register(conns[0]);
    for (let i = 0; i < 4; i++)
      assert.equal(
        (await wire(conns[0], 'login', { username, password: 'wrong password' })).code,
        'invalid_credentials',
      );
    const wrong = Array.from({ length: 20 }, (_, i) =>
      spread(gw, conns, i, 'login', { username, password: `wrong-${i}-pw` }),
    );
    const right = spread(gw, conns, 20, 'login', { username, password: PASSWORD });
    const outcomes = await Promise.all([...wrong, right]);
    const n = count(outcomes);
    console.log('20 wrong + the right one, 1 attempt left:', JSON.stringify(n));
    if ((await right).code === 'ok') {
      // The right password, sent last but over HTTP, arrived first and took the attempt left
      // (none of the wrong ones before it was verified); its success cleared the failures, so
      // the wrong ones after it had the fresh budget of 5, and no more.
      assert.ok((n.invalid_credentials ?? 0) <= 5, `verified after the success ${JSON.stringify(n)}`);
      assert.equal(n.locked ?? 0, 20 - (n.invalid_credentials ?? 0), JSON.stringify(n));
    } else {
      assert.ok((n.invalid_credentials ?? 0) + (n.ok ?? 0) <= 1, `verified ${JSON.stringify(n)}`);
      assert.equal(
        (await right).code,
        'locked',
        'the right password, after the last attempt, finds it locked',
      );
    }
    for (const c of conns) c.destroy();
  });

  test('100 concurrent guesses from one IP over 20 accounts, budget 50: at most 50 verified', async () => {
    const g = await startGateway({
      GW_IP_FAILURE_BUDGET: '50',
      GW_LOCKOUT_ATTEMPTS: '10',
      GW_REGISTER_PER_MINUTE: '10000',
      // Every guess admitted to the hash pool: on a loaded machine 100 hashes queued on two
      // threads are expected to take longer than the default 2 s, and the last ones were
      // answered `overloaded` (the pool's own bound, not the address's budget under test).
      GW_HASH_MAX_WAIT_MS: '600000',
    });
    try {
      const conns = await clients(g, 8);
      const names: string[] = [];
      for (let i = 0; i < 20; i++) names.push(await register(conns[i % conns.length]));
      const outcomes = await Promise.all(
        Array.from({ length: 100 }, (_, i) =>
          spread(g, conns, i, 'login', { username: names[i % 20], password: `wrong-${i}-pw` }),
        ),
      );
      const n = count(outcomes);
      console.log('100 guesses from one IP, budget 50:', JSON.stringify(n));
      assert.ok((n.invalid_credentials ?? 0) <= 50, `verified ${n.invalid_credentials} > 50`);
      assert.equal((n.invalid_credentials ?? 0) + (n.rate_limited ?? 0), 100, JSON.stringify(n));
      for (const o of outcomes.filter((x) => x.code === 'rate_limited'))
        assert.ok(o.retryAfter! > 0, 'rate_limited carries retryAfter');
      assert.deepEqual(
        await ipBudget(g),
        { failures: n.invalid_credentials, inFlight: 0 },
        "the address's budget holds the verified failures and no attempt in flight",
      );
      for (const c of conns) c.destroy();
    } finally {
      await g.stop();
    }
  });

  test('a burst of right logins from one IP past its budget: told to retry soon, all in at once after, the budget intact', async () => {
    // A fleet behind one NAT address logging in at once. Before, each refused login stayed
    // counted and only a success gave a point back, so the address stayed refused, for the
    // window (15 minutes by default, told as retryAfter), after the burst.
    const g = await startGateway({
      GW_IP_FAILURE_BUDGET: '5',
      GW_LOCKOUT_ATTEMPTS: '100',
      GW_LOCKOUT_SECONDS: '900',
      GW_REGISTER_PER_MINUTE: '10000',
    });
    try {
      const conns = await clients(g, 8);
      const names: string[] = [];
      for (let i = 0; i < 10; i++) names.push(await register(conns[i % conns.length]));
      const login = (i: number) =>
        spread(g, conns, i, 'login', { username: names[i % 10], password: PASSWORD });
      const outcomes = await Promise.all(Array.from({ length: 60 }, (_, i) => login(i)));
      const n = count(outcomes);
      console.log('60 right logins at once from one IP, budget 5:', JSON.stringify(n));
      assert.equal((n.ok ?? 0) + (n.rate_limited ?? 0), 60, JSON.stringify(n));
      assert.ok((n.rate_limited ?? 0) > 0, `the burst went past the budget: ${JSON.stringify(n)}`);
      const hints = outcomes.filter((o) => o.code === 'rate_limited').map((o) => o.retryAfter ?? 0);
      // Refused only for the logins in flight: about one verification, far from the window.
      for (const h of hints)
        assert.ok(h > 0 && h < 60_000, `retryAfter ${h} ms for a login refused in a burst`);
      // Nothing failed: the address's whole budget is there, one login after another.
      for (let i = 0; i < 10; i++) {
        const o = await login(i);
        assert.equal(o.code, 'ok', `login ${i} after the burst: ${JSON.stringify(o)}`);
      }
      // And it still counts failures: 5 wrong, then the right password is refused for the window.
      for (let i = 0; i < 5; i++)
        assert.equal(
          (await wire(conns[0], 'login', { username: names[i], password: 'wrong password' })).code,
          'invalid_credentials',
        );
      const spent = await wire(conns[1], 'login', { username: names[7], password: PASSWORD });
      assert.equal(spent.code, 'rate_limited', JSON.stringify(spent));
      assert.ok(
        spent.retryAfter! > 800_000,
        `a spent budget's retryAfter is the window's end: ${spent.retryAfter}`,
      );
      for (const c of conns) c.destroy();
    } finally {
      await g.stop();
    }
  });

  test('a burst of right logins to one account past the lockout attempts: told to retry soon, not locked', async () => {
    const g = await startGateway({ GW_LOCKOUT_ATTEMPTS: '3', GW_IP_FAILURE_BUDGET: '100000' });
    try {
      const conns = await clients(g, 8);
      const username = await register(conns[0]);
      const outcomes = await Promise.all(
        Array.from({ length: 30 }, (_, i) => spread(g, conns, i, 'login', { username, password: PASSWORD })),
      );
      const n = count(outcomes);
      console.log('30 right logins of one account at once, 3 attempts:', JSON.stringify(n));
      assert.equal((n.ok ?? 0) + (n.locked ?? 0), 30, JSON.stringify(n));
      assert.ok((n.locked ?? 0) > 0, `the burst went past the attempts: ${JSON.stringify(n)}`);
      assert.deepEqual(
        await accountBudget(g, username),
        { failures: 0, inFlight: 0 },
        'the budget holds nothing after right logins',
      );
      for (const o of outcomes.filter((x) => x.code === 'locked'))
        assert.ok(
          o.retryAfter! > 0 && o.retryAfter! < 60_000,
          `retryAfter ${o.retryAfter} ms for a login refused in a burst`,
        );
      const again = await wire(conns[0], 'login', { username, password: PASSWORD });
      assert.equal(again.code, 'ok', JSON.stringify(again));
      for (const c of conns) c.destroy();
    } finally {
      await g.stop();
    }
  });

  test('one wrong password among right ones in flight, the last point taken: the account is not locked', async () => {
    // Two hash threads: the two right logins are verified first, the wrong one (sent last, the
    // last point of 3) after them. Before, the failure that took the last point locked the
    // account for the window, although only one attempt had failed; now the failures alone
    // must reach the limit.
    const g = await startGateway({
      GW_LOCKOUT_ATTEMPTS: '3',
      GW_HASH_THREADS: '2',
      // Slow enough (~400 ms) that the wrong one waits for a thread the right ones hold.
      ARGON2_MEMORY_KIB: '65536',
      ARGON2_ITERATIONS: '8',
      GW_IP_FAILURE_BUDGET: '100000',
    });
    try {
      const conns = await clients(g, 3);
      const username = await register(conns[0]);
      const admitted = 'gateway_hash_jobs_total{outcome="admitted"}';
      const before = (await scrapeMetrics(g.metricsPort)).value(admitted);
      const right = [0, 1].map((i) => wire(conns[i], 'login', { username, password: PASSWORD }));
      // Sent once both right ones hold their points (and threads): both admitted to the pool.
      // (Counted, not the pool's gauge: on a loaded machine a scrape could miss the moment both
      // were in the pool, and the wait then never ended. Right ones already done by then have
      // settled their points, and the account must not lock either.)
      await until(
        async () => (await scrapeMetrics(g.metricsPort)).value(admitted) >= before + 2,
        'the two right logins admitted to the hash pool',
        20000,
      );
      const wrong = wire(conns[2], 'login', { username, password: 'wrong password' });
      const outcomes = await Promise.all([...right, wrong]);
      console.log('two right logins and a wrong one, 3 attempts:', JSON.stringify(count(outcomes)));
      assert.equal((await wrong).code, 'invalid_credentials');
      const after = await wire(conns[0], 'login', { username, password: PASSWORD });
      assert.equal(after.code, 'ok', `one failure locked the account: ${JSON.stringify(after)}`);
      for (const c of conns) c.destroy();
    } finally {
      await g.stop();
    }
  });

  test('concurrent wrong otp.verify codes, then the right one: never more than OTP_MAX_RETRIES checks', async () => {
    const conns = await clients(gw, 6);
    const s = await signUp(conns[0]);
    await conns[0].request('logout');
    const email = `${s.username}@example.com`;
    await conns[0].request('otp.request', { email });
    const code = codeOf(await smtp.next(email));
    const wrongCodes = Array.from({ length: 30 }, (_, i) =>
      String((Number(code) + 1 + i) % 1_000_000).padStart(6, '0'),
    );
    const outcomes = await Promise.all(
      wrongCodes.map((c, i) => wire(conns[i % conns.length], 'otp.verify', { email, code: c })),
    );
    // Five (GW_LOCKOUT_ATTEMPTS) are checked, of which three (OTP_MAX_RETRIES) spend the code;
    // the rest find the address locked.
    assert.deepEqual(count(outcomes), { otp_invalid: 5, locked: 25 });
    const last = await wire(conns[1], 'otp.verify', { email, code });
    console.log('30 concurrent wrong codes, then the right one:', last.code);
    assert.equal(last.code, 'locked', 'the address is locked after GW_LOCKOUT_ATTEMPTS wrong codes');
    for (const c of conns) c.destroy();
  });

  test('a new code does not give new guesses: wrong codes count per address across the codes sent', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    await c.request('logout');
    const email = `${s.username}@example.com`;
    const wrong = (code: string) => String((Number(code) + 1) % 1_000_000).padStart(6, '0');
    // Three wrong tries void the first code; a second code, two more wrong: five for the address.
    await c.request('otp.request', { email });
    const first = codeOf(await smtp.next(email));
    for (let i = 0; i < 3; i++)
      assert.equal((await wire(c, 'otp.verify', { email, code: wrong(first) })).code, 'otp_invalid');
    await c.request('otp.request', { email });
    const second = codeOf(await smtp.next(email));
    for (let i = 0; i < 2; i++)
      assert.equal((await wire(c, 'otp.verify', { email, code: wrong(second) })).code, 'otp_invalid');
    // A third code, right this time: the address is locked for GW_LOCKOUT_SECONDS.
    await c.request('otp.request', { email });
    const third = codeOf(await smtp.next(email));
    const locked = await wire(c, 'otp.verify', { email, code: third });
    assert.equal(locked.code, 'locked');
    assert.ok(locked.retryAfter! > 0, 'locked carries retryAfter');
    c.destroy();
  });
});

describe('refresh grace', () => {
  test('a retried refresh gets the same pair; after the successor is used the old token is reuse', async () => {
    const a = await connected(gw.tcpUrl);
    const s = await signUp(a);
    const b = await connected(gw.wsUrl);
    const p1 = (await wire(b, 'refresh', { refresh: s.refresh })).data!;
    // the reply was "lost": the client retries with the same token
    const retry = await wire(b, 'refresh', { refresh: s.refresh });
    assert.equal(retry.code, 'ok');
    assert.equal(retry.data!.refresh, p1.refresh, 'same successor refresh token');
    assert.equal(retry.data!.token, p1.token, 'same access token');
    assert.equal((await b.request('validate', { token: p1.token })).valid, true);
    // nothing usable is kept in clear in Redis
    const r = redisClient();
    try {
      const keys = await r.keys(`${gw.prefix}*`);
      for (const k of keys) {
        const type = await r.type(k);
        const values =
          type === 'string' ? [await r.get(k)] : type === 'hash' ? Object.values(await r.hgetall(k)) : [];
        for (const v of values) {
          assert.ok(!v?.includes(p1.refresh as string), `refresh token in clear at ${k}`);
          assert.ok(!v?.includes(p1.token as string), `access token in clear at ${k}`);
        }
      }
    } finally {
      r.disconnect();
    }
    // the successor is used: presenting the old token now is reuse and ends the session
    const p2 = (await wire(b, 'refresh', { refresh: p1.refresh })).data!;
    const kicked = kickOf(a);
    assert.equal((await wire(b, 'refresh', { refresh: s.refresh })).code, 'refresh_reused');
    assert.equal((await kicked).code, 'session_revoked');
    assert.equal((await b.request('validate', { token: p2.token })).valid, false);
    b.destroy();
  });

  test('20 concurrent refreshes of one token over TCP, WS and HTTP: one rotation, one pair, session alive', async () => {
    const conns = await clients(gw, 6);
    const s = await signUp(conns[0]);
    const outcomes = await Promise.all(
      Array.from({ length: 20 }, (_, i) => spread(gw, conns, i, 'refresh', { refresh: s.refresh })),
    );
    const n = count(outcomes);
    console.log('20 concurrent refreshes:', JSON.stringify(n));
    assert.deepEqual(n, { ok: 20 });
    const pairs = new Set(outcomes.map((o) => `${o.data!.token} ${o.data!.refresh}`));
    assert.equal(pairs.size, 1, 'every answer carries the same pair');
    const pair = outcomes[0].data!;
    assert.equal((await conns[1].request('validate', { token: pair.token })).valid, true);
    // the successor still works: the session is alive
    assert.equal((await wire(conns[2], 'refresh', { refresh: pair.refresh })).code, 'ok');
    for (const c of conns) c.destroy();
  });

  test('after the grace period the old token is refresh_reused', async () => {
    const a = await connected(gw.tcpUrl);
    const s = await signUp(a);
    const b = await connected(gw.wsUrl);
    const p1 = (await wire(b, 'refresh', { refresh: s.refresh })).data!;
    await wait(GRACE_SECONDS * 1000 + 300);
    assert.equal((await wire(b, 'refresh', { refresh: s.refresh })).code, 'refresh_reused');
    assert.equal((await b.request('validate', { token: p1.token })).valid, false);
    a.destroy();
    b.destroy();
  });

  test('logout with a refresh token ends that session, over the wire and HTTP; unknown tokens answer {}', async () => {
    const a = await connected(gw.tcpUrl);
    const s = await signUp(a);
    const kicked = kickOf(a);
    // logout needs an authenticated connection (PROTOCOL.md §4): b is another session
    const b = await connected(gw.wsUrl);
    await b.request('login', { username: s.username, password: PASSWORD });
    assert.deepEqual(await b.request('logout', { token: s.refresh }), {});
    assert.equal((await kicked).code, 'session_revoked');
    assert.equal((await b.request('validate', { token: s.token })).valid, false);
    assert.equal((await wire(b, 'refresh', { refresh: s.refresh })).code, 'token_invalid');
    assert.deepEqual(await b.request('logout', { token: s.refresh }), {}, 'already ended');
    assert.deepEqual(await b.request('logout', { token: 'unknown-token' }), {});
    // HTTP: the refresh token in the body
    const c = await connected(gw.tcpUrl);
    const s2 = await c.request<Session>('login', { username: s.username, password: PASSWORD });
    const kicked2 = kickOf(c);
    const out = await http(gw, '/auth/logout', { refresh: s2.refresh });
    assert.equal(out.status, 200);
    assert.equal((await kicked2).code, 'session_revoked');
    // a bearer token and no body at all
    const s4 = await httpLogin(s.username);
    const bare = await fetch(`http://127.0.0.1:${gw.httpPort}/auth/logout`, {
      method: 'POST',
      headers: { authorization: `Bearer ${s4.token}` },
      signal: AbortSignal.timeout(20000),
    });
    assert.equal(bare.status, 200);
    assert.equal((await b.request('validate', { token: s4.token })).valid, false);
    assert.equal((await b.request('validate', { token: s2.token })).valid, false);
    // a refresh token rotated moments ago (its reply lost) still names its session
    const d = await connected(gw.tcpUrl);
    const s3 = await d.request<Session>('login', { username: s.username, password: PASSWORD });
    const kicked3 = kickOf(d);
    await b.request('refresh', { refresh: s3.refresh });
    assert.deepEqual(await b.request('logout', { token: s3.refresh }), {});
    assert.equal((await kicked3).code, 'session_revoked');
    b.destroy();
  });
});

/**
 * A gateway of its own whose refresh budget per IP (GW_REFRESH_PER_MINUTE) is 5: every request
 * of these tests comes from 127.0.0.1, and a spent budget answers `rate_limited` with a
 * `retryAfter` of up to a minute, far past the grace period.
 */
const budgetEnv = {
  GW_REGISTER_PER_MINUTE: '10000',
  GW_REFRESH_PER_MINUTE: '5',
  GW_REFRESH_GRACE_SECONDS: String(GRACE_SECONDS),
  GW_DEFAULT_ROOM: '',
};

describe('refresh grace and the IP refresh budget', () => {
  test('a retried refresh is answered from its grace period when the IP has spent its budget; reuse is still reuse', async () => {
    const g = await startGateway(budgetEnv);
    const a = await connected(g.tcpUrl);
    // Not the session's own connection, which its end closes.
    const b = await connected(g.wsUrl);
    try {
      const s = await signUp(a);
      // The reply of this refresh is "lost": the device holds the old token.
      const p1 = (await wire(b, 'refresh', { refresh: s.refresh })).data!;
      let spent: Outcome | undefined;
      for (let i = 0; i < 10 && spent?.code !== 'rate_limited'; i++)
        spent = await wire(b, 'refresh', { refresh: `unknown-token-${i}` });
      assert.equal(spent?.code, 'rate_limited', 'refreshes of unknown tokens spend the budget of 5');
      assert.ok(spent.retryAfter! > GRACE_SECONDS * 1000, 'the budget asks to wait past the grace period');
      const retry = await wire(b, 'refresh', { refresh: s.refresh });
      assert.equal(retry.code, 'ok', `the retry is answered (retryAfter ${retry.retryAfter})`);
      assert.equal(retry.data!.refresh, p1.refresh, 'with the same successor refresh token');
      assert.equal(retry.data!.token, p1.token, 'and the same access token');
      // Past the grace period the old token is reuse, budget or not: the session ends.
      await wait(GRACE_SECONDS * 1000 + 300);
      assert.equal((await wire(b, 'refresh', { refresh: s.refresh })).code, 'refresh_reused');
      assert.equal((await b.request('validate', { token: p1.token })).valid, false, 'the session ended');
    } finally {
      a.destroy();
      b.destroy();
      await g.stop();
    }
  });

  test('100 concurrent refreshes of one token, refused for the budget while another address rotates it: one pair for all', async () => {
    const g = await startGateway({ ...budgetEnv, GW_TRUSTED_PROXIES: '127.0.0.1' });
    const conns = await clients(g, 6);
    try {
      const s = await signUp(conns[0]);
      let spent: Outcome | undefined;
      for (let i = 0; i < 10 && spent?.code !== 'rate_limited'; i++)
        spent = await wire(conns[1], 'refresh', { refresh: `unknown-token-${i}` });
      assert.equal(spent?.code, 'rate_limited', 'refreshes of unknown tokens spend the budget of 5');
      // The device's connections (127.0.0.1) all refresh its token at once; once one of them is
      // refused, another of its addresses (a proxied HTTP request, with a budget of its own)
      // rotates the token.
      const wave = Array.from({ length: 100 }, (_, i) =>
        wire(conns[i % 6], 'refresh', { refresh: s.refresh }),
      );
      const firstAnswer = await Promise.race(wave);
      assert.equal(firstAnswer.code, 'rate_limited', 'nothing rotated the token yet: refused for the budget');
      const other = await http(
        g,
        '/auth/refresh',
        { refresh: s.refresh },
        { 'x-forwarded-for': '198.51.100.7' },
      );
      assert.equal(other.code, 'ok', 'the other address rotates the token');
      const first = await Promise.all(wave);
      console.log('100 concurrent refreshes, budget spent:', JSON.stringify(count(first)));
      const refused = first.filter((o) => o.code === 'rate_limited');
      assert.equal(
        refused.length + (count(first).ok ?? 0),
        100,
        `each is ok or rate_limited: ${JSON.stringify(count(first))}`,
      );
      // The refused come back after their retryAfter, as a device does: past the grace period.
      const after = Math.max(...refused.map((o) => o.retryAfter ?? 0));
      assert.ok(after > GRACE_SECONDS * 1000, `told to wait past the grace period (${after} ms)`);
      await wait(after + 100);
      const again = await Promise.all(
        refused.map((_, i) => wire(conns[i % 6], 'refresh', { refresh: s.refresh })),
      );
      assert.deepEqual(
        count(again),
        { ok: refused.length },
        `every refused refresh gets the pair when it comes back: ${JSON.stringify(count(again))}`,
      );
      const pairs = new Set(
        [other, ...first, ...again]
          .filter((o) => o.code === 'ok')
          .map((o) => `${o.data!.token} ${o.data!.refresh}`),
      );
      assert.equal(pairs.size, 1, 'every answer carries the same pair');
      const pair = again[0].data!;
      assert.equal(
        (await conns[1].request('validate', { token: pair.token })).valid,
        true,
        'the session lives',
      );
    } finally {
      for (const c of conns) c.destroy();
      await g.stop();
    }
  });
});

async function httpLogin(username: string): Promise<Session> {
  const r = await http(gw, '/auth/login', { username, password: PASSWORD });
  assert.equal(r.status, 200);
  return r.data as unknown as Session;
}

describe('devices belong to accounts', () => {
  test("another account's login, resume or otp.verify with an owned device id is forbidden", async () => {
    const device = { id: `dev-${randomUUID()}` };
    const a = await connected(gw.tcpUrl);
    await signUp(a, device);
    const b = await connected(gw.wsUrl);
    const other = await register(b);
    assert.equal((await wire(b, 'login', { username: other, password: PASSWORD, device })).code, 'forbidden');
    const h = await http(gw, '/auth/login', { username: other, password: PASSWORD, device });
    assert.equal(h.status, 403);
    assert.equal(h.code, 'forbidden');
    const own = await b.request<Session>('login', { username: other, password: PASSWORD });
    const c = await connected(gw.tcpUrl);
    assert.equal((await wire(c, 'resume', { token: own.token, device })).code, 'forbidden');
    await c.request('otp.request', { email: `${other}@example.com` });
    const code = codeOf(await smtp.next(`${other}@example.com`));
    assert.equal(
      (await wire(c, 'otp.verify', { email: `${other}@example.com`, code, device })).code,
      'forbidden',
    );
    const row = await query(gw.schema, 'SELECT owner FROM devices WHERE id = $1', [device.id]);
    assert.equal(row.rowCount, 1);
    a.destroy();
    b.destroy();
    c.destroy();
  });

  test('two accounts racing for a new device id: exactly one owns it', async () => {
    const setup = await connected(gw.tcpUrl);
    const users = [await register(setup), await register(setup)];
    setup.destroy();
    for (let round = 0; round < 6; round++) {
      const device = { id: `race-${randomUUID()}` };
      // one account over the wire (TCP or WS), the other over HTTP, sides swapped every round
      const c = await connected(round % 2 ? gw.wsUrl : gw.tcpUrl);
      const [viaWire, viaHttp] = round % 2 ? [users[0], users[1]] : [users[1], users[0]];
      const outcomes = await Promise.all([
        wire(c, 'login', { username: viaWire, password: PASSWORD, device }),
        http(gw, '/auth/login', { username: viaHttp, password: PASSWORD, device }),
      ]);
      const codes = outcomes.map((o) => o.code).sort();
      assert.deepEqual(codes, ['forbidden', 'ok'], `round ${round}`);
      const winner = outcomes.find((o) => o.code === 'ok')!.data!.userId;
      const row = await query(gw.schema, 'SELECT owner FROM devices WHERE id = $1', [device.id]);
      assert.equal(row.rows[0].owner, winner);
      c.destroy();
    }
  });

  test('a device target resolves as soon as the session exists, and only while it does', async () => {
    const username = await register(await connected(gw.tcpUrl));
    const device = { id: `dev-${randomUUID()}` };
    const login = await http(gw, '/auth/login', { username, password: PASSWORD, device });
    assert.equal(login.status, 200);
    const publish = () =>
      fetch(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify({ target: { device: device.id }, name: 'cfg.set', data: { a: 1 } }),
        signal: AbortSignal.timeout(20000),
      });
    const res = await publish();
    console.log('publish to a device right after its HTTP login:', res.status);
    assert.equal(res.status, 202, 'resolves while the session is only resumable');
    const { eids } = (await res.json()) as { eids: string[] };
    const d = await connected(gw.tcpUrl);
    const got: EventMsg[] = [];
    d.on('event', (e: EventMsg) => got.push(e));
    await d.request('resume', { token: login.data!.token });
    await until(() => got.some((e) => e.eid === eids[0]), 'the event after resume');
    await d.request('logout');
    assert.equal((await publish()).status, 404, 'the session ended: the device has no session');
    d.destroy();
  });
});

describe('takeover keeps the device events', () => {
  test('a new login with the device id gets the old session’s unacked events in order', async () => {
    const reader = new QueueReader(gw.prefix);
    try {
      const device = { id: `dev-${randomUUID()}` };
      const old = await connected(gw.tcpUrl, { autoAck: false });
      const s = await signUp(old, device);
      const gotOld: EventMsg[] = [];
      old.on('event', (e: EventMsg) => gotOld.push(e));
      const N = 8;
      const eids: string[] = [];
      for (let i = 0; i < N; i++) {
        const res = await fetch(`http://127.0.0.1:${gw.httpPort}/v1/events`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
          body: JSON.stringify({
            target: { device: device.id },
            name: 'cmd',
            data: i,
            ...(i === 0 ? { receipt: true } : {}),
            ...(i === 1 ? { ttl: 600_000 } : {}),
          }),
          signal: AbortSignal.timeout(20000),
        });
        assert.equal(res.status, 202);
        eids.push(((await res.json()) as { eids: string[] }).eids[0]);
      }
      await until(() => gotOld.length >= N, 'the first deliveries');
      const kicked = kickOf(old);
      // No acks until the end: the moved events stay in the outbox (and a ttl in the expiry
      // index, which an ack would empty) for the checks below.
      const fresh = await connected(gw.wsUrl, { autoAck: false });
      const got: EventMsg[] = [];
      fresh.on('event', (e: EventMsg) => got.push(e));
      const s2 = await fresh.request<Session>('login', { username: s.username, password: PASSWORD, device });
      assert.notEqual(s2.sessionId, s.sessionId);
      assert.equal((await kicked).code, 'session_takeover');
      await until(() => got.length >= N, `${N} events on the new session`).catch((e) => {
        console.log('new session received', got.length, 'of', N);
        throw e;
      });
      console.log(
        'after takeover:',
        JSON.stringify(got.map((e) => e.attempt)),
        'attempts; eids in order:',
        got.slice(0, N).every((e, i) => e.eid === eids[i]),
      );
      assert.deepEqual(
        got.slice(0, N).map((e) => e.eid),
        eids,
      );
      for (const e of got.slice(0, N)) assert.ok(e.attempt! >= 2, `attempt ${e.attempt}`);
      await wait(500);
      const failed = (await reader.jobs('gw-backend', 'delivery.failed')).filter((j) =>
        eids.includes(j.data.eid),
      );
      assert.equal(failed.length, 0, `delivery.failed for ${failed.length} moved events`);
      // the ttl moved with its event: the expiry index names the new session
      const r = redisClient();
      try {
        assert.ok(
          await r.zscore(`${gw.prefix}expiries`, `${s2.sessionId}|${eids[1]}`),
          'the expiry index names the new session',
        );
        assert.equal(await r.zscore(`${gw.prefix}expiries`, `${s.sessionId}|${eids[1]}`), null);
      } finally {
        r.disconnect();
      }
      // the receipt moved with its event
      fresh.ack([eids[0]]);
      await reader.waitFor(
        'gw-backend',
        (j) => j.some((x) => x.name === 'delivery.acked' && x.data.eid === eids[0]),
        15000,
      );
      fresh.destroy();
    } finally {
      await reader.close();
    }
  });

  test('two logins of one account with one device at once: exactly one session survives', async () => {
    const setup = await connected(gw.tcpUrl);
    const username = await register(setup);
    setup.destroy();
    const survivors: number[] = [];
    for (let round = 0; round < 5; round++) {
      const device = { id: `dev-${randomUUID()}` };
      const conns = await clients(gw, 2);
      const kicks: string[] = [];
      for (const c of conns) c.on('kick', (k: { code: string }) => kicks.push(k.code));
      const outcomes = await Promise.all([
        ...conns.map((c) => wire(c, 'login', { username, password: PASSWORD, device })),
        http(gw, '/auth/login', { username, password: PASSWORD, device }),
      ]);
      // A login on a connection that a simultaneous login took over may lose its answer with
      // the connection (kicked `session_takeover`); any other outcome is a failure.
      const lost = outcomes.filter((o) => o.code !== 'ok').length;
      assert.deepEqual(
        outcomes.map((o) => o.code).filter((c) => c !== 'ok' && c !== 'internal'),
        [],
      );
      assert.ok(
        kicks.filter((k) => k === 'session_takeover').length >= lost,
        `${lost} answers lost, kicks ${kicks}`,
      );
      // A login whose answer was lost with its connection may still be running (its takeover of
      // the device's other sessions too): its line is logged once it is done. A fixed 200 ms
      // raced it, and could count a session it was about to end, or miss one it ended late.
      await until(
        () => gw.logs.filter((l) => l.msg === 'login' && l.device === device.id).length === outcomes.length,
        'every login of the round done (its log line)',
      );
      const check = await connected(gw.tcpUrl);
      let alive = 0;
      for (const o of outcomes) {
        if (o.code !== 'ok') continue;
        if ((await check.request<{ valid: boolean }>('validate', { token: o.data!.token })).valid) alive++;
      }
      survivors.push(alive);
      check.destroy();
      for (const c of conns) c.destroy();
    }
    console.log(
      'live sessions after 3 simultaneous logins with one device, per round:',
      JSON.stringify(survivors),
    );
    assert.deepEqual(survivors, [1, 1, 1, 1, 1]);
  });

  test('a connection that logs in again with its own device id takes its session over without being kicked by it', async () => {
    const c = await connected(gw.tcpUrl);
    const kicks: string[] = [];
    c.on('kick', (k: { code: string }) => kicks.push(k.code));
    try {
      const username = await register(c);
      const device = { id: `relogin-${randomUUID()}` };
      const sessions: Session[] = [];
      for (let i = 0; i < 5; i++) {
        const o = await wire(c, 'login', { username, password: PASSWORD, device });
        assert.equal(
          o.code,
          'ok',
          `login ${i} on the same connection: ${JSON.stringify(o)} (kicks ${kicks})`,
        );
        sessions.push(o.data as unknown as Session);
        // A kick of the connection by its own takeover would come within this.
        await wait(200);
        assert.ok(c.isOpen, `open after login ${i} (kicks ${kicks})`);
      }
      assert.deepEqual(kicks, []);
      const { sessions: listed } = await c.request<{ sessions: { sessionId: string; current: boolean }[] }>(
        'sessions',
      );
      assert.deepEqual(
        listed.map((x) => [x.sessionId, x.current]),
        [[sessions[4].sessionId, true]],
        'only the newest session is live, and it is this connection',
      );
    } finally {
      c.destroy();
    }
  });

  test('thirty devices of one account taken over at once: each old session ends once, by its own device, and no other', async () => {
    const setup = await connected(gw.tcpUrl);
    const username = await register(setup);
    setup.destroy();
    const N = 30;
    const devices = Array.from({ length: N }, (_, i) => ({ id: `fleet-${i}-${randomUUID().slice(0, 8)}` }));
    /** A login, tried again after `retryAfter` while the account's attempts in flight fill its budget. */
    const login = async (c: GatewayClient, device: { id: string }) => {
      for (let tries = 0; ; tries++) {
        const o = await wire(c, 'login', { username, password: PASSWORD, device });
        if (o.code === 'ok') return o.data as unknown as Session;
        if ((o.code !== 'locked' && o.code !== 'rate_limited') || tries > 200)
          throw new Error(`login of ${device.id}: ${JSON.stringify(o)}`);
        await wait(Math.min(o.retryAfter ?? 50, 500));
      }
    };
    const olds = await clients(gw, N);
    const newer = await clients(gw, N);
    try {
      const kicks = olds.map(() => [] as string[]);
      const newKicks = newer.map(() => [] as string[]);
      for (let i = 0; i < N; i++) {
        olds[i].on('kick', (k: { code: string }) => kicks[i].push(k.code));
        newer[i].on('kick', (k: { code: string }) => newKicks[i].push(k.code));
      }
      const first: Session[] = [];
      for (let i = 0; i < N; i++) first.push(await login(olds[i], devices[i]));
      const second = await Promise.all(newer.map((c, i) => login(c, devices[i])));
      await until(() => kicks.every((k) => k.length >= 1), 'every old connection kicked');
      // A second kick of one of them, or a kick of a new one, would come within this.
      await wait(300);
      assert.deepEqual(
        kicks.map((k) => k.join()),
        kicks.map(() => 'session_takeover'),
        'each old session ended once, as its device was taken over',
      );
      assert.deepEqual(newKicks.flat(), [], 'no new session was ended');
      const check = await connected(gw.tcpUrl);
      try {
        for (let i = 0; i < N; i++) {
          assert.equal(
            (await check.request<{ valid: boolean }>('validate', { token: first[i].token })).valid,
            false,
          );
          assert.equal(
            (await check.request<{ valid: boolean }>('validate', { token: second[i].token })).valid,
            true,
          );
        }
      } finally {
        check.destroy();
      }
      const r = redisClient(REDIS_URL);
      try {
        for (let i = 0; i < N; i++)
          assert.deepEqual(await r.smembers(`${gw.prefix}devsess:${devices[i].id}`), [second[i].sessionId]);
      } finally {
        r.disconnect();
      }
    } finally {
      for (const c of [...olds, ...newer]) c.destroy();
    }
  });

  test("a session the device's sessions do not list (made by a node of the previous version) is taken over all the same; ended sessions leave the list", async () => {
    const setup = await connected(gw.tcpUrl);
    const username = await register(setup);
    setup.destroy();
    const device = { id: `dev-${randomUUID()}` };
    const listed = `${gw.prefix}devsess:${device.id}`;
    const r = redisClient(REDIS_URL);
    const [a, b, c] = await clients(gw, 3);
    try {
      const first = await a.request<Session>('login', { username, password: PASSWORD, device });
      assert.deepEqual(await r.smembers(listed), [first.sessionId]);
      // A node of the previous version kept no list: only the device key names the session.
      await r.del(listed);
      const kicked = nextEvent<{ code: string }>(a, 'kick', 'the kick of the unlisted session');
      const second = await b.request<Session>('login', { username, password: PASSWORD, device });
      assert.equal((await kicked).code, 'session_takeover');
      assert.equal((await c.request<{ valid: boolean }>('validate', { token: first.token })).valid, false);
      assert.deepEqual(await r.smembers(listed), [second.sessionId], 'the ended session left the list');
      // A resume of an unlisted session lists it.
      await r.del(listed);
      await c.request('resume', { token: second.token });
      assert.deepEqual(await r.smembers(listed), [second.sessionId]);
      assert.ok((await r.ttl(listed)) > 0, 'the list expires with its sessions');
    } finally {
      for (const x of [a, b, c]) x.destroy();
      r.disconnect();
    }
  });

  test('across two nodes: the device moves to node B and its events follow it', async () => {
    const deployment = deploymentEnv();
    const shared = {
      ...deployment,
      GW_DEFAULT_ROOM: '',
    };
    const a = await startGateway(shared);
    const b = await startGateway(shared);
    const reader = new QueueReader(shared.GW_REDIS_PREFIX);
    try {
      const device = { id: `dev-${randomUUID()}` };
      const onA = await connected(a.tcpUrl, { autoAck: false });
      const s = await signUp(onA, device);
      const gotA: EventMsg[] = [];
      onA.on('event', (e: EventMsg) => gotA.push(e));
      const pub = await connectPublisher({ redisUrl: REDIS_URL, prefix: shared.GW_REDIS_PREFIX });
      const eids: string[] = [];
      for (let i = 0; i < 5; i++)
        eids.push((await pub.publish({ device: device.id }, { name: 'm', data: i })).eid);
      await until(() => gotA.length >= 5, 'the first deliveries on node A');
      const kicked = kickOf(onA);
      const onB = await connected(b.wsUrl);
      const gotB: EventMsg[] = [];
      onB.on('event', (e: EventMsg) => gotB.push(e));
      await onB.request('login', { username: s.username, password: PASSWORD, device });
      assert.equal((await kicked).code, 'session_takeover');
      await until(() => gotB.length >= 5, 'the events on node B');
      assert.deepEqual(
        gotB.slice(0, 5).map((e) => e.eid),
        eids,
      );
      assert.ok(
        gotB.every((e) => e.attempt! >= 2),
        'gotB.every((e) => e.attempt! >= 2)',
      );
      const failed = (await reader.jobs('gw-backend', 'delivery.failed')).filter((j) =>
        eids.includes(j.data.eid),
      );
      assert.equal(failed.length, 0);
      await pub.close();
      onB.destroy();
    } finally {
      await reader.close();
      await Promise.all([a.stop(), b.stop()]);
      await dropDeployment(deployment);
    }
  });
});

describe('a connection that closes while its login is under way', () => {
  test('the login, finished after the close, starts no session and binds nothing to the closed connection', async () => {
    // A slow hash (~100 ms or more here) so that the socket is gone before the password is verified.
    const g = await startGateway({ ARGON2_MEMORY_KIB: '65536', ARGON2_ITERATIONS: '3', GW_DEFAULT_ROOM: '' });
    const r = redisClient();
    try {
      const username = newName();
      const setup = await connected(g.tcpUrl);
      await setup.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
      await setup.close();

      const gone = await connected(g.tcpUrl);
      gone.request('login', { username, password: PASSWORD }).catch(() => {});
      gone.destroy();
      const line = await g.waitForLog(
        (l) => l.msg === 'login' && l.username === username,
        15000,
        'the login line of the closed connection',
      );
      // Nobody would get its tokens: no session is started (before, one was, and only its bind
      // was refused).
      assert.equal(line.result, 'abandoned', JSON.stringify(line));
      assert.equal(line.sessionId, undefined, 'no session started');

      // A later login's presence is written after anything the late one's bind would have written
      // (the binding's Redis work goes in order, one script call per tick).
      const other = await connected(g.tcpUrl);
      const s = await signUp(other);
      for (let i = 0; !(await r.hexists(`${g.prefix}presence`, s.sessionId)); i++) {
        assert.ok(i < 200, 'the later login is online within 10 s');
        await new Promise((res) => setTimeout(res, 50));
      }
      assert.equal(await r.hlen(`${g.prefix}presence`), 1, 'only the later session is online');
      await other.close();
    } finally {
      r.disconnect();
      await g.stop();
    }
  });

  test("a login with a device id whose connection closed before its password was verified starts no session, and does not take the device's live one", async () => {
    // A device that gave up on a slow login (a timeout, a network switch) and logged in again
    // on a new connection. Before, the first login, finished after its connection had gone,
    // started a session that nobody held, took the device over from the live session, and had
    // the live connection kicked (session_takeover); a fleet simulation showed it under load.
    const g = await startGateway({ ARGON2_MEMORY_KIB: '65536', ARGON2_ITERATIONS: '3', GW_DEFAULT_ROOM: '' });
    try {
      const live = await connected(g.tcpUrl);
      const device = { id: `dev-${randomUUID()}` };
      const s = await signUp(live, device);
      const kicks: { code: string }[] = [];
      live.on('kick', (k: { code: string }) => kicks.push(k));

      const gone = await connected(g.tcpUrl);
      gone.request('login', { username: s.username, password: PASSWORD, device }).catch(() => {});
      gone.destroy();
      const line = await g.waitForLog(
        (l) => l.msg === 'login' && l.username === s.username && l.sessionId !== s.sessionId,
        20000,
        'the login line of the closed connection',
      );
      console.log(`the login of the closed connection: ${line.result}`);
      assert.equal(line.result, 'abandoned', JSON.stringify(line));
      // The live session was not ended, and its connection still works as that session.
      assert.ok(
        !g.logs.some((l) => l.msg === 'session ended' && l.sessionId === s.sessionId),
        'the live session was not ended',
      );
      const who = await live.request<{ sessionId?: string }>('sessions', {});
      assert.ok(who, 'the live connection still answers as its session');
      assert.deepEqual(kicks, [], 'the live connection was not kicked');
      await live.close();
    } finally {
      await g.stop();
    }
  });

  test('logins whose connections close while they wait for a hash thread are not hashed', async () => {
    // A device that gives up on a slow login and tries again would otherwise have its password
    // verified once per try, and the tries nobody waits for delay the logins somebody does.
    // One hash thread and a slow hash (~1 s here): the first login holds the thread while the
    // others wait behind it.
    const g = await startGateway({ ...SLOW_HASH_ENV, GW_HASH_THREADS: '1', GW_DEFAULT_ROOM: '' });
    try {
      const username = newName();
      const setup = await connected(g.tcpUrl);
      await setup.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
      await setup.close();
      const before = await scrapeMetrics(g.metricsPort);

      const first = await connected(g.tcpUrl);
      const firstLogin = wire(first, 'login', { username, password: PASSWORD });
      await untilHashJobs(g.metricsPort, 1, 'the first login in the hash pool');
      const waiting = await Promise.all([1, 2, 3].map(() => connected(g.tcpUrl)));
      for (const c of waiting) c.request('login', { username, password: PASSWORD }).catch(() => {});
      await untilHashJobs(g.metricsPort, 4, 'the three other logins waiting for the hash thread');
      for (const c of waiting) c.destroy();

      assert.equal((await firstLogin).code, 'ok', 'the login whose connection stayed is answered');
      const abandoned = () =>
        g.logs.filter((l) => l.msg === 'login' && l.username === username && l.result === 'abandoned').length;
      await until(() => abandoned() >= 3, 'the three closed logins to be logged abandoned');
      await until(
        async () => (await scrapeMetrics(g.metricsPort)).value('gateway_hash_jobs') === 0,
        'the hash pool to be empty',
      );
      const after = await scrapeMetrics(g.metricsPort);
      const delta = (s: string) => after.value(s) - before.value(s);
      // Before, all four were hashed: nothing was dropped.
      assert.equal(
        delta('gateway_hash_jobs_total{outcome="abandoned"}'),
        3,
        'the three closed logins were dropped',
      );
      assert.equal(
        delta('gateway_hash_jobs_total{outcome="admitted"}'),
        4,
        'all four logins had been admitted',
      );
      assert.equal(
        delta('gateway_hash_job_seconds_count'),
        1,
        'only the login whose connection stayed was hashed',
      );
      await first.close();
    } finally {
      await g.stop();
    }
  });

  test('an HTTP login aborted before its password was verified starts no session', async () => {
    // A slow hash (~0.5 s here), so that the abort comes while the password is being verified.
    const g = await startGateway({
      ARGON2_MEMORY_KIB: '65536',
      ARGON2_ITERATIONS: '12',
      GW_DEFAULT_ROOM: '',
    });
    try {
      const username = newName();
      const setup = await connected(g.tcpUrl);
      await setup.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
      await setup.close();
      const abort = new AbortController();
      const sent = fetch(`http://127.0.0.1:${g.httpPort}/auth/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ username, password: PASSWORD }),
        signal: abort.signal,
      }).catch(() => {});
      // Aborted once its password is being verified (the hash pool holds its job).
      await untilHashJobs(g.metricsPort, 1, 'the login in the hash pool');
      abort.abort();
      await sent;
      const line = await g.waitForLog(
        (l) => l.msg === 'login' && l.username === username,
        20000,
        'the login line of the aborted request',
      );
      assert.equal(line.result, 'abandoned', JSON.stringify(line));
    } finally {
      await g.stop();
    }
  });
});
