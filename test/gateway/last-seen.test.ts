/**
 * Resumes' last-seen times written in batches off their path (gateway/auth/last-seen.ts): one
 * statement per table for a batch, never back in time, and kept through a PostgreSQL outage
 * until it is back; the rows found ended handed over (a Redis rolled back brought them back). A private PostgreSQL this file stops and starts, with the project's
 * migrations in a schema of its own.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createDb, type Db } from '../../gateway/auth/db.ts';
import { CHECK_EVERY_MS, LastSeen, writeEnds } from '../../gateway/auth/last-seen.ts';
import { migrate } from '../../gateway/auth/migrate.ts';
import { createLogger } from '../../gateway/log.ts';
import { until, within } from '../helpers/deadline.ts';
import { captureLog } from '../helpers/log-capture.ts';
import { type OwnPostgres, startOwnPostgres } from '../helpers/own-postgres.ts';

const SCHEMA = 'gwtest_lastseen';
let own: OwnPostgres;
let db: Db;

before(async () => {
  own = await startOwnPostgres();
  await migrate({ url: own.url, schema: SCHEMA, direction: 'up' });
  db = createDb({
    url: own.url,
    schema: SCHEMA,
    statementTimeoutMs: 5000,
    connectTimeoutMs: 1000,
    queryTimeoutMs: 2000,
    max: 2,
  });
  // Idle clients report the server's stop (the gateway's pool handles them too: auth/module.ts).
  db.pool.on('error', () => {});
});
after(async () => {
  await db?.pool.end().catch(() => {});
  await own?.remove();
});

/** A user with `n` sessions and devices, seen an hour ago. */
async function fleet(n: number) {
  const userId = randomUUID();
  await db.pool.query(`INSERT INTO users (id, username, email, password_hash) VALUES ($1, $2, $3, 'x')`, [
    userId,
    `u${userId.slice(0, 8)}`,
    `${userId}@example.com`,
  ]);
  const sessions = Array.from({ length: n }, () => randomUUID());
  const devices = sessions.map((s) => `dev-${s}`);
  for (let i = 0; i < n; i++) {
    await db.pool.query(
      `INSERT INTO sessions (id, user_id, device_id, ip, last_seen_at) VALUES ($1, $2, $3, '10.0.0.1', now() - interval '1 hour')`,
      [sessions[i], userId, devices[i]],
    );
    await db.pool.query(
      `INSERT INTO devices (id, owner, last_seen) VALUES ($1, $2, now() - interval '1 hour')`,
      [devices[i], userId],
    );
  }
  const rows = async () => {
    const s = await db.pool.query('SELECT id, ip, last_seen_at FROM sessions WHERE id = ANY($1)', [sessions]);
    const d = await db.pool.query('SELECT id, last_seen FROM devices WHERE id = ANY($1)', [devices]);
    return {
      sessions: new Map(
        s.rows.map((r) => [r.id as string, { ip: r.ip as string, at: (r.last_seen_at as Date).getTime() }]),
      ),
      devices: new Map(d.rows.map((r) => [r.id as string, (r.last_seen as Date).getTime()])),
    };
  };
  return { sessions, devices, rows };
}

/** How many statements the pool was sent while `f` ran. */
async function queriesOf(f: () => Promise<unknown>): Promise<number> {
  let queries = 0;
  const query = db.pool.query.bind(db.pool);
  db.pool.query = ((...args: Parameters<typeof query>) => {
    queries++;
    return query(...args);
  }) as typeof db.pool.query;
  try {
    await f();
  } finally {
    db.pool.query = query;
  }
  return queries;
}

test('what is noted is written in one statement per table, newest time per row, never back in time', async () => {
  const { lines, stream } = captureLog();
  const seen = new LastSeen(db.pool, createLogger('debug', {}, stream));
  const f = await fleet(50);
  const at = Date.now();
  for (let i = 0; i < 50; i++) {
    seen.session(f.sessions[i], '10.0.0.2', at - 5000);
    seen.session(f.sessions[i], '10.0.0.3', at); // the later resume wins
    seen.device(f.devices[i], at);
  }
  // One row is newer in PostgreSQL already (another node wrote it): kept.
  await db.pool.query(
    `UPDATE sessions SET last_seen_at = now() + interval '1 hour', ip = '10.9.9.9' WHERE id = $1`,
    [f.sessions[0]],
  );
  assert.equal(seen.pending, 100);
  const queries = await queriesOf(() => seen.flush());
  assert.equal(queries, 2, 'one statement per table');
  assert.equal(seen.pending, 0, 'nothing left');
  const rows = await f.rows();
  assert.equal(rows.sessions.get(f.sessions[0])?.ip, '10.9.9.9', 'a newer row is not moved back');
  for (let i = 1; i < 50; i++) {
    assert.deepEqual(rows.sessions.get(f.sessions[i]), { ip: '10.0.0.3', at }, `session ${i}`);
    assert.equal(rows.devices.get(f.devices[i]), at, `device ${i}`);
  }
  assert.deepEqual(lines, [], 'nothing logged');
});

test('the rows of resumed sessions found ended are handed to `ended`, in the same statement, and keep their times', async () => {
  const found: string[][] = [];
  const seen = new LastSeen(db.pool, createLogger('silent', {}), 1000, 100_000, {
    ended: (ids) => found.push(ids),
  });
  const f = await fleet(6);
  // Three rows ended (a logout, a revoke, lost) before their sessions were resumed again.
  await db.pool.query(
    `UPDATE sessions SET ended_at = now() - interval '30 minutes', end_reason = v.reason
     FROM unnest($1::uuid[], $2::text[]) AS v(id, reason) WHERE sessions.id = v.id`,
    [f.sessions.slice(0, 3), ['logout', 'revoked', 'lost']],
  );
  const before = await f.rows();
  const at = Date.now();
  for (const sid of f.sessions) seen.session(sid, '10.0.0.4', at);
  const queries = await queriesOf(() => seen.flush());
  assert.equal(queries, 1, 'one statement writes the times and reads the ends');
  assert.equal(found.length, 1, 'handed over once');
  assert.deepEqual([...found[0]!].sort(), f.sessions.slice(0, 3).sort(), 'exactly the ended rows');
  const rows = await f.rows();
  for (const sid of f.sessions.slice(0, 3)) {
    assert.deepEqual(rows.sessions.get(sid), before.sessions.get(sid), 'an ended row keeps its times');
  }
  for (const sid of f.sessions.slice(3)) {
    assert.deepEqual(rows.sessions.get(sid), { ip: '10.0.0.4', at }, 'an open row is written');
  }
  // None ended: nothing handed over.
  for (const sid of f.sessions.slice(3)) seen.session(sid, '10.0.0.5', at + 1000);
  await seen.flush();
  assert.equal(found.length, 1, 'nothing more');
});

test('sessions whose tokens were used are read in the same statement, not written, at most once per CHECK_EVERY_MS each; `force` reads one again', async () => {
  const found: string[][] = [];
  const seen = new LastSeen(db.pool, createLogger('silent', {}), 1000, 100_000, {
    ended: (ids) => found.push(ids),
  });
  const f = await fleet(4);
  // The first two rows ended (a logout, a revoke); their sessions' tokens are used after.
  await db.pool.query(
    `UPDATE sessions SET ended_at = now() - interval '30 minutes', end_reason = v.reason
     FROM unnest($1::uuid[], $2::text[]) AS v(id, reason) WHERE sessions.id = v.id`,
    [f.sessions.slice(0, 2), ['logout', 'revoked']],
  );
  const before = await f.rows();
  const at = Date.now();
  for (const sid of f.sessions) seen.check(sid, at);
  // A resumed session checked too is read once.
  seen.session(f.sessions[3]!, '10.0.0.7', at);
  assert.equal(seen.pending, 5);
  const queries = await queriesOf(() => seen.flush());
  assert.equal(queries, 1, 'one statement');
  assert.equal(seen.pending, 0);
  assert.equal(found.length, 1, 'handed over once');
  assert.deepEqual([...found[0]!].sort(), f.sessions.slice(0, 2).sort(), 'exactly the ended rows');
  const rows = await f.rows();
  for (const sid of f.sessions.slice(0, 3))
    assert.deepEqual(rows.sessions.get(sid), before.sessions.get(sid), 'a checked row is not written');
  assert.deepEqual(rows.sessions.get(f.sessions[3]!), { ip: '10.0.0.7', at }, 'a resumed row is');

  // Used again within CHECK_EVERY_MS: not read again; past it, or forced, it is.
  seen.check(f.sessions[0]!, at + CHECK_EVERY_MS - 1);
  assert.equal(seen.pending, 0, 'within the interval: not taken');
  seen.check(f.sessions[1]!, at + 1, true);
  seen.check(f.sessions[2]!, at + CHECK_EVERY_MS);
  assert.equal(seen.pending, 2, 'forced, and past the interval');
  await seen.flush();
  assert.deepEqual(found.slice(1), [[f.sessions[1]]], 'the forced one handed over again');
});

test('sessions checked while PostgreSQL is stopped are read once it is back', async () => {
  const found: string[] = [];
  const seen = new LastSeen(db.pool, createLogger('silent', {}), 0, 100_000, {
    ended: (ids) => found.push(...ids),
  });
  const f = await fleet(3);
  await db.pool.query(`UPDATE sessions SET ended_at = now(), end_reason = 'logout' WHERE id = $1`, [
    f.sessions[0],
  ]);
  await own.stop();
  try {
    for (const sid of f.sessions) seen.check(sid);
    await seen.flush();
    assert.deepEqual(found, [], 'nothing handed over while PostgreSQL is stopped');
    assert.equal(seen.pending, 3, 'kept');
  } finally {
    await own.start();
  }
  await Promise.all(Array.from({ length: 3 }, () => seen.flush()));
  await seen.flush();
  assert.deepEqual(found, [f.sessions[0]], 'the ended row handed over once');
  assert.equal(seen.pending, 0);
});

test('a write that fails while PostgreSQL is stopped is kept, and made once it is back', async () => {
  const { lines, stream } = captureLog();
  const seen = new LastSeen(db.pool, createLogger('debug', {}, stream), 0);
  const f = await fleet(3);
  await own.stop();
  const at = Date.now();
  try {
    for (let i = 0; i < 3; i++) {
      seen.session(f.sessions[i], '10.0.0.4', at);
      seen.device(f.devices[i], at);
    }
    await seen.flush();
    assert.equal(seen.pending, 6, 'kept after the failed write');
    // Noted again during the outage: the newer time is the one written.
    seen.session(f.sessions[0], '10.0.0.5', at + 1000);
    await seen.flush();
    assert.equal(seen.pending, 6, 'kept after the second failed write');
  } finally {
    await own.start();
  }
  await seen.flush();
  assert.equal(seen.pending, 0, 'written once PostgreSQL is back');
  const rows = await f.rows();
  assert.deepEqual(rows.sessions.get(f.sessions[0]), { ip: '10.0.0.5', at: at + 1000 }, 'the newest noted');
  for (let i = 1; i < 3; i++)
    assert.deepEqual(rows.sessions.get(f.sessions[i]), { ip: '10.0.0.4', at }, `session ${i}`);
  for (let i = 0; i < 3; i++) assert.equal(rows.devices.get(f.devices[i]), at, `device ${i}`);
  const failed = lines.filter((l) => l.msg === 'last-seen times not written yet');
  assert.ok(failed.length >= 2, `each failed write logged: ${JSON.stringify(lines)}`);
  assert.ok(
    failed.every((l) => (l.level as number) <= 20),
    'a dependency fault is logged at debug (the outage itself is reported once by the monitor)',
  );
});

test('ended rows of sessions resumed while PostgreSQL is stopped are handed over once it is back, once each however many writes race', async () => {
  const found: string[] = [];
  const seen = new LastSeen(db.pool, createLogger('silent', {}), 0, 100_000, {
    ended: (ids) => found.push(...ids),
  });
  const f = await fleet(4);
  await db.pool.query(
    `UPDATE sessions SET ended_at = now(), end_reason = 'logout' WHERE id = ANY($1::uuid[])`,
    [f.sessions.slice(0, 2)],
  );
  await own.stop();
  try {
    for (const sid of f.sessions) seen.session(sid, '10.0.0.6');
    await seen.flush();
    assert.deepEqual(found, [], 'nothing handed over while PostgreSQL is stopped');
    assert.equal(seen.pending, 4, 'kept');
  } finally {
    await own.start();
  }
  await Promise.all(Array.from({ length: 5 }, () => seen.flush()));
  await seen.flush();
  assert.deepEqual(found.sort(), f.sessions.slice(0, 2).sort(), 'each ended row handed over once');
  assert.equal(seen.pending, 0);
});

test("two nodes' batches over the same rows in opposite orders (times, devices, ends) wait for each other instead of deadlocking", async () => {
  const { lines, stream } = captureLog();
  const log = createLogger('debug', {}, stream);
  const f = await fleet(2);
  // Tables of a fleet's size, so that PostgreSQL looks the batch's rows up one by one, in the
  // batch's order (of a few rows it reads the whole table, in its own order).
  const owner = (await db.pool.query('SELECT user_id FROM sessions WHERE id = $1', [f.sessions[0]])).rows[0]
    .user_id as string;
  await db.pool.query(
    `INSERT INTO sessions (id, user_id, ip) SELECT gen_random_uuid(), $1, '10.0.0.1' FROM generate_series(1, 20000)`,
    [owner],
  );
  await db.pool.query(
    `INSERT INTO devices (id, owner) SELECT 'bulk-' || g || '-' || $1, $1::uuid FROM generate_series(1, 20000) g`,
    [owner],
  );
  await db.pool.query('ANALYZE sessions');
  await db.pool.query('ANALYZE devices');
  const at = Date.now();
  const holder = new pg.Client({ connectionString: own.url, options: `-c search_path=${SCHEMA}` });
  await holder.connect();
  // Two nodes, a pool each.
  const pools = [0, 1].map(() =>
    createDb({
      url: own.url,
      schema: SCHEMA,
      statementTimeoutMs: 10_000,
      connectTimeoutMs: 1000,
      queryTimeoutMs: 10_000,
      max: 1,
    }),
  );
  try {
    for (const step of ['sessions', 'devices', 'ends'] as const) {
      const table = step === 'devices' ? 'devices' : 'sessions';
      const ids = table === 'sessions' ? f.sessions : f.devices;
      // Each node has the rows in its own order (a Map's: the order its devices resumed, or
      // their sessions ended).
      const order = (k: number) => (k === 0 ? ids : [...ids].reverse());
      const nodes = pools.map((p) => new LastSeen(p.pool, log, 0));
      // The rows held by a transaction until both batches wait on them: released, each batch's
      // next lock is one the other took first, unless both take them in one order.
      await holder.query('BEGIN');
      await holder.query(`SELECT 1 FROM ${table} WHERE id = ANY($1) FOR UPDATE`, [ids]);
      const written = pools.map(async (p, k) => {
        if (step === 'ends') {
          const ends = new Map(order(k).map((id) => [id, { reason: 'logout', at: at + k }]));
          return (await writeEnds(p.pool, ends)) >= 0;
        }
        const node = nodes[k]!;
        for (const id of order(k)) {
          if (step === 'sessions') node.session(id, `10.0.0.${8 + k}`, at + k);
          else node.device(id, at + k);
        }
        await node.flush();
        return node.pending === 0;
      });
      const settled = Promise.allSettled(written);
      await until(
        `both batches waiting on the ${table} rows (${step})`,
        async () =>
          // Not on the holder's connection: a transaction reads the activity view once.
          (
            await db.pool.query(
              "SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
              [`%UPDATE ${table}%`],
            )
          ).rows[0].n === 2,
      );
      await holder.query('COMMIT');
      const outcomes = (await within(`both batches written (${step})`, settled)).map((r) =>
        r.status === 'fulfilled' ? r.value : String(r.reason),
      );
      assert.deepEqual(outcomes, [true, true], `${step}: both written: ${JSON.stringify(lines)}`);
    }
  } finally {
    await holder.query('ROLLBACK').catch(() => {});
    await holder.end();
    for (const p of pools) await p.pool.end().catch(() => {});
  }
  const rows = await f.rows();
  for (const sid of f.sessions) assert.deepEqual(rows.sessions.get(sid), { ip: '10.0.0.9', at: at + 1 });
  for (const id of f.devices) assert.equal(rows.devices.get(id), at + 1);
  const ended = await db.pool.query(
    'SELECT count(*)::int AS n FROM sessions WHERE id = ANY($1) AND ended_at IS NOT NULL',
    [f.sessions],
  );
  assert.equal(ended.rows[0].n, 2, 'both ends written');
  assert.deepEqual(lines, [], 'nothing logged');
});

test('past its bound, the oldest noted rows are dropped', async () => {
  const seen = new LastSeen(db.pool, createLogger('silent', {}), 1000, 3);
  for (let i = 0; i < 5; i++) seen.device(`d${i}`);
  assert.equal(seen.pending, 3);
});
