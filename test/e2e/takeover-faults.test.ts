/**
 * A takeover (a login with a device id) under a failing Redis: the device's sessions
 * (`Pdevsess:<device>`) and its key (`Pdev:<device>`) are written when the new session is made,
 * and the takeover that ends the older ones follows in later calls. When Redis fails in between,
 * the login is refused with a session already made and the older one still live. The node ends
 * that session (nobody holds its tokens), taken over by the older one, which gets the device's
 * key back; the device tries again, and that login's takeover must bring every event to the
 * session that survives. A private redis-server: an ACL rule denies the takeover's read to make the
 * failure land exactly there, and freezes hit a storm of thirty devices wherever they fall.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import pg from 'pg';
import type { GatewayClient, Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { ProtocolError } from '../../protocol/index.ts';
import { connected, newName, PASSWORD } from '../helpers/accounts.ts';
import { backendPid, blockedBy, DATABASE_URL } from '../helpers/cleanup.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import { collect } from '../helpers/events.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'api-key-for-takeover-faults-5c1e';
const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

let redis: OwnRedis;
let deployment: ReturnType<typeof deploymentEnv>;
let g: GatewayProcess;
before(async () => {
  redis = await startOwnRedis();
  deployment = deploymentEnv();
  g = await startGateway({
    ...deployment,
    REDIS_URL: redis.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    // Every login comes from 127.0.0.1, and the storm's retries are many.
    GW_IP_FAILURE_BUDGET: '100000',
    // A frozen Redis answers nothing: each call gives up after this and is answered overloaded.
    GW_REDIS_TIMEOUT_MS: '300',
  });
});
after(async () => {
  await g?.stop();
  await redis?.remove();
  if (deployment) await dropDeployment(deployment);
});

const acl = (rule: string) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', rule));
const devsess = (device: string) =>
  redis.with((r) => r.smembers(`${deployment.GW_REDIS_PREFIX}devsess:${device}`));
/** The points the account's login budget holds: failures and attempts in flight. */
const accountBudgetHeld = () =>
  redis.with(async (r) => {
    let held = 0;
    for (const key of await r.keys(`${deployment.GW_REDIS_PREFIX}rl:login-account*`)) {
      const type = await r.type(key);
      if (type === 'string') held += Number(await r.get(key));
      else if (type === 'zset') held += await r.zcard(key);
      else held += 1;
    }
    return held;
  });
const sessionExists = (sid: string) =>
  redis.with((r) => r.exists(`${deployment.GW_REDIS_PREFIX}{s:${sid}}:sess`));

async function register(): Promise<string> {
  const c = await connected(g.tcpUrl);
  try {
    const username = newName();
    await within(
      'the registration',
      c.request('register', { username, email: `${username}@example.com`, password: PASSWORD }),
    );
    return username;
  } finally {
    c.destroy();
  }
}

/** A login's outcome: the session, or the error's code (and retryAfter). */
async function tryLogin(
  c: GatewayClient,
  username: string,
  device: string,
): Promise<{ session?: Session; code?: string; retryAfter?: number }> {
  try {
    return {
      session: await c.request<Session>(
        'login',
        { username, password: PASSWORD, device: { id: device } },
        { timeoutMs: 20_000 },
      ),
    };
  } catch (e) {
    if (e instanceof ProtocolError) return { code: e.code, retryAfter: e.retryAfter };
    throw e;
  }
}

async function publish(targets: { device: string; eid: string }[]): Promise<void> {
  const res = await postEvents(
    g.httpPort,
    API_KEY,
    targets.map(({ device, eid }) => ({ target: { device }, eid, name: 'takeover.test', data: {} })),
  );
  assert.equal(res.status, 202, await res.text());
}

test('a login whose takeover Redis refuses after its session was made: its session is ended, the key back at the older one, and the retry gets every event', async () => {
  const username = await register();
  const device = `tf-${randomUUID().slice(0, 8)}`;
  const open: GatewayClient[] = [];
  try {
    // The device's session, offline, with three events waiting in its outbox.
    const first = await connected(g.tcpUrl);
    open.push(first);
    const s1 = (await tryLogin(first, username, device)).session!;
    await within('the first connection closed', first.close());
    const before = Array.from({ length: 3 }, () => `tf-${randomUUID().slice(0, 8)}`);
    await publish(before.map((eid) => ({ device, eid })));

    // The takeover reads the device's sessions with SMEMBERS, which the making of a session
    // does not use: the login makes its session, then fails.
    const next = await connected(g.tcpUrl, { autoAck: true });
    open.push(next);
    const got = collect(next);
    await acl('-smembers');
    let failed: Awaited<ReturnType<typeof tryLogin>>;
    try {
      failed = await tryLogin(next, username, device);
    } finally {
      await acl('+smembers');
    }
    assert.equal(failed.session, undefined, 'the login whose takeover failed is refused');
    // Its session was made, and took the device's key; nobody holds its tokens. Once Redis
    // allows the takeover's read again, the node ends it, taken over by the older session, which
    // gets the key back (unstarted.ts). Before, it lived on with the key, and the device's events
    // went to it until the device logged in again.
    const holder = () => redis.with((r) => r.get(`${deployment.GW_REDIS_PREFIX}dev:${device}`));
    await until(
      "the device's key back at the older session",
      async () => (await holder()) === s1.sessionId && (await devsess(device)).length === 1,
    );
    assert.deepEqual(await devsess(device), [s1.sessionId], "the device's sessions: the older one");
    assert.equal(await sessionExists(s1.sessionId), 1, 'the older session is still live');

    // Meanwhile events for the device go to the older session.
    const meanwhile = Array.from({ length: 2 }, () => `tf-${randomUUID().slice(0, 8)}`);
    await publish(meanwhile.map((eid) => ({ device, eid })));

    // The device tries again.
    const s3 = (await tryLogin(next, username, device)).session;
    assert.ok(s3, 'the retried login is answered');
    await until('every event of the older session at the new one', () =>
      [...before, ...meanwhile].every((e) => got.some((x: EventMsg) => x.eid === e)),
    );
    assert.deepEqual(await devsess(device), [s3.sessionId], "the device's sessions: the new one only");
    assert.equal(await sessionExists(s1.sessionId), 0, 'the first session ended');
    // Each event once.
    const eids = got.map((x) => x.eid);
    assert.equal(new Set(eids).size, eids.length, `no event twice: ${JSON.stringify(eids)}`);
  } finally {
    for (const c of open) c.destroy();
  }
});

test('thirty devices of one account taken over at once while Redis freezes again and again: once each login is answered, one session per device, each older one kicked once, events reach the new ones', async () => {
  const username = await register();
  const N = 30;
  const devices = Array.from({ length: N }, (_, i) => `tfs-${i}-${randomUUID().slice(0, 8)}`);
  const olds: GatewayClient[] = [];
  const newer: GatewayClient[] = [];
  let freezing = true;
  let freezes = 0;
  try {
    for (let i = 0; i < N; i++) {
      const c = await connected(g.tcpUrl, { autoAck: true });
      olds.push(c);
      const o = await tryLogin(c, username, devices[i]);
      assert.ok(o.session, `device ${i}'s first login: ${JSON.stringify(o)}`);
    }
    for (let i = 0; i < N; i++) newer.push(await connected(g.tcpUrl, { autoAck: true }));
    const kicks = olds.map(() => [] as string[]);
    const newKicks = newer.map(() => [] as string[]);
    for (let i = 0; i < N; i++) {
      olds[i].on('kick', (k: { code: string }) => kicks[i].push(k.code));
      newer[i].on('kick', (k: { code: string }) => newKicks[i].push(k.code));
    }
    const refusals: string[] = [];

    // Redis frozen for 700 ms every 1,000 ms while the thirty log in again at once, each trying
    // again after its retryAfter until it is answered.
    const freezer = (async () => {
      while (freezing) {
        redis.freeze();
        freezes++;
        await wait(700);
        redis.thaw();
        await wait(300);
      }
    })();
    const deadline = Date.now() + 90_000;
    const sessions = await Promise.all(
      newer.map(async (c, i) => {
        for (;;) {
          const o = await tryLogin(c, username, devices[i]);
          if (o.session) return o.session;
          refusals.push(`${o.code}:${o.retryAfter}`);
          if (Date.now() > deadline)
            throw new Error(`device ${i}'s login not answered within 90 s: ${o.code}`);
          await wait(Math.min(o.retryAfter ?? 200, 1000));
        }
      }),
    ).finally(() => {
      freezing = false;
    });
    await freezer;
    redis.thaw();
    assert.ok(
      refusals.some((r) => r.startsWith('overloaded')),
      `the freezes (${freezes}) met logins under way: ${JSON.stringify(refusals)}`,
    );
    // Every login answered: no point of the account's budget is left held. A reservation a
    // freeze held past its timeout ran once Redis thawed, for a login already answered
    // `overloaded`; its give-back runs after it. Before, such points stayed, and once five were
    // held the account's every login was refused `locked`.
    await until(
      "the account's login budget to hold nothing",
      async () => (await accountBudgetHeld()) === 0,
      10_000,
    );

    await until('every older connection kicked', () => kicks.every((k) => k.length >= 1), 30_000);
    // A second kick of one of them, or a kick of a new one, would come within this.
    await wait(500);
    assert.deepEqual(
      kicks.map((k) => k.join()),
      kicks.map(() => 'session_takeover'),
      `each older session ended once, by its device's takeover (refusals on the way: ${refusals.length})`,
    );
    assert.deepEqual(newKicks.flat(), [], 'no new session was ended');
    for (let i = 0; i < N; i++)
      assert.deepEqual(await devsess(devices[i]), [sessions[i].sessionId], `device ${i}: its sessions`);

    const got = newer.map((c) => collect(c));
    const oldGot = olds.map((c) => collect(c));
    const eids = devices.map(() => `tfs-${randomUUID().slice(0, 8)}`);
    await publish(devices.map((device, i) => ({ device, eid: eids[i] })));
    await until('each device its event at its new connection', () =>
      got.every((g, i) => g.some((x: EventMsg) => x.eid === eids[i])),
    );
    assert.deepEqual(oldGot.flat(), [], 'no event at an older connection');
  } finally {
    freezing = false;
    redis.thaw();
    for (const c of [...olds, ...newer]) c.destroy();
  }
});

test("logins whose account reservation a frozen Redis ran after they were answered `overloaded` leave the account's budget whole", async () => {
  const username = await register();
  const c = await connected(g.tcpUrl);
  const db = new pg.Client({
    connectionString: DATABASE_URL,
    options: `-c search_path=${deployment.GW_DB_SCHEMA}`,
  });
  await db.connect();
  try {
    // As many times as the account has points (GW_LOCKOUT_ATTEMPTS, 5): the login's lookup
    // held by a lock on the users table until Redis is frozen, so that the account's
    // reservation, the next step, is sent to a frozen Redis and the login answered
    // `overloaded` after the 300 ms timeout. Redis runs the reservation once thawed.
    const holder = await backendPid(db);
    // Logins answered before their lookup (the hash pool still busy with the last case's
    // thirty logins on a loaded machine refuses `overloaded` before any other work): tried
    // again, a few times; they reserved nothing.
    let early = 0;
    for (let i = 0; i < 5; i++) {
      await db.query('BEGIN');
      await db.query('LOCK TABLE users IN ACCESS EXCLUSIVE MODE');
      let answered: Awaited<ReturnType<typeof tryLogin>> | undefined;
      const login = tryLogin(c, username, `tf-${randomUUID().slice(0, 8)}`).then((o) => {
        answered = o;
        return o;
      });
      try {
        await until(
          'the login waiting for the users table, or answered before it',
          // From another connection: in a transaction, pg_stat_activity is read once.
          async () => answered !== undefined || (await blockedBy(holder, '%FROM users WHERE%')) > 0,
        );
        if (answered === undefined) redis.freeze();
      } finally {
        await db.query('COMMIT');
      }
      if (answered !== undefined) {
        assert.equal(
          answered.code,
          'overloaded',
          `login ${i} answered before its lookup: ${JSON.stringify(answered)}`,
        );
        assert.ok(++early <= 5, `logins answered before their lookup ${early} times`);
        await wait(1000);
        i--;
        continue;
      }
      let o: Awaited<typeof login>;
      try {
        o = await within('the login under a frozen Redis', login);
      } finally {
        redis.thaw();
      }
      assert.equal(o.code, 'overloaded', `login ${i} answered overloaded: ${JSON.stringify(o)}`);
    }
    // Every reservation ran, and was given back after it: the right password logs in. Before,
    // the five points stayed held and the login was refused `locked`.
    await until(
      "the account's login budget to hold nothing",
      async () => (await accountBudgetHeld()) === 0,
      10_000,
    );
    const o = await tryLogin(c, username, `tf-${randomUUID().slice(0, 8)}`);
    assert.ok(o.session, `the right password logs in: ${JSON.stringify(o)}`);
  } finally {
    redis.thaw();
    await db.end();
    c.destroy();
  }
});

test('a login while Redis refuses PUBLISH is answered and binds its connection: a session just made has no other connection to kick', async () => {
  const username = await register();
  const c = await connected(g.tcpUrl);
  try {
    await acl('-publish');
    let o: Awaited<ReturnType<typeof tryLogin>>;
    try {
      o = await tryLogin(c, username, `tf-${randomUUID().slice(0, 8)}`);
    } finally {
      await acl('+publish');
    }
    assert.ok(o.session, `the login answered: ${JSON.stringify(o)}`);
    await within('a request as the session', c.request('rooms'));
  } finally {
    c.destroy();
  }
});

test('a resume whose notice to older connections Redis refuses is answered with an error and leaves its connection unauthenticated; resumed again, it is the session', async () => {
  const username = await register();
  const device = `tf-${randomUUID().slice(0, 8)}`;
  const first = await connected(g.tcpUrl);
  const second = await connected(g.tcpUrl);
  try {
    const s = (await tryLogin(first, username, device)).session!;
    const kicked = nextEvent<{ code: string }>(
      first,
      'kick',
      'the older connection kicked by the resume',
      30_000,
    );
    kicked.catch(() => {}); // awaited below
    await acl('-publish');
    try {
      await assert.rejects(
        within('the refused resume', second.request('resume', { token: s.token })),
        (e: unknown) => e instanceof ProtocolError,
      );
    } finally {
      await acl('+publish');
    }
    // Told the resume failed, the device is not left as the session on this connection.
    await assert.rejects(within('a request after the refused resume', second.request('rooms')), {
      code: 'unauthenticated',
    });
    await within('the resume again', second.request('resume', { token: s.token }));
    await within('a request as the session', second.request('rooms'));
    assert.equal((await kicked).code, 'session_takeover');
  } finally {
    first.destroy();
    second.destroy();
  }
});

test('a resume Redis refuses on a connection already authenticated leaves it as it was: as its own session when it resumed that one, as its first session when it resumed another', async () => {
  const username = await register();
  const c = await connected(g.tcpUrl);
  const other = await connected(g.tcpUrl);
  try {
    const mine = (await tryLogin(c, username, `tf-${randomUUID().slice(0, 8)}`)).session!;
    const theirs = (await tryLogin(other, username, `tf-${randomUUID().slice(0, 8)}`)).session!;
    const current = async () => {
      const r = await within(
        'the sessions of the connection',
        c.request<{ sessions: { sessionId: string; current: boolean }[] }>('sessions'),
      );
      return r.sessions.find((x) => x.current)?.sessionId;
    };
    await acl('-publish');
    try {
      for (const token of [mine.token, theirs.token]) {
        await assert.rejects(
          within('the refused resume', c.request('resume', { token })),
          (e: unknown) => e instanceof ProtocolError,
        );
      }
    } finally {
      await acl('+publish');
    }
    assert.equal(await current(), mine.sessionId, 'still its own session after both refused resumes');
  } finally {
    c.destroy();
    other.destroy();
  }
});

test('thirty devices of one account logging in again while Redis restarts empty: each ends with one live session on an open connection, and gets its events', async () => {
  const username = await register();
  const N = 30;
  const devices = Array.from({ length: N }, (_, i) => `tfr-${i}-${randomUUID().slice(0, 8)}`);
  const olds: GatewayClient[] = [];
  const current: GatewayClient[] = [];
  try {
    for (let i = 0; i < N; i++) {
      const c = await connected(g.tcpUrl, { autoAck: true });
      olds.push(c);
      assert.ok((await tryLogin(c, username, devices[i])).session, `device ${i}'s first login`);
    }
    // Redis dies 200 ms into the storm and comes back with nothing: the account, in
    // PostgreSQL, stays; every session, device key and outbox goes.
    let restarted = false;
    const outage = (async () => {
      await wait(200);
      await redis.kill();
      await redis.start();
      restarted = true;
    })();
    const deadline = Date.now() + 120_000;
    const sessions = await Promise.all(
      devices.map(async (device, i) => {
        for (;;) {
          if (Date.now() > deadline) throw new Error(`device ${i} not logged in within 120 s`);
          let c = current[i];
          if (!c?.isOpen) {
            c?.destroy();
            try {
              c = await connected(g.tcpUrl, { autoAck: true });
            } catch {
              await wait(200);
              continue;
            }
            current[i] = c;
          }
          // A login begun before Redis was back may have made its session in the Redis that
          // died: the device logs in again (on the same connection, if it is still open).
          const after = restarted;
          const o = await tryLogin(c, username, device).catch(() => ({ code: 'closed' }) as { code: string });
          if ('session' in o && o.session) {
            if (after) return o.session;
            await outage;
            continue;
          }
          await wait(Math.min((o as { retryAfter?: number }).retryAfter ?? 200, 1000));
        }
      }),
    );
    await outage;
    // The older connections' sessions went with Redis (or were taken over): each is closed.
    await until('every older connection closed', () => olds.every((c) => !c.isOpen), 60_000);
    for (let i = 0; i < N; i++)
      assert.deepEqual(await devsess(devices[i]), [sessions[i].sessionId], `device ${i}: one listed session`);
    const got = current.map((c) => collect(c));
    const eids = devices.map(() => `tfr-${randomUUID().slice(0, 8)}`);
    await publish(devices.map((device, i) => ({ device, eid: eids[i] })));
    await until('each device its event at its live connection', () =>
      got.every((g, i) => g.some((x: EventMsg) => x.eid === eids[i])),
    );
  } finally {
    for (const c of [...olds, ...current]) c?.destroy();
  }
});

test("a logout that Redis ran after answering it `overloaded` (Redis stopped as its end came): its connection is not kicked by the end, and the same connection's retry answers {} and leaves it unauthenticated", async () => {
  // A node of its own behind a proxy, which stops Redis the moment the end's write comes, after
  // its read has been answered. (Pausing Redis's writes before the logout, as this test did,
  // also held the read when the node had a write of its own ahead of it on the connection: a
  // beat, a sweep; the read timed out and the logout never wrote.)
  const proxy = await startRedisProxy({ host: '127.0.0.1', port: redis.port });
  const node = await startGateway({
    ...deployment,
    REDIS_URL: proxy.url,
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REDIS_TIMEOUT_MS: '300',
  });
  let c: GatewayClient | undefined;
  try {
    const username = await register();
    c = await connected(node.tcpUrl);
    const kicks: string[] = [];
    c.on('kick', (k: { code: string }) => kicks.push(k.code));
    const o = await tryLogin(c, username, `tf-${randomUUID().slice(0, 8)}`);
    assert.ok(o.session, `the login answered: ${JSON.stringify(o)}`);
    const sid = o.session.sessionId;
    // The end's MULTI: its DEL of the session's hash. Redis stops before it arrives, so the
    // node's wait of 300 ms runs out, and it runs once Redis goes on.
    const stopped = proxy.holdReplyOf(
      (command) => /\r\ndel\r\n/i.test(command) && command.includes(`{s:${sid}}:sess`),
      0,
      () => redis.freeze(),
    );
    const first = await within(
      'the logout with Redis stopped at its write',
      c.request('logout', {}).then(
        () => 'ok',
        (e: { code?: string }) => e.code,
      ),
    );
    assert.equal(first, 'overloaded', 'the logout answered while Redis is stopped');
    await within("the end's write seen at the proxy", stopped);
    // Run once Redis goes on: the session gone, its kick sent (sparing this connection).
    redis.thaw();
    await until('the logout run once Redis goes on', async () => (await sessionExists(sid)) === 0);
    // Tried again (after retryAfter, as PROTOCOL.md §8 asks; here at once).
    assert.deepEqual(await within('the logout tried again', c.request('logout', {})), {});
    await assert.rejects(
      within('a request after the logout', c.request('rooms')),
      (e: { code?: string }) => e.code === 'unauthenticated',
    );
    assert.deepEqual(kicks, [], 'not kicked: its own end spared it');
  } finally {
    redis.thaw();
    c?.destroy();
    await node.stop();
    await proxy.close();
  }
});
