/**
 * Identity: accounts (PostgreSQL), live sessions (Redis), tokens, lockout, email codes.
 * The same operations serve the wire requests (PROTOCOL.md §4) and the HTTP auth API.
 *
 * Rules worth knowing:
 * - `invalid_credentials` is the same code and message for an unknown user (after a full dummy
 *   verify, so timing does not tell either) and a wrong password.
 * - After `lockoutAttempts` consecutive failures an account is `locked` for `lockoutSeconds`;
 *   one IP also has a failure budget, so it cannot walk through many accounts.
 * - Refresh tokens are single use; presenting a used one ends the whole session
 *   (`refresh_reused`), and every node kicks that session's connection.
 * - A login or resume with the device id of another live session of the same user ends that
 *   session (`takeover`).
 */
import { createHash, randomBytes, randomInt, randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import type pg from 'pg';
import { RateLimiterRedis, type RateLimiterRes } from 'rate-limiter-flexible';
import { badMessage, type Device, ProtocolError, type SessionData } from '../../protocol/index.ts';
import type { Keys } from '../keys.ts';
import type { Logger } from '../log.ts';
import { pgError } from './db.ts';
import type { Hasher } from './hasher.ts';
import type { Mailer } from './mailer.ts';
import { type LiveSession, SessionStore } from './session-store.ts';
import { hashToken, newRefreshToken, type Tokens } from './tokens.ts';

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
}

export interface RequestContext {
  ip: string;
  userAgent?: string;
  /** The caller's session, when authenticated. */
  sessionId?: string;
}

export interface SessionGrant extends SessionData {
  /** Not sent on the wire: the device id bound to the session. */
  deviceId?: string;
}

export type EndReason = 'logout' | 'revoked' | 'expired' | 'refresh_reused' | 'takeover';

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

export class IdentityService {
  readonly store: SessionStore;
  private readonly accountFailures: RateLimiterRedis;
  private readonly ipFailures: RateLimiterRedis;
  private readonly registerLimit: RateLimiterRedis;
  private readonly refreshLimit: RateLimiterRedis;
  private readonly otpLimit: RateLimiterRedis;
  private readonly endedHooks: ((sessionId: string, reason: EndReason) => void)[] = [];
  private readonly username: RegExp;

  constructor(
    private readonly deps: {
      pool: pg.Pool;
      redis: Redis;
      keys: Keys;
      hasher: Hasher;
      tokens: Tokens;
      mailer: Mailer | null;
      log: Logger;
      options: IdentityOptions;
    },
  ) {
    const o = deps.options;
    this.store = new SessionStore(deps.redis, deps.keys, o.sessionTtlSeconds);
    const limiter = (name: string, points: number, duration: number, blockDuration = 0) =>
      new RateLimiterRedis({
        storeClient: deps.redis,
        keyPrefix: deps.keys.rateLimit(name),
        points,
        duration,
        blockDuration,
      });
    this.accountFailures = limiter('login-account', o.lockoutAttempts, o.lockoutSeconds);
    this.ipFailures = limiter('login-ip', o.ipFailureBudget, o.lockoutSeconds);
    this.registerLimit = limiter('register-ip', o.registerPerMinute, 60);
    this.refreshLimit = limiter('refresh-ip', o.refreshPerMinute, 60);
    this.otpLimit = limiter('otp-ip', o.otpPerMinute, 60);
    this.username = new RegExp(`^[A-Za-z0-9_]{${o.usernameMin},${o.usernameMax}}$`);
  }

  /** Runs whenever a session ends, on the node that ended it (e.g. to purge its outbox). */
  onSessionEnded(hook: (sessionId: string, reason: EndReason) => void): void {
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
    if (email.length > 254 || !EMAIL.test(email)) throw new ProtocolError('invalid_email');
    return email;
  }

  private checkPassword(password: string): void {
    // NIST SP 800-63B: length only, counted in code points; no composition rules.
    const n = [...password].length;
    if (n < 8) throw new ProtocolError('weak_password', 'password must have at least 8 characters');
    if (n > 128) throw new ProtocolError('weak_password', 'password must have at most 128 characters');
  }

  private async limit(limiter: RateLimiterRedis, key: string): Promise<void> {
    try {
      await limiter.consume(key);
    } catch (e) {
      if (e instanceof Error) throw e;
      throw new ProtocolError('rate_limited', undefined, { retryAfter: (e as RateLimiterRes).msBeforeNext });
    }
  }

  /** Inserts a user and its `user.registered` outbox row in one transaction. */
  private async insertUser(username: string, email: string, passwordHash: string): Promise<string> {
    const client = await this.deps.pool.connect();
    try {
      await client.query('BEGIN');
      const r = await client.query(
        'INSERT INTO users (username, email, password_hash) VALUES ($1, $2, $3) RETURNING id, created_at',
        [username, email, passwordHash],
      );
      const userId = r.rows[0].id as string;
      await client.query('INSERT INTO outbox (name, payload) VALUES ($1, $2)', [
        'user.registered',
        JSON.stringify({ userId, username, email, ts: new Date(r.rows[0].created_at).getTime() }),
      ]);
      await client.query('COMMIT');
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

  async register(
    req: { username: string; email: string; password: string },
    ctx: RequestContext,
  ): Promise<{ userId: string }> {
    await this.limit(this.registerLimit, ctx.ip);
    this.checkUsername(req.username);
    const email = this.normalizeEmail(req.email);
    this.checkPassword(req.password);
    const { hash } = await this.deps.hasher.hash(req.password);
    const userId = await this.insertUser(req.username, email, hash);
    this.deps.log.info({ userId }, 'user registered');
    return { userId };
  }

  async me(userId: string): Promise<Record<string, unknown>> {
    const r = await this.deps.pool.query(
      'SELECT id, username, email, created_at, last_login_at FROM users WHERE id = $1',
      [userId],
    );
    if (r.rowCount === 0) throw new ProtocolError('not_found', 'user not found');
    const u = r.rows[0];
    return {
      userId: u.id,
      username: u.username,
      email: u.email,
      createdAt: new Date(u.created_at).getTime(),
      lastLoginAt: u.last_login_at ? new Date(u.last_login_at).getTime() : null,
    };
  }

  async userIdOf(username: string): Promise<string | null> {
    const r = await this.deps.pool.query('SELECT id FROM users WHERE lower(username) = lower($1)', [
      username,
    ]);
    return r.rowCount ? (r.rows[0].id as string) : null;
  }

  // ---- login ----------------------------------------------------------------------------------

  async login(
    req: { username?: string; email?: string; password: string; device?: Device },
    ctx: RequestContext,
  ): Promise<SessionGrant> {
    const ident = (req.username ?? req.email ?? '').trim().toLowerCase();
    const r = await this.deps.pool.query(
      req.username !== undefined
        ? 'SELECT id, username, password_hash FROM users WHERE lower(username) = lower($1)'
        : 'SELECT id, username, password_hash FROM users WHERE email = $1',
      [req.username !== undefined ? req.username : ident],
    );
    const user = r.rows[0] as { id: string; username: string; password_hash: string } | undefined;
    // One failure counter per account, whether it is named by username or by email.
    const accountKey = user ? `u:${user.id}` : `n:${ident}`;
    const [account, ip] = await Promise.all([
      this.accountFailures.get(accountKey),
      this.ipFailures.get(ctx.ip),
    ]);
    const o = this.deps.options;
    if (account && account.consumedPoints >= o.lockoutAttempts) {
      throw new ProtocolError('locked', undefined, { retryAfter: account.msBeforeNext });
    }
    if (ip && ip.consumedPoints >= o.ipFailureBudget) {
      throw new ProtocolError('rate_limited', 'too many failed logins from this address', {
        retryAfter: ip.msBeforeNext,
      });
    }
    let ok = false;
    let rehash = false;
    if (user) ({ ok, rehash } = await this.deps.hasher.verify(req.password, user.password_hash));
    else await this.deps.hasher.dummyVerify(req.password);
    if (!ok || !user) {
      await Promise.all([this.accountFailures.penalty(accountKey, 1), this.ipFailures.penalty(ctx.ip, 1)]);
      throw new ProtocolError('invalid_credentials', UNKNOWN_OR_WRONG);
    }
    await this.accountFailures.delete(accountKey);
    if (rehash) {
      const { hash } = await this.deps.hasher.hash(req.password);
      await this.deps.pool.query('UPDATE users SET password_hash = $2 WHERE id = $1', [user.id, hash]);
      this.deps.log.info({ userId: user.id }, 'password hash upgraded to argon2id');
    }
    await this.deps.pool.query('UPDATE users SET last_login_at = now() WHERE id = $1', [user.id]);
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
    await this.deps.pool.query(
      `INSERT INTO sessions (id, user_id, device_id, device_name, device_model, device_fw, ip, user_agent)
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
      },
      o.refreshTtlSeconds * 1000,
    );
    if (device?.id) await this.takeOverDevice(userId, device.id, sessionId);
    const { token, expiresAt } = await this.deps.tokens.issue(userId, sessionId);
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

  /** Ends the user's other live sessions that carry this device id (`takeover`). */
  private async takeOverDevice(userId: string, deviceId: string, keep: string): Promise<void> {
    for (const sid of await this.store.ofUser(userId)) {
      if (sid === keep) continue;
      const s = await this.store.get(sid);
      if (s?.device?.id === deviceId) await this.endSession(sid, 'takeover');
    }
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
    return { ...claims, username: session.username, session };
  }

  async resume(req: { token: string; device?: Device }, ctx: RequestContext): Promise<SessionGrant> {
    const a = await this.authenticate(req.token);
    const device = req.device ?? a.session.device;
    await this.store.touch(a.sessionId, a.userId, req.device ?? null);
    await this.deps.pool.query('UPDATE sessions SET last_seen_at = now(), ip = $2 WHERE id = $1', [
      a.sessionId,
      ctx.ip,
    ]);
    if (device?.id) await this.takeOverDevice(a.userId, device.id, a.sessionId);
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

  async refresh(
    req: { refresh: string },
    ctx: RequestContext,
  ): Promise<{ token: string; refresh: string; expiresAt: number; refreshExpiresAt: number }> {
    await this.limit(this.refreshLimit, ctx.ip);
    const o = this.deps.options;
    const next = newRefreshToken();
    const r = await this.store.rotate(
      hashToken(req.refresh),
      hashToken(next),
      o.refreshTtlSeconds * 1000,
      o.refreshTtlSeconds * 1000,
    );
    if (r.status === 'reused') {
      await this.endSession(r.sessionId!, 'refresh_reused');
      this.deps.log.warn({ sessionId: r.sessionId }, 'refresh token reused: session ended');
      throw new ProtocolError('refresh_reused');
    }
    if (r.status === 'invalid') throw new ProtocolError('token_invalid', 'refresh token invalid or expired');
    const s = await this.store.get(r.sessionId!);
    if (!s) throw new ProtocolError('session_revoked');
    await this.store.touch(s.sessionId, s.userId);
    const { token, expiresAt } = await this.deps.tokens.issue(s.userId, s.sessionId);
    return { token, refresh: next, expiresAt, refreshExpiresAt: Date.now() + o.refreshTtlSeconds * 1000 };
  }

  async logout(req: { token?: string }, ctx: RequestContext): Promise<Record<string, never>> {
    let sid = ctx.sessionId;
    if (req.token !== undefined) {
      try {
        sid = (await this.deps.tokens.verify(req.token, true)).sessionId;
      } catch {
        return {}; // idempotent: an unusable token has no session left to end
      }
    }
    if (!sid)
      throw new ProtocolError('unauthenticated', 'logout needs a token or an authenticated connection');
    await this.endSession(sid, 'logout');
    return {};
  }

  async sessions(userId: string, current: string | undefined): Promise<Record<string, unknown>[]> {
    const out: Record<string, unknown>[] = [];
    for (const sid of await this.store.ofUser(userId)) {
      const s = await this.store.get(sid);
      if (!s) continue;
      out.push({
        sessionId: sid,
        device: s.device,
        ip: s.ip,
        createdAt: s.createdAt,
        lastSeenAt: s.lastSeenAt,
        current: sid === current,
      });
    }
    return out.sort((a, b) => (a.createdAt as number) - (b.createdAt as number));
  }

  async revoke(userId: string, sessionId: string): Promise<Record<string, never>> {
    const s = await this.store.get(sessionId);
    if (!s || s.userId !== userId) throw new ProtocolError('not_found', 'no such session');
    await this.endSession(sessionId, 'revoked');
    return {};
  }

  /** Ends a session once: Redis, the audit row, the kick on every node, the ended hooks. */
  async endSession(sessionId: string, reason: EndReason): Promise<boolean> {
    const s = await this.store.remove(sessionId);
    if (!s) return false;
    await this.deps.pool.query(
      'UPDATE sessions SET ended_at = now(), end_reason = $2 WHERE id = $1 AND ended_at IS NULL',
      [sessionId, reason],
    );
    await this.deps.redis.publish(
      this.deps.keys.kickChannel,
      JSON.stringify({ sessionId, code: KICK_FOR[reason] }),
    );
    for (const hook of this.endedHooks) hook(sessionId, reason);
    this.deps.log.info({ sessionId, reason }, 'session ended');
    return true;
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
    mailer.sendCode(email, code, o.otpExpirationMinutes).catch((e) => {
      this.deps.log.error({ err: (e as Error).message }, 'could not send the login code');
    });
    return {};
  }

  async otpVerify(
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
    if (!r.rowCount) {
      // Checked before the code is spent, so a missing username costs no attempt.
      if (req.username === undefined)
        throw badMessage('username', 'needed to create an account for a new address');
      this.checkUsername(req.username);
    }
    const result = (await this.deps.redis.eval(
      OTP_CHECK,
      1,
      this.otpKey(email),
      this.codeHash(email, req.code.trim()),
      this.deps.options.otpMaxRetries,
    )) as string;
    if (result !== 'ok') throw new ProtocolError('otp_invalid');
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
    await this.deps.pool.query('UPDATE users SET last_login_at = now() WHERE id = $1', [userId]);
    return this.startSession(userId, username, ctx.device ?? null, ctx);
  }
}
