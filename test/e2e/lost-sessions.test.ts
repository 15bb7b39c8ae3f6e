/**
 * A session gone from Redis with no end recorded anywhere (Redis lost it: a restart without
 * persistence, a failover, a rollback; or a node died before it settled a failed login) left its
 * audit row open for good. The cluster-wide sweep now reads the open rows a batch at a time and
 * ends `lost` those whose session is gone, not in the expiry index and owed no end, once older
 * than ten minutes (gateway/auth/lost-sessions.ts). The test puts Redis in each of those states
 * by hand, for sessions made by a real login, and back-dates the rows past the ten minutes.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { test } from 'node:test';
import type { GatewayClient } from '../../client/client.ts';
import { connected, signUp } from '../helpers/accounts.ts';
import { query, redisClient } from '../helpers/cleanup.ts';
import { fetchWithin, nextEvent, until, within } from '../helpers/deadline.ts';
import {
  deploymentEnv,
  dropDeployment,
  type GatewayProcess,
  startGateway,
} from '../helpers/gateway-process.ts';
import { postJson } from '../helpers/http.ts';
import { scrapeMetrics } from '../helpers/metrics.ts';
import { type OwnRedis, startOwnRedis } from '../helpers/own-redis.ts';

interface Row {
  id: string;
  ended_at: Date | null;
  end_reason: string | null;
  last_seen_at: Date;
}

/** The sessions the gateway's lines `msg` counted so far (their `sessions` fields summed). */
const sessionsLogged = (gw: GatewayProcess, msg: string) =>
  gw.logs.filter((l) => l.msg === msg).reduce((n, l) => n + Number(l.sessions), 0);

/**
 * Waits until `gw` has counted `n` sessions ended again after a rollback, then checks it counted
 * no more: a batch counts its ends once all of them are done, after each session's record is
 * gone (which is what the cases wait for first).
 */
async function resurrectedCounted(gw: GatewayProcess, n: number): Promise<void> {
  const counted = await until(`${n} sessions counted in gateway_sessions_resurrected_total`, async () => {
    const v = (await scrapeMetrics(gw.metricsPort)).value('gateway_sessions_resurrected_total');
    return v >= n ? v : false;
  });
  assert.equal(counted, n);
}

test("open audit rows of sessions lost from Redis are ended 'lost' at their last sign of life; live, expiring, owed and young ones are not", async () => {
  const deployment = deploymentEnv();
  const schema = deployment.GW_DB_SCHEMA;
  const prefix = deployment.GW_REDIS_PREFIX;
  const open: GatewayClient[] = [];
  let gw: GatewayProcess | undefined;
  const r = redisClient();
  try {
    gw = await startGateway({
      ...deployment,
      GW_SWEEP_INTERVAL_MS: '200',
      // Two rows a run: a pass over the table takes several runs, and the cursor wraps.
      GW_AUDIT_CHECK_BATCH: '2',
      // The sweep's steps log a dependency's failure at debug: shown if the wait fails.
      GW_LOG_LEVEL: 'debug',
      GW_DEFAULT_ROOM: '',
      GW_REGISTER_PER_MINUTE: '1000',
    });
    const sessions: Record<string, string> = {};
    for (const name of ['live1', 'live2', 'lost1', 'lost2', 'owed', 'expiring', 'notDue', 'earlier']) {
      const c = await connected(gw.tcpUrl);
      open.push(c);
      sessions[name] = (await within(`the sign-up of ${name}`, signUp(c))).sessionId;
    }
    const userId = (await query(schema, 'SELECT user_id FROM sessions WHERE id = $1', [sessions.live1]))
      .rows[0].user_id as string;
    // Every row an hour old, as if made long ago.
    await query(
      schema,
      "UPDATE sessions SET created_at = created_at - interval '1 hour', last_seen_at = last_seen_at - interval '1 hour'",
    );
    // A login whose node died before it settled it: a row, an hour old, and no session.
    sessions.deadLogin = randomUUID();
    // A row just made, whose session is not made yet (a login between its two steps).
    sessions.young = randomUUID();
    await query(
      schema,
      `INSERT INTO sessions (id, user_id, ip, created_at, last_seen_at) VALUES
        ($1, $3, '127.0.0.1', now() - interval '1 hour', now() - interval '1 hour'),
        ($2, $3, '127.0.0.1', now(), now())`,
      [sessions.deadLogin, sessions.young, userId],
    );
    const hash = (sid: string) => `${prefix}{s:${sid}}:sess`;
    // Lost by Redis: the hash and its expiry entry gone.
    for (const sid of [sessions.lost1, sessions.lost2, sessions.owed]) {
      await r.del(hash(sid));
      await r.zrem(`${prefix}sessexp`, sid);
    }
    // Ended, its audit end owed (a node writes it, or the sweep once it is stale: here never).
    await r.zadd(`${prefix}auditowed`, Date.now() + 3_600_000, `${sessions.owed} logout ${Date.now()}`);
    // Run out: the hash gone, its expiry entry due. The expiry step ends it `expired`.
    await r.del(hash(sessions.expiring));
    await r.zadd(`${prefix}sessexp`, 'XX', Date.now(), sessions.expiring);

    // Its hash gone before its expiry entry is due (the entry's time is Redis's; a sweep's
    // interval apart at most): the expiry step's, later.
    await r.del(hash(sessions.notDue));
    await r.zadd(`${prefix}sessexp`, 'XX', Date.now() + 3_600_000, sessions.notDue);

    // Live, made by a node of an earlier version, which wrote no expiry entry.
    await r.zrem(`${prefix}sessexp`, sessions.earlier);

    const rows = async () => {
      const res = await query(schema, 'SELECT id, ended_at, end_reason, last_seen_at FROM sessions');
      return new Map((res.rows as Row[]).map((row) => [row.id, row]));
    };
    const lost = [sessions.lost1, sessions.lost2, sessions.deadLogin];
    await until(
      "the lost sessions' rows ended",
      async () => {
        const now = await rows();
        return lost.every((sid) => now.get(sid)?.end_reason === 'lost');
      },
      60_000,
    ).catch(async (e: Error) => {
      // What the check did (its failures are logged at debug), and how far it got.
      const m = await scrapeMetrics(gw!.metricsPort);
      const lines = gw!.logs
        .filter((l) => /sweep|audit/.test(String(l.msg)))
        .slice(-8)
        .map((l) => `${l.msg}${l.err ? `: ${l.err}` : ''}`);
      throw new Error(
        `${e.message}; rows checked ${m.value('gateway_audit_rows_checked_total')}, ended lost ${m.value('gateway_sessions_lost_total')}; the sweep's last lines: ${JSON.stringify(lines)}`,
      );
    });
    // A whole pass more over the table after that: every open row read again at least once.
    const checked = async () =>
      (await scrapeMetrics(gw!.metricsPort)).value('gateway_audit_rows_checked_total');
    const from = await checked();
    await until('another pass over the open rows', async () => (await checked()) >= from + 2 * 11, 30_000);
    const end = await rows();
    for (const sid of lost) {
      const row = end.get(sid)!;
      assert.equal(row.end_reason, 'lost', `${sid} ended lost`);
      assert.equal(
        row.ended_at?.getTime(),
        row.last_seen_at.getTime(),
        'ended at its last sign of life, an hour ago',
      );
    }
    for (const name of ['live1', 'live2', 'owed', 'young', 'notDue', 'earlier']) {
      const row = end.get(sessions[name]!)!;
      assert.equal(row.ended_at, null, `${name}'s row is still open (${row.end_reason})`);
    }
    assert.equal(end.get(sessions.expiring!)!.end_reason, 'expired', 'the expiry step ended its own');
    const m = await scrapeMetrics(gw.metricsPort);
    assert.equal(m.value('gateway_sessions_lost_total'), 3, 'three rows counted lost');
    const logged = gw.logs
      .filter((l) => l.msg === 'presence sweep ended the audit rows of sessions lost from Redis')
      .reduce((n, l) => n + Number(l.sessions), 0);
    assert.equal(logged, 3, 'each lost row logged once');
  } finally {
    await Promise.all(open.map((c) => c.close()));
    r.disconnect();
    await gw?.stop();
    await dropDeployment(deployment);
  }
});

test("Redis restarted empty: every session's row is ended 'lost', the offline devices' too, once the sweep runs again", async () => {
  const deployment = deploymentEnv();
  const schema = deployment.GW_DB_SCHEMA;
  const open: GatewayClient[] = [];
  let gw: GatewayProcess | undefined;
  let redis: OwnRedis | undefined;
  try {
    // No persistence: a restart loses everything, the sweep's schedule with it.
    redis = await startOwnRedis(['--appendonly', 'no']);
    gw = await startGateway({
      ...deployment,
      REDIS_URL: redis.url,
      GW_SWEEP_INTERVAL_MS: '200',
      GW_PRESENCE_STALE_MS: '2000',
      GW_DEFAULT_ROOM: '',
      GW_REGISTER_PER_MINUTE: '1000',
    });
    const sids: string[] = [];
    for (let i = 0; i < 6; i++) {
      const c = await connected(gw.tcpUrl);
      open.push(c);
      sids.push((await within(`sign-up ${i}`, signUp(c))).sessionId);
    }
    // Half of the devices go offline; their sessions live on in Redis.
    for (const c of open.splice(0, 3)) await c.close();
    await query(
      schema,
      "UPDATE sessions SET created_at = created_at - interval '1 hour', last_seen_at = last_seen_at - interval '1 hour'",
    );
    await redis.kill();
    await redis.start();
    await until(
      "every session's row ended lost",
      async () => {
        const r = await query(schema, 'SELECT id, end_reason FROM sessions WHERE id = ANY($1::uuid[])', [
          sids,
        ]);
        return r.rows.length === sids.length && r.rows.every((row) => row.end_reason === 'lost');
      },
      60_000,
    );
    assert.equal((await scrapeMetrics(gw.metricsPort)).value('gateway_sessions_lost_total'), 6);
  } finally {
    await Promise.all(open.map((c) => c.close()));
    await gw?.stop();
    await redis?.remove();
    await dropDeployment(deployment);
  }
});

test('Redis rolled back to before two logouts: the sessions it brought back are ended again, their tokens refused, their rows kept', async () => {
  const deployment = deploymentEnv();
  const schema = deployment.GW_DB_SCHEMA;
  const prefix = deployment.GW_REDIS_PREFIX;
  const open: GatewayClient[] = [];
  let gw: GatewayProcess | undefined;
  let redis: OwnRedis | undefined;
  try {
    redis = await startOwnRedis(['--enable-debug-command', 'yes']);
    gw = await startGateway({
      ...deployment,
      REDIS_URL: redis.url,
      GW_SWEEP_INTERVAL_MS: '200',
      // Two sessions a run: a pass over the index takes several runs.
      GW_AUDIT_CHECK_BATCH: '2',
      GW_DEFAULT_ROOM: '',
      GW_REGISTER_PER_MINUTE: '1000',
    });
    const sessions: Awaited<ReturnType<typeof signUp>>[] = [];
    for (let i = 0; i < 5; i++) {
      const c = await connected(gw.tcpUrl);
      open.push(c);
      sessions.push(await within(`sign-up ${i}`, signUp(c)));
    }
    const rollback = await redis.rdbSnapshot();
    // Two devices log out after the snapshot: their sessions end, in Redis and in the audit.
    for (const i of [0, 1]) await within(`logout ${i}`, open[i]!.request('logout', {}));
    const endsBefore = await query(
      schema,
      'SELECT id, ended_at, end_reason FROM sessions WHERE ended_at IS NOT NULL',
    );
    assert.equal(endsBefore.rows.length, 2, 'two rows ended');
    const hash = (sid: string) => `${prefix}{s:${sid}}:sess`;
    // The rollback brings the two logged-out sessions back; the sweep's check (every 200 ms) may
    // end them again before a read here would see them (a check pair's copy read the hash gone),
    // so that they came back is told by the sweep's line below, which names them.
    await rollback();
    await until(
      'the sessions brought back ended again',
      async () =>
        (await redis!.with((r) => r.exists(...[0, 1].map((i) => hash(sessions[i]!.sessionId))))) === 0,
      30_000,
    );
    // A logged-out device's token is refused again.
    const again = await connected(gw.tcpUrl);
    open.push(again);
    await assert.rejects(
      within('a resume with a logged-out token', again.request('resume', { token: sessions[0]!.token })),
      (e: Error & { code?: string }) => e.code === 'session_revoked' || e.code === 'token_invalid',
      'refused',
    );
    // Their rows keep their ends; the others' sessions live on, their rows open.
    const endsAfter = await query(
      schema,
      'SELECT id, ended_at, end_reason FROM sessions WHERE ended_at IS NOT NULL',
    );
    assert.deepEqual(
      endsAfter.rows.map((r) => [r.id, r.end_reason, r.ended_at.getTime()]).sort(),
      endsBefore.rows.map((r) => [r.id, r.end_reason, r.ended_at.getTime()]).sort(),
      'the rows keep the ends they had',
    );
    for (const s of sessions.slice(2)) {
      assert.equal(await redis.with((r) => r.exists(hash(s.sessionId))), 1, 'a live session left alone');
    }
    await resurrectedCounted(gw, 2);
    // Logged after the ends (and the metric): it may reach us after them.
    const logged = () =>
      sessionsLogged(
        gw!,
        'presence sweep ended again sessions whose audit rows say they ended: Redis was rolled back',
      );
    await until('the ends logged', () => logged() >= 2);
    assert.equal(logged(), 2, 'each logged once');
    const named = gw.logs
      .filter(
        (l) =>
          l.msg ===
          'presence sweep ended again sessions whose audit rows say they ended: Redis was rolled back',
      )
      .flatMap((l) => l.sessionIds as string[]);
    assert.deepEqual(
      named.sort(),
      [sessions[0]!.sessionId, sessions[1]!.sessionId].sort(),
      'the rollback brought the two logged-out sessions back, and the sweep ended them again',
    );
  } finally {
    await Promise.all(open.map((c) => c.close()));
    await gw?.stop();
    await redis?.remove();
    await dropDeployment(deployment);
  }
});

type Session = Awaited<ReturnType<typeof signUp>>;

/**
 * A gateway on a private Redis with the sweep's check off (`GW_AUDIT_CHECK_BATCH=0`: only a
 * session's use can find one a rollback revived), and three sessions signed up on connections of
 * their own. `rollBack` snapshots Redis, logs the first two out, and loads the snapshot back;
 * `ends` reads the ended rows as `[id, reason, ms]`. Cleans up after `body`.
 */
async function withRevivable(
  env: Record<string, string>,
  body: (f: {
    gw: GatewayProcess;
    redis: OwnRedis;
    sessions: [Session, Session, Session];
    open: GatewayClient[];
    alive: (sid: string) => Promise<number>;
    rollBack: () => Promise<unknown[][]>;
    ends: () => Promise<unknown[][]>;
  }) => Promise<void>,
): Promise<void> {
  const deployment = deploymentEnv();
  const schema = deployment.GW_DB_SCHEMA;
  const open: GatewayClient[] = [];
  let gw: GatewayProcess | undefined;
  let redis: OwnRedis | undefined;
  try {
    redis = await startOwnRedis(['--enable-debug-command', 'yes']);
    const own = redis;
    gw = await startGateway({
      ...deployment,
      REDIS_URL: own.url,
      GW_SWEEP_INTERVAL_MS: '200',
      GW_AUDIT_CHECK_BATCH: '0',
      GW_DEFAULT_ROOM: '',
      GW_REGISTER_PER_MINUTE: '1000',
      ...env,
    });
    const sessions: Session[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await connected(gw.tcpUrl);
      open.push(c);
      sessions.push(await within(`sign-up ${i}`, signUp(c)));
    }
    const ends = async () =>
      (await query(schema, 'SELECT id, ended_at, end_reason FROM sessions WHERE ended_at IS NOT NULL')).rows
        .map((r) => [r.id, r.end_reason, r.ended_at.getTime()])
        .sort();
    await body({
      gw,
      redis: own,
      sessions: sessions as [Session, Session, Session],
      open,
      alive: (sid) => own.with((r) => r.exists(`${deployment.GW_REDIS_PREFIX}{s:${sid}}:sess`)),
      async rollBack() {
        const rollback = await own.rdbSnapshot();
        for (const i of [0, 1]) await within(`logout ${i}`, open[i]!.request('logout', {}));
        const before = await ends();
        assert.equal(before.length, 2, 'two rows ended');
        await rollback();
        return before;
      },
      ends,
    });
  } finally {
    await Promise.all(open.map((c) => c.close()));
    await gw?.stop();
    await redis?.remove();
    await dropDeployment(deployment);
  }
}

test("Redis rolled back, the sweep's check off: a logged-out session's first resume and refresh end it again within a second or two", async () => {
  await withRevivable(
    {},
    async ({ gw, sessions: [resumed, refreshed, live], open, alive, rollBack, ends }) => {
      const endsBefore = await rollBack();
      assert.equal(
        await alive(resumed.sessionId),
        1,
        'the rollback brought the first logged-out session back',
      );

      // The live session resumes too, first: it is in the same batch as the others, or an earlier one.
      const liveConn = await connected(gw.tcpUrl);
      open.push(liveConn);
      await within('the live session resumed', liveConn.request('resume', { token: live.token }));
      // The logged-out device's old token resumes: the rollback brought its session back...
      const thief = await connected(gw.tcpUrl);
      open.push(thief);
      const kicked = nextEvent<{ code: string }>(thief, 'kick', 'the resumed session kicked', 20_000);
      await within('a resume with a logged-out token', thief.request('resume', { token: resumed.token }));
      // ...and a refresh with the other's old refresh token gets a new pair.
      const other = await connected(gw.tcpUrl);
      open.push(other);
      const pair = await within(
        'a refresh with a logged-out refresh token',
        other.request<{ refresh: string }>('refresh', { refresh: refreshed.refresh }),
      );
      // Both are found by the last-seen batch and ended again.
      assert.equal((await kicked).code, 'session_revoked');
      await until(
        'the refreshed session ended again',
        async () => (await alive(refreshed.sessionId)) === 0,
        20_000,
      );
      assert.equal(await alive(resumed.sessionId), 0, 'the resumed session gone');
      // (The kick closed the thief's connection.)
      const again = await connected(gw.tcpUrl);
      open.push(again);
      await assert.rejects(
        within(
          'a second resume with the logged-out token',
          again.request('resume', { token: resumed.token }),
        ),
        (e: Error & { code?: string }) => e.code === 'session_revoked' || e.code === 'token_invalid',
      );
      await assert.rejects(
        within('a refresh with the pair it was given', other.request('refresh', { refresh: pair.refresh })),
        (e: Error & { code?: string }) => e.code === 'token_invalid',
      );
      // The rows keep their ends; the live session lives on, its row open.
      assert.deepEqual(await ends(), endsBefore, 'the rows keep the ends they had');
      assert.equal(await alive(live.sessionId), 1, 'the live session left alone');
      const logged = () =>
        sessionsLogged(
          gw,
          'resumed sessions whose audit rows say they ended were ended again: Redis was rolled back',
        );
      await until('the ends logged', () => logged() >= 2);
      assert.equal(logged(), 2, 'each logged once');
      await resurrectedCounted(gw, 2);
    },
  );
});

test("Redis rolled back, the sweep's check off: a logged-out session's access token, used or validated, ends it within seconds; an end Redis refuses while full is tried again until it takes it", async () => {
  // The retries of an end Redis refused are logged at debug.
  await withRevivable(
    { GW_LOG_LEVEL: 'debug' },
    async ({ gw, redis, sessions: [validated, used, live], alive, rollBack, ends }) => {
      const base = `http://127.0.0.1:${gw.httpPort}`;
      const validate = async (token: string) =>
        (await (await postJson(`${base}/auth/validate`, { token })).json()) as { valid: boolean };
      const me = async (token: string) =>
        (await fetchWithin(`${base}/auth/user/me`, { headers: { authorization: `Bearer ${token}` } })).status;
      // Neither token used since sign-up: a node reads a session's row for its token's use at
      // most once per CHECK_EVERY_MS (10 s), so a use just before the logout would hold the
      // check back until then (found then at its next use, not tested here).
      const endsBefore = await rollBack();
      assert.equal(await alive(validated.sessionId), 1, 'the rollback brought the logged-out sessions back');
      // Redis full: an end of a session is refused (its reads still answered).
      await redis.with((r) => r.config('SET', 'maxmemory', '1'));
      const retried = (sid: string) =>
        gw!.logs.filter(
          (l) =>
            l.sessionId === sid &&
            l.msg ===
              'resumed session whose audit row says it ended not ended again yet: Redis did not take it',
        ).length;
      // A back end validates the one's token, the other's calls an authenticated route: both
      // accepted, as Redis holds their sessions...
      assert.equal((await validate(validated.token)).valid, true, 'validated while revived');
      assert.equal(await me(used.token), 200, 'used while revived');
      assert.equal((await validate(live.token)).valid, true);
      // ...and their rows are read with the next batch, the ends refused and tried again.
      await until(
        'both ends refused by the full Redis, and tried again',
        () => retried(validated.sessionId) >= 2 && retried(used.sessionId) >= 2,
        20_000,
      ).catch((e: Error) => {
        // What the check did instead (an end refused in another way is logged with its error).
        const lines = gw!.logs
          .filter((l) => /^resumed session/.test(String(l.msg)))
          .slice(-4)
          .map((l) => `${l.msg}: ${JSON.stringify((l.err as { message?: string })?.message ?? l.err)}`);
        throw new Error(`${e.message}; the check's last lines: ${JSON.stringify(lines)}`);
      });
      assert.equal(await alive(validated.sessionId), 1, 'kept while Redis refuses its end');
      await redis.with((r) => r.config('SET', 'maxmemory', '0'));
      await until(
        'both sessions ended again once Redis takes writes',
        async () => (await alive(validated.sessionId)) === 0 && (await alive(used.sessionId)) === 0,
        20_000,
      );
      assert.equal((await validate(validated.token)).valid, false, 'the validated token refused');
      assert.equal(await me(used.token), 401, 'the used token refused');
      assert.equal((await validate(live.token)).valid, true, 'the live session left alone');
      assert.equal(await alive(live.sessionId), 1);
      assert.deepEqual(await ends(), endsBefore, 'the rows keep the ends they had');
      await resurrectedCounted(gw, 2);
    },
  );
});
