/**
 * A session's audit row is ended in PostgreSQL after the session is ended in Redis: at once, or,
 * when PostgreSQL refuses, by the node's later batches; an expired session's always by a batch.
 * A node that dies before that write used to leave the row open for good. Every end is now owed
 * in Redis from the step that ends the session until its row is written (keys.ts auditOwed), and
 * the cluster-wide sweep writes what a dead node left.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import pgLib from 'pg';
import type { GatewayClient } from '../../client/client.ts';
import { connected, PASSWORD, signUp } from '../helpers/accounts.ts';
import { backendPid, blockedBy, DATABASE_URL, query, redisClient } from '../helpers/cleanup.ts';
import { nextEvent, until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvent } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnPostgres, startOwnPostgres } from '../helpers/own-postgres.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';

const TTL_S = 3;

function env(deployment: DeploymentEnv, extra: Record<string, string> = {}) {
  return {
    ...deployment,
    SESSION_TTL: String(TTL_S),
    GW_SWEEP_INTERVAL_MS: '200',
    GW_PRESENCE_STALE_MS: '2000',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    ...extra,
  };
}

/** Asserts `at` (ms) is within [from, to] give or take the 1 ms of a timestamp's rounding. */
function between(what: string, at: number, from: number, to: number): void {
  assert.ok(at >= from - 1 && at <= to + 1, `${what}: ${at} not within [${from}, ${to}]`);
}

let pg: OwnPostgres;
before(async () => {
  pg = await startOwnPostgres();
});
after(async () => {
  await pg.remove();
});

test("a node killed before it wrote its sessions' audit ends (PostgreSQL stopped): another node's sweep writes a logout's and an expiry's, each at its time", async () => {
  const deployment = deploymentEnv();
  const open: GatewayClient[] = [];
  const nodes: GatewayProcess[] = [];
  const r = redisClient();
  try {
    const a = await startGateway(env(deployment, { DATABASE_URL: pg.url }));
    nodes.push(a);
    const c1 = await connected(a.tcpUrl);
    const c2 = await connected(a.tcpUrl);
    open.push(c1, c2);
    const loggedOut = await within('the first sign-up', signUp(c1));
    const expiresFrom = Date.now();
    const expiring = await within('the second sign-up', signUp(c2));
    const expiresTo = Date.now();
    await pg.stop();
    let logoutFrom = 0;
    let logoutTo = 0;
    try {
      // The logout is answered (its session is gone from Redis), its row not written.
      logoutFrom = Date.now();
      await within('the logout answered', c1.request('logout', {}));
      logoutTo = Date.now();
      await a.waitForLog(
        (l) =>
          l.msg === 'session end not written to PostgreSQL yet; written once it answers' &&
          l.sessionId === loggedOut.sessionId,
        15_000,
        "the logout's row refused",
      );
      // The other runs out: A's sweep ends it and hands its row to a batch that PostgreSQL refuses.
      await a.waitForLog(
        (l) => l.msg === 'session ended' && l.sessionId === expiring.sessionId && l.reason === 'expired',
        15_000,
        "the expiry's end",
      );
      const since = a.logs.length;
      await a.waitForLog(
        (l) => a.logs.indexOf(l) >= since && l.msg === 'session ends not written to PostgreSQL yet',
        15_000,
        "the expiry's row refused",
      );
      // Both are owed in Redis until their rows are written.
      assert.equal(await r.zcard(`${deployment.GW_REDIS_PREFIX}auditowed`), 2);
      a.proc.kill('SIGKILL');
      await within('node A killed', a.exited);
    } finally {
      await pg.start();
    }
    const b = await startGateway(env(deployment, { DATABASE_URL: pg.url }));
    nodes.push(b);
    const rows = await until(
      'both audit rows ended by the sweep',
      async () => {
        const res = await query(
          deployment.GW_DB_SCHEMA,
          'SELECT id, ended_at, end_reason FROM sessions WHERE id = ANY($1) AND ended_at IS NOT NULL',
          [[loggedOut.sessionId, expiring.sessionId]],
          pg.url,
        );
        return res.rows.length === 2
          ? new Map(res.rows.map((row) => [row.id as string, row as { ended_at: Date; end_reason: string }]))
          : undefined;
      },
      30_000,
    );
    const logout = rows.get(loggedOut.sessionId)!;
    assert.equal(logout.end_reason, 'logout');
    between('the logout ended_at', logout.ended_at.getTime(), logoutFrom, logoutTo);
    const expired = rows.get(expiring.sessionId)!;
    assert.equal(expired.end_reason, 'expired');
    between(
      'the expiry ended_at',
      expired.ended_at.getTime(),
      expiresFrom + TTL_S * 1000,
      expiresTo + TTL_S * 1000,
    );
    // Logged once the sweep's writes are answered: it may reach us after the rows are seen.
    await b.waitForLog(
      (l) => l.msg === 'presence sweep wrote session ends a node left unwritten',
      15_000,
      "the sweep's line",
    );
    assert.equal((await scrapeMetrics(b.metricsPort)).value('gateway_session_ends_swept_total'), 2);
    await until(
      'nothing left owed',
      async () => (await r.zcard(`${deployment.GW_REDIS_PREFIX}auditowed`)) === 0,
    );
  } finally {
    for (const c of open) c.destroy();
    for (const g of nodes) await g.stop();
    r.disconnect();
    await dropDeployment(deployment);
  }
});

test('ends whose rows are written at once, 30 logouts and 10 expiries, leave nothing owed in Redis', async () => {
  // The written ends are forgotten in batches: without that, every end of a fleet would stay
  // in the owed set for good (and the sweep would write each row twice).
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const r = redisClient();
  const open: GatewayClient[] = [];
  try {
    const clients = await Promise.all(Array.from({ length: 40 }, () => connected(g.tcpUrl)));
    open.push(...clients);
    // Each logout right after its sign-up, well within the session's life; ten sign-ups at a
    // time (forty at once can fill the hash queue of a loaded machine).
    const sessions: Awaited<ReturnType<typeof signUp>>[] = [];
    for (let i = 0; i < clients.length; i += 10) {
      const group = clients.slice(i, i + 10);
      sessions.push(
        ...(await within(
          'ten sign-ups and logouts',
          Promise.all(
            group.map(async (c, k) => {
              const s = await signUp(c);
              if (i + k < 30) await c.request('logout', {});
              return s;
            }),
          ),
          60_000,
        )),
      );
    }
    const ids = sessions.map((s) => s.sessionId);
    await until(
      'every row ended',
      async () =>
        Number(
          (
            await query(
              deployment.GW_DB_SCHEMA,
              'SELECT count(*) FROM sessions WHERE id = ANY($1) AND ended_at IS NOT NULL',
              [ids],
            )
          ).rows[0].count,
        ) === ids.length,
      30_000,
    );
    await until(
      'nothing left owed',
      async () => (await r.zcard(`${deployment.GW_REDIS_PREFIX}auditowed`)) === 0,
    );
    assert.ok(
      !g.logs.some((l) => l.msg === 'presence sweep wrote session ends a node left unwritten'),
      'no end left to the sweep',
    );
    assert.equal((await scrapeMetrics(g.metricsPort)).value('gateway_session_ends_swept_total'), 0);
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    r.disconnect();
    await dropDeployment(deployment);
  }
});

test("two ends of one session at once (a logout and a revoke): its row ended once, and the loser's owed end forgotten without a count or a warning", async () => {
  // The removal that loses the race (its session gone when its MULTI runs) records its end as
  // owed all the same; the sweep finds the row ended and only forgets it. Before, it counted it
  // in gateway_session_ends_swept_total and warned of an end a node left unwritten (9 of the
  // 10 pairs here). The two ends come through two nodes, and a private Redis pauses its writes
  // while they are sent, so that both ends of a pair read the session before either removal
  // runs.
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment, { REDIS_URL: own.url }));
  const other = await startGateway(env(deployment, { REDIS_URL: own.url }));
  const r = redisClient(own.url);
  const open: GatewayClient[] = [];
  try {
    const pairs = await Promise.all(
      Array.from({ length: 10 }, async () => {
        const c1 = await connected(g.tcpUrl);
        const c2 = await connected(other.tcpUrl);
        open.push(c1, c2);
        const s1 = await within('a sign-up', signUp(c1));
        await within('a second login', c2.request('login', { username: s1.username, password: PASSWORD }));
        return { c1, c2, s1 };
      }),
    );
    const since = g.logs.length;
    const otherSince = other.logs.length;
    await r.call('CLIENT', 'PAUSE', '700', 'WRITE');
    await within(
      'the ends answered',
      Promise.all(
        pairs.flatMap(({ c1, c2, s1 }) => [
          c1.request('logout', {}),
          c2.request('revoke', { sessionId: s1.sessionId }).catch((e: { code?: string }) => {
            if (e.code !== 'not_found') throw e;
          }),
        ]),
      ),
    );
    const ids = pairs.map((p) => p.s1.sessionId);
    const rows = await until(
      'every row ended',
      async () => {
        const res = await query(
          deployment.GW_DB_SCHEMA,
          'SELECT end_reason FROM sessions WHERE id = ANY($1) AND ended_at IS NOT NULL',
          [ids],
        );
        return res.rows.length === ids.length ? res.rows : undefined;
      },
      30_000,
    );
    for (const row of rows) assert.ok(['logout', 'revoked'].includes(row.end_reason), row.end_reason);
    const ended = [...g.logs.slice(since), ...other.logs.slice(otherSince)].filter(
      (l) => l.msg === 'session ended' && ids.includes(l.sessionId as string),
    );
    assert.equal(ended.length, ids.length, 'each session ended once');
    // Past the stale time the sweep has seen every owed end.
    await until(
      'nothing left owed',
      async () => (await r.zcard(`${deployment.GW_REDIS_PREFIX}auditowed`)) === 0,
    );
    for (const n of [g, other]) {
      assert.equal((await scrapeMetrics(n.metricsPort)).value('gateway_session_ends_swept_total'), 0);
      assert.ok(
        !n.logs.some((l) => l.msg === 'presence sweep wrote session ends a node left unwritten'),
        'no end left to the sweep',
      );
    }
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await other.stop();
    r.disconnect();
    await own.remove();
    await dropDeployment(deployment);
  }
});

/**
 * The device's events reach its live session: an event posted for `deviceId` (eid `eid`) arrives
 * on `live` within 15 s.
 */
async function eventReaches(
  g: GatewayProcess,
  apiKey: string,
  live: GatewayClient,
  deviceId: string,
  eid: string,
): Promise<void> {
  // What the live connection heard meanwhile, and the node's warnings and lines about kicks and
  // events: said if the event does not come.
  const heard: string[] = [];
  const onKick = (k: { code: string }) => heard.push(`kick ${k.code}`);
  const onClose = (c: { code?: string }) => heard.push(`close ${c.code ?? ''}`);
  live.on('kick', onKick);
  live.on('close', onClose);
  try {
    const got = nextEvent<{ eid: string }>(live, 'event', 'the event for the device', 15_000);
    const res = await postEvent(g.httpPort, apiKey, { device: deviceId }, eid);
    assert.equal(res.status, 202, await res.text());
    assert.equal((await got).eid, eid);
  } catch (e) {
    const lines = g.logs
      .filter(
        (l) => Number(l.level) >= 40 || /kick|deliver|event|session ended|failed login/.test(String(l.msg)),
      )
      .slice(-25)
      .map((l) => JSON.stringify(l));
    throw new Error(
      `${(e as Error).message}; the connection heard ${JSON.stringify(heard)}; the node since: ${lines.join(' ')}`,
    );
  } finally {
    live.off('kick', onKick);
    live.off('close', onClose);
  }
}

/** A PostgreSQL client (not connected) on `deployment`'s schema, for a test's own transaction. */
function schemaClient(deployment: DeploymentEnv): pgLib.Client {
  return new pgLib.Client({
    connectionString: DATABASE_URL,
    options: `-c search_path=${deployment.GW_DB_SCHEMA}`,
  });
}

/** The audit rows of `username`'s sessions: id and whether ended, oldest first. */
async function rowsOf(schema: string, username: string): Promise<{ id: string; ended: boolean }[]> {
  const r = await query(
    schema,
    `SELECT s.id, s.ended_at IS NOT NULL AS ended FROM sessions s JOIN users u ON u.id = s.user_id
     WHERE u.username = $1 ORDER BY s.created_at`,
    [username],
  );
  return r.rows as { id: string; ended: boolean }[];
}

/** The rows of `username`'s sessions other than `sessionId`: a later login's. */
async function otherRows(
  schema: string,
  username: string,
  sessionId: string,
): Promise<{ id: string; end_reason: string | null }[]> {
  const r = await query(
    schema,
    `SELECT s.id, s.end_reason FROM sessions s JOIN users u ON u.id = s.user_id WHERE u.username = $1 AND s.id <> $2`,
    [username, sessionId],
  );
  return r.rows as { id: string; end_reason: string | null }[];
}

/**
 * For a case whose device keeps a live session to the end (its event must reach it): a day's
 * life, not the file's 3 s. On a loaded machine the five-logins case ran past 3 s, and the
 * device's live session ran out before the event was sent (kicked `session_revoked`; in one
 * run gone before the check that it lives).
 */
const LIVE = { SESSION_TTL: '86400' };

/**
 * Locks the sessions table (on `db`, in the deployment's schema), has `send` send a login, waits
 * until that login's audit row's INSERT waits on the lock, runs `held` (a freeze of Redis, the
 * connection closed), then lets the INSERT run.
 */
async function withInsertHeld(
  db: pgLib.Client,
  send: () => void,
  held: () => unknown,
  /** How many logins' INSERTs to wait for. */
  logins = 1,
): Promise<void> {
  const holder = await backendPid(db);
  await db.query('BEGIN');
  await db.query('LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE');
  try {
    send();
    await until(
      `${logins} login(s) waiting for the sessions table`,
      async () => (await blockedBy(holder, '%INSERT INTO sessions%')) >= logins,
    );
    await held();
  } finally {
    await db.query('COMMIT');
  }
}

test('a login whose session Redis refuses to make leaves no audit row', async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment, { REDIS_URL: own.url }));
  const acl = (rule: string) => own.with((r) => r.call('ACL', 'SETUSER', 'default', rule));
  const open: GatewayClient[] = [];
  try {
    const c = await connected(g.tcpUrl);
    open.push(c);
    const s = await within('a sign-up', signUp(c));
    // The session is made with HSET (session-store.ts, CREATE), which nothing before it in a
    // login uses: the login gets past its checks and its audit row, then fails.
    await acl('-hset');
    try {
      await assert.rejects(
        within('the login', c.request('login', { username: s.username, password: PASSWORD })),
        'the login fails',
      );
    } finally {
      await acl('+hset');
    }
    // Only the sign-up's row: the failed login's was deleted. Before, it stayed open for good.
    await until(
      "the failed login's audit row gone",
      async () => {
        const rows = await rowsOf(deployment.GW_DB_SCHEMA, s.username);
        return rows.length === 1 && rows[0].id === s.sessionId;
      },
      15_000,
    );
    // Logged once the deletion is answered: it may reach us after the row is seen gone.
    await g.waitForLog(
      (l) => l.msg === 'audit rows of failed logins deleted: their sessions were never made',
      15_000,
      'the log line of the deletion',
    );
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await own.remove();
    await dropDeployment(deployment);
  }
});

test("a login whose session a frozen Redis made after the login's timeout has it ended: nobody holds its tokens", async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment, { REDIS_URL: own.url, GW_REDIS_TIMEOUT_MS: '300' }));
  const open: GatewayClient[] = [];
  const db = schemaClient(deployment);
  try {
    await db.connect();
    const c = await connected(g.tcpUrl);
    open.push(c);
    const s = await within('a sign-up', signUp(c));
    // The audit row's INSERT held by a lock on the sessions table until Redis is frozen, so
    // that the next step, making the session, is sent to a frozen Redis: the login is answered
    // `overloaded` after 300 ms, and Redis makes the session once thawed.
    let login!: Promise<string | undefined>;
    await withInsertHeld(
      db,
      () => {
        login = c.request('login', { username: s.username, password: PASSWORD }).then(
          () => 'ok',
          (e: { code?: string }) => e.code,
        );
      },
      () => own.freeze(),
    );
    try {
      assert.equal(await within('the login under a frozen Redis', login), 'overloaded');
    } finally {
      own.thaw();
    }
    await g.waitForLog(
      (l) =>
        l.msg === 'sessions of failed logins made after all: ended' ||
        l.msg === 'audit rows of failed logins deleted: their sessions were never made',
      15_000,
      'the failed login settled',
    );
    // The session was made, and is ended (`revoked`: the device has no other session), its row
    // kept with that end. Before, it lived on, its row open, until its life ran out.
    const rows = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
    assert.equal(rows.length, 1, JSON.stringify(rows));
    const made = rows[0]!;
    assert.equal(made.end_reason, 'revoked', 'its row ended');
    assert.equal(
      await own.with((r) => r.exists(`${deployment.GW_REDIS_PREFIX}{s:${made.id}}:sess`)),
      0,
      'the session gone from Redis',
    );
    assert.equal(
      await own.with((r) => r.zscore(`${deployment.GW_REDIS_PREFIX}sessexp`, made.id)),
      null,
      'and from the expiry index',
    );
    assert.equal(
      (await query(deployment.GW_DB_SCHEMA, 'SELECT ended_at FROM sessions WHERE id = $1', [s.sessionId]))
        .rows[0].ended_at,
      null,
      "the sign-up's session untouched",
    );
  } finally {
    own.thaw();
    await db.end();
    for (const c of open) c.destroy();
    await g.stop();
    await own.remove();
    await dropDeployment(deployment);
  }
});

test("a device's login whose session a frozen Redis made after the login's timeout leaves the device's key, and its events, to the device's live session", async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const apiKey = 'api-key-for-audit-owed-7d2e';
  const g = await startGateway(
    env(deployment, { ...LIVE, REDIS_URL: own.url, GW_REDIS_TIMEOUT_MS: '300', GW_API_KEY: apiKey }),
  );
  const open: GatewayClient[] = [];
  const db = schemaClient(deployment);
  try {
    await db.connect();
    const deviceId = `dev-${randomUUID().slice(0, 8)}`;
    // The device's live session, on its own connection.
    const live = await connected(g.tcpUrl);
    open.push(live);
    const s = await within('a sign-up with the device', signUp(live, { id: deviceId }));
    // A second login of the device (another connection) whose session Redis makes after the
    // login timed out: the session takes the device's key, and nobody holds its tokens.
    const late = await connected(g.tcpUrl);
    open.push(late);
    let login!: Promise<string | undefined>;
    await withInsertHeld(
      db,
      () => {
        login = late
          .request('login', { username: s.username, password: PASSWORD, device: { id: deviceId } })
          .then(
            () => 'ok',
            (e: { code?: string }) => e.code,
          );
      },
      () => own.freeze(),
    );
    try {
      assert.equal(await within('the login under a frozen Redis', login), 'overloaded');
    } finally {
      own.thaw();
    }
    await g.waitForLog(
      (l) =>
        l.msg === 'sessions of failed logins made after all: ended' ||
        l.msg === 'sessions of failed logins made after all: their audit rows kept' ||
        l.msg === 'audit rows of failed logins deleted: their sessions were never made',
      15_000,
      'the failed login settled',
    );
    const rows = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
    assert.equal(rows.length, 1, `the late session's row: ${JSON.stringify(rows)}`);
    const made = rows[0]!;
    // The device's key names its live session again, and the late one ended as taken over by it.
    assert.equal(
      await own.with((r) => r.get(`${deployment.GW_REDIS_PREFIX}dev:${deviceId}`)),
      s.sessionId,
      "the device's key names its live session",
    );
    assert.equal(made.end_reason, 'takeover', "the late session's row");
    await eventReaches(g, apiKey, live, deviceId, `late-${deviceId}`);
  } finally {
    own.thaw();
    await db.end();
    for (const c of open) c.destroy();
    await g.stop();
    await own.remove();
    await dropDeployment(deployment);
  }
});

test("five logins of one device at once whose sessions a frozen Redis made after their timeouts, settled together: all ended, the key and the events the device's live session's", async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const apiKey = 'api-key-for-audit-owed-5f1a';
  const g = await startGateway(
    env(deployment, { ...LIVE, REDIS_URL: own.url, GW_REDIS_TIMEOUT_MS: '300', GW_API_KEY: apiKey }),
  );
  const open: GatewayClient[] = [];
  const db = schemaClient(deployment);
  const N = 5;
  try {
    await db.connect();
    const deviceId = `dev-${randomUUID().slice(0, 8)}`;
    const live = await connected(g.tcpUrl);
    open.push(live);
    const s = await within('a sign-up with the device', signUp(live, { id: deviceId }));
    // A device retrying on flaky links: five logins of it at once on five connections, each
    // held on its audit row until Redis is frozen, each answered `overloaded`; Redis makes the
    // five sessions at the thaw, in whatever order its connections' steps come, the last of
    // them holding the device's key.
    const logins: Promise<string | undefined>[] = [];
    const conns: GatewayClient[] = [];
    for (let i = 0; i < N; i++) {
      const c = await connected(g.tcpUrl);
      open.push(c);
      conns.push(c);
    }
    await withInsertHeld(
      db,
      () => {
        for (const c of conns)
          logins.push(
            c.request('login', { username: s.username, password: PASSWORD, device: { id: deviceId } }).then(
              () => 'ok',
              (e: { code?: string }) => e.code,
            ),
          );
      },
      () => own.freeze(),
      N,
    );
    try {
      assert.deepEqual(
        await within('the logins under a frozen Redis', Promise.all(logins)),
        Array(N).fill('overloaded'),
      );
    } finally {
      own.thaw();
    }
    const sessionKey = (sid: string) => `${deployment.GW_REDIS_PREFIX}{s:${sid}}:sess`;
    await until(
      'the five late sessions ended, their rows too',
      async () => {
        const rows = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
        if (rows.length !== N || rows.some((r) => r.end_reason === null)) return false;
        for (const r of rows) if ((await own.with((x) => x.exists(sessionKey(r.id)))) === 1) return false;
        return true;
      },
      20_000,
    ).catch(async (e: Error) => {
      const rows = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
      throw new Error(`${e.message}: ${JSON.stringify(rows)}`);
    });
    const rows = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
    assert.deepEqual(
      rows.map((r) => r.end_reason),
      Array(N).fill('takeover'),
      'each taken over by the live session',
    );
    assert.equal(
      await own.with((r) => r.get(`${deployment.GW_REDIS_PREFIX}dev:${deviceId}`)),
      s.sessionId,
      "the device's key names its live session",
    );
    assert.equal(await own.with((r) => r.exists(sessionKey(s.sessionId))), 1, 'the live session lives');
    await eventReaches(g, apiKey, live, deviceId, `five-${deviceId}`);
  } finally {
    own.thaw();
    await db.end();
    for (const c of open) c.destroy();
    await g.stop();
    await own.remove();
    await dropDeployment(deployment);
  }
});

test("a device's login that fails in its takeover, its session made, leaves the device's key and events to the device's live session", async () => {
  const own = await startOwnRedis();
  const deployment = deploymentEnv();
  const apiKey = 'api-key-for-audit-owed-5b1f';
  const g = await startGateway(env(deployment, { ...LIVE, REDIS_URL: own.url, GW_API_KEY: apiKey }));
  const acl = (rule: string) => own.with((r) => r.call('ACL', 'SETUSER', 'default', rule));
  const open: GatewayClient[] = [];
  try {
    const deviceId = `dev-${randomUUID().slice(0, 8)}`;
    const live = await connected(g.tcpUrl);
    open.push(live);
    const s = await within('a sign-up with the device', signUp(live, { id: deviceId }));
    // The takeover reads the device's sessions with SMEMBERS (session-store.ts, ofDevice), which
    // nothing before it in a login uses: the session is made, then the login fails.
    const second = await connected(g.tcpUrl);
    open.push(second);
    await acl('-smembers');
    try {
      await assert.rejects(
        within(
          'the login',
          second.request('login', { username: s.username, password: PASSWORD, device: { id: deviceId } }),
        ),
        'the login fails',
      );
      const late = await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId);
      assert.equal(late.length, 1, 'the failed login made its session');
      assert.equal(
        await own.with((r) => r.get(`${deployment.GW_REDIS_PREFIX}dev:${deviceId}`)),
        late[0]!.id,
        "its session took the device's key",
      );
    } finally {
      await acl('+smembers');
    }
    await until(
      "the failed login's session ended",
      async () =>
        (await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId))[0]?.end_reason === 'takeover',
      15_000,
    );
    assert.equal(
      await own.with((r) => r.get(`${deployment.GW_REDIS_PREFIX}dev:${deviceId}`)),
      s.sessionId,
      "the device's key names its live session again",
    );
    await eventReaches(g, apiKey, live, deviceId, `acl-${deviceId}`);
  } finally {
    await acl('+smembers').catch(() => {});
    for (const c of open) c.destroy();
    await g.stop();
    await own.remove();
    await dropDeployment(deployment);
  }
});

test("a device's login whose connection dropped while its session was made leaves the device's key and events to the device's live session", async () => {
  const deployment = deploymentEnv();
  const apiKey = 'api-key-for-audit-owed-9c3a';
  const g = await startGateway(env(deployment, { ...LIVE, GW_API_KEY: apiKey }));
  const open: GatewayClient[] = [];
  const db = schemaClient(deployment);
  try {
    await db.connect();
    const deviceId = `dev-${randomUUID().slice(0, 8)}`;
    const live = await connected(g.tcpUrl);
    open.push(live);
    const s = await within('a sign-up with the device', signUp(live, { id: deviceId }));
    const redis = redisClient();
    const holder = () => redis.get(`${deployment.GW_REDIS_PREFIX}dev:${deviceId}`);
    try {
      // A second login of the device, its audit row's INSERT held on a lock until its connection
      // is closed: the password is verified, then the session is made for nobody.
      const dropped = await connected(g.tcpUrl);
      open.push(dropped);
      const opened = async () =>
        (await scrapeMetrics(g.metricsPort)).value('gateway_connections_open{transport="tcp"}');
      assert.equal(await opened(), 2, 'two connections open');
      await withInsertHeld(
        db,
        () => {
          dropped
            .request('login', { username: s.username, password: PASSWORD, device: { id: deviceId } })
            .catch(() => {});
        },
        async () => {
          dropped.destroy();
          await until('the gateway to see the connection closed', async () => (await opened()) === 1);
        },
      );
      const lateRow = async () => (await otherRows(deployment.GW_DB_SCHEMA, s.username, s.sessionId))[0];
      // Its session is made, then ended as taken over by the device's live one.
      await until(
        "the dropped login's session ended",
        async () => (await lateRow())?.end_reason === 'takeover',
        15_000,
      );
      assert.equal(await holder(), s.sessionId, "the device's key names its live session");
      await eventReaches(g, apiKey, live, deviceId, `drop-${deviceId}`);
    } finally {
      redis.disconnect();
    }
  } finally {
    await db.end();
    for (const c of open) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test("a login whose audit row's INSERT PostgreSQL ran after the login's query timeout leaves no audit row", async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(
    env(deployment, { GW_DB_QUERY_TIMEOUT_MS: '1000', GW_DB_STATEMENT_TIMEOUT_MS: '3000' }),
  );
  const open: GatewayClient[] = [];
  const db = schemaClient(deployment);
  try {
    await db.connect();
    const c = await connected(g.tcpUrl);
    open.push(c);
    const s = await within('a sign-up', signUp(c));
    // The INSERT waits on a lock past the node's 1 s query timeout: the login is answered
    // `overloaded`, then the lock is released and PostgreSQL writes the row (within its 3 s
    // statement_timeout) for a login that has no session.
    await db.query('BEGIN');
    await db.query('LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE');
    let code: string | undefined;
    try {
      code = await within(
        'the login held on PostgreSQL',
        c.request('login', { username: s.username, password: PASSWORD }).then(
          () => 'ok',
          (e: { code?: string }) => e.code,
        ),
      );
    } finally {
      await db.query('COMMIT');
    }
    assert.equal(code, 'overloaded');
    await until(
      'the row written after the timeout',
      async () => (await rowsOf(deployment.GW_DB_SCHEMA, s.username)).length === 2,
    );
    // Settled once PostgreSQL has run or cancelled the statement: the row is deleted. Before,
    // it stayed open for good.
    await until(
      'the late row gone',
      async () => {
        const rows = await rowsOf(deployment.GW_DB_SCHEMA, s.username);
        return rows.length === 1 && rows[0].id === s.sessionId;
      },
      15_000,
    );
  } finally {
    await db.end();
    for (const c of open) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});
