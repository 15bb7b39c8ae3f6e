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
