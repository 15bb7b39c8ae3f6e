/**
 * The audit rows of logins that failed while their session was being made in Redis, or after.
 *
 * A login writes its session's audit row (PostgreSQL `sessions`) before it makes the session
 * in Redis. When Redis refuses that step, or does not answer it in time, the login is answered
 * with an error and the row would stay open for good: an audit of a session that never was.
 * Such a session is noted here, and the node looks for it in Redis, on the same connection
 * after the step that failed, so that Redis answers after running that step if it runs it at
 * all (a reply lost to a timeout), and after resending it if its connection was cut:
 * - the session is there: it was made after all, and nobody holds its tokens (the login was
 *   answered with an error): it is ended (`endUnstarted`, in IdentityService), its row kept
 *   with that end. Kept, it lived a day in the account's session list, got the account's
 *   events to report failed when it ran out, and, made after a later login of the same device
 *   (a Redis that ran the two logins' steps out of order at a thaw), held the device's key: the
 *   device's events went to it instead of the device;
 * - it is not: it never will be, and the row is deleted.
 * A look-up, an end or a deletion that fails is tried again from the node's sweep, once a second,
 * until one succeeds. A node killed with some still noted leaves their rows open, until the sweep
 * ends them `lost` (lost-sessions.ts).
 *
 * A login whose row's `INSERT` the node stopped waiting for (its query timeout, a connection
 * lost) may have its row written after all, once PostgreSQL gets to it: its session is noted
 * to be settled only after PostgreSQL's statement_timeout, by which time the statement has run
 * or been cancelled (not if PostgreSQL stopped running anything, frozen, for longer).
 */
import type { Redis } from 'ioredis';
import type pg from 'pg';
import { logFailure } from '../faults.ts';
import type { Keys } from '../keys.ts';
import type { Logger } from '../log.ts';

/** Sessions looked up per round. */
const BATCH = 1000;
/** Sessions noted at most; past it the oldest is dropped, its row left open (logged). */
const MAX_PENDING = 100_000;
/** How often a failed round is tried again, ms. */
const RETRY_MS = 1000;

export class UnstartedSessions {
  /** Session id → from when it is settled (ms). */
  private readonly pending = new Map<string, number>();
  private running: Promise<void> | undefined;
  private triedAt = 0;

  constructor(
    private readonly deps: {
      redis: Redis;
      pool: pg.Pool;
      keys: Keys;
      log: Logger;
      /** Ends a session made after its login failed; absent: it is kept. */
      endUnstarted?: (sid: string) => Promise<unknown>;
    },
    private readonly maxPending = MAX_PENDING,
  ) {}

  /** Sessions noted and not yet settled. */
  get size(): number {
    return this.pending.size;
  }

  /**
   * A login failed making session `sid`, whose audit row is written or may yet be: settle it
   * from `from` (ms; now by default).
   */
  add(sid: string, from = Date.now()): void {
    this.pending.set(sid, from);
    if (this.pending.size > this.maxPending) {
      const [oldest] = this.pending.keys();
      this.pending.delete(oldest);
      this.deps.log.warn(
        { sessionId: oldest },
        'audit row of a failed login left open: too many failed logins waiting for Redis',
      );
    }
    if (from <= Date.now()) void this.run();
  }

  /** From the node's sweep: a round failed before is tried again, at most once a second. */
  tick(now: number): void {
    if (this.pending.size > 0 && now - this.triedAt >= RETRY_MS) void this.run(now);
  }

  /** One round at a time; resolves when it is done, whatever became of it. */
  run(now = Date.now()): Promise<void> {
    if (this.running) return this.running;
    this.triedAt = now;
    this.running = this.round()
      .catch(() => {})
      .finally(() => {
        this.running = undefined;
      });
    return this.running;
  }

  private async round(): Promise<void> {
    const { redis, pool, keys, log } = this.deps;
    for (;;) {
      const now = Date.now();
      const sids: string[] = [];
      for (const [sid, from] of this.pending) {
        if (from > now) continue;
        sids.push(sid);
        if (sids.length === BATCH) break;
      }
      if (sids.length === 0) return;
      let exists: number[];
      try {
        exists = await Promise.all(sids.map((sid) => redis.exists(keys.session(sid))));
      } catch (e) {
        logFailure(
          log,
          e,
          { sessions: this.pending.size },
          'failed logins not settled yet: Redis did not answer',
        );
        return;
      }
      const made = sids.filter((_, i) => exists[i] === 1);
      const never = sids.filter((_, i) => exists[i] !== 1);
      if (made.length > 0) {
        try {
          for (const sid of made) {
            await this.deps.endUnstarted?.(sid);
            this.pending.delete(sid);
          }
        } catch (e) {
          logFailure(
            log,
            e,
            { sessions: this.pending.size },
            'failed logins not settled yet: a session made after all not ended',
          );
          return;
        }
        log.info(
          { sessions: made.length },
          this.deps.endUnstarted
            ? 'sessions of failed logins made after all: ended'
            : 'sessions of failed logins made after all: their audit rows kept',
        );
      }
      if (never.length === 0) continue;
      try {
        const r = await pool.query('DELETE FROM sessions WHERE id = ANY($1::uuid[]) AND ended_at IS NULL', [
          never,
        ]);
        for (const sid of never) this.pending.delete(sid);
        log.info(
          { sessions: never.length, deleted: r.rowCount },
          'audit rows of failed logins deleted: their sessions were never made',
        );
      } catch (e) {
        logFailure(
          log,
          e,
          { sessions: this.pending.size },
          'failed logins not settled yet: PostgreSQL did not answer',
        );
        return;
      }
    }
  }
}
