/**
 * The audit trail and Redis, made to agree by the cluster-wide sweep: open audit rows whose
 * sessions are gone from Redis with no end recorded anywhere are ended `lost`
 * (endLostSessions), and live sessions whose rows say they ended, which a Redis rolled back
 * brings back, are ended again (sessionsResurrected, below).
 *
 * A session's audit row is opened by its login and ended by whatever ends the session: a
 * removal or the expiry sweep, each of which records the end as owed in Redis in the same step
 * (keys.ts auditOwed) until the row is written. A session can still leave Redis with no end
 * recorded:
 *
 * - Redis lost it: a restart without persistence, a failover to a replica that had not got it,
 *   a rollback to an earlier snapshot, a `FLUSHALL`. The node kicks its connection
 *   (`kickGone`), but nothing ends its row.
 * - A login whose session Redis did not make, on a node killed before it could ask Redis
 *   whether it was made (unstarted.ts deletes those rows on a live node).
 * - A session made or last extended by a node of an earlier version, which kept no expiry
 *   index: it runs out unnoticed.
 *
 * Each left an audit row open for good: a session the audit trail calls live that no device
 * can use. The sweep reads a batch of open rows per run, in the order of their ids, from a
 * cursor kept in Redis, so that a run goes on where the last one stopped and the whole table is
 * read over and over, a batch per sweep. A row is ended when its session's hash is gone, it is
 * not in the expiry index (the expiry step ends those `expired`), no end of it is owed (its
 * node or the sweep writes that one), and it is older than AFTER_MS. Its `ended_at` is its
 * last sign of life (`last_seen_at`): when it was lost is not known.
 */
import type { Redis } from 'ioredis';
import type pg from 'pg';
import type { Keys } from '../keys.ts';
import { RedisScript } from '../redis-script.ts';
import { parseAuditOwed } from './session-store.ts';

/**
 * How old an open row must be for the check to end it. A login opens its row and then makes
 * its session; a Redis that froze between the two can run the `HSET` minutes later (unstarted.ts
 * settles those on a live node). Ten minutes is far past any login's wait and PostgreSQL's
 * statement timeout, and a fleet's sessions live hours.
 */
export const AFTER_MS = 10 * 60_000;

/** Past this many owed ends (PostgreSQL failing for long), a run ends nothing: it would read them all. */
const OWED_READ_MAX = 100_000;

/**
 * KEYS[1] the expiry index, KEYS[2..n+1] the rows' session hashes; ARGV[1..n] their ids.
 * Returns the 1-based positions of the rows whose hash is gone and that are not in the index:
 * one command for a batch. Two commands a row (`EXISTS`, `ZSCORE`, auto-pipelined) cost the node
 * ~20 µs of CPU a row, a run with the script ~5 µs a row all told (bench:audit-check).
 */
const GONE = new RedisScript(`
local out = {}
for i, sid in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 and not redis.call('ZSCORE', KEYS[1], sid) then
    out[#out + 1] = i
  end
end
return out
`);

/** The smallest uuid: the cursor's start. */
const FIRST = '00000000-0000-0000-0000-000000000000';

export interface LostCheck {
  /** Open rows read in this run. */
  checked: number;
  /** Of those, ended `lost`. */
  ended: string[];
  /** Rows left for a later run because too many ends are owed to tell them apart. */
  deferred: number;
}

/**
 * One run: reads up to `limit` open rows after the cursor, ends those whose sessions are lost,
 * and moves the cursor (back to the start after the last row).
 */
export async function endLostSessions(
  deps: { pool: pg.Pool; redis: Redis; keys: Keys },
  limit: number,
  afterMs = AFTER_MS,
): Promise<LostCheck> {
  const { pool, redis, keys } = deps;
  const cursor = (await redis.get(keys.auditCheckCursor)) ?? FIRST;
  // The partial index on open rows (migrations/1764000000003_lost_sessions.sql) keeps this a range read
  // however long the audit trail grows.
  const { rows } = await pool.query<{ id: string }>(
    `SELECT id FROM sessions
      WHERE ended_at IS NULL AND id > $1 AND created_at < now() - $2 * interval '1 millisecond'
      ORDER BY id LIMIT $3`,
    [cursor, afterMs, limit],
  );
  const next = rows.length < limit ? FIRST : rows[rows.length - 1]!.id;
  if (rows.length === 0) {
    if (cursor !== FIRST) await redis.set(keys.auditCheckCursor, next);
    return { checked: 0, ended: [], deferred: 0 };
  }
  // The hash and the index first (one script), then the owed ends: an end made between the two
  // reads is in the second (a removal's MULTI and the expiry script each take the session out of
  // the first and put its end in the second in one step), and one written and forgotten since
  // has ended its row, which the UPDATE below leaves as it is.
  const ids = rows.map(({ id }) => id);
  const positions = (await GONE.run(
    redis,
    [keys.sessionExpiries, ...ids.map((id) => keys.session(id))],
    ids,
  )) as number[];
  let gone = positions.map((i) => ids[i - 1]!);
  let deferred = 0;
  if (gone.length > 0) {
    const owedCount = await redis.zcard(keys.auditOwed);
    if (owedCount > OWED_READ_MAX) {
      deferred = gone.length;
      gone = [];
    } else if (owedCount > 0) {
      const owed = new Set<string>();
      for (const m of await redis.zrange(keys.auditOwed, '0', '-1')) {
        const end = parseAuditOwed(m);
        if (end) owed.add(end.sid);
      }
      gone = gone.filter((id) => !owed.has(id));
    }
  }
  let ended: string[] = [];
  if (gone.length > 0) {
    const r = await pool.query<{ id: string }>(
      `UPDATE sessions SET ended_at = greatest(last_seen_at, created_at), end_reason = 'lost'
        WHERE id = ANY($1::uuid[]) AND ended_at IS NULL RETURNING id`,
      [gone],
    );
    ended = r.rows.map(({ id }) => id);
  }
  // Deferred rows are read again on the next pass over the table.
  await redis.set(keys.auditCheckCursor, next);
  return { checked: rows.length, ended, deferred };
}

/** What `sessionsResurrected` did in one run. */
export interface ResurrectedCheck {
  /** Live sessions (expiry index entries) read in this run. */
  checked: number;
  /** Of those, sessions whose audit row is ended, which `end` ended in Redis again. */
  ended: string[];
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * The other direction: live sessions in Redis whose audit row says they ended. An end takes
 * the session out of Redis before its row is written, so this is never so in a running fleet;
 * it is what a Redis rolled back (restored from a backup, a failover to a replica behind) leaves:
 * the sessions logged out, revoked or taken over since the snapshot come back to life, their
 * access and refresh tokens valid again (a stolen device's revoked session among them). One run
 * reads `limit` entries of the expiry index (ZSCAN from a cursor kept in Redis, wrapping at the
 * end) and has `end` end again those whose rows are ended (the row keeps its end: `AND ended_at
 * IS NULL`); `end` says whether it found the session to end. A session ended between the two
 * reads is already out of Redis, and ending it again changes nothing. The cursor moves on once
 * every end is done: a failure leaves the batch to be read again. Sessions made by nodes of an
 * earlier version are not in the index, and not read.
 */
export async function sessionsResurrected(
  deps: { pool: pg.Pool; redis: Redis; keys: Keys },
  limit: number,
  end: (sessionId: string) => Promise<boolean>,
): Promise<ResurrectedCheck> {
  const { pool, redis, keys } = deps;
  const cursor = (await redis.get(keys.resurrectCheckCursor)) ?? '0';
  const [next, flat] = await redis.zscan(keys.sessionExpiries, cursor, 'COUNT', limit);
  const ids: string[] = [];
  for (let i = 0; i < flat.length; i += 2) if (UUID.test(flat[i]!)) ids.push(flat[i]!);
  const ended: string[] = [];
  if (ids.length > 0) {
    const r = await pool.query<{ id: string }>(
      'SELECT id FROM sessions WHERE id = ANY($1::uuid[]) AND ended_at IS NOT NULL',
      [ids],
    );
    for (const { id } of r.rows) if (await end(id)) ended.push(id);
  }
  await redis.set(keys.resurrectCheckCursor, next);
  return { checked: ids.length, ended };
}
