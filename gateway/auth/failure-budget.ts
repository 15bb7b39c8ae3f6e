/**
 * A failure budget (the account lockout, the per-IP login budget, the wrong email codes per
 * address): `points` failures and attempts in flight per key, the failures counted in a window
 * of `durationSeconds` from the first.
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
 * window's end. Otherwise it is the window's end (or the lock's).
 *
 * The failures and the attempts in flight are kept apart: the failures are a count with the
 * window as TTL (`Prl:<name>:<key>`), each attempt in flight a member of a sorted set
 * (`Prl:<name>-flying:<key>`, its id scored with Redis's time), forgotten once it is older than
 * `IN_FLIGHT_TTL_MS`. So an attempt that is never settled holds its point for that long and is
 * never taken for a failure. Before, one count held both: the attempts of a node that died
 * mid-verification, and the reservations a frozen Redis ran after their caller had timed out
 * and answered `overloaded`, became failures once their in-flight mark expired, and could lock
 * an account that had no wrong password (five logins answered `overloaded` while Redis was
 * frozen left their account refusing the right password `locked`, test/e2e/takeover-faults).
 *
 * An attempt in flight longer than `STUCK_MS` (30 s) looks stuck: a refusal for attempts in
 * flight that all look so says when the oldest is forgotten, since none of them will give its
 * point back before. Before, such a refusal said "about one verification" for two minutes, and
 * a fleet behind one address whose node died with its logins in flight retried in a loop until
 * the points were forgotten.
 *
 * A reservation whose reply did not come may still run; its give-back is sent at once, on the
 * same connection after it, so Redis runs it after the reservation. Settling an attempt removes
 * its id, whatever was there: a give-back of an attempt never reserved changes nothing.
 *
 * A settlement Redis refused unsent (it was down when the attempt was verified) is owed, and
 * sent again by `settleOwed` (before the next reservation, and from the node's sweep) for as
 * long as its attempt would count as in flight. Before, the points of the attempts verified
 * during a Redis outage stayed as failures for the rest of the window: a fleet behind one
 * address, logging in when Redis restarted, found its address refused for up to a whole
 * window once their in-flight marks had expired, though none of them had failed.
 */
import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import { type ErrorCode, ProtocolError } from '../../protocol/index.ts';
import { neverSent } from '../faults.ts';
import type { Keys } from '../keys.ts';

/** How long an attempt in flight is counted at most: longer than a verification can take. */
export const IN_FLIGHT_TTL_MS = 120_000;

/**
 * How long an attempt may be in flight before it looks stuck: far past any verification's
 * expected wait (GW_HASH_MAX_WAIT_MS, 2 s by default) and run, and a PostgreSQL look-up's
 * bound. A refusal for attempts in flight that all look stuck (a dead node's, or reservations
 * whose reply was lost) tells when the oldest is forgotten instead of one verification.
 */
export const STUCK_MS = 30_000;

/**
 * KEYS[1] the failures, KEYS[2] the attempts in flight (ZSET attempt id → ms, Redis's clock);
 * ARGV[1] points, ARGV[2] the in-flight TTL (ms), ARGV[3] the attempt's id, ARGV[4] the time
 * after which an attempt in flight looks stuck (ms). Attempts in flight past the TTL are
 * forgotten first. Returns {taken (1/0), failures + attempts in flight (before a refused
 * attempt), ms to the failures' window's end (when refused; -2 with none), attempts in flight,
 * and when refused for attempts in flight that all look stuck, ms until the oldest is forgotten
 * (else -1)}. A refused attempt writes nothing.
 */
const RESERVE = `
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
local flying = redis.call('ZCARD', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if flying > 0 then
  flying = flying - redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
end
if failures + flying >= tonumber(ARGV[1]) then
  -- Refused for attempts in flight that all look stuck: no point comes back before the oldest
  -- is forgotten.
  local wait = -1
  if flying > 0 and failures < tonumber(ARGV[1])
    and redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[4]), '+inf') == 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + tonumber(ARGV[2]) - now
  end
  return {0, failures + flying, redis.call('PTTL', KEYS[1]), flying, wait}
end
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {1, failures + flying + 1, 0, flying + 1}
`;

/**
 * Settles a reservation. KEYS[1] the failures, KEYS[2] the attempts in flight; ARGV[1] 'give'
 * (the point back), 'fail' (a failure) or 'clear' (the failures deleted); ARGV[2] points,
 * ARGV[3] the window (ms), ARGV[4] '1' when a spent budget locks, ARGV[5] the attempt's id.
 * The attempt leaves the set in flight whatever it was (a 'give' of one never reserved, or
 * given already, changes nothing). Returns 1 when this failure locked the key: the failures
 * reach the points, and the count is set to them for a whole window from now.
 */
const SETTLE = `
redis.call('ZREM', KEYS[2], ARGV[5])
local how = ARGV[1]
if how == 'fail' then
  local n = redis.call('INCR', KEYS[1])
  if ARGV[4] == '1' and n >= tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
  end
  if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
elseif how == 'clear' then
  redis.call('DEL', KEYS[1])
end
return 0
`;

type BudgetRedis = Redis & {
  gwBudgetReserve(
    failures: string,
    inFlight: string,
    points: number,
    inFlightTtlMs: number,
    id: string,
    stuckMs: number,
  ): Promise<number[]>;
  gwBudgetSettle(
    failures: string,
    inFlight: string,
    how: string,
    points: number,
    windowMs: number,
    lock: string,
    id: string,
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
  /** How long an attempt is counted in flight at most, ms (IN_FLIGHT_TTL_MS). */
  inFlightTtlMs?: number;
  /**
   * How long an attempt may be in flight before it is taken for one that will never be settled
   * (its node died, or its reservation's reply was lost), ms (STUCK_MS).
   */
  stuckMs?: number;
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
  id: string;
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
    this.inFlightPrefix = `${keys.rateLimit(`${options.name}-flying`)}:`;
  }

  /**
   * Takes a point for `key` before an attempt is verified; past the budget, the budget's code
   * with `retryAfter`, nothing taken. Redis errors are thrown as they are; a reservation whose
   * reply did not come (a timeout, a connection cut under it) may yet be run by Redis, and is
   * given back after it (see the header).
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
    const id = randomBytes(9).toString('base64url');
    let reply: number[];
    try {
      reply = await this.redis.gwBudgetReserve(
        count,
        inFlight,
        points,
        this.inFlightTtlMs,
        id,
        this.options.stuckMs ?? STUCK_MS,
      );
    } catch (e) {
      // Sent, and perhaps run once Redis answers again (a freeze, a slow Redis): its point
      // would be held for the whole in-flight time by an attempt that is never verified. The
      // give-back goes on the same connection after it, so Redis runs it after the reservation.
      if (!neverSent(e)) void this.settle({ count, inFlight, id, how: 'give', reservedAt }).catch(() => {});
      throw e;
    }
    const [taken, n, ttl, flying, stuckFor] = reply;
    if (!taken) throw this.refused(n, ttl < 0 ? windowMs : ttl, flying, stuckFor);
    let settled = false;
    const settle = async (how: 'give' | 'fail' | 'clear') => {
      if (settled) return false;
      settled = true;
      return this.settle({ count, inFlight, id, how, reservedAt });
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

  /** Sends a settlement; one Redis refused unsent is owed (see the header). */
  private async settle(o: Owed): Promise<boolean> {
    try {
      return await this.send(o);
    } catch (e) {
      if (neverSent(e)) this.owed.push(o);
      throw e;
    }
  }

  private get inFlightTtlMs(): number {
    return this.options.inFlightTtlMs ?? IN_FLIGHT_TTL_MS;
  }

  private async send(o: Owed): Promise<boolean> {
    const { points, durationSeconds, lockWhenSpent } = this.options;
    const locked = await this.redis.gwBudgetSettle(
      o.count,
      o.inFlight,
      o.how,
      points,
      durationSeconds * 1000,
      lockWhenSpent ? '1' : '0',
      o.id,
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
        if (now - o.reservedAt >= this.inFlightTtlMs) continue;
        try {
          await this.send(o);
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

  /**
   * The refusal of a reservation: `count` taken, `flying` of them in flight, and `stuckFor` (ms)
   * until the oldest is forgotten when every one in flight looks stuck (else negative).
   */
  private refused(count: number, toWindowEndMs: number, flying: number, stuckFor = -1): ProtocolError {
    const failures = count - Math.max(0, flying);
    const toEnd = Math.max(1, toWindowEndMs);
    let retryAfter = toEnd;
    if (failures < this.options.points)
      retryAfter = Math.min(
        toEnd,
        Math.max(1, Math.ceil(stuckFor >= 0 ? stuckFor : this.options.retryHintMs())),
      );
    return new ProtocolError(this.options.code, this.options.message, { retryAfter });
  }
}
