/**
 * Identity end to end against real gateway processes, PostgreSQL, Redis and an SMTP server,
 * over TCP and WebSocket.
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import type { Session } from '../../client/client.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { query, REDIS_URL, redisClient } from '../helpers/cleanup.ts';
import { nextEvent, until } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { codeOf, type SmtpSink, startSmtpSink } from '../helpers/smtp-sink.ts';

const isCode = (code: string) => (e: unknown) => e instanceof ProtocolError && e.code === code;
const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

let gw: GatewayProcess;
let smtp: SmtpSink;

before(async () => {
  smtp = await startSmtpSink();
  gw = await startGateway({
    SMTP_HOST: '127.0.0.1',
    SMTP_PORT: String(smtp.port),
    GW_REGISTER_PER_MINUTE: '1000',
    GW_OTP_PER_MINUTE: '1000',
    // Grace period off here; test/e2e/identity-races.test.ts covers it.
    GW_REFRESH_GRACE_SECONDS: '0',
  });
});
after(async () => {
  await gw.stop();
  await smtp.close();
});

for (const transport of ['tcp', 'ws'] as const) {
  const url = () => (transport === 'tcp' ? gw.tcpUrl : gw.wsUrl);

  describe(`identity over ${transport}`, () => {
    test('register: success and every validation error', async () => {
      const c = await connected(url());
      const name = newName();
      const r = await c.request<{ userId: string }>('register', {
        username: name,
        email: `  ${name.toUpperCase()}@Example.COM `,
        password: PASSWORD,
      });
      assert.match(r.userId, /^[0-9a-f-]{36}$/);
      const row = await query(gw.schema, 'SELECT email FROM users WHERE id = $1', [r.userId]);
      assert.equal(row.rows[0].email, `${name}@example.com`, 'email trimmed and lowercased');
      const cases: [Record<string, unknown>, string][] = [
        [{ username: 'ab', email: 'x@example.com', password: PASSWORD }, 'invalid_username'],
        [{ username: 'has space', email: 'x@example.com', password: PASSWORD }, 'invalid_username'],
        [{ username: 'a'.repeat(17), email: 'x@example.com', password: PASSWORD }, 'invalid_username'],
        [{ username: newName(), email: 'not-an-email', password: PASSWORD }, 'invalid_email'],
        [{ username: newName(), email: 'x@example.com', password: 'short' }, 'weak_password'],
        [{ username: newName(), email: 'x@example.com', password: 'x'.repeat(129) }, 'weak_password'],
        [
          { username: name.toUpperCase(), email: `${newName()}@example.com`, password: PASSWORD },
          'username_taken',
        ],
        [{ username: newName(), email: `${name}@EXAMPLE.com`, password: PASSWORD }, 'email_taken'],
        [{ username: newName(), email: 'x@example.com' }, 'bad_message'],
      ];
      for (const [fields, code] of cases) {
        await assert.rejects(c.request('register', fields), isCode(code), JSON.stringify(fields));
      }
      // 8 characters of any kind are enough (no composition rules)
      await c.request('register', {
        username: newName(),
        email: `${newName()}@example.com`,
        password: 'aaaaaaaa',
      });
      await c.close();
    });

    test('login: a session; the same error for an unknown user and a wrong password', async () => {
      const c = await connected(url());
      const s = await signUp(c, { id: `dev-${randomUUID()}` });
      for (const k of [
        'userId',
        'username',
        'sessionId',
        'token',
        'refresh',
        'expiresAt',
        'refreshExpiresAt',
      ]) {
        assert.ok(k in s, k);
      }
      assert.ok(
        s.expiresAt > Date.now() && s.expiresAt <= Date.now() + 15 * 60_000 + 2000,
        's.expiresAt > Date.now() && s.expiresAt <= Date.now() + 15 * 60_000 + 2000',
      );
      const errs: ProtocolError[] = [];
      for (const fields of [
        { username: s.username, password: 'wrong password' },
        { username: newName(), password: 'wrong password' },
        { email: `${s.username}@example.com`, password: 'wrong password' },
      ]) {
        const c2 = await connected(url());
        await c2.request('login', fields).catch((e) => errs.push(e));
        await c2.close();
      }
      assert.equal(errs.length, 3);
      for (const e of errs) {
        assert.equal(e.code, 'invalid_credentials');
        assert.equal(e.message, errs[0].message);
      }
      // login by email works too
      const c3 = await connected(url());
      const byEmail = await c3.request<Session>('login', {
        email: `${s.username}@EXAMPLE.com`,
        password: PASSWORD,
      });
      assert.equal(byEmail.userId, s.userId);
      await c3.close();
      await c.close();
    });

    test('resume, validate, logout (idempotent)', async () => {
      const a = await connected(url());
      const s = await signUp(a);
      const b = await connected(url());
      await assert.rejects(b.request('sessions'), isCode('unauthenticated'));
      const resumed = await b.request<Session>('resume', { token: s.token });
      assert.equal(resumed.sessionId, s.sessionId);
      assert.equal(resumed.refresh, undefined);
      const v = await b.request('validate', { token: resumed.token });
      assert.deepEqual(
        { ...v, expiresAt: 0 },
        { valid: true, userId: s.userId, username: s.username, sessionId: s.sessionId, expiresAt: 0 },
      );
      assert.deepEqual(await b.request('validate', { token: 'garbage' }), { valid: false });
      assert.deepEqual(await b.request('validate', { token: `${s.token.slice(0, -4)}AAAA` }), {
        valid: false,
      });
      await assert.rejects(b.request('resume', { token: 'garbage' }), isCode('token_invalid'));
      assert.deepEqual(await b.request('logout'), {});
      // logout needs an authenticated connection (PROTOCOL.md §4); the connection stays open
      await assert.rejects(b.request('logout'), isCode('unauthenticated'));
      assert.deepEqual(await b.request('validate', { token: resumed.token }), { valid: false });
      await assert.rejects(b.request('resume', { token: resumed.token }), isCode('session_revoked'));
      await b.request('login', { username: s.username, password: PASSWORD });
      assert.deepEqual(
        await b.request('logout', { token: s.token }),
        {},
        'idempotent: that session is already gone',
      );
      assert.deepEqual(await b.request('logout', { token: 'garbage' }), {});
      const audit = await query(gw.schema, 'SELECT ended_at, end_reason FROM sessions WHERE id = $1', [
        s.sessionId,
      ]);
      assert.equal(audit.rows[0].end_reason, 'logout');
      assert.ok(audit.rows[0].ended_at, 'audit.rows[0].ended_at');
      b.destroy();
      a.destroy();
    });

    test('refresh rotates; without a grace period two concurrent refreshes: one wins, the session ends', async () => {
      const a = await connected(url());
      const s = await signUp(a);
      const kicked = nextEvent<{ code: string }>(a, 'kick');
      const b = await connected(url());
      const t1 = await b.request<Session>('refresh', { refresh: s.refresh });
      assert.notEqual(t1.refresh, s.refresh);
      assert.ok(
        t1.token && t1.expiresAt && t1.refreshExpiresAt,
        't1.token && t1.expiresAt && t1.refreshExpiresAt',
      );
      const results = await Promise.allSettled([
        b.request('refresh', { refresh: t1.refresh }),
        b.request('refresh', { refresh: t1.refresh }),
      ]);
      const won = results.filter((r) => r.status === 'fulfilled');
      const lost = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(won.length, 1);
      assert.equal(lost.length, 1);
      assert.equal((lost[0].reason as ProtocolError).code, 'refresh_reused');
      // reuse ended the whole session: its live connection is kicked, its tokens stop working
      assert.equal((await kicked).code, 'session_revoked');
      assert.deepEqual(await b.request('validate', { token: t1.token }), { valid: false });
      const audit = await query(gw.schema, 'SELECT end_reason FROM sessions WHERE id = $1', [s.sessionId]);
      assert.equal(audit.rows[0].end_reason, 'refresh_reused');
      await assert.rejects(b.request('refresh', { refresh: 'not-a-token' }), isCode('token_invalid'));
      b.destroy();
    });

    test('sessions lists device, ip and current; revoke kicks the other connection', async () => {
      const a = await connected(url());
      // device ids belong to one account (PROTOCOL.md §4): fresh ones for each run
      const laptop = `laptop-${randomUUID()}`;
      const s = await signUp(a, { id: `phone-${randomUUID()}` });
      const b = await connected(url());
      const s2 = await b.request<Session>('login', {
        username: s.username,
        password: PASSWORD,
        device: { id: laptop, name: 'Lap' },
      });
      const list = (await a.request<{ sessions: Record<string, unknown>[] }>('sessions')).sessions;
      assert.equal(list.length, 2);
      const mine = list.find((x) => x.current)!;
      assert.equal(mine.sessionId, s.sessionId);
      assert.deepEqual(list.find((x) => !x.current)!.device, { id: laptop, name: 'Lap' });
      assert.equal(mine.ip, '127.0.0.1');
      const kicked = nextEvent<{ code: string }>(b, 'kick');
      await a.request('revoke', { sessionId: s2.sessionId });
      assert.equal((await kicked).code, 'session_revoked');
      await assert.rejects(a.request('revoke', { sessionId: randomUUID() }), isCode('not_found'));
      a.destroy();
    });
  });
}

describe('across two gateway processes', () => {
  test('revoke and device takeover kick the connection on the other node', async () => {
    const shared = deploymentEnv();
    const a = await startGateway({ ...shared });
    const b = await startGateway({ ...shared });
    try {
      const onA = await connected(a.tcpUrl);
      const s = await signUp(onA, { id: 'sensor-1' });
      // the same device id logs in through node B: node A's connection is taken over
      const takeover = nextEvent<{ code: string }>(onA, 'kick');
      const onB = await connected(b.wsUrl);
      const s2 = await onB.request<Session>('login', {
        username: s.username,
        password: PASSWORD,
        device: { id: 'sensor-1' },
      });
      assert.equal((await takeover).code, 'session_takeover');
      const audit = await query(shared.GW_DB_SCHEMA, 'SELECT end_reason FROM sessions WHERE id = $1', [
        s.sessionId,
      ]);
      assert.equal(audit.rows[0].end_reason, 'takeover');
      // a session on A revoked from B is kicked (the wait's deadline bounds it; no clock here)
      const onA2 = await connected(a.tcpUrl);
      const s3 = await onA2.request<Session>('login', { username: s.username, password: PASSWORD });
      const revoked = nextEvent<{ code: string }>(onA2, 'kick', 'the kick of the session revoked from B');
      await onB.request('revoke', { sessionId: s3.sessionId });
      assert.equal((await revoked).code, 'session_revoked');
      // resuming the same session on another node moves it there (the old connection is kicked)
      const again = nextEvent<{ code: string }>(onB, 'kick');
      const onA3 = await connected(a.tcpUrl);
      await onA3.request('resume', { token: s2.token });
      assert.equal((await again).code, 'session_takeover');
      onA3.destroy();
    } finally {
      await Promise.all([a.stop(), b.stop()]);
      await dropDeployment(shared);
    }
  });
});

describe('lockout', () => {
  test('5 failures lock the account with retryAfter; it expires; success resets the count', async () => {
    const g = await startGateway({ GW_LOCKOUT_SECONDS: '2' });
    try {
      const c = await connected(g.tcpUrl);
      const s = await signUp(c);
      await c.request('logout');
      for (let i = 0; i < 4; i++) {
        await assert.rejects(
          c.request('login', { username: s.username, password: 'nope nope' }),
          isCode('invalid_credentials'),
        );
      }
      // success resets the counter
      await c.request('login', { username: s.username, password: PASSWORD });
      await c.request('logout');
      // failures by username and by email count against the same account
      for (let i = 0; i < 5; i++) {
        const by = i % 2 ? { email: `${s.username}@example.com` } : { username: s.username };
        await assert.rejects(
          c.request('login', { ...by, password: 'nope nope' }),
          isCode('invalid_credentials'),
        );
      }
      const locked = await c.request('login', { username: s.username, password: PASSWORD }).catch((e) => e);
      assert.equal(locked.code, 'locked');
      assert.ok(locked.retryAfter > 0 && locked.retryAfter <= 2000, `retryAfter ${locked.retryAfter}`);
      await wait(locked.retryAfter + 100);
      const ok = await c.request<Session>('login', { username: s.username, password: PASSWORD });
      assert.equal(ok.userId, s.userId);
      await c.close();
    } finally {
      await g.stop();
    }
  });
});

describe('lockout that starts late in its window', () => {
  test("the lock lasts GW_LOCKOUT_SECONDS from the failure that made it, not to the end of the first failure's window", async () => {
    // Times are measured around each request, so every bound below holds however slow the
    // machine is, up to a slack of about 4 s on each side (the old fixed waits left 1.5 s).
    const W = 8000;
    const g = await startGateway({ GW_LOCKOUT_ATTEMPTS: '2', GW_LOCKOUT_SECONDS: String(W / 1000) });
    try {
      const c = await connected(g.tcpUrl);
      const s = await signUp(c);
      await c.request('logout');
      const fail = () =>
        assert.rejects(
          c.request('login', { username: s.username, password: 'nope nope' }),
          isCode('invalid_credentials'),
        );
      const waitTill = (at: number) => wait(Math.max(0, at - Date.now()));
      // One failure opens the window (between t1 and t1End); the second, half a window later,
      // locks the account (from a moment after t2) for W.
      const t1 = Date.now();
      await fail();
      const t1End = Date.now();
      await waitTill(t1 + W / 2);
      const t2 = Date.now();
      await fail();
      await g.waitForLog((l) => l.msg === 'account locked');
      // Past the first failure's window, before the lock's end (at least t2 + W).
      await waitTill(t1End + W + 50);
      const still = await c.request('login', { username: s.username, password: PASSWORD }).catch((e) => e);
      const stillEnd = Date.now();
      assert.equal(still.code, 'locked', 'still locked after the window the first failure opened');
      assert.ok(
        still.retryAfter >= t2 + W - stillEnd - 5 && still.retryAfter <= W,
        `retryAfter ${still.retryAfter}: the lock runs to at least ${t2 + W - stillEnd} ms after the answer`,
      );
      await waitTill(stillEnd + still.retryAfter + 200);
      const ok = await c.request<Session>('login', { username: s.username, password: PASSWORD });
      assert.equal(ok.userId, s.userId);
      await c.close();
    } finally {
      await g.stop();
    }
  });
});

describe('legacy bcrypt hashes', () => {
  test('a bcrypt hash verifies and is rehashed to argon2id on login', async () => {
    const c = await connected(gw.tcpUrl);
    const name = newName();
    // bcrypt (cost 10) of "legacy-password-1", as imported from a seed's database
    for (const prefix of ['$2y$', '$2b$']) {
      const user = `${name}${prefix[2]}`;
      const hash = `${prefix}10$IbZ231P4cjUtoZuIy9BB7OKghbsoZJ7tM07B8FUsFkiFYXUakth0e`;
      await query(gw.schema, 'INSERT INTO users (username, email, password_hash) VALUES ($1, $2, $3)', [
        user,
        `${user}@example.com`,
        hash,
      ]);
      await assert.rejects(
        c.request('login', { username: user, password: 'wrong-password' }),
        isCode('invalid_credentials'),
      );
      const s = await c.request<Session>('login', { username: user, password: 'legacy-password-1' });
      const row = await query(gw.schema, 'SELECT password_hash FROM users WHERE id = $1', [s.userId]);
      assert.match(row.rows[0].password_hash, /^\$argon2id\$/);
      await c.request('logout');
      await c.request('login', { username: user, password: 'legacy-password-1' });
      await c.request('logout');
    }
    await c.close();
  });
});

describe('email login codes', () => {
  const otpKey = (prefix: string, email: string) =>
    `${prefix}otp:${createHash('sha256').update(email).digest('hex')}`;

  test('a code by real email logs in and creates the account for a new address', async () => {
    const c = await connected(gw.wsUrl);
    const name = newName();
    const email = `${name}@example.com`;
    assert.deepEqual(await c.request('otp.request', { email }), {});
    const code = codeOf(await smtp.next(email));
    await assert.rejects(c.request('otp.verify', { email, code }), isCode('bad_message'), 'username needed');
    const s = await c.request<Session>('otp.verify', { email, code, username: name });
    assert.equal(s.username, name);
    assert.ok(s.token && s.refresh, 's.token && s.refresh');
    await assert.rejects(
      c.request('otp.verify', { email, code, username: name }),
      isCode('otp_invalid'),
      'single use',
    );
    // an existing account: no username needed
    await c.request('otp.request', { email });
    const s2 = await c.request<Session>('otp.verify', { email, code: codeOf(await smtp.next(email)) });
    assert.equal(s2.userId, s.userId);
    // unknown and invalid addresses get the same answer
    assert.deepEqual(await c.request('otp.request', { email: 'not an address' }), {});
    await c.close();
  });

  test('wrong codes, attempts exhausted, replacement and expiry', async () => {
    const c = await connected(gw.tcpUrl);
    const email = `${newName()}@example.com`;
    const username = newName();
    await c.request('otp.request', { email });
    const first = codeOf(await smtp.next(email));
    await c.request('otp.request', { email });
    const second = codeOf(await smtp.next(email));
    if (first !== second) {
      await assert.rejects(
        c.request('otp.verify', { email, code: first, username }),
        isCode('otp_invalid'),
        'replaced',
      );
    }
    const wrong = second === '000000' ? '111111' : '000000';
    await assert.rejects(c.request('otp.verify', { email, code: wrong, username }), isCode('otp_invalid'));
    await assert.rejects(c.request('otp.verify', { email, code: wrong, username }), isCode('otp_invalid'));
    // the third wrong try uses up the code: even the right one fails now
    await assert.rejects(c.request('otp.verify', { email, code: second, username }), isCode('otp_invalid'));

    await c.request('otp.request', { email });
    const code = codeOf(await smtp.next(email));
    const r = redisClient();
    await r.pexpire(otpKey(gw.prefix, email), 1); // let Redis expire it now
    r.disconnect();
    await wait(20);
    await assert.rejects(
      c.request('otp.verify', { email, code, username }),
      isCode('otp_invalid'),
      'expired',
    );
    await c.close();
  });

  test('without SMTP settings the gateway starts and otp.request gets a clear error', async () => {
    const c = await connected(gwNoSmtp.tcpUrl);
    await assert.rejects(c.request('otp.request', { email: 'a@example.com' }), isCode('forbidden'));
    assert.ok(
      gwNoSmtp.logs.some((l) => String(l.msg).includes('SMTP_HOST is not set')),
      "gwNoSmtp.logs.some((l) => String(l.msg).includes('SMTP_HOST is not set'))",
    );
    await c.close();
  });
});

describe('logs', () => {
  test('no password, token, refresh token or code ever reaches the log, even at debug level', async () => {
    const c = await connected(gw.tcpUrl);
    const s = await signUp(c);
    const t = await c.request<Session>('refresh', { refresh: s.refresh });
    await c.request('login', { username: s.username, password: 'a wrong password 42' }).catch(() => {});
    const email = `${newName()}@example.com`;
    await c.request('otp.request', { email });
    const code = codeOf(await smtp.next(email));
    await c.close();
    await wait(200);
    const all = JSON.stringify(gw.logs);
    // the 6-digit code as a value of its own (digits inside ids and timestamps are not a leak)
    for (const secret of [
      PASSWORD,
      'a wrong password 42',
      s.token,
      s.refresh,
      t.token,
      t.refresh,
      `"${code}"`,
      ` ${code}`,
    ]) {
      assert.ok(!all.includes(secret!), `a secret leaked into the log: ${secret!.slice(0, 12)}…`);
    }
    assert.ok(gw.logs.length > 5, 'the gateway did log');
  });
});

let gwNoSmtp: GatewayProcess;
before(async () => {
  gwNoSmtp = await startGateway({ GW_HASH_THREADS: '1', GW_HASH_MAX_QUEUE: '1' });
});
after(async () => {
  await gwNoSmtp.stop();
});

describe('rate limits per IP', () => {
  test('register beyond its budget is rate_limited with retryAfter', async (t) => {
    const g = await startGateway();
    t.after(() => g.stop());
    const c = await connected(g.wsUrl);
    const results = await Promise.allSettled(
      Array.from({ length: 12 }, () =>
        c.request('register', { username: newName(), email: `${newName()}@example.com`, password: PASSWORD }),
      ),
    );
    const limited = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
    assert.equal(results.length - limited.length, 10, 'GW_REGISTER_PER_MINUTE defaults to 10');
    assert.equal((limited[0].reason as ProtocolError).code, 'rate_limited');
    assert.ok(
      (limited[0].reason as ProtocolError).retryAfter! > 0,
      '(limited[0].reason as ProtocolError).retryAfter! > 0',
    );
    await c.close();
  });
});

describe('hashing off the event loop', () => {
  test('past the bound on queued hash jobs: overloaded with retryAfter', async () => {
    const c = await connected(gwNoSmtp.tcpUrl);
    const s = await signUp(c);
    await c.request('logout');
    // One connection's requests run one after another (PROTOCOL.md §4): a storm comes from many.
    const devices = await Promise.all(Array.from({ length: 40 }, () => connected(gwNoSmtp.tcpUrl)));
    const results = await Promise.allSettled(
      devices.map((d) => d.request('login', { username: s.username, password: PASSWORD })),
    );
    for (const d of devices) d.destroy();
    const overloaded = results.filter(
      (r) => r.status === 'rejected' && (r.reason as ProtocolError).code === 'overloaded',
    ) as PromiseRejectedResult[];
    assert.ok(overloaded.length > 0, 'some logins are refused');
    assert.ok(
      results.some((r) => r.status === 'fulfilled'),
      'some get through',
    );
    assert.ok(
      (overloaded[0].reason as ProtocolError).retryAfter! > 0,
      '(overloaded[0].reason as ProtocolError).retryAfter! > 0',
    );
    c.destroy();
  });

  test('structurally, only the worker module loads the hashing libraries', async () => {
    const { readdirSync, readFileSync, statSync } = await import('node:fs');
    const { join } = await import('node:path');
    const root = new URL('../../', import.meta.url).pathname;
    const offenders: string[] = [];
    const walk = (dir: string) => {
      for (const f of readdirSync(join(root, dir))) {
        const p = join(dir, f);
        if (statSync(join(root, p)).isDirectory()) walk(p);
        else if (
          /\.(ts|mjs|js)$/.test(f) &&
          /@node-rs\/(argon2|bcrypt)/.test(readFileSync(join(root, p), 'utf8'))
        ) {
          offenders.push(p);
        }
      }
    };
    for (const d of ['gateway', 'protocol', 'client', 'workers']) walk(d);
    assert.deepEqual(offenders, ['workers/password-hash.worker.mjs']);
    // and that module refuses to run on a main thread
    const { spawnSync } = await import('node:child_process');
    const r = spawnSync(
      process.execPath,
      ['-e', `import('${join(root, 'workers/password-hash.worker.mjs')}')`],
      {
        encoding: 'utf8',
      },
    );
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /must run in a worker thread/);
  });

  test('hash jobs run on worker threads', async () => {
    const { Hasher } = await import('../../gateway/auth/hasher.ts');
    const h = new Hasher({
      params: { memoryCost: 1024, timeCost: 1, parallelism: 1 },
      threads: 1,
      maxQueue: 10,
    });
    try {
      const r = await h.hash('some password');
      assert.ok(r.threadId > 0, 'not the main thread (threadId 0)');
      assert.ok(
        (await h.verify('some password', r.hash)).threadId > 0,
        "(await h.verify('some password', r.hash)).threadId > 0",
      );
    } finally {
      await h.close();
    }
  });
});

describe('user.registered reaches the back-end queue', () => {
  test('exactly once with the documented shape, also when the relay is killed after adding', async () => {
    const shared = deploymentEnv();
    const a = await startGateway({ ...shared, GW_TEST_RELAY_PAUSE_AFTER_ADD: '1' });
    const bull = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
    const queue = new Queue('gw-backend', { connection: bull, prefix: `${shared.GW_REDIS_PREFIX}bull` });
    try {
      const c = await connected(a.tcpUrl);
      const name = newName();
      const { userId } = await c.request<{ userId: string }>('register', {
        username: name,
        email: `${name}@example.com`,
        password: PASSWORD,
      });
      const paused = await a.waitForLog((l) => l.msg === 'relay paused after add');
      a.proc.kill('SIGKILL');
      await a.exited;
      const row = await query(shared.GW_DB_SCHEMA, 'SELECT id, published_at FROM outbox WHERE id = $1', [
        paused.id,
      ]);
      assert.equal(row.rows[0].published_at, null, 'killed before marking the row');
      const b = await startGateway({ ...shared });
      await until('the restarted node to send the row again and mark it', async () => {
        const r = await query(shared.GW_DB_SCHEMA, 'SELECT published_at FROM outbox WHERE id = $1', [
          paused.id,
        ]);
        return !!r.rows[0].published_at;
      });
      const jobs = (await queue.getJobs(['waiting', 'active', 'completed', 'delayed'])).filter(
        (j) => j.name === 'user.registered',
      );
      assert.equal(jobs.length, 1, 'one job although the row was sent twice');
      const job = jobs[0];
      assert.equal(job.id, `outbox-${paused.id}`);
      assert.deepEqual(Object.keys(job.data).sort(), ['email', 'ts', 'userId', 'username']);
      assert.equal(job.data.userId, userId);
      assert.equal(job.data.username, name);
      assert.equal(job.data.email, `${name}@example.com`);
      assert.equal(typeof job.data.ts, 'number');
      await b.stop();
      c.destroy();
    } finally {
      await queue.close();
      bull.disconnect();
      await a.stop();
      await dropDeployment(shared);
    }
  });
});
