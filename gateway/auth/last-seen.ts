/**
 * When a session and a device were last resumed, for PostgreSQL's records (`sessions.last_seen_at`
 * and `ip`, `devices.last_seen`), written off the resume's path: `session` and `device` cost a
 * Map set, and `tick` (the node's sweep) writes what was noted, at most once per `everyMs`, in one
 * statement per table for the whole batch.
 *
 * So a token `resume` needs no PostgreSQL: a fleet that reconnects while PostgreSQL is down or
 * frozen (a failover, a restart) gets its sessions back from Redis, and a reconnect storm of N
 * devices costs PostgreSQL a few statements a second instead of N to 2N. (The device's ownership
 * needs no check at a resume of the session's own device: it was checked when the session
 * started, and a device id never changes owner.) What is noted and not yet written is kept
 * through an outage, newest time per row, up to `maxPending` rows (beyond, the oldest noted are
 * dropped, and counted in the log line); a process that dies loses at most one interval of it.
 * These columns are records for operators: no code reads them back.
 *
 * It also keeps the ends of sessions whose audit row PostgreSQL did not take when the session
 * ended (`ended`: `ended_at`, `end_reason`), written with the next batch until one succeeds, at
 * the time the session ended; before, such a row stayed open for good unless an operator set it
 * from the log. A row already ended keeps its end. The ends of expired sessions, which the sweep
 * finds by the hundred, are written this way from the start.
 *
 * Every end is also owed in Redis until its row is written (keys.ts auditOwed, recorded in the
 * step that ends the session), so that a node that dies first leaves it to the cluster-wide
 * sweep (`writeOwedEnds`) rather than losing it. Once a row is written here or by the end
 * itself (`written`), its member is removed with the next batch (`forget`, one `ZREM` for all).
 *
 * The same statement that writes the resumed sessions' times reads which of their rows are
 * ended, and hands those sessions to `ended`. A session is taken out of Redis before its row is
 * ended, so a live session with an ended row is one a Redis rolled back brought to life (restored
 * from a backup, a failover to a replica behind): a logged-out or revoked device's tokens valid
 * again. Its first resume, refresh or token use after the rollback is then seen within one interval, and
 * the session ended again, instead of when the sweep's pass over every session reaches it
 * (lost-sessions.ts, sessionsResurrected). A resumed session's row is not written past its end.
 * The sessions whose access tokens are used (`check`: an HTTP request, a back end's validation)
 * are read in the same statement, at most once per `CHECK_EVERY_MS` each on a node, so that a
 * revived session's access token is refused within seconds of its first use too.
 */
import type pg from 'pg';
import { logFailure } from '../faults.ts';
import type { Logger } from '../log.ts';
import { Throttle } from '../throttle.ts';

interface SessionSeen {
  ip: string;
  at: number;
}

interface SessionEnd {
  reason: string;
  at: number;
  /** Noted because PostgreSQL refused it when the session ended (logged once written). */
  late: boolean;
  /** Its `auditOwed` member in Redis, removed once the row is written. */
  audit?: string;
}

/** A session's access-token uses have its row read for an end at most this often on a node, ms. */
export const CHECK_EVERY_MS = 10_000;

/** `auditOwed` members forgotten in one call at most (the rest with the next batch). */
const FORGET_BATCH = 5000;

/**
 * Writes session ends (id → reason and time) to their audit rows in one statement; a row
 * already ended keeps its end. Returns how many rows it ended.
 */
export async function writeEnds(
  pool: pg.Pool,
  ends: Map<string, Pick<SessionEnd, 'reason' | 'at'>>,
): Promise<number> {
  const rows = byId(ends);
  const res = await pool.query(
    `UPDATE sessions s SET ended_at = to_timestamp(v.at), end_reason = v.reason
     FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS v(id, reason, at)
     WHERE s.id = v.id AND s.ended_at IS NULL`,
    [rows.map(([id]) => id), rows.map(([, e]) => e.reason), rows.map(([, e]) => e.at / 1000)],
  );
  return res.rowCount ?? 0;
}

/**
 * A batch's rows in id order. A statement over a batch locks its rows in the batch's order once
 * the table is large enough for PostgreSQL to look them up one by one, and two nodes' batches
 * over the same rows in two orders deadlocked: one failed (`deadlock detected`, logged as an
 * error) and was written a second later (test/gateway/last-seen.test.ts, the times and the
 * devices; the ends' statement did not deadlock there, and is sorted all the same). In one
 * order, the second waits for the first.
 */
function byId<V>(m: Map<string, V>): [string, V][] {
  return [...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

export class LastSeen {
  private sessions = new Map<string, SessionSeen>();
  private devices = new Map<string, number>();
  /** Sessions whose rows are read for an end with the next write (`check`), not written. */
  private checks = new Set<string>();
  /** When each session was last taken for a check. */
  private readonly checkedAt: Throttle;
  private ends = new Map<string, SessionEnd>();
  /** `auditOwed` members whose rows are written, to be removed from Redis. */
  private forgetting = new Set<string>();
  private writing: Promise<void> | undefined;
  private lastWriteAt = 0;
  private dropped = 0;

  constructor(
    private readonly pool: pg.Pool,
    private readonly log: Logger,
    private readonly everyMs = 1000,
    private readonly maxPending = 100_000,
    private readonly hooks: {
      /** Removes written ends' `auditOwed` members from Redis; absent: none kept. */
      forget?: (members: string[]) => Promise<unknown>;
      /** Sessions noted as resumed whose audit rows are ended (see above). */
      ended?: (sessionIds: string[]) => void;
    } = {},
  ) {
    this.checkedAt = new Throttle(CHECK_EVERY_MS, maxPending);
  }

  /** A session resumed from `ip` now. */
  session(sessionId: string, ip: string, at = Date.now()): void {
    this.sessions.delete(sessionId);
    this.sessions.set(sessionId, { ip, at });
    this.bound(this.sessions);
  }

  /**
   * A session's access token was used now (its connection is not: a resumed connection's session
   * is noted by `session`): its row is read with the next write, at most once per
   * `CHECK_EVERY_MS` per session, and it goes to `ended` if the row is ended. `force`: read with
   * the next write whatever the last check (an end of it that failed, tried again).
   */
  check(sessionId: string, at = Date.now(), force = false): void {
    if (!this.checkedAt.take(sessionId, at) && !force) return;
    this.checks.add(sessionId);
    this.boundChecks();
  }

  /** A device's session resumed now. */
  device(deviceId: string, at = Date.now()): void {
    this.devices.delete(deviceId);
    this.devices.set(deviceId, at);
    this.bound(this.devices);
  }

  /**
   * A session ended at `at` whose audit row PostgreSQL refused (`late`), or one whose end is
   * written only here (an expired session's, found by the sweep): written with the next batches
   * until PostgreSQL takes it. Beyond `maxPending` the oldest are dropped, each logged with its
   * id and reason (givenUp: left to the sweep when owed in Redis, or for an operator to set).
   */
  ended(sessionId: string, reason: string, at = Date.now(), late = true, audit?: string): void {
    this.ends.set(sessionId, { reason, at, late, ...(audit ? { audit } : {}) });
    this.boundEnds();
  }

  /** An end's row was written by the end itself: its `auditOwed` member goes with the next batch. */
  written(audit: string): void {
    if (!this.hooks.forget) return;
    this.forgetting.add(audit);
    // Beyond the bound (Redis refusing the removals for long), the oldest are left owed: the
    // sweep writes them again, which changes nothing, and removes them.
    while (this.forgetting.size > this.maxPending) {
      this.forgetting.delete(this.forgetting.values().next().value as string);
    }
  }

  /** Rows noted and not yet written, and written ends not yet forgotten in Redis. */
  get pending(): number {
    return this.sessions.size + this.checks.size + this.devices.size + this.ends.size + this.forgetting.size;
  }

  /** From the node's sweep: writes what was noted if `everyMs` has passed since the last write. */
  tick(now: number): void {
    if (this.writing || this.pending === 0 || now - this.lastWriteAt < this.everyMs) return;
    this.lastWriteAt = now;
    void this.flush();
  }

  /** Writes what was noted (one write at a time); a failed write keeps it for the next. */
  flush(): Promise<void> {
    this.writing ??= this.write().finally(() => {
      this.writing = undefined;
    });
    return this.writing;
  }

  private bound<V>(m: Map<string, V>): void {
    // Oldest noted first (a Map keeps insertion order, and a row noted again moves to the end).
    while (m.size > this.maxPending) {
      m.delete(m.keys().next().value as string);
      this.dropped++;
    }
  }

  private boundChecks(): void {
    while (this.checks.size > this.maxPending) {
      this.checks.delete(this.checks.values().next().value as string);
      this.dropped++;
    }
  }

  private boundEnds(): void {
    while (this.ends.size > this.maxPending) {
      const [id, end] = this.ends.entries().next().value as [string, SessionEnd];
      this.ends.delete(id);
      this.givenUp(id, end);
    }
  }

  /**
   * An end this node will not write: one owed in Redis is left to the cluster-wide sweep;
   * another is logged with what an operator needs to set it by hand.
   */
  private givenUp(sessionId: string, end: SessionEnd): void {
    const fields = { sessionId, reason: end.reason, endedAt: new Date(end.at).toISOString() };
    if (end.audit && this.hooks.forget)
      this.log.warn(fields, 'session end not written by this node, left to the sweep');
    else this.log.error(fields, 'session end not written to PostgreSQL');
  }

  private async write(): Promise<void> {
    const sessions = this.sessions;
    const devices = this.devices;
    const checks = this.checks;
    const ends = this.ends;
    this.sessions = new Map();
    this.devices = new Map();
    this.checks = new Set();
    this.ends = new Map();
    this.checkedAt.prune(Date.now());
    if (ends.size > 0) {
      try {
        await writeEnds(this.pool, ends);
        let late = 0;
        for (const end of ends.values()) {
          if (end.late) late++;
          if (end.audit) this.written(end.audit);
        }
        if (late > 0) this.log.info({ sessions: late }, 'session ends written to PostgreSQL after a failure');
      } catch (e) {
        for (const [id, end] of ends) if (!this.ends.has(id)) this.ends.set(id, end);
        this.boundEnds();
        logFailure(this.log, e, { ends: this.ends.size }, 'session ends not written to PostgreSQL yet');
      }
    }
    try {
      if (sessions.size > 0 || checks.size > 0) {
        const ids: string[] = [];
        const ips: string[] = [];
        const ats: number[] = [];
        for (const [id, s] of byId(sessions)) {
          ids.push(id);
          ips.push(s.ip);
          ats.push(s.at / 1000);
        }
        const read = [...ids];
        for (const id of checks) if (!sessions.has(id)) read.push(id);
        // Never back in time: a row another node wrote later keeps its time. An ended row keeps
        // its times, and is read: its session was resumed, or its token used, after it ended.
        // The read is a look-up by primary key per id (a subplan), whatever the batch's size. As
        // a join or `= ANY`, PostgreSQL's cost model (a look-up priced as a read from disk) took a
        // scan of the whole table for a batch of thousands while the table was a few million
        // rows: bench:audit-check, 10,000 ids against 1.1 million rows, 146-218 ms against 48-54.
        const r = await this.pool.query<{ id: string }>(
          `WITH v AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS v(id, ip, at)),
           u AS (UPDATE sessions s SET last_seen_at = to_timestamp(v.at), ip = v.ip FROM v
                 WHERE s.id = v.id AND s.ended_at IS NULL AND s.last_seen_at < to_timestamp(v.at))
           SELECT r.id FROM unnest($4::uuid[]) AS r(id)
            WHERE (SELECT s.ended_at FROM sessions s WHERE s.id = r.id) IS NOT NULL`,
          [ids, ips, ats, read],
        );
        sessions.clear();
        checks.clear();
        if (r.rows.length > 0) this.hooks.ended?.(r.rows.map(({ id }) => id));
      }
      if (devices.size > 0) {
        const rows = byId(devices);
        await this.pool.query(
          `UPDATE devices d SET last_seen = to_timestamp(v.at)
           FROM unnest($1::text[], $2::float8[]) AS v(id, at)
           WHERE d.id = v.id AND d.last_seen < to_timestamp(v.at)`,
          [rows.map(([id]) => id), rows.map(([, at]) => at / 1000)],
        );
        devices.clear();
      }
    } catch (e) {
      // Kept for the next write, unless noted again since (the newer time wins).
      for (const [id, s] of sessions) if (!this.sessions.has(id)) this.sessions.set(id, s);
      for (const id of checks) this.checks.add(id);
      for (const [id, at] of devices) if (!this.devices.has(id)) this.devices.set(id, at);
      this.bound(this.sessions);
      this.bound(this.devices);
      this.boundChecks();
      logFailure(
        this.log,
        e,
        { pending: this.pending, dropped: this.dropped },
        'last-seen times not written yet',
      );
    }
    if (this.hooks.forget && this.forgetting.size > 0) {
      const members = [...this.forgetting].slice(0, FORGET_BATCH);
      try {
        await this.hooks.forget(members);
        for (const m of members) this.forgetting.delete(m);
      } catch (e) {
        // Kept for the next batch; owed a while longer, they cost only a second write.
        logFailure(
          this.log,
          e,
          { ends: this.forgetting.size },
          'written session ends not yet forgotten in Redis',
        );
      }
    }
  }

  /**
   * Writes what is pending (at shutdown); a failure is logged, not thrown, and each session end
   * still not written is logged with its id and reason (givenUp: left to the sweep, or for an
   * operator to set).
   */
  async close(): Promise<void> {
    await this.flush();
    if (this.pending > 0) await this.flush();
    for (const [id, end] of this.ends) this.givenUp(id, end);
  }
}
