/** Removes what a test left in Redis (its key prefix) and PostgreSQL (its schema). */
import { Redis, type RedisOptions } from 'ioredis';
import pg from 'pg';
import { DEADLINE_MS } from './deadline.ts';

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
export const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

/**
 * A test's own Redis client (the shared server's unless `url` names another): every command has
 * the default deadline, so a read from a Redis that hangs fails the test instead of hanging it.
 */
export function redisClient(url = REDIS_URL, options: RedisOptions = {}): Redis {
  return new Redis(url, { commandTimeout: DEADLINE_MS, ...options });
}

export async function dropRedisPrefix(prefix: string): Promise<void> {
  const r = redisClient();
  try {
    let cursor = '0';
    do {
      const [next, keys] = await r.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length) await r.unlink(...keys);
    } while (cursor !== '0');
  } finally {
    r.disconnect();
  }
}

export async function dropSchema(schema: string): Promise<void> {
  const c = new pg.Client({ connectionString: DATABASE_URL });
  await c.connect();
  try {
    await c.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  } finally {
    await c.end();
  }
}

/**
 * How many backends whose query is like `like` wait on a lock that backend `holderPid` holds
 * (`pg_blocking_pids`): a test's own waiters, whatever schema. The suite may run twice at once
 * on one PostgreSQL; a count of the backends waiting on any lock, picked by their query's text
 * alone, took another copy's waiters for the test's own (an audit-owed case froze Redis with four
 * of its five logins at their INSERT, 3 copies of it at once).
 */
export async function blockedBy(holderPid: number, like: string, url = DATABASE_URL): Promise<number> {
  const r = await query(
    'public',
    'SELECT count(*)::int AS n FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid)) AND query LIKE $2',
    [holderPid, like],
    url,
  );
  return r.rows[0].n as number;
}

/** The backend pid of a connected client (for `blockedBy`). */
export async function backendPid(c: pg.Client | pg.PoolClient): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

/** A query against a test's schema. */
export async function query(
  schema: string,
  sql: string,
  params: unknown[] = [],
  url = DATABASE_URL,
): Promise<pg.QueryResult> {
  const c = new pg.Client({ connectionString: url, options: `-c search_path=${schema}` });
  await c.connect();
  try {
    return await c.query(sql, params);
  } finally {
    await c.end();
  }
}
