/**
 * The sweep's check for open audit rows whose sessions are lost (gateway/auth/lost-sessions.ts),
 * run by hand: it reads a batch a run in the order of the rows' ids, goes on from its cursor
 * and wraps at the end, reads no row younger than its age, and ends nothing while too many ends
 * are owed to tell them apart. The project's migrations in a schema of its own, a Redis prefix
 * of its own; no session of these rows is in Redis.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createDb, type Db } from '../../gateway/auth/db.ts';
import { endLostSessions, sessionsResurrected } from '../../gateway/auth/lost-sessions.ts';
import { migrate } from '../../gateway/auth/migrate.ts';
import { Keys } from '../../gateway/keys.ts';
import { DATABASE_URL, dropRedisPrefix, dropSchema, redisClient } from '../helpers/cleanup.ts';

const tag = randomUUID().slice(0, 8);
const SCHEMA = `gwtest_${tag}`;
const keys = new Keys(`gwtest:${tag}:`);
const redis = redisClient();
let db: Db;
let userId: string;

before(async () => {
  await migrate({ url: DATABASE_URL, schema: SCHEMA, direction: 'up' });
  db = createDb({
    url: DATABASE_URL,
    schema: SCHEMA,
    statementTimeoutMs: 5000,
    connectTimeoutMs: 5000,
    queryTimeoutMs: 10_000,
    max: 2,
  });
  userId = randomUUID();
  await db.pool.query(
    `INSERT INTO users (id, username, email, password_hash) VALUES ($1, 'lost${tag}', 'lost${tag}@example.com', 'x')`,
    [userId],
  );
});
after(async () => {
  await db?.pool.end().catch(() => {});
  redis.disconnect();
  await dropRedisPrefix(keys.prefix);
  await dropSchema(SCHEMA);
});

/** `n` open rows made `ageMinutes` ago, their ids sorted. */
async function rows(n: number, ageMinutes: number): Promise<string[]> {
  const ids = Array.from({ length: n }, () => randomUUID()).sort();
  for (const id of ids) {
    await db.pool.query(
      `INSERT INTO sessions (id, user_id, ip, created_at, last_seen_at)
       VALUES ($1, $2, '127.0.0.1', now() - $3 * interval '1 minute', now() - $3 * interval '1 minute')`,
      [id, userId, ageMinutes],
    );
  }
  return ids;
}

async function openOf(ids: string[]): Promise<string[]> {
  const r = await db.pool.query<{ id: string }>(
    'SELECT id FROM sessions WHERE id = ANY($1::uuid[]) AND ended_at IS NULL ORDER BY id',
    [ids],
  );
  return r.rows.map(({ id }) => id);
}

test('a batch a run in the order of the ids, on from the cursor, back to the start after the last; young rows unread', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.auditCheckCursor);
  const old = await rows(7, 60);
  const young = await rows(2, 1);
  const run = () => endLostSessions({ pool: db.pool, redis, keys }, 3);
  const first = await run();
  assert.deepEqual(first.ended, old.slice(0, 3), 'the first three ids');
  assert.equal(first.checked, 3);
  assert.equal(await redis.get(keys.auditCheckCursor), old[2], 'the cursor at the last row read');
  assert.deepEqual((await run()).ended, old.slice(3, 6), 'the next three');
  const third = await run();
  assert.deepEqual(third.ended, old.slice(6), 'the last one');
  assert.equal(third.checked, 1, 'the young rows are not read');
  assert.equal(
    await redis.get(keys.auditCheckCursor),
    '00000000-0000-0000-0000-000000000000',
    'back to the start',
  );
  // A row made since, before the old cursor in id order, is read in the next pass.
  const late = await rows(1, 60);
  const fourth = await run();
  assert.deepEqual(fourth.ended, late, 'the new row, on the next pass');
  assert.deepEqual(await openOf(young), young, 'the young rows stay open');
  assert.deepEqual(await openOf(old), [], 'every old row ended');
});

test('with more ends owed than it reads, a run ends nothing; once they are written, it does', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.auditCheckCursor);
  const old = await rows(2, 60);
  // 100,001 owed ends of other sessions (PostgreSQL failing for long).
  for (let i = 0; i < 100_001; i += 10_000) {
    const args: (string | number)[] = [];
    for (let j = i; j < Math.min(i + 10_000, 100_001); j++) args.push(j, `${randomUUID()} logout ${j}`);
    await redis.zadd(keys.auditOwed, ...args);
  }
  const held = await endLostSessions({ pool: db.pool, redis, keys }, 10);
  assert.deepEqual(held, { checked: 2, ended: [], deferred: 2 }, 'read, left open');
  assert.deepEqual(await openOf(old), old);
  await redis.del(keys.auditOwed);
  const done = await endLostSessions({ pool: db.pool, redis, keys }, 10);
  assert.deepEqual(done.ended, old, 'ended on the next pass');
});

test('live sessions against their rows: a run reads a batch of the expiry index from its cursor, returns those whose rows are ended, and wraps', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.resurrectCheckCursor, keys.sessionExpiries);
  // Past 128 members a sorted set is a hash table, which ZSCAN reads a part at a time.
  const open = await rows(300, 60);
  const ended = await rows(3, 60);
  await db.pool.query(
    "UPDATE sessions SET ended_at = now(), end_reason = 'logout' WHERE id = ANY($1::uuid[])",
    [ended],
  );
  // Every one in the index, with one member that is not a session id (never looked up).
  for (const sid of [...open, ...ended]) await redis.zadd(keys.sessionExpiries, Date.now() + 60_000, sid);
  await redis.zadd(keys.sessionExpiries, Date.now(), 'not-a-session');
  const found: string[] = [];
  let checked = 0;
  let runs = 0;
  for (; runs < 1000; runs++) {
    const r = await sessionsResurrected({ pool: db.pool, redis, keys }, 10, async () => true);
    found.push(...r.ended);
    checked += r.checked;
    if ((await redis.get(keys.resurrectCheckCursor)) === '0') break;
  }
  assert.equal(await redis.get(keys.resurrectCheckCursor), '0', 'the cursor back at the start after a pass');
  assert.deepEqual([...new Set(found)].sort(), ended, 'the sessions whose rows are ended, and no other');
  assert.ok(checked >= 303, `every session read at least once (${checked})`);
  assert.ok(runs >= 10, `a pass took several runs (${runs + 1})`);
});

test('an end that fails leaves the cursor where it was: the batch is read again', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.resurrectCheckCursor, keys.sessionExpiries);
  // Every one ended, past 128 (a hash table, read a part at a time).
  const ended = await rows(150, 60);
  await db.pool.query("UPDATE sessions SET ended_at = now(), end_reason = 'logout'");
  for (const sid of ended) await redis.zadd(keys.sessionExpiries, Date.now() + 60_000, sid);
  // The first batch a run from the start reads.
  const [, flat] = await redis.zscan(keys.sessionExpiries, '0', 'COUNT', 10);
  const first = flat.filter((_, i) => i % 2 === 0).sort();
  await assert.rejects(
    sessionsResurrected({ pool: db.pool, redis, keys }, 10, async () => {
      throw new Error('Redis refused the end');
    }),
    /Redis refused the end/,
  );
  const tried: string[] = [];
  await sessionsResurrected({ pool: db.pool, redis, keys }, 10, async (sid) => {
    tried.push(sid);
    return true;
  });
  assert.deepEqual(tried.sort(), first, 'the same batch again');
});

test('four runs at once (sweeps on two nodes, one late) over the same lost rows: each row ended once', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.auditCheckCursor);
  const lost = await rows(12, 60);
  const runs = await Promise.all(
    Array.from({ length: 4 }, () => endLostSessions({ pool: db.pool, redis, keys }, 100)),
  );
  const ended = runs.flatMap((r) => r.ended);
  assert.deepEqual(ended.sort(), lost, 'every lost row ended, by one run each');
  assert.deepEqual(await openOf(lost), []);
});

test('PostgreSQL or Redis gone: a run fails, ends nothing and leaves the cursor; the next one does it', async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.set(keys.auditCheckCursor, '00000000-0000-0000-0000-000000000000');
  const lost = await rows(3, 60);
  // Nothing listens on port 1: refused at once.
  const deadPg = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/test', max: 1 });
  deadPg.on('error', () => {});
  const deadRedis = redisClient('redis://127.0.0.1:1', {
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
  });
  deadRedis.on('error', () => {});
  try {
    await assert.rejects(endLostSessions({ pool: deadPg, redis, keys }, 10), 'PostgreSQL gone');
    await assert.rejects(
      sessionsResurrected({ pool: deadPg, redis, keys }, 10, async () => true),
      'PostgreSQL gone',
    );
    await assert.rejects(endLostSessions({ pool: db.pool, redis: deadRedis, keys }, 10), 'Redis gone');
  } finally {
    await deadPg.end().catch(() => {});
    deadRedis.disconnect();
  }
  assert.deepEqual(await openOf(lost), lost, 'nothing ended');
  assert.equal(
    await redis.get(keys.auditCheckCursor),
    '00000000-0000-0000-0000-000000000000',
    'the cursor left',
  );
  assert.deepEqual((await endLostSessions({ pool: db.pool, redis, keys }, 10)).ended, lost, 'the next run');
});

test("a node's first run, with another command of the node auto-pipelined in the same tick: it runs", async () => {
  await db.pool.query('DELETE FROM sessions');
  await redis.del(keys.auditCheckCursor);
  const lost = await rows(2, 60);
  // A client as the gateway's (auto-pipelined) that has not run the check yet, and a command
  // of another part of the node sent in the tick PostgreSQL's answer comes in: it opens the
  // tick's pipeline before the check's script is sent. Before, the script was defined as an
  // ioredis command at its first call, after that pipeline was made, and the call threw.
  const fresh = redisClient(undefined, { enableAutoPipelining: true });
  const pool = {
    query: async (...args: Parameters<pg.Pool['query']>) => {
      const r = await (db.pool.query as (...a: unknown[]) => Promise<unknown>)(...args);
      void fresh.get(keys.auditCheckCursor);
      return r;
    },
  } as unknown as pg.Pool;
  try {
    assert.deepEqual((await endLostSessions({ pool, redis: fresh, keys }, 10)).ended, lost);
  } finally {
    fresh.disconnect();
  }
});
