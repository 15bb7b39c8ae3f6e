/**
 * Identity: accounts (PostgreSQL), live sessions (Redis), tokens, lockout, email codes.
 * The same operations serve the wire requests (PROTOCOL.md §4) and the HTTP auth API.
 *
 * Rules worth knowing:
 * - `invalid_credentials` is the same code and message for an unknown user (after a full dummy
 *   verify, so timing does not tell either) and a wrong password.
 * - After `lockoutAttempts` consecutive failures an account is `locked` for `lockoutSeconds`;
 *   one IP also has a failure budget, so it cannot walk through many accounts. An attempt is
 *   reserved (one script: check and take, failure-budget.ts) before its password is verified,
 *   so concurrent guesses count while in flight: at most `lockoutAttempts` per account and
 *   `ipFailureBudget` per IP are ever verified in a window, however they are spread over
 *   connections and transports. A refused attempt takes nothing, and is told to come back in
 *   about one verification when only attempts in flight fill the budget.
 * - A login whose requester went (`RequestContext.gone`) while its password was verified starts
 *   no session; one (or a registration) whose requester went while it waited for a hash thread
 *   is not hashed at all (hasher.ts); one whose requester went while its session was made takes
 *   over no older session of the device, and its session is ended (unstarted.ts).
 * - Refresh tokens are single use; presenting a used one ends the whole session
 *   (`refresh_reused`), and every node kicks that session's connection. A refresh retried within
 *   `refreshGraceSeconds` while the successor is unused gets the same successor pair
 *   (PROTOCOL.md §4); the pair is kept in Redis only sealed under the presented token. The per-IP
 *   refresh budget never pushes such a retry past the grace period (see `rotateRefresh`).
 * - A device id belongs to the first account that logs in with it (`devices` table); another
 *   account's login, resume or otp.verify with it is `forbidden`.
 * - A login or resume with the device id of another live session of the same user ends that
 *   session (`takeover`); its successor inherits its waiting events (the ended hooks get it).
 */
import { createHash, randomBytes, randomInt, randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import type pg from 'pg';
import { RateLimiterRedis, type RateLimiterRes } from 'rate-limiter-flexible';
import {
  badMessage,
  type Device,
  hasControlChars,
  ProtocolError,
  type SessionData,
} from '../../protocol/index.ts';
import { isDependencyFault, logFailure, RequesterGone } from '../faults.ts';
import type { Keys } from '../keys.ts';
import type { ListLimit } from '../list-limit.ts';
import type { Logger } from '../log.ts';
import type { GatewayMetrics } from '../metrics.ts';
import { LostReplies } from '../receipts.ts';
import { SharedRead } from '../shared-read.ts';
import { pgError } from './db.ts';
import { FailureBudget, type FailureBudgetOptions, type Reservation } from './failure-budget.ts';
import type { Hasher } from './hasher.ts';
import { LastSeen, writeEnds } from './last-seen.ts';
import { endLostSessions, type LostCheck, sessionsResurrected } from './lost-sessions.ts';
import type { Mailer } from './mailer.ts';
import { deviceInfoFromUserAgent, type Locator } from './session-details.ts';
import {
  auditOwed,
  type ExpiredSession,
  endOwed,
  type LiveSession,
  parseAuditOwed,
  SessionStore,
  type SessionView,
} from './session-store.ts';
import { hashToken, newRefreshToken, openWithToken, sealWithToken, type Tokens } from './tokens.ts';
import { UnstartedSessions } from './unstarted.ts';
import { UserIds } from './user-ids.ts';

export interface IdentityOptions {
  usernameMin: number;
  usernameMax: number;
  sessionTtlSeconds: number;
  refreshTtlSeconds: number;
  lockoutAttempts: number;
  lockoutSeconds: number;
  /** Failed logins allowed per IP per lockout window, across accounts. */
  ipFailureBudget: number;
  /** Requests per IP per minute. */
  registerPerMinute: number;
  refreshPerMinute: number;
  otpPerMinute: number;
  otpExpirationMinutes: number;
  otpMaxRetries: number;
  /** A retried refresh within this many seconds gets the same successor pair; 0 disables. */
  refreshGraceSeconds: number;
  /**
   * PostgreSQL's statement_timeout (GW_DB_STATEMENT_TIMEOUT_MS): a statement whose answer the
   * node stopped waiting for has run or been cancelled by then. Default 5000.
   */
  statementTimeoutMs?: number;
}

export interface RequestContext {
  ip: string;
  userAgent?: string;
  /** The caller's session, when authenticated. */
  sessionId?: string;
  /**
   * True once the requester is gone (its connection closed, its HTTP request aborted). A login
   * or resume then starts or touches no session: nobody would get its tokens, and one with a
   * device id would take the device's live session (on the connection the device made since)
   * from it. A login or registration still waiting for a hash thread is dropped unhashed.
   * Without it, the requester is taken to be there.
   */
  gone?: () => boolean;
  /**
   * The requesting connection (`node:conn`), when the request came over one. A login or resume
   * with a device id that takes over the session this connection is bound to leaves it to the
   * request's answer (which binds it to the new session) rather than kicking it.
   */
  connection?: string;
}

export interface SessionGrant extends SessionData {
  /** Not sent on the wire: the device id bound to the session. */
  deviceId?: string;
}

export type EndReason = 'logout' | 'revoked' | 'expired' | 'refresh_reused' | 'takeover';

/** What `refresh` answers. */
export interface TokenPair {
  token: string;
  refresh: string;
  expiresAt: number;
  refreshExpiresAt: number;
}

/** Runs when a session ends; `successor` is the session that took it over (`takeover`). */
export type SessionEndedHook = (sessionId: string, reason: EndReason, successor?: string) => void;

/** Kick codes for how a session ended (PROTOCOL.md §6). */
const KICK_FOR: Record<EndReason, string> = {
  logout: 'session_revoked',
  revoked: 'session_revoked',
  expired: 'session_revoked',
  refresh_reused: 'session_revoked',
  takeover: 'session_takeover',
};

const EMAIL = /^[^\s@]{1,64}@[^\s@]{1,190}\.[^\s@]{2,63}$/;
const UNKNOWN_OR_WRONG = 'invalid username or password';

/** The OTP check: KEYS[1] otp hash key; ARGV[1] code hash, ARGV[2] max tries. */
const OTP_CHECK = `
local stored = redis.call('HGET', KEYS[1], 'code')
if not stored then return 'missing' end
if stored == ARGV[1] then redis.call('DEL', KEYS[1]) return 'ok' end
local tries = redis.call('HINCRBY', KEYS[1], 'tries', 1)
if tries >= tonumber(ARGV[2]) then redis.call('DEL', KEYS[1]) return 'exhausted' end
return 'wrong'
`;

/** A failed request's result in the log and `gateway_auth_total`: its code, or what went. */
function resultOf(e: unknown): string {
  return e instanceof ProtocolError ? e.code : e instanceof RequesterGone ? 'abandoned' : 'error';
}

export class IdentityService {
  readonly store: SessionStore;
  private readonly accountFailures: FailureBudget;
  private readonly ipFailures: FailureBudget;
  private readonly registerLimit: RateLimiterRedis;
  private readonly refreshLimit: RateLimiterRedis;
  private readonly otpLimit: RateLimiterRedis;
  /**
   * Wrong codes per address, across the codes it is sent: a new code starts its own
   * OTP_MAX_RETRIES, so without this an `otp.request` between every few guesses would give
   * guesses without end. The account lockout's numbers (GW_LOCKOUT_*), locked the same way.
   */
  private readonly otpFailures: FailureBudget;
  private readonly endedHooks: SessionEndedHook[] = [];
  private owedTriedAt = 0;
  /** Resumes' times for PostgreSQL's records, written in batches off their path. */
  private readonly lastSeen: LastSeen;
  /** Failed logins' sessions, whose audit rows are kept or deleted once Redis says (unstarted.ts). */
  private readonly unstarted: UnstartedSessions;
  /** Takes of expired sessions whose reply did not come (endExpired), read from their receipts. */
  private readonly lostTakes: LostReplies<ExpiredSession[]>;
  private readonly username: RegExp;
  private readonly userIds = new UserIds(
    (username) => this.queryUserId(username),
    () => this.deps.redis.get(this.deps.keys.usersGeneration),
  );
  /**
   * An account's live sessions, newest first, one read at a time per account, shared by every
   * `sessions` request of the account that comes while one is out (shared-read.ts): a device
   * maker's account holds a session per device, so a read costs a round trip of two commands
   * per session, and a fleet of one account that asks together would otherwise read them once
   * per device. An answer is never from a read begun before its request. Shared: never changed.
   */
  private readonly userViews = new SharedRead<string, readonly SessionView[]>(async (userId) => {
    this.deps.metrics?.listReads.labels('sessions').inc();
    return (await this.store.viewsOfUser(userId)).sort(
      (a, b) => b.session.lastSeenAt - a.session.lastSeenAt || b.session.createdAt - a.session.createdAt,
    );
  });

  constructor(
    private readonly deps: {
      pool: pg.Pool;
      redis: Redis;
      keys: Keys;
      hasher: Hasher;
      tokens: Tokens;
      mailer: Mailer | null;
      log: Logger;
      /** Results by operation (gateway/metrics.ts); absent in tools that run the service alone. */
      metrics?: GatewayMetrics;
      /** Sessions' locations (session-details.ts); without it, none. */
      locator?: Locator;
      /** `sessions` requests per session, shared with `users` and `rooms` (GW_LIST_PER_MINUTE). */
      listLimit: ListLimit;
      options: IdentityOptions;
    },
  ) {
    const o = deps.options;
    this.store = new SessionStore(deps.redis, deps.keys, o.sessionTtlSeconds);
    this.lostTakes = new LostReplies(
      (receipts) => this.store.takenExpired(receipts),
      (taken) => {
        deps.log.info(
          { sessions: taken.length },
          'expired sessions ended by a take whose reply was lost, read from its receipt',
        );
        this.expired(taken);
      },
    );
    this.unstarted = new UnstartedSessions({ ...deps, endUnstarted: (sid) => this.endUnstarted(sid) });
    this.lastSeen = new LastSeen(deps.pool, deps.log, undefined, undefined, {
      forget: (members) => deps.redis.zrem(deps.keys.auditOwed, ...members),
      ended: (ids) => void this.endResumedEnded(ids),
    });
    const limiter = (name: string, points: number, duration: number, blockDuration = 0) =>
      new RateLimiterRedis({
        storeClient: deps.redis,
        keyPrefix: deps.keys.rateLimit(name),
        points,
        duration,
        blockDuration,
      });
    const budget = (options: Omit<FailureBudgetOptions, 'durationSeconds'>) =>
      new FailureBudget(deps.redis, deps.keys, { durationSeconds: o.lockoutSeconds, ...options });
    // A login's point comes back when its hash is verified: about one verification away.
    const verifyHint = () => deps.hasher.retryHintMs();
    this.accountFailures = budget({
      name: 'login-account',
      points: o.lockoutAttempts,
      lockWhenSpent: true,
      code: 'locked',
      retryHintMs: verifyHint,
    });
    this.ipFailures = budget({
      name: 'login-ip',
      points: o.ipFailureBudget,
      lockWhenSpent: false,
      code: 'rate_limited',
      message: 'too many failed logins from this address',
      retryHintMs: verifyHint,
    });
    this.registerLimit = limiter('register-ip', o.registerPerMinute, 60);
    this.refreshLimit = limiter('refresh-ip', o.refreshPerMinute, 60);
    this.otpLimit = limiter('otp-ip', o.otpPerMinute, 60);
    this.otpFailures = budget({
      name: 'otp-address',
      points: o.lockoutAttempts,
      lockWhenSpent: true,
      code: 'locked',
      message: 'too many wrong codes for this address',
      // A code's check is one script call: its point comes back within milliseconds.
      retryHintMs: () => 50 + Math.random() * 50,
    });
    this.username = new RegExp(`^[A-Za-z0-9_]{${o.usernameMin},${o.usernameMax}}$`);
  }

  /**
   * From the node's sweep: the resumes' last-seen times (last-seen.ts), and the failure
   * budgets' settlements owed since a Redis outage.
   */
  sweep(now: number): void {
    this.lastSeen.tick(now);
    this.settleOwed(now);
    this.unstarted.tick(now);
    void this.lostTakes.tick(now);
  }

  /** At shutdown: writes the last-seen times still pending. */
  close(): Promise<void> {
    return this.lastSeen.close();
  }

  /**
   * Sends again the failure budgets' settlements Redis refused unsent during an outage
   * (failure-budget.ts), at most once a second while some are owed.
   */
  private settleOwed(now: number): void {
    if (now - this.owedTriedAt < 1000) return;
    for (const budget of [this.ipFailures, this.accountFailures, this.otpFailures]) {
      if (budget.owedCount === 0) continue;
      this.owedTriedAt = now;
      void budget.settleOwed(now).then((settled) => {
        if (settled > 0)
          this.deps.log.info(
            { budget: budget.name, settled, owed: budget.owedCount },
            'login budget settlements sent after a Redis outage',
          );
      });
    }
  }

  /**
   * Runs whenever a session ends, on the node that ended it: to purge its outbox, or on a
   * takeover to move it to the successor. Not for a session whose life ran out: the sweep that
   * finds it leaves its purge owed (endExpired).
   */
  onSessionEnded(hook: SessionEndedHook): void {
    this.endedHooks.push(hook);
  }

  // ---- accounts -------------------------------------------------------------------------------

  private checkUsername(username: string): void {
    if (!this.username.test(username)) {
      const o = this.deps.options;
      throw new ProtocolError(
        'invalid_username',
        `username must be ${o.usernameMin}-${o.usernameMax} of [A-Za-z0-9_]`,
      );
    }
  }

  private normalizeEmail(raw: string): string {
    const email = raw.trim().toLowerCase();
    // No control character either: `\s` leaves out NUL, which PostgreSQL refuses (PROTOCOL.md §8).
    if (email.length > 254 || !EMAIL.test(email) || hasControlChars(email))
      throw new ProtocolError('invalid_email');
    return email;
  }

  /** An optional display name: trimmed, 1-128 characters, no control characters; empty is none. */
  private checkFullName(raw: string | undefined): string | null {
    if (raw === undefined) return null;
    const name = raw.trim();
    if (name === '') return null;
    if ([...name].length > 128 || hasControlChars(name))
      throw new ProtocolError('bad_message', 'fullName: at most 128 characters, no control characters', {
        field: 'fullName',
      });
    return name;
  }

  private checkPassword(password: string): void {
    // NIST SP 800-63B: length only, counted in code points; no composition rules.
    const n = [...password].length;
    if (n < 8) throw new ProtocolError('weak_password', 'password must have at least 8 characters');
    if (n > 128) throw new ProtocolError('weak_password', 'password must have at most 128 characters');
  }

  /** Takes a point of `limiter` for `key`; past its budget, `code` with retryAfter. */
  private async limit(
    limiter: RateLimiterRedis,
    key: string,
    code: 'rate_limited' | 'locked' = 'rate_limited',
    message?: string,
  ): Promise<RateLimiterRes> {
    try {
      return await limiter.consume(key);
    } catch (e) {
      if (e instanceof Error) throw e;
      throw new ProtocolError(code, message, { retryAfter: (e as RateLimiterRes).msBeforeNext });
    }
  }

  /** Inserts a user and its `user.registered` outbox row in one transaction. */
  private async insertUser(
    username: string,
    email: string,
    passwordHash: string,
    fullName: string | null = null,
  ): Promise<string> {
    const client = await this.deps.pool.connect();
    try {
      await client.query('BEGIN');
      const r = await client.query(
        'INSERT INTO users (username, email, password_hash, full_name) VALUES ($1, $2, $3, $4) RETURNING id, created_at',
        [username, email, passwordHash, fullName],
      );
      const userId = r.rows[0].id as string;
      await client.query('INSERT INTO outbox (name, payload) VALUES ($1, $2)', [
        'user.registered',
        JSON.stringify({ userId, username, email, ts: new Date(r.rows[0].created_at).getTime() }),
      ]);
      await client.query('COMMIT');
      await this.usersChanged(userId);
      return userId;
    } catch (e) {
      await client.query('ROLLBACK').catch(() => {});
      const { code, constraint } = pgError(e);
      if (code === '23505') {
        throw new ProtocolError(constraint?.includes('email') ? 'email_taken' : 'username_taken');
      }
      throw e;
    } finally {
      client.release();
    }
  }

  /**
   * Raises the users generation, before the registration is answered: every node's remembered
   * misses (user-ids.ts) then look the name up again. The account exists either way, so a
   * failure is logged, not thrown; such misses last their TTL at most.
   */
  private async usersChanged(userId: string): Promise<void> {
    try {
      await this.deps.redis.incr(this.deps.keys.usersGeneration);
    } catch (e) {
      this.deps.log.warn({ userId, err: (e as Error)?.message ?? String(e) }, 'users generation not raised');
    }
  }

  /** Counts the outcome of an identity operation: ok or the error code. */
  private async counted<T>(
    operation: 'register' | 'refresh' | 'otp_verify',
    run: () => Promise<T>,
  ): Promise<T> {
    try {
      const out = await run();
      this.deps.metrics?.authResult(operation, 'ok');
      return out;
    } catch (e) {
      this.deps.metrics?.authResult(operation, resultOf(e));
      throw e;
    }
  }

  /**
   * Creates an account. Without a username (the RealChat gRPC contract registers by email
   * alone) one is derived from the address: see `derivedUsernames`.
   */
  register(
    req: { username?: string; email: string; password: string; fullName?: string },
    ctx: RequestContext,
  ) {
    return this.counted('register', () => this.registerUser(req, ctx));
  }

  private async registerUser(
    req: { username?: string; email: string; password: string; fullName?: string },
    ctx: RequestContext,
  ): Promise<{ userId: string }> {
    // Refused before any other work while the hash pool is full (counted and logged as the
    // request's result, as every other refusal).
    this.deps.hasher.check();
    await this.limit(this.registerLimit, ctx.ip);
    if (req.username !== undefined) this.checkUsername(req.username);
    const email = this.normalizeEmail(req.email);
    this.checkPassword(req.password);
    const fullName = this.checkFullName(req.fullName);
    // Not hashed (and nothing created) if the requester went while the job waited for a thread.
    const { hash } = await this.deps.hasher.hash(req.password, ctx.gone);
    if (req.username !== undefined) {
      const userId = await this.insertUser(req.username, email, hash, fullName);
      this.deps.log.info({ userId }, 'user registered');
      return { userId };
    }
    // A derived name that is taken is not the caller's fault: the next candidate is tried
    // (the password is hashed once); a taken address is `email_taken` as always.
    const candidates = this.derivedUsernames(email);
    for (let i = 0; ; i++) {
      try {
        const userId = await this.insertUser(candidates[i], email, hash, fullName);
        this.deps.log.info({ userId, username: candidates[i], derived: true }, 'user registered');
        return { userId };
      } catch (e) {
        if (!(e instanceof ProtocolError && e.code === 'username_taken') || i === candidates.length - 1)
          throw e;
      }
    }
  }

  /**
   * Usernames for an account registered by email alone, in the order tried: the address's
   * local part (before any `+tag`) with every character outside [A-Za-z0-9_] made `_`, cut to
   * the longest username; then that stem with `_` and four random digits, four times; last
   * `u_` and random hex. A stem shorter than the shortest username only gets suffixed forms.
   */
  private derivedUsernames(email: string): string[] {
    const o = this.deps.options;
    const local = email.slice(0, email.lastIndexOf('@')).split('+')[0];
    const stem = local.replace(/[^A-Za-z0-9_]/g, '_').slice(0, o.usernameMax);
    const out: string[] = [];
    if (stem.length >= o.usernameMin) out.push(stem);
    const cut = stem.slice(0, Math.max(0, o.usernameMax - 5)) || 'u';
    for (let i = 0; i < 4; i++) out.push(`${cut}_${String(randomInt(0, 10_000)).padStart(4, '0')}`);
    out.push(`u_${randomBytes(16).toString('hex')}`.slice(0, Math.max(o.usernameMax, o.usernameMin)));
    return out.filter((u) => this.username.test(u));
  }

  async me(userId: string): Promise<Record<string, unknown>> {
    const r = await this.deps.pool.query(
      'SELECT id, username, email, full_name, created_at, last_login_at FROM users WHERE id = $1',
      [userId],
    );
    if (r.rowCount === 0) throw new ProtocolError('not_found', 'user not found');
    const u = r.rows[0];
    return {
      userId: u.id,
      username: u.username,
      email: u.email,
      fullName: u.full_name ?? null,
      createdAt: new Date(u.created_at).getTime(),
      lastLoginAt: u.last_login_at ? new Date(u.last_login_at).getTime() : null,
    };
  }

  /** The user id of a username (case-insensitive), or null; remembered (user-ids.ts). */
  userIdOf(username: string): Promise<string | null> {
    return this.userIds.of(username);
  }

  /** The user id of a username already remembered, else undefined (UserIds.known). */
  userIdKnown(username: string): string | undefined {
    return this.userIds.known(username);
  }

  private async queryUserId(username: string): Promise<string | null> {
    const r = await this.deps.pool.query('SELECT id FROM users WHERE lower(username) = lower($1)', [
      username,
    ]);
    return r.rowCount ? (r.rows[0].id as string) : null;
  }

  // ---- login ----------------------------------------------------------------------------------

  /** A login, with one structured log line for its result (never the password). */
  async login(
    req: { username?: string; email?: string; password: string; device?: Device },
    ctx: RequestContext,
  ): Promise<SessionGrant> {
    const fields = {
      ip: ctx.ip,
      device: req.device?.id ?? null,
      ...(req.username !== undefined ? { username: req.username } : { by: 'email' }),
    };
    try {
      const grant = await this.attemptLogin(req, ctx);
      this.deps.log.info(
        { ...fields, result: 'ok', userId: grant.userId, sessionId: grant.sessionId },
        'login',
      );
      this.deps.metrics?.authResult('login', 'ok');
      return grant;
    } catch (e) {
      const result = resultOf(e);
      this.deps.log.info({ ...fields, result }, 'login');
      this.deps.metrics?.authResult('login', result);
      throw e;
    }
  }

  private async attemptLogin(
    req: { username?: string; email?: string; password: string; device?: Device },
    ctx: RequestContext,
  ): Promise<SessionGrant> {
    // Refused before any other work while the hash pool is full. Before, the check ran ahead of
    // this method and its refusals were neither logged nor counted in gateway_auth_total: in a
    // fleet simulation the pool refused 285 requests and the metric showed 44.
    this.deps.hasher.check();
    const ident = (req.username ?? req.email ?? '').trim().toLowerCase();
    // A name or address with a control character is no account's (none can be registered), and
    // is not looked up: pg-native would cut it at a NUL and find the account named by what comes
    // before. It is an unknown user, answered after the same work as one (PROTOCOL.md §8).
    const named = !hasControlChars(req.username ?? req.email ?? '');
    // Reserve the attempt before the hash is verified, so attempts in flight count (a `get`
    // before and a `penalty` after let 50 concurrent guesses through a limit of 5). The
    // address's point first, before the account is looked up: a login refused for it (a fleet
    // behind one address in a burst, or guesses past the budget) costs one Redis call and no
    // PostgreSQL query.
    const ip = await this.ipFailures.reserve(ctx.ip);
    let user: { id: string; username: string; password_hash: string } | undefined;
    let account: Reservation;
    try {
      const r = named
        ? await this.deps.pool.query(
            req.username !== undefined
              ? 'SELECT id, username, password_hash FROM users WHERE lower(username) = lower($1)'
              : 'SELECT id, username, password_hash FROM users WHERE email = $1',
            [req.username !== undefined ? req.username : ident],
          )
        : { rows: [] };
      user = r.rows[0] as typeof user;
      // One failure counter per account, whether it is named by username or by email.
      account = await this.accountFailures.reserve(user ? `u:${user.id}` : `n:${ident}`);
    } catch (e) {
      await ip.release().catch(() => {});
      throw e;
    }
    let ok = false;
    let rehash = false;
    try {
      // A login whose requester went while it waited for a hash thread is dropped there, unhashed.
      if (user) ({ ok, rehash } = await this.deps.hasher.verify(req.password, user.password_hash, ctx.gone));
      else await this.deps.hasher.dummyVerify(req.password, ctx.gone);
    } catch (e) {
      // Not verified (`overloaded`, or the requester went): the reservations are given back.
      await Promise.all([account.release(), ip.release()]).catch(() => {});
      throw e;
    }
    if (!ok || !user) {
      const [locked] = await Promise.all([account.failed(), ip.failed()]);
      if (locked) {
        this.deps.log.warn(
          {
            ip: ctx.ip,
            ...(user ? { userId: user.id } : { unknownAccount: true }),
            retryAfter: this.deps.options.lockoutSeconds * 1000,
          },
          'account locked',
        );
        this.deps.metrics?.lockouts.inc();
      }
      throw new ProtocolError('invalid_credentials', UNKNOWN_OR_WRONG);
    }
    // Success: the account's count starts again, and the IP's reservation is given back.
    await Promise.all([account.succeeded(true), ip.succeeded()]);
    // The hash took a while: a device that gave up on this login and logged in again on
    // another connection meanwhile would have its new session taken over by this one.
    if (ctx.gone?.()) throw new RequesterGone('its connection closed before the password was verified');
    if (rehash) {
      const { hash } = await this.deps.hasher.hash(req.password, ctx.gone);
      await this.deps.pool.query('UPDATE users SET password_hash = $2 WHERE id = $1', [user.id, hash]);
      this.deps.log.info({ userId: user.id }, 'password hash upgraded to argon2id');
    }
    if (req.device?.id) await this.claimDevice(user.id, req.device);
    return this.startSession(user.id, user.username, req.device ?? null, ctx);
  }

  private async startSession(
    userId: string,
    username: string,
    device: Device | null,
    ctx: RequestContext,
  ): Promise<SessionGrant> {
    const o = this.deps.options;
    const sessionId = randomUUID();
    const refresh = newRefreshToken();
    const now = Date.now();
    const refreshExpiresAt = now + o.refreshTtlSeconds * 1000;
    // The session row and the user's last_login_at in one statement: one round trip (and one
    // query for PostgreSQL to run) fewer per login.
    try {
      await this.deps.pool.query(
        `WITH login AS (UPDATE users SET last_login_at = now() WHERE id = $2)
         INSERT INTO sessions (id, user_id, device_id, device_name, device_model, device_fw, ip, user_agent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
        [
          sessionId,
          userId,
          device?.id ?? null,
          device?.name ?? null,
          device?.model ?? null,
          device?.fw ?? null,
          ctx.ip,
          ctx.userAgent ?? null,
        ],
      );
    } catch (e) {
      // A statement the node stopped waiting for (a timeout, a lost connection) may still run
      // and write the row: it is settled once PostgreSQL has run or cancelled it (unstarted.ts).
      if (isDependencyFault(e))
        this.unstarted.add(sessionId, Date.now() + (o.statementTimeoutMs ?? 5000) + 1000);
      throw e;
    }
    // The audit row is written: a session that Redis does not make now (refused, or a reply
    // lost) would leave it open for good. Redis is asked after this step whether it ran, and
    // the row is deleted if not (unstarted.ts).
    try {
      await this.store.create(
        {
          sessionId,
          userId,
          username,
          device,
          ip: ctx.ip,
          ...(ctx.userAgent ? { userAgent: ctx.userAgent } : {}),
          createdAt: now,
          lastSeenAt: now,
          refreshHash: hashToken(refresh),
          refreshExpiresAt,
          deviceInfo: device ? null : deviceInfoFromUserAgent(ctx.userAgent),
          location: this.deps.locator?.locate(ctx.ip) ?? null,
        },
        o.refreshTtlSeconds * 1000,
      );
    } catch (e) {
      this.unstarted.add(sessionId);
      throw e;
    }
    // A step after the session is made that fails (a Redis blip in the takeover) answers the
    // login with an error too, and a requester gone by now (a device's connection dropped while
    // its row or session was written) gets no answer: nobody gets its tokens, and it holds the
    // device's key, with the device's older session not taken over. It is settled as one Redis
    // made late (unstarted.ts: ended, the key back to the device's live session).
    let token: string;
    let expiresAt: number;
    const gone = () => {
      if (ctx.gone?.()) throw new RequesterGone('its connection closed before its session was answered');
    };
    try {
      gone();
      if (device?.id) await this.takeOverDevice(userId, device.id, sessionId, ctx.connection);
      ({ token, expiresAt } = await this.deps.tokens.issue(userId, sessionId));
      gone();
    } catch (e) {
      this.unstarted.add(sessionId);
      throw e;
    }
    return {
      userId,
      username,
      sessionId,
      token,
      refresh,
      expiresAt,
      refreshExpiresAt,
      ...(device?.id ? { deviceId: device.id } : {}),
    };
  }

  /**
   * A failed login's session that Redis made after all (unstarted.ts): nobody holds its tokens.
   * Ended `revoked`; or, when another live session of the account has its device, `takeover`
   * with that one as its successor (the events it got move there), and the device's key, if it
   * names this one (made after that session's login: a Redis that ran the two logins' steps out
   * of order), is handed to the successor first, in one step with that check. False:
   * the session was gone.
   */
  private async endUnstarted(sid: string): Promise<boolean> {
    const s = await this.store.get(sid);
    if (!s) return false;
    const deviceId = s.device?.id;
    let successor: LiveSession | undefined;
    if (deviceId) {
      for (const other of await this.store.ofDevice(deviceId)) {
        if (other === sid) continue;
        const o = await this.store.get(other);
        if (o?.userId !== s.userId || o.device?.id !== deviceId) continue;
        if (!successor || o.createdAt > successor.createdAt) successor = o;
      }
      // Only while the key names this one: a login of the device that set it since keeps it.
      if (successor) await this.store.handDevice(deviceId, sid, successor.sessionId);
    }
    return this.endSession(sid, successor ? 'takeover' : 'revoked', successor?.sessionId);
  }

  /**
   * Ends the user's other live sessions that carry this device id (`takeover`); `keep`, the
   * session that takes the device, is their successor. The session the device key names is
   * spared: it was created or resumed with the device after `keep` (the key is set in the
   * same step that makes a session visible here), and it ends `keep` itself. So of logins
   * with one device at once exactly one session survives, the last to set the key (before,
   * two could end each other: test/e2e/identity-races.test.ts). The candidates are the
   * device's sessions (`Pdevsess:<id>`), not the account's: an account of 200 devices made
   * each device's login read all 200 sessions, one round trip each (login-round-trips.test).
   */
  private async takeOverDevice(
    userId: string,
    deviceId: string,
    keep: string,
    /** The requesting connection, not kicked (RequestContext.connection). */
    spare?: string,
  ): Promise<void> {
    const gone: string[] = [];
    for (const sid of await this.store.ofDevice(deviceId)) {
      if (sid === keep) continue;
      const s = await this.store.get(sid);
      if (!s || s.device?.id !== deviceId) {
        gone.push(sid);
        continue;
      }
      if (s.userId !== userId) continue;
      if ((await this.store.deviceHolder(deviceId)) === sid) continue;
      await this.endSession(sid, 'takeover', keep, spare);
    }
    await this.store.forgetOfDevice(deviceId, gone);
  }

  /**
   * Registers the device to this account, or refreshes its record if the account owns it;
   * `forbidden` if another account does (PROTOCOL.md §4). One statement, so of two accounts
   * racing for a new id exactly one gets it.
   */
  private async claimDevice(userId: string, device: Device): Promise<void> {
    const r = await this.deps.pool.query(
      `INSERT INTO devices (id, owner, name, model, fw) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (id) DO UPDATE SET last_seen = now(),
         name = COALESCE(EXCLUDED.name, devices.name),
         model = COALESCE(EXCLUDED.model, devices.model),
         fw = COALESCE(EXCLUDED.fw, devices.fw)
       WHERE devices.owner = EXCLUDED.owner
       RETURNING owner`,
      [device.id, userId, device.name ?? null, device.model ?? null, device.fw ?? null],
    );
    if (r.rowCount === 0) throw new ProtocolError('forbidden', 'this device belongs to another account');
  }

  /** Access-token check for anything authenticated: signature, expiry, and the session alive. */
  async authenticate(token: string): Promise<{
    userId: string;
    username: string;
    sessionId: string;
    expiresAt: number;
    session: LiveSession;
  }> {
    const claims = await this.deps.tokens.verify(token);
    const session = await this.store.get(claims.sessionId);
    if (!session || session.userId !== claims.userId) throw new ProtocolError('session_revoked');
    // Its row read for an end with the last-seen batch: a session a Redis rolled back brought
    // back is ended within seconds of its token's first use (endResumedEnded).
    this.lastSeen.check(claims.sessionId);
    return { ...claims, username: session.username, session };
  }

  async resume(req: { token: string; device?: Device }, ctx: RequestContext): Promise<SessionGrant> {
    let a: Awaited<ReturnType<IdentityService['authenticate']>>;
    let device: Device | null;
    const gone = () => {
      if (ctx.gone?.()) throw new RequesterGone('its connection closed before the session was resumed');
    };
    if (req.device) {
      a = await this.authenticate(req.token);
      device = req.device;
      gone();
      if (device.id) await this.claimDevice(a.userId, device);
      // Ended since it was read (a revoke, a logout): not brought back by the touch.
      if (!(await this.store.touch(a.sessionId, a.userId, req.device, a.session.device)))
        throw new ProtocolError('session_revoked');
    } else {
      // The session's own device (claimed by this account when the session started): the read
      // and the touch are one call, the device key's extension follows its ownership check.
      const claims = await this.deps.tokens.verify(req.token);
      gone();
      const session = await this.store.resume(claims.sessionId, claims.userId);
      if (!session || session.userId !== claims.userId) throw new ProtocolError('session_revoked');
      a = { ...claims, username: session.username, session };
      device = session.device;
      // No PostgreSQL: the device's ownership was checked when the session started, and a
      // device id never changes owner (last-seen.ts). Before, the claim's upsert ran again and
      // also set the device's name, model and firmware back to this session's, however old.
      if (device?.id) await this.store.extendDevice(a.sessionId, device.id);
    }
    // Written in a batch off the resume's path, so that a resume needs PostgreSQL only when
    // it names a device to claim.
    this.lastSeen.session(a.sessionId, ctx.ip);
    if (device?.id) this.lastSeen.device(device.id);
    if (device?.id) await this.takeOverDevice(a.userId, device.id, a.sessionId, ctx.connection);
    const { token, expiresAt } = await this.deps.tokens.issue(a.userId, a.sessionId);
    return {
      userId: a.userId,
      username: a.username,
      sessionId: a.sessionId,
      token,
      expiresAt,
      ...(device?.id ? { deviceId: device.id } : {}),
    };
  }

  async validate(req: { token: string }): Promise<Record<string, unknown>> {
    try {
      const a = await this.authenticate(req.token);
      return {
        valid: true,
        userId: a.userId,
        username: a.username,
        sessionId: a.sessionId,
        expiresAt: a.expiresAt,
      };
    } catch (e) {
      if (e instanceof ProtocolError) return { valid: false };
      throw e;
    }
  }

  refresh(req: { refresh: string }, ctx: RequestContext): Promise<TokenPair> {
    return this.counted('refresh', () => this.rotateRefresh(req, ctx));
  }

  private async rotateRefresh(req: { refresh: string }, ctx: RequestContext): Promise<TokenPair> {
    const o = this.deps.options;
    const oldHash = hashToken(req.refresh);
    const found = await this.store.lookupRefresh(oldHash);
    // The IP's refresh budget is charged for a token unknown or current. A used one is a retry
    // (its reply lost) or a reuse: refused for the budget, a retry would come back after
    // retryAfter, past the grace period, and end its session as a reuse.
    if (!found || found.current) {
      try {
        await this.limit(this.refreshLimit, ctx.ip);
      } catch (e) {
        // Another refresh of this token (another connection of the device) may rotate it
        // meanwhile: the grace period then lasts until this one may come back, and a while more.
        if (found && e instanceof ProtocolError && e.code === 'rate_limited' && o.refreshGraceSeconds > 0)
          await this.store.holdGrace(oldHash, (e.retryAfter ?? 0) + o.refreshGraceSeconds * 1000);
        throw e;
      }
    }
    if (!found) throw new ProtocolError('token_invalid', 'refresh token invalid or expired');
    // The successor pair is made before the rotation and sealed under the presented token, so
    // the rotation script can keep it for a retry (grace period) in the same step.
    let pair: TokenPair | null = null;
    let sealed = '';
    const s = found.current ? await this.store.get(found.sessionId) : null;
    if (s) {
      const { token, expiresAt } = await this.deps.tokens.issue(s.userId, s.sessionId);
      pair = {
        token,
        refresh: newRefreshToken(),
        expiresAt,
        refreshExpiresAt: Date.now() + o.refreshTtlSeconds * 1000,
      };
      sealed = sealWithToken(req.refresh, pair);
    }
    const r = await this.store.rotate(found.sessionId, oldHash, pair ? hashToken(pair.refresh) : '', {
      refreshTtlMs: o.refreshTtlSeconds * 1000,
      usedMemoryMs: o.refreshTtlSeconds * 1000,
      graceMs: o.refreshGraceSeconds * 1000,
      sealed,
    });
    if (r.status === 'again') {
      const again = openWithToken<TokenPair>(req.refresh, r.sealed);
      if (again) return again;
    }
    if (r.status === 'reused' || r.status === 'again') {
      // Logged once, by the reuse that ended the session (used tokens are not charged to the
      // budget: replays of one would otherwise log without bound).
      if (await this.endSession(r.sessionId, 'refresh_reused'))
        this.deps.log.warn({ sessionId: r.sessionId }, 'refresh token reused: session ended');
      throw new ProtocolError('refresh_reused');
    }
    if (r.status === 'invalid' || !pair || !s)
      throw new ProtocolError('token_invalid', 'refresh token invalid or expired');
    if (!(await this.store.touch(s.sessionId, s.userId, null, s.device)))
      throw new ProtocolError('session_revoked');
    // A sign of life for the audit row, and its check that the session did not end there
    // (last-seen.ts): a refresh is how a back end's device keeps its session without resuming.
    this.lastSeen.session(s.sessionId, ctx.ip);
    return pair;
  }

  /**
   * Ends the session of an access token, or of a refresh token (PROTOCOL.md §4), or the
   * caller's own; `{}` for an unknown or expired token. `spare`: the requesting connection,
   * which the end's kick leaves to the answer (the end of its own session).
   */
  async logout(req: { token?: string }, ctx: RequestContext, spare?: string): Promise<Record<string, never>> {
    let sid = ctx.sessionId;
    if (req.token !== undefined) {
      try {
        sid = (await this.deps.tokens.verify(req.token, true)).sessionId;
      } catch {
        const hash = hashToken(req.token);
        const found = await this.store.lookupRefresh(hash);
        // A refresh token names its session while it could still refresh: the current one, or
        // one just rotated whose successor is unused (the grace period); a used one does not.
        if (!found || (!found.current && !(await this.store.inGrace(hash, found.sessionId)))) return {};
        sid = found.sessionId;
      }
    }
    if (!sid)
      throw new ProtocolError('unauthenticated', 'logout needs a token or an authenticated connection');
    await this.endSession(sid, 'logout', undefined, spare);
    return {};
  }

  /**
   * The user's live sessions, newest activity first (then newest created), with their count:
   * the wire's `sessions` and `GET /auth/user/sessions` (PROTOCOL.md §8, "Session details").
   * `lastSeenAt` and `lastActivityAt` are the same throttled field (activity.ts).
   */
  async sessions(
    userId: string,
    current: string | undefined,
  ): Promise<{ sessions: Record<string, unknown>[]; totalActiveSessions: number }> {
    if (current) await this.deps.listLimit.take(current);
    this.deps.metrics?.listRequests.labels('sessions').inc();
    const views = await this.userViews.get(userId);
    const sessions = views.map((v: SessionView) => {
      const s = v.session;
      return {
        sessionId: s.sessionId,
        device: s.device,
        deviceInfo: s.deviceInfo ?? null,
        ip: s.ip,
        location: s.location ?? null,
        createdAt: s.createdAt,
        lastSeenAt: s.lastSeenAt,
        lastActivityAt: s.lastSeenAt,
        expiresAt: v.expiresAt,
        online: v.online,
        current: s.sessionId === current,
      };
    });
    return { sessions, totalActiveSessions: sessions.length };
  }

  /** `spare`: as logout's. */
  async revoke(userId: string, sessionId: string, spare?: string): Promise<Record<string, never>> {
    const s = await this.store.get(sessionId);
    if (!s || s.userId !== userId) throw new ProtocolError('not_found', 'no such session');
    await this.endSession(sessionId, 'revoked', undefined, spare);
    return {};
  }

  /**
   * Ends a session once: Redis (and its device key, if it still names it), the audit row, the
   * kick on every node, the ended hooks. `successor`: the session that took over its device.
   */
  async endSession(
    sessionId: string,
    reason: EndReason,
    successor?: string,
    /**
     * A connection (`node:conn`) the kick leaves alone: the one taking the session over, or the
     * one whose own logout or revoke this is (answered instead).
     */
    spare?: string,
  ): Promise<boolean> {
    // Its outbox is owed a move or a purge from the same step on, until an ended hook is done,
    // and every node is told to kick its connections in that step too (session-store.ts). The
    // hooks run before the audit row is written, so that a PostgreSQL that fails here cannot
    // leave them undone (a retry of the revoke would find no session to end).
    // Its audit row's end is owed in Redis, from the same step, until the row is written: a node
    // that dies before that leaves it to the cluster-wide sweep (writeOwedEnds).
    const endedAt = Date.now();
    const audit = auditOwed(sessionId, reason, endedAt);
    const s = await this.store.remove(
      sessionId,
      endOwed(sessionId, reason, successor),
      JSON.stringify({ sessionId, code: KICK_FOR[reason], ...(spare ? { keep: spare } : {}) }),
      audit,
    );
    if (!s) return false;
    for (const hook of this.endedHooks) hook(sessionId, reason, successor);
    this.deps.log.info({ sessionId, reason }, 'session ended');
    try {
      await this.deps.pool.query(
        'UPDATE sessions SET ended_at = now(), end_reason = $2 WHERE id = $1 AND ended_at IS NULL',
        [sessionId, reason],
      );
      this.lastSeen.written(audit);
    } catch (e) {
      // The session is ended; its audit row is written with the last-seen batches once
      // PostgreSQL takes it, at the time it ended.
      this.lastSeen.ended(sessionId, reason, endedAt, true, audit);
      logFailure(
        this.deps.log,
        e,
        { sessionId, reason },
        'session end not written to PostgreSQL yet; written once it answers',
      );
    }
    return true;
  }

  /**
   * From the cluster-wide sweep: ends up to `limit` sessions whose life ran out (their hash
   * expired in Redis), each as of the time it expired: the kick of its connections on every node
   * and its outbox's purge (each waiting event reported `delivery.failed`, `session_expired`, by
   * the sweep's owed step) are recorded in the step that takes it (session-store.ts, EXPIRED);
   * its audit row is ended `expired` by the last-seen batch (within a second, one statement for
   * all, off the sweep's path: a PostgreSQL that is slow or gone holds no sweep). The ended hooks
   * do not run: the owed step does the purge. Returns how many it ended.
   */
  async endExpired(limit: number): Promise<number> {
    const receipt = this.deps.keys.expiryReceipt(randomUUID());
    // What a take whose reply is lost ended is read from its receipt, from the node's sweep.
    const taken = await this.lostTakes.watch(receipt, this.store.takeExpired(limit, receipt));
    this.expired(taken);
    return taken.length;
  }

  /** The node's part of sessions a take ended: their audit ends, a line each, the count. */
  private expired(taken: ExpiredSession[]): void {
    for (const { sessionId, at, audit } of taken) {
      this.lastSeen.ended(sessionId, 'expired', at, false, audit);
      this.deps.log.info({ sessionId, reason: 'expired' }, 'session ended');
    }
    if (taken.length > 0) this.deps.metrics?.sessionsExpired.inc(taken.length);
  }

  /**
   * From the cluster-wide sweep: writes up to `limit` audit ends owed since before `cutoff` (ms)
   * (keys.ts auditOwed: their node died before it wrote them, or is still failing to), in one
   * statement, each at the time its session ended, and forgets them; a row already ended keeps
   * its end (one ended by a concurrent end of the same session, whose removal lost the race but
   * recorded its end as owed all the same: session-store.ts remove). Returns how many it found
   * and how many rows it ended.
   */
  async writeOwedEnds(cutoff: number, limit: number): Promise<{ found: number; written: number }> {
    const { redis, keys, pool } = this.deps;
    const members = await redis.zrangebyscore(keys.auditOwed, '-inf', cutoff, 'LIMIT', 0, limit);
    if (members.length === 0) return { found: 0, written: 0 };
    const ends = new Map<string, { reason: string; at: number }>();
    for (const m of members) {
      const end = parseAuditOwed(m);
      if (end) ends.set(end.sid, end);
    }
    const written = ends.size > 0 ? await writeEnds(pool, ends) : 0;
    await redis.zrem(keys.auditOwed, ...members);
    if (written > 0) this.deps.metrics?.auditEndsSwept.inc(written);
    return { found: members.length, written };
  }

  /**
   * From the cluster-wide sweep: reads the next `limit` open audit rows and ends `lost` those
   * whose sessions are gone from Redis with no end recorded (lost-sessions.ts). 0: none read.
   */
  async endLostSessions(limit: number): Promise<LostCheck> {
    if (limit <= 0) return { checked: 0, ended: [], deferred: 0 };
    const r = await endLostSessions(this.deps, limit);
    this.deps.metrics?.auditRowsChecked.inc(r.checked);
    if (r.ended.length > 0) this.deps.metrics?.sessionsLostEnded.inc(r.ended.length);
    return r;
  }

  /**
   * From the cluster-wide sweep: reads the next `limit` live sessions of the expiry index and
   * ends again, in Redis, those whose audit row says they ended: brought back by a Redis rolled
   * back (lost-sessions.ts, sessionsResurrected). Each is ended as a revoke is (its connections
   * kicked `session_revoked`, its tokens and waiting events gone); its row keeps the end it had.
   * Returns the sessions it ended. 0: none read.
   */
  async endResurrected(limit: number): Promise<string[]> {
    if (limit <= 0) return [];
    const { ended } = await sessionsResurrected(this.deps, limit, (sid) => this.endSession(sid, 'revoked'));
    if (ended.length > 0) this.deps.metrics?.sessionsResurrected.inc(ended.length);
    return ended;
  }

  /**
   * Sessions resumed, refreshed or authenticated whose audit rows the last-seen batch found ended
   * (last-seen.ts): brought back by a Redis rolled back. Each is ended again as the sweep's check
   * does (`endResurrected`), within a second of its first use instead of when the sweep's pass
   * reaches it. One whose end Redis does not take (down, full, a timeout) is read again with the
   * next batch, once a second until it is ended or gone; one refused otherwise (an error of
   * ours, a permission) is logged and left to the sweep's pass.
   */
  private async endResumedEnded(ids: string[]): Promise<void> {
    const ended: string[] = [];
    for (const sid of ids) {
      try {
        if (await this.endSession(sid, 'revoked')) ended.push(sid);
      } catch (e) {
        const again = isDependencyFault(e);
        if (again) this.lastSeen.check(sid, Date.now(), true);
        logFailure(
          this.deps.log,
          e,
          { sessionId: sid },
          again
            ? 'resumed session whose audit row says it ended not ended again yet: Redis did not take it'
            : 'resumed session whose audit row says it ended not ended again; left to the sweep',
        );
      }
    }
    if (ended.length === 0) return;
    this.deps.metrics?.sessionsResurrected.inc(ended.length);
    this.deps.log.warn(
      { sessions: ended.length, sessionIds: ended.slice(0, 10) },
      'resumed sessions whose audit rows say they ended were ended again: Redis was rolled back',
    );
  }

  // ---- email codes ------------------------------------------------------------------------------

  private otpKey(email: string): string {
    return this.deps.keys.otp(createHash('sha256').update(email).digest('hex'));
  }

  private codeHash(email: string, code: string): string {
    return createHash('sha256').update(`${email}\n${code}`).digest('hex');
  }

  async otpRequest(req: { email: string }, ctx: RequestContext): Promise<Record<string, never>> {
    const mailer = this.deps.mailer;
    if (!mailer) throw new ProtocolError('forbidden', 'email login is not enabled on this server');
    await this.limit(this.otpLimit, ctx.ip);
    let email: string;
    try {
      email = this.normalizeEmail(req.email);
    } catch {
      return {}; // always ok: the answer does not tell which addresses are usable
    }
    const code = String(randomInt(0, 1_000_000)).padStart(6, '0');
    const o = this.deps.options;
    const key = this.otpKey(email);
    const m = this.deps.redis.multi();
    m.del(key);
    m.hset(key, 'code', this.codeHash(email, code), 'tries', 0);
    m.pexpire(key, o.otpExpirationMinutes * 60_000);
    await m.exec();
    // The address is personal data: the log names it by a short hash.
    this.deps.log.info(
      { ip: ctx.ip, to: createHash('sha256').update(email).digest('hex').slice(0, 12) },
      'login code sent',
    );
    this.deps.metrics?.authResult('otp_send', 'ok');
    mailer.sendCode(email, code, o.otpExpirationMinutes).catch((e) => {
      this.deps.metrics?.authResult('otp_send', 'mail_failed');
      this.deps.log.error({ err: (e as Error).message }, 'could not send the login code');
    });
    return {};
  }

  otpVerify(
    req: { email: string; code: string; username?: string },
    ctx: RequestContext & { device?: Device },
  ): Promise<SessionGrant> {
    return this.counted('otp_verify', () => this.verifyCode(req, ctx));
  }

  private async verifyCode(
    req: { email: string; code: string; username?: string },
    ctx: RequestContext & { device?: Device },
  ): Promise<SessionGrant> {
    let email: string;
    try {
      email = this.normalizeEmail(req.email);
    } catch {
      throw new ProtocolError('otp_invalid');
    }
    const r = await this.deps.pool.query('SELECT id, username FROM users WHERE email = $1', [email]);
    const device = ctx.device;
    if (device?.id) {
      // Checked before the code is spent, and before an account is created for it.
      const d = await this.deps.pool.query('SELECT owner FROM devices WHERE id = $1', [device.id]);
      if (d.rowCount && d.rows[0].owner !== r.rows[0]?.id)
        throw new ProtocolError('forbidden', 'this device belongs to another account');
    }
    if (!r.rowCount) {
      // Checked before the code is spent, so a missing username costs no attempt.
      if (req.username === undefined)
        throw badMessage('username', 'needed to create an account for a new address');
      this.checkUsername(req.username);
    }
    // Reserved before the code is checked, as a login's attempt is: concurrent guesses count.
    const addressKey = createHash('sha256').update(email).digest('hex');
    const reserved = await this.otpFailures.reserve(addressKey);
    let result: string;
    try {
      result = (await this.deps.redis.eval(
        OTP_CHECK,
        1,
        this.otpKey(email),
        this.codeHash(email, req.code.trim()),
        this.deps.options.otpMaxRetries,
      )) as string;
    } catch (e) {
      await reserved.release().catch(() => {});
      throw e;
    }
    if (result !== 'ok') {
      await reserved.failed();
      throw new ProtocolError('otp_invalid');
    }
    await reserved.succeeded(true);
    let userId: string;
    let username: string;
    if (r.rowCount) {
      userId = r.rows[0].id;
      username = r.rows[0].username;
    } else {
      // An unusable password hash: this account logs in by email code until a password is set.
      const unusable = `!otp-only:${randomBytes(16).toString('hex')}`;
      userId = await this.insertUser(req.username!, email, unusable);
      username = req.username!;
    }
    if (device?.id) await this.claimDevice(userId, device);
    return this.startSession(userId, username, device ?? null, ctx);
  }
}
