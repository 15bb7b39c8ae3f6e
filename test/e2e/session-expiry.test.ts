/**
 * A session lives `SESSION_TTL` from its login, or from its last resume or refresh. When that
 * runs out its hash expires in Redis, and the session must end as any other end does: its
 * connections kicked `session_revoked`, its waiting events reported `delivery.failed`
 * (`session_expired`, as docs/BACKEND.md says), its audit row ended `expired` at the time it
 * expired. Before, nothing noticed: the audit row stayed open, the events stayed unreported
 * until their outbox's keys expired, and a connected device that only pinged stayed bound to a
 * session that no longer existed. The cluster-wide sweep now ends such sessions from an index of
 * expiry times (session-store.ts, EXPIRED).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { Redis } from 'ioredis';
import type { GatewayClient, Session } from '../../client/client.ts';
import { connected, newName, PASSWORD, signUp } from '../helpers/accounts.ts';
import { query, REDIS_URL } from '../helpers/cleanup.ts';
import { until, within } from '../helpers/deadline.ts';
import {
  type DeploymentEnv,
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postEvents } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { startOwnPostgres } from '../helpers/own-postgres.ts';
import { startOwnRedis } from '../helpers/own-redis.ts';
import { QueueReader, sweepsPaused } from '../helpers/queues.ts';
import { monitor } from '../helpers/redis-monitor.ts';
import { startRedisProxy } from '../helpers/redis-proxy.ts';

const API_KEY = 'api-key-for-session-expiry-5c2e';
const TTL_S = 3;

function env(deployment: DeploymentEnv, extra: Record<string, string> = {}) {
  return {
    ...deployment,
    GW_API_KEY: API_KEY,
    SESSION_TTL: String(TTL_S),
    GW_SWEEP_INTERVAL_MS: '200',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '1000',
    ...extra,
  };
}

/** The kick codes a client is sent, with when each came. */
function kicks(c: GatewayClient): { code: string; at: number }[] {
  const got: { code: string; at: number }[] = [];
  c.on('kick', (k: { code: string }) => got.push({ code: k.code, at: Date.now() }));
  return got;
}

/** The audit rows of `ids` once every one of them is ended. */
async function endedRows(
  schema: string,
  ids: string[],
  ms?: number,
): Promise<Map<string, { ended_at: Date; end_reason: string }>> {
  return until(
    `the audit rows of ${ids.length} sessions ended`,
    async () => {
      const r = await query(schema, 'SELECT id, ended_at, end_reason FROM sessions WHERE id = ANY($1)', [
        ids,
      ]);
      const ended = r.rows.filter((row) => row.ended_at);
      return ended.length === ids.length
        ? new Map(ended.map((row) => [row.id as string, row as { ended_at: Date; end_reason: string }]))
        : undefined;
    },
    ms,
  );
}

/**
 * Waits until each of `eids` is reported `delivery.failed`, and asserts each was reported once,
 * `session_expired` (of `sessionId`, if given).
 */
async function reportedExpired(reader: QueueReader, eids: string[], ms = 20_000, sessionId?: string) {
  const failed = await reader.waitFor(
    'gw-backend',
    (jobs) => eids.every((e) => jobs.some((j) => j.data.eid === e)),
    ms,
    'delivery.failed',
  );
  for (const e of eids) {
    const r = failed.filter((j) => j.data.eid === e);
    assert.equal(r.length, 1, `${e} reported once`);
    assert.equal(r[0].data.reason, 'session_expired');
    if (sessionId) assert.equal(r[0].data.sessionId, sessionId);
  }
}

/** Asserts `at` (ms) is within [from, to] give or take the 1 ms of a timestamp's rounding. */
function between(what: string, at: number, from: number, to: number): void {
  assert.ok(at >= from - 1 && at <= to + 1, `${what}: ${at} not within [${from}, ${to}]`);
}

test('a session whose life runs out is ended: its waiting events reported session_expired, its audit row ended expired at the time, its connection kicked', async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX);
  const open: GatewayClient[] = [];
  try {
    // Offline, with three events waiting.
    const device = `exp-${randomUUID().slice(0, 8)}`;
    const a = await connected(g.tcpUrl);
    const aFrom = Date.now();
    const sa = await within('the offline device sign-up', signUp(a, { id: device }));
    const aTo = Date.now();
    await within('the device closed', a.close());
    const eids = [0, 1, 2].map((i) => `exp-${i}-${randomUUID().slice(0, 8)}`);
    const res = await postEvents(
      g.httpPort,
      API_KEY,
      eids.map((eid) => ({ target: { device }, eid, name: 'expiry.test', data: {} })),
    );
    assert.equal(res.status, 202, await res.text());
    // Connected and silent (the client pings; pings are not activity).
    const b = await connected(g.tcpUrl);
    open.push(b);
    const bFrom = Date.now();
    const sb = await within('the connected device sign-up', signUp(b));
    const bTo = Date.now();
    const bKicks = kicks(b);

    await reportedExpired(reader, eids, 20_000, sa.sessionId);
    await until('the connected device kicked', () => bKicks.length > 0);
    assert.deepEqual(
      bKicks.map((k) => k.code),
      ['session_revoked'],
    );
    assert.ok(bKicks[0].at >= bFrom + TTL_S * 1000, 'kicked once its life ran out, not before');

    const rows = await endedRows(deployment.GW_DB_SCHEMA, [sa.sessionId, sb.sessionId]);
    for (const [s, from, to] of [
      [sa, aFrom, aTo],
      [sb, bFrom, bTo],
    ] as const) {
      const row = rows.get(s.sessionId)!;
      assert.equal(row.end_reason, 'expired');
      // The time its hash expired: SESSION_TTL after its login, not when the sweep found it.
      between('ended_at', row.ended_at.getTime(), from + TTL_S * 1000, to + TTL_S * 1000);
    }
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_expired_total'), 2);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="activity"}'), 0);
    const r = new Redis(REDIS_URL);
    try {
      assert.equal(await r.zcard(`${deployment.GW_REDIS_PREFIX}sessexp`), 0, 'nothing left in the index');
      await until(
        'the owed purge done',
        async () => (await r.zcard(`${deployment.GW_REDIS_PREFIX}endowed`)) === 0,
      );
    } finally {
      r.disconnect();
    }
    // The device logs in again as after any end.
    const again = await connected(g.tcpUrl);
    open.push(again);
    await within(
      'a login again',
      again.request('login', { username: sa.username, password: PASSWORD, device: { id: device } }),
    );
  } finally {
    for (const c of open) c.destroy();
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('a refresh and a resume extend the life: each session ends SESSION_TTL after its last one, not after its login', async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const open: GatewayClient[] = [];
  const r = new Redis(REDIS_URL);
  try {
    const refreshed = await connected(g.tcpUrl);
    const resumed = await connected(g.tcpUrl);
    open.push(refreshed, resumed);
    const s1 = await within('the first sign-up', signUp(refreshed));
    const s2 = await within('the second sign-up', signUp(resumed));
    const k1 = kicks(refreshed);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const rFrom = Date.now();
    await within('a refresh', refreshed.request('refresh', { refresh: s1.refresh }));
    const rTo = Date.now();
    // The second session resumed on a new connection (its first closed).
    resumed.destroy();
    const back = await connected(g.tcpUrl);
    open.push(back);
    const k2 = kicks(back);
    const uFrom = Date.now();
    await within('a resume', back.request('resume', { token: s2.token }));
    const uTo = Date.now();
    // The index holds the extended times at once.
    const index = `${deployment.GW_REDIS_PREFIX}sessexp`;
    between(
      'the refreshed index entry',
      Number(await r.zscore(index, s1.sessionId)),
      rFrom + 3000,
      rTo + 3000,
    );
    between('the resumed index entry', Number(await r.zscore(index, s2.sessionId)), uFrom + 3000, uTo + 3000);

    await until('both connections kicked', () => k1.length > 0 && k2.length > 0);
    assert.deepEqual(
      [...k1, ...k2].map((k) => k.code),
      ['session_revoked', 'session_revoked'],
    );
    assert.ok(k1[0].at >= rFrom + TTL_S * 1000, 'the refreshed one kicked after its extended life');
    assert.ok(k2[0].at >= uFrom + TTL_S * 1000, 'the resumed one kicked after its extended life');
    const rows = await endedRows(deployment.GW_DB_SCHEMA, [s1.sessionId, s2.sessionId]);
    between('refreshed ended_at', rows.get(s1.sessionId)!.ended_at.getTime(), rFrom + 3000, rTo + 3000);
    between('resumed ended_at', rows.get(s2.sessionId)!.ended_at.getTime(), uFrom + 3000, uTo + 3000);
  } finally {
    r.disconnect();
    for (const c of open) c.destroy();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('an offline session kept alive by a refresh, or a resume that acks nothing, keeps its waiting events until it ends: each reported session_expired', async () => {
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment));
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX);
  const r = new Redis(REDIS_URL);
  const open: GatewayClient[] = [];
  try {
    const outboxKeys = (sid: string) =>
      ['q', 'ev', 'att', 'rc', 'exp', 'seq'].map((n) => `${deployment.GW_REDIS_PREFIX}{s:${sid}}:${n}`);
    const offline = async (tag: string) => {
      const device = `${tag}-${randomUUID().slice(0, 8)}`;
      const c = await connected(g.tcpUrl);
      const session = await within(`${tag}'s sign-up`, signUp(c, { id: device }));
      await within(`${tag} closed`, c.close());
      const eids = [0, 1].map((i) => `${tag}-${i}-${randomUUID().slice(0, 8)}`);
      const res = await postEvents(
        g.httpPort,
        API_KEY,
        eids.map((eid) => ({ target: { device }, eid, name: 'expiry.extended', data: {}, receipt: true })),
      );
      assert.equal(res.status, 202, await res.text());
      // As if the last publish were long ago: the outbox has 2 s left (its keys expire together).
      for (const k of outboxKeys(session.sessionId)) await r.expire(k, 2);
      return { session, eids };
    };
    const refreshed = await offline('refreshed');
    const resumed = await offline('resumed');
    // A refresh over a connection that never authenticates (nothing is delivered to it).
    const c1 = await connected(g.tcpUrl);
    open.push(c1);
    await within('the refresh', c1.request('refresh', { refresh: refreshed.session.refresh }));
    // A resume on a connection that acks nothing and is gone at once.
    const c2 = await connected(g.tcpUrl, { autoAck: false });
    await within('the resume', c2.request('resume', { token: resumed.session.token }));
    c2.destroy();
    for (const s of [refreshed.session, resumed.session]) {
      const q = outboxKeys(s.sessionId)[0];
      const left = await r.ttl(q);
      assert.ok(left > 60, `${s.sessionId}'s outbox extended with its session: ${left} s left`);
    }
    const eids = [...refreshed.eids, ...resumed.eids];
    await reportedExpired(reader, eids);
  } finally {
    r.disconnect();
    for (const c of open) c.destroy();
    await reader.close();
    await g.stop();
    await dropDeployment(deployment);
  }
});

test('activity of a session whose life ran out, before the sweep ends it, is no lost session: the sweep kicks it once', async () => {
  const redis = await startOwnRedis();
  const deployment = deploymentEnv();
  // The node's periodic check of its sessions runs too, and must leave it to the sweep as well.
  const g = await startGateway(
    env(deployment, { REDIS_URL: redis.url, GW_SESSION_ACTIVITY_MS: '100', GW_SESSION_CHECK_MS: '200' }),
  );
  const open: GatewayClient[] = [];
  const acl = (rule: string) => redis.with((r) => r.call('ACL', 'SETUSER', 'default', rule));
  try {
    const c = await connected(g.tcpUrl);
    open.push(c);
    const s = await within('the sign-up', signUp(c));
    const got = kicks(c);
    // The sweep reads its index with ZRANGEBYSCORE: refused, it cannot end the session.
    await acl('-zrangebyscore');
    const watch = await monitor(redis.port, { scripts: true });
    try {
      const hash = `${deployment.GW_REDIS_PREFIX}{s:${s.sessionId}}:sess`;
      await until(
        'the session hash expired',
        () => redis.with(async (r) => (await r.exists(hash)) === 0),
        15_000,
      );
      // A request is activity; its write (the activity script, on the session's hash) finds the
      // hash gone.
      const before = watch.seen.length;
      await c.request('rooms').catch(() => {});
      await until('the activity write of the expired session', () =>
        watch.seen
          .slice(before)
          .some((x) => x.source !== 'lua' && x.command.startsWith('eval') && x.args.includes(hash)),
      );
      // Time for a kick as a lost session to come (it is in the index of expiries): none should.
      await new Promise((resolve) => setTimeout(resolve, 2000));
      assert.equal(got.length, 0, 'not kicked as a lost session');
    } finally {
      await watch.stop();
      await acl('+zrangebyscore');
    }
    await until('the sweep kicked it', () => got.length > 0);
    assert.deepEqual(
      got.map((k) => k.code),
      ['session_revoked'],
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(m.value('gateway_sessions_found_gone_total{by="activity"}'), 0, 'not counted lost');
    assert.equal(
      m.value('gateway_sessions_found_gone_total{by="check"}'),
      0,
      'not counted lost by the check',
    );
    assert.equal(m.value('gateway_sessions_expired_total'), 1);
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await redis.remove();
    await dropDeployment(deployment);
  }
});

test("a session the sweep ends while its end notice is on the way is no lost session: the node's periodic check that finds it gone leaves it to the notice, which kicks it once, however late it comes on the subscriber's connection", async () => {
  const redis = await startOwnRedis();
  const proxy = await startRedisProxy({ host: '127.0.0.1', port: redis.port });
  const deployment = deploymentEnv();
  const prefix = deployment.GW_REDIS_PREFIX;
  const g = await startGateway(env(deployment, { REDIS_URL: proxy.url, GW_SESSION_CHECK_MS: '200' }));
  const open: GatewayClient[] = [];
  try {
    const c = await connected(g.tcpUrl);
    open.push(c);
    const s = await within('the sign-up', signUp(c));
    const got = kicks(c);
    // The sweep's end notice (published by its script) waits at the proxy: the node's check
    // finds the session's hash gone and its entry out of the index of expiries.
    proxy.holdSubscribers();
    const watch = await monitor(redis.port, { scripts: true });
    try {
      const hash = `${prefix}{s:${s.sessionId}}:sess`;
      // The sweep's script takes the session out of the index (Redis's order, as MONITOR shows
      // it); the first check after it finds the session's hash gone, and reads that it is not
      // in the index (the sign it expired) either.
      const ended = () =>
        watch.seen.findIndex((x) => x.source === 'lua' && x.command === 'zrem' && x.args[1] === s.sessionId);
      await until('the sweep ended the session', () => ended() >= 0, 15_000);
      await until("the node's check looked at the ended session and the index", () => {
        const after = watch.seen.slice(ended());
        return (
          after.some((x) => x.command === 'exists' && x.args[0] === hash) &&
          after.some((x) => x.source !== 'lua' && x.command === 'zscore' && x.args[1] === s.sessionId)
        );
      });
      // Longer than GONE_NOTICE_GRACE_MS: the node waits for a PING answered on the
      // subscriber's connection, held here behind the notice (before, it waited that second
      // and then kicked the session as lost). Shorter than the PING's GW_REDIS_TIMEOUT_MS.
      await new Promise((resolve) => setTimeout(resolve, 1500));
    } finally {
      proxy.release();
      await watch.stop();
    }
    await until('the end notice kicked it', () => got.length > 0);
    // Time for a second kick, as a found gone one, to come: none should.
    await new Promise((resolve) => setTimeout(resolve, 2000));
    assert.deepEqual(
      got.map((k) => k.code),
      ['session_revoked'],
      'kicked once, as its notice kicks it',
    );
    const m = await scrapeMetrics(g.metricsPort);
    assert.equal(
      m.value('gateway_sessions_found_gone_total{by="check"}'),
      0,
      'not counted lost by the check',
    );
    assert.equal(m.value('gateway_sessions_expired_total'), 1, 'counted expired');
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await proxy.close();
    await redis.remove();
    await dropDeployment(deployment);
  }
});

/**
 * Three sessions run out and the sweep's take that ends them has its reply held past the node's
 * timeout: the node must read what the take ended from its receipt. With `freezeMs`, Redis is
 * stopped before the take reaches it, for that long: the take runs when it resumes, long after
 * the node gave up on it, and the node's reads of the receipt until then fail.
 */
async function takeWithLostReply(freezeMs = 0): Promise<void> {
  const redis = await startOwnRedis();
  const proxy = await startRedisProxy({ host: '127.0.0.1', port: redis.port });
  const deployment = deploymentEnv();
  const prefix = deployment.GW_REDIS_PREFIX;
  const g = await startGateway(
    env(deployment, { REDIS_URL: proxy.url, SESSION_TTL: '3600', GW_REDIS_TIMEOUT_MS: '300' }),
  );
  const open: GatewayClient[] = [];
  try {
    const sids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await connected(g.tcpUrl);
      open.push(c);
      sids.push((await within(`sign-up ${i}`, signUp(c))).sessionId);
    }
    const got = kicks(open[0]!);
    // The sweep's next take (its keys: the index of expiries, then the owed ends) ends them, and
    // its reply reaches the node 1.5 s later: the node stopped waiting at 300 ms. The sweeps are
    // paused meanwhile: one run between the three's expiry and the hold would end them unheld.
    const esc = (x: string) => x.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    const at = Date.now() - 1000;
    const { held } = await sweepsPaused(prefix, redis.url, async () => {
      // The three run out now: their hashes gone, their expiry entries due (written past the proxy).
      await redis.with(async (r) => {
        const m = r.multi();
        for (const sid of sids) m.del(`${prefix}{s:${sid}}:sess`).zadd(`${prefix}sessexp`, 'XX', at, sid);
        await m.exec();
      });
      return {
        held: proxy.holdReplyOf(
          new RegExp(`${esc(prefix)}sessexp\\r\\n\\$\\d+\\r\\n${esc(prefix)}endowed`),
          1500,
          freezeMs > 0 ? () => redis.freeze() : undefined,
        ),
      };
    });
    await within("the sweep's take", held, 15_000);
    if (freezeMs > 0) {
      await new Promise((r) => setTimeout(r, freezeMs));
      redis.thaw();
    }
    await until(
      'the three counted expired by the node',
      async () => (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_expired_total') === 3,
      20_000,
    ).catch((e: Error) => {
      const lines = g.logs.filter((l) => /expired|sweep/.test(String(l.msg))).slice(-6);
      throw new Error(`${e.message}; ${JSON.stringify(lines)}`);
    });
    // Logged before they are counted, the lines can still reach the test after a scrape does
    // (a check pair's loaded copy read the count and no line yet).
    const endedLines = () =>
      g.logs.filter((l) => l.msg === 'session ended' && l.reason === 'expired').map((l) => l.sessionId);
    await until('a line for each of the three', () => endedLines().length >= 3, 10_000);
    assert.deepEqual(endedLines().sort(), [...sids].sort(), 'a line each, once');
    await until(
      'the take found lost and read from its receipt',
      () => g.logs.some((l) => /read from its receipt/.test(String(l.msg))),
      10_000,
    );
    const rows = await endedRows(deployment.GW_DB_SCHEMA, sids, 20_000);
    for (const sid of sids) {
      assert.equal(rows.get(sid)!.end_reason, 'expired');
      assert.equal(rows.get(sid)!.ended_at.getTime(), at, 'ended at the time it ran out');
    }
    await until('the connected device kicked', () => got.length > 0, 10_000);
    assert.deepEqual(
      got.map((k) => k.code),
      ['session_revoked'],
    );
    assert.equal(
      (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_expired_total'),
      3,
      'counted once, after the rows were ended too',
    );
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await proxy.close();
    await redis.remove();
    await dropDeployment(deployment);
  }
}

test("a take of expired sessions whose reply is lost (Redis slow past the node's timeout): the node reads what it ended from its receipt, and counts, logs and ends each", () =>
  takeWithLostReply());

test('the same with Redis stopped for 2.5 s before the take reaches it: the take runs after the node gave up, the reads of its receipt meanwhile fail, and nothing is lost or counted twice', () =>
  takeWithLostReply(2500));

test('two nodes, 40 sessions expiring while Redis freezes: each ended once, its events reported once, its connection kicked once', async () => {
  const redis = await startOwnRedis();
  const deployment = deploymentEnv();
  const fast = {
    REDIS_URL: redis.url,
    ARGON2_MEMORY_KIB: '1024',
    ARGON2_ITERATIONS: '1',
    GW_REDIS_TIMEOUT_MS: '300',
  };
  const nodes: GatewayProcess[] = [];
  const open: GatewayClient[] = [];
  const reader = new QueueReader(deployment.GW_REDIS_PREFIX, redis.url);
  const TTL = 6;
  try {
    nodes.push(await startGateway(env(deployment, { ...fast, SESSION_TTL: String(TTL) })));
    nodes.push(await startGateway(env(deployment, { ...fast, SESSION_TTL: String(TTL) })));
    const username = newName();
    const first = await connected(nodes[0].tcpUrl);
    await within(
      'the registration',
      first.request('register', { username, email: `${username}@example.com`, password: PASSWORD }),
    );
    first.destroy();
    // 40 sessions of one account, half on each node: every other one stays connected, the
    // rest closed with an event waiting.
    const N = 40;
    const sessions: { session: Session; device: string; from: number; to: number }[] = [];
    const gotKicks: { code: string; at: number }[][] = [];
    const eids: string[] = [];
    for (let i = 0; i < N; i++) {
      const device = `fleet-${i}-${randomUUID().slice(0, 8)}`;
      const c = await connected(nodes[i % 2].tcpUrl);
      const from = Date.now();
      const session = await within(
        `login ${i}`,
        c.request<Session>('login', { username, password: PASSWORD, device: { id: device } }),
      );
      sessions.push({ session, device, from, to: Date.now() });
      if (i % 2 === 0) {
        open.push(c);
        gotKicks.push(kicks(c));
      } else {
        await within('a device closed', c.close());
        const eid = `fleet-${i}-${randomUUID().slice(0, 8)}`;
        eids.push(eid);
        const res = await postEvents(nodes[i % 2].httpPort, API_KEY, [
          { target: { device }, eid, name: 'expiry.fleet', data: {} },
        ]);
        assert.equal(res.status, 202, await res.text());
      }
    }
    // Redis freezes as the first sessions expire: the sweeps in between fail or wait.
    const firstExpiry = sessions[0].from + TTL * 1000;
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, firstExpiry - Date.now())));
    await redis.freeze();
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await redis.thaw();

    await until('every connected device kicked', () => gotKicks.every((k) => k.length > 0), 30_000);
    await reportedExpired(reader, eids, 30_000);
    const rows = await endedRows(
      deployment.GW_DB_SCHEMA,
      sessions.map((s) => s.session.sessionId),
      30_000,
    );
    for (const s of sessions) {
      const row = rows.get(s.session.sessionId)!;
      assert.equal(row.end_reason, 'expired');
      between('ended_at', row.ended_at.getTime(), s.from + TTL * 1000, s.to + TTL * 1000);
    }
    // Each session ended by exactly one node, once; each connection kicked once.
    let total = 0;
    for (const g of nodes)
      total += (await scrapeMetrics(g.metricsPort)).value('gateway_sessions_expired_total');
    assert.equal(total, N, 'each session ended once across the two nodes');
    const endedLines = nodes.flatMap((g) =>
      g.logs.filter((l) => l.msg === 'session ended' && l.reason === 'expired').map((l) => l.sessionId),
    );
    assert.equal(endedLines.length, N);
    assert.equal(new Set(endedLines).size, N);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.deepEqual(
      gotKicks.map((k) => k.map((x) => x.code).join()),
      gotKicks.map(() => 'session_revoked'),
    );
  } finally {
    for (const c of open) c.destroy();
    await reader.close();
    for (const g of nodes) await g.stop();
    await redis.remove();
    await dropDeployment(deployment);
  }
});

test('a session that runs out while PostgreSQL is stopped is ended and kicked all the same; its audit row is written once PostgreSQL is back, at the time it expired', async () => {
  const pg = await startOwnPostgres();
  const deployment = deploymentEnv();
  const g = await startGateway(env(deployment, { DATABASE_URL: pg.url }));
  const open: GatewayClient[] = [];
  try {
    const c = await connected(g.tcpUrl);
    open.push(c);
    const from = Date.now();
    const s = await within('the sign-up', signUp(c));
    const to = Date.now();
    const got = kicks(c);
    await pg.stop();
    try {
      await until('the connection kicked with PostgreSQL stopped', () => got.length > 0);
      assert.deepEqual(
        got.map((k) => k.code),
        ['session_revoked'],
      );
      await within(
        'the audit write refused',
        g.waitForLog((l) => l.msg === 'session ends not written to PostgreSQL yet', 15_000),
        16_000,
      );
    } finally {
      await pg.start();
    }
    const row = await until(
      'the audit row ended once PostgreSQL is back',
      async () => {
        const r = await query(
          deployment.GW_DB_SCHEMA,
          'SELECT ended_at, end_reason FROM sessions WHERE id = $1',
          [s.sessionId],
          pg.url,
        );
        return r.rows[0]?.ended_at ? (r.rows[0] as { ended_at: Date; end_reason: string }) : undefined;
      },
      30_000,
    );
    assert.equal(row.end_reason, 'expired');
    between('ended_at', row.ended_at.getTime(), from + TTL_S * 1000, to + TTL_S * 1000);
  } finally {
    for (const c of open) c.destroy();
    await g.stop();
    await pg.remove();
    await dropDeployment(deployment);
  }
});
