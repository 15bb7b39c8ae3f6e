/**
 * A failure budget (the account lockout, the per-IP login budget, the wrong email codes per
 * address): `points` failures per key in a window of `durationSeconds` from the first, counted
 * in Redis (`Prl:<name>:<key>`, a count with a TTL).
 *
 * An attempt reserves its point before it is verified, so attempts in flight count and
 * concurrent guesses cannot get past the budget (docs/ARCHITECTURE.md, "Login limits"). What
 * the reservation becomes once the attempt is verified:
 * - a failure keeps the point (`failed`); with `lockWhenSpent`, the one that makes the failures
 *   alone (not counting attempts still in flight) reach the points locks the key for the whole
 *   window from now;
 * - a success gives it back, or clears the key (`succeeded`);
 * - an attempt that could not be verified gives it back (`release`).
 *
 * A refused reservation takes nothing: the check and the count are one script. Before, with
 * rate-limiter-flexible's `consume`, every refused attempt stayed counted and only a success
 * gave a point back, so a burst of more right logins from one address than its budget (a fleet
 * behind one NAT address) left the address refused for the rest of the window, each retry
 * counting once more. (Giving the point back after the refusal instead let a lock's count be
 * lowered by refusals made before it, and a sixth guess through a limit of five.)
 *
 * A refusal says when to come back (`retryAfter`). When the failures alone are within the
 * budget, the refusal is only the attempts in flight: a point comes back as soon as one of them
 * is verified, so the caller's hint (about one verification) is given, never more than the
 * window's end. Otherwise it is the window's end (or the lock's). Attempts in flight are counted
 * per key beside the budget (`Prl:<name>-inflight:<key>`, with a TTL, so that those of a
 * process that died are forgotten).
 *
 * A settlement Redis refused unsent (it was down when the attempt was verified) is owed, and
 * sent again by `settleOwed` (before the next reservation, and from the node's sweep) for as
 * long as its attempt would count as in flight. Before, the points of the attempts verified
 * during a Redis outage stayed as failures for the rest of the window: a fleet behind one
 * address, logging in when Redis restarted, found its address refused for up to a whole
 * window once their in-flight marks had expired, though none of them had failed.
 */
import type { Redis } from 'ioredis';
import { type ErrorCode, ProtocolError } from '../../protocol/index.ts';
import { neverSent } from '../faults.ts';
import type { Keys } from '../keys.ts';

/** How long an attempt in flight is counted at most: longer than a verification can take. */
export const IN_FLIGHT_TTL_MS = 120_000;

/**
 * KEYS[1] the count, KEYS[2] the attempts in flight; ARGV[1] points, ARGV[2] the window (ms),
 * ARGV[3] the in-flight TTL (ms). Returns {taken (1/0), the count (before the refused attempt),
 * ms to the window's end (when refused), in flight}. A refused attempt's INCR is undone in the
 * same call, so it is never seen.
 */
const RESERVE = `
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return {0, n - 1, redis.call('PTTL', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local f = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1, n, 0, f}
`;

/**
 * Settles a reservation. KEYS[1] the count, KEYS[2] the attempts in flight; ARGV[1] 'give'
 * (the point back), 'fail' (the point stays: a failure) or 'clear' (the count deleted);
 * ARGV[2] points, ARGV[3] the window (ms), ARGV[4] '1' when a spent budget locks. Returns 1
 * when this failure locked the key: the failures alone (the count less the attempts still in
 * flight) reach the points, and the count is set to them for a whole window from now.
 */
const SETTLE = `
-- A count at 0 stays until its TTL: one command fewer per attempt. Below 0, the key had
-- ended (its TTL) while the attempt was out.
local f = redis.call('DECR', KEYS[2])
if f < 0 then
  redis.call('DEL', KEYS[2])
  f = 0
end
local how = ARGV[1]
if how == 'give' then
  -- Not below 0: the window may have ended (and the key with it) while the attempt was out.
  if redis.call('DECR', KEYS[1]) < 0 then redis.call('DEL', KEYS[1]) end
elseif how == 'fail' then
  local n = tonumber(redis.call('GET', KEYS[1]) or '0')
  if ARGV[4] == '1' and n - f >= tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
  end
elseif how == 'clear' then
  redis.call('DEL', KEYS[1])
end
return 0
`;

type BudgetRedis = Redis & {
  gwBudgetReserve(
    count: string,
    inFlight: string,
    points: number,
    windowMs: number,
    inFlightTtlMs: number,
  ): Promise<number[]>;
  gwBudgetSettle(
    count: string,
    inFlight: string,
    how: string,
    points: number,
    windowMs: number,
    lock: string,
  ): Promise<number>;
};

export interface FailureBudgetOptions {
  /** The budget's name in its keys (`Prl:<name>:<key>`). */
  name: string;
  points: number;
  durationSeconds: number;
  /**
   * Whether the failure that spends the last point locks the key for a whole window from then
   * (the account lockout); otherwise the count ends with the window of its first failure.
   */
  lockWhenSpent: boolean;
  /** The error code of a refusal: `locked` or `rate_limited`. */
  code: Extract<ErrorCode, 'locked' | 'rate_limited'>;
  /** Its message. */
  message?: string;
  /** About how long until an attempt in flight is verified, ms (a refusal's hint). */
  retryHintMs: () => number;
}

/** The point an attempt holds while it is verified. */
export interface Reservation {
  /** A failure: the point stays. True when it spent the budget and locked the key. */
  failed(): Promise<boolean>;
  /** A success: the point is given back, or with `clear` the key's count starts again. */
  succeeded(clear?: boolean): Promise<void>;
  /** Not verified (e.g. `overloaded`): the point is given back. */
  release(): Promise<void>;
}

/** A settlement Redis refused unsent, to be sent again. */
interface Owed {
  count: string;
  inFlight: string;
  how: 'give' | 'fail' | 'clear';
  /** When its attempt was reserved (ms): owed until its in-flight mark would have expired. */
  reservedAt: number;
}

export class FailureBudget {
  private readonly redis: BudgetRedis;
  private readonly countPrefix: string;
  private readonly inFlightPrefix: string;
  private owed: Owed[] = [];
  private settling: Promise<number> | undefined;

  constructor(
    redis: Redis,
    keys: Keys,
    private readonly options: FailureBudgetOptions,
  ) {
    if (!('gwBudgetReserve' in redis)) {
      redis.defineCommand('gwBudgetReserve', { numberOfKeys: 2, lua: RESERVE });
      redis.defineCommand('gwBudgetSettle', { numberOfKeys: 2, lua: SETTLE });
    }
    this.redis = redis as BudgetRedis;
    this.countPrefix = `${keys.rateLimit(options.name)}:`;
    this.inFlightPrefix = `${keys.rateLimit(`${options.name}-inflight`)}:`;
  }

  /**
   * Takes a point for `key` before an attempt is verified; past the budget, the budget's code
   * with `retryAfter`, nothing taken. Redis errors are thrown as they are.
   */
  async reserve(key: string): Promise<Reservation> {
    const { points, durationSeconds } = this.options;
    const count = this.countPrefix + key;
    const inFlight = this.inFlightPrefix + key;
    const windowMs = durationSeconds * 1000;
    // What an outage left owed first, so that this attempt is not refused for points it holds;
    // reservations racing a run already under way wait for it too (it took the owed list).
    if (this.owed.length > 0 || this.settling) await this.settleOwed();
    const reservedAt = Date.now();
    const [taken, n, ttl, flying] = await this.redis.gwBudgetReserve(
      count,
      inFlight,
      points,
      windowMs,
      IN_FLIGHT_TTL_MS,
    );
    if (!taken) throw this.refused(n, ttl < 0 ? windowMs : ttl, flying);
    let settled = false;
    const settle = async (how: 'give' | 'fail' | 'clear') => {
      if (settled) return false;
      settled = true;
      try {
        return await this.send(count, inFlight, how);
      } catch (e) {
        if (neverSent(e)) this.owed.push({ count, inFlight, how, reservedAt });
        throw e;
      }
    };
    return {
      // The failure that spends the budget (the failures alone, not the attempts still in
      // flight, which may yet succeed) locks the key for the whole window from now: the count's
      // own window started at the first failure, and alone it would end the lock when that
      // window ends (four failures in its last seconds, locked for those seconds only).
      failed: () => settle('fail'),
      succeeded: async (clear = false) => {
        await settle(clear ? 'clear' : 'give');
      },
      release: async () => {
        await settle('give');
      },
    };
  }

  private async send(count: string, inFlight: string, how: Owed['how']): Promise<boolean> {
    const { points, durationSeconds, lockWhenSpent } = this.options;
    const locked = await this.redis.gwBudgetSettle(
      count,
      inFlight,
      how,
      points,
      durationSeconds * 1000,
      lockWhenSpent ? '1' : '0',
    );
    return locked === 1;
  }

  get name(): string {
    return this.options.name;
  }

  /** Settlements owed since an outage (see the header). */
  get owedCount(): number {
    return this.owed.length;
  }

  /**
   * Sends the owed settlements again, oldest first; keeps those Redis refuses unsent again,
   * drops those past their in-flight time and those whose outcome is unknown (a timeout: Redis
   * may run it yet). One run at a time; resolves to the number settled.
   */
  settleOwed(now = Date.now()): Promise<number> {
    if (this.settling) return this.settling;
    if (this.owed.length === 0) return Promise.resolve(0);
    const run = async () => {
      const owed = this.owed;
      this.owed = [];
      let settled = 0;
      for (let i = 0; i < owed.length; i++) {
        const o = owed[i];
        if (now - o.reservedAt >= IN_FLIGHT_TTL_MS) continue;
        try {
          await this.send(o.count, o.inFlight, o.how);
          settled++;
        } catch (e) {
          if (neverSent(e)) {
            // Still down: this one and the rest wait for the next try.
            this.owed = owed.slice(i).concat(this.owed);
            break;
          }
        }
      }
      return settled;
    };
    this.settling = run().finally(() => {
      this.settling = undefined;
    });
    return this.settling;
  }

  /** The refusal of a reservation: `count` taken, `flying` of them in flight. */
  private refused(count: number, toWindowEndMs: number, flying: number): ProtocolError {
    const failures = count - Math.max(0, flying);
    const toEnd = Math.max(1, toWindowEndMs);
    const retryAfter =
      failures < this.options.points
        ? Math.min(toEnd, Math.max(1, Math.ceil(this.options.retryHintMs())))
        : toEnd;
    return new ProtocolError(this.options.code, this.options.message, { retryAfter });
  }
}
