/**
 * Live sessions in Redis: one hash per session with a TTL (SESSION_TTL), the set of each
 * user's sessions, the refresh-token index (current and used hashes, grace records) and the
 * device key (device id → session) of a session with a device. Rotation is one Lua script, so
 * two concurrent refreshes of one token cannot both rotate it.
 */
import type { Redis } from 'ioredis';
import type { Device } from '../../protocol/index.ts';
import { OUTBOX_TTL_GRACE_S } from '../delivery/outbox.ts';
import type { Keys } from '../keys.ts';
import { RECEIPT_MS } from '../receipts.ts';
import type { DeviceInfo } from './session-details.ts';

export interface LiveSession {
  sessionId: string;
  userId: string;
  username: string;
  device: Device | null;
  ip: string;
  userAgent?: string;
  createdAt: number;
  lastSeenAt: number;
  refreshHash: string;
  refreshExpiresAt: number;
  /** From the User-Agent, when the session started without a device (session-details.ts). */
  deviceInfo?: DeviceInfo | null;
  /** `Local`, a place from the GeoIP database, or null (session-details.ts). */
  location?: string | null;
}

/** A live session as the session lists show it. */
export interface SessionView {
  session: LiveSession;
  /** When the session's hash expires unless extended (resume, refresh). */
  expiresAt: number;
  /** A connection of it is online on some node (presence). */
  online: boolean;
}

/**
 * Refresh rotation, and the grace period of a retried refresh (PROTOCOL.md §4).
 * KEYS[1] current refresh key, KEYS[2] used refresh key, KEYS[3] new refresh key, KEYS[4] session,
 * KEYS[5] grace record of the presented token, KEYS[6] its hold (see HOLD_GRACE)
 * ARGV[1] new refresh TTL (ms), ARGV[2] how long a used token is remembered (ms), ARGV[3] new hash,
 * ARGV[4] new refresh expiry (ms), ARGV[5] the sealed successor pair, ARGV[6] grace (ms, 0: none)
 * Returns {"ok", sid} | {"again", sid, sealed} | {"reused", sid} | {"invalid"}
 *   again: the token was rotated less than the grace period ago (or than its hold, if longer)
 *   and its successor is still the session's current token; `sealed` is the pair that rotation
 *   handed out.
 * The grace record is written by the same call as the rotation, so a concurrent refresh sees
 * either the current token or the used record with its pair, never a state in between.
 */
const ROTATE = `
local sid = redis.call('GET', KEYS[1])
if not sid then
  local used = redis.call('GET', KEYS[2])
  if not used then return {'invalid'} end
  local g = redis.call('HMGET', KEYS[5], 'next', 'sealed')
  if g[1] and g[2] and redis.call('HGET', KEYS[4], 'refreshHash') == g[1] then
    return {'again', used, g[2]}
  end
  return {'reused', used}
end
if redis.call('EXISTS', KEYS[4]) == 0 or ARGV[5] == '' then
  redis.call('DEL', KEYS[1])
  return {'invalid'}
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], sid, 'PX', ARGV[2])
redis.call('SET', KEYS[3], sid, 'PX', ARGV[1])
redis.call('HSET', KEYS[4], 'refreshHash', ARGV[3], 'refreshExpiresAt', ARGV[4])
if tonumber(ARGV[6]) > 0 then
  redis.call('HSET', KEYS[5], 'next', ARGV[3], 'sealed', ARGV[5])
  redis.call('PEXPIRE', KEYS[5], math.max(tonumber(ARGV[6]), redis.call('PTTL', KEYS[6])))
end
return {'ok', sid}
`;

/**
 * A refresh of a current token was refused (`rate_limited`), and its sender told to come back
 * after `retryAfter`: meanwhile a concurrent refresh of the same token (another connection of
 * the device) may rotate it, and the refused one's retry must then still be within the grace
 * period. The token's hold lives ARGV[1] ms (retryAfter plus the grace period), and its grace
 * record, if the rotation came first, at least as long; a rotation after it reads the hold.
 * KEYS[1] hold of the token, KEYS[2] its grace record; ARGV[1] ms
 */
const HOLD_GRACE = `
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
local g = redis.call('PTTL', KEYS[2])
if g >= 0 and g < ms then redis.call('PEXPIRE', KEYS[2], ms) end
return 1
`;

/**
 * Lua (CREATE, RESUME, TOUCH): session `sid` (a Lua expression) expires `ttl` s from now, as its
 * hash's EXPIRE says, in the index of session expiries `index` (keys.ts sessionExpiries), read
 * by the sweep that ends sessions whose life ran out (EXPIRED). Redis's clock: the one its TTLs
 * run on.
 */
const indexExpiry = (index: string, sid: string, ttl: string) => `
  local now = redis.call('TIME')
  redis.call('ZADD', ${index}, now[1] * 1000 + math.floor(now[2] / 1000) + ${ttl} * 1000, ${sid})`;

/**
 * Lua (RESUME, TOUCH): the session's outbox (its six keys from KEYS[`first`]: q, ev, att, rc,
 * exp, seq) lives at least as long as the session extended now: `ttl` s (SESSION_TTL and the
 * outbox's grace, OUTBOX_TTL_GRACE_S), refreshed when q has run down by the slack publish.lua
 * uses (a tenth of it, at most a minute), as a publish refreshes it. Before, an offline session
 * kept alive by refreshes outlived its outbox, whose life ran from the last publish: its waiting
 * events were gone, unreported, before the session ended. The sent mark is left as it is: it
 * may go before the counter (a rollback to the pump, which starts over), never after it.
 */
const extendOutbox = (first: number, ttl: string) => `
  local left = redis.call('PTTL', KEYS[${first}])
  local full = tonumber(${ttl})
  if left >= 0 and left < (full - math.min(60, math.floor(full / 10))) * 1000 then
    for i = ${first}, ${first + 5} do redis.call('EXPIRE', KEYS[i], full) end
  end`;

/**
 * Lua (CREATE, TOUCH): the device key `key` names session `sid` from now on; that session and
 * the one the key named before (it may have been made by a node that kept no device sessions)
 * are among the device's sessions `set`, which live `ttl` s. Each argument is a Lua expression.
 */
const takeDeviceKey = (key: string, set: string, sid: string, ttl: string) => `
  local before = redis.call('GET', ${key})
  if before and before ~= ${sid} then redis.call('SADD', ${set}, before) end
  redis.call('SET', ${key}, ${sid}, 'EX', ${ttl})
  redis.call('SADD', ${set}, ${sid})
  redis.call('EXPIRE', ${set}, ${ttl})`;

/**
 * A new session in one script call: its hash, the user's set, the refresh token and (with a
 * device) the device key and the device's sessions, all with their TTLs. The session the device
 * key named before (it may have been made by a node that kept no device sessions) joins them
 * too, so that the takeover that follows finds it.
 * KEYS[1] session, KEYS[2] user's sessions, KEYS[3] refresh key, KEYS[4] device key ('' none),
 * KEYS[5] the device's sessions ('' none), KEYS[6] the index of session expiries
 * ARGV[1] session id, ARGV[2] TTL (s), ARGV[3] refresh TTL (ms), then field, value, ... of the hash
 */
const CREATE = `
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])${indexExpiry('KEYS[6]', 'ARGV[1]', 'ARGV[2]')}
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
if KEYS[4] ~= '' then${takeDeviceKey('KEYS[4]', 'KEYS[5]', 'ARGV[1]', 'ARGV[2]')}
end
return 1
`;

/**
 * A resume's read and touch in one call: the session's hash, and, if it belongs to ARGV[1],
 * its activity marked and its life (and its user's set's) extended, as `touch` does.
 * KEYS[1] session, KEYS[2] user's sessions, KEYS[3] the index of session expiries, KEYS[4-9]
 * its outbox (extendOutbox); ARGV[1] user id, ARGV[2] now (ms), ARGV[3] TTL (s), ARGV[4] session
 * id, ARGV[5] the outbox's TTL (s)
 * Returns the hash as HGETALL does (before the touch), empty when the session is gone.
 */
const RESUME = `
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if h[i] == 'userId' then
    if h[i + 1] == ARGV[1] then
      redis.call('HSET', KEYS[1], 'lastSeenAt', ARGV[2])
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      redis.call('EXPIRE', KEYS[2], ARGV[3])${indexExpiry('KEYS[3]', 'ARGV[4]', 'ARGV[3]')}${extendOutbox(4, 'ARGV[5]')}
    end
    break
  end
end
return h
`;

/**
 * A session's `touch` (a refresh, a resume naming a device): if the session is still there and
 * `userId`'s, its activity is marked and its life extended, with its user's set's and the key
 * naming the node that holds it (`P{s:<sid>}:node`, set when a connection binds it: a connection
 * that outlives SESSION_TTL by refreshing keeps getting its events); a device key is set
 * (KEYS[4], the resume's device; the session joins that device's sessions, with the session the
 * key named before, as in CREATE) or released or extended (KEYS[5], the session's previous
 * device, each only while it names the session; released, the session leaves that device's
 * sessions, KEYS[7]; extended, so do they). A session that is gone (revoked, logged out,
 * expired) is not created again: the call returns 0.
 * KEYS[1] session, KEYS[2] user's sessions, KEYS[3] node key, KEYS[4] new device key or "",
 * KEYS[5] previous device key or "", KEYS[6] the new device's sessions or "", KEYS[7] the
 * previous device's sessions or "", KEYS[8] the index of session expiries, KEYS[9-14] the
 * session's outbox (extendOutbox); ARGV[1] user id, ARGV[2] now (ms), ARGV[3] TTL (s), ARGV[4]
 * session id, ARGV[5] the new device (JSON) or "", ARGV[6] "release" or "extend" (KEYS[5]),
 * ARGV[7] the outbox's TTL (s)
 */
const TOUCH = `
if redis.call('HGET', KEYS[1], 'userId') ~= ARGV[1] then return 0 end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'lastSeenAt', ARGV[2], 'device', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'lastSeenAt', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])${indexExpiry('KEYS[8]', 'ARGV[4]', 'ARGV[3]')}${extendOutbox(9, 'ARGV[7]')}
if KEYS[5] ~= '' then
  if ARGV[6] == 'release' then
    if redis.call('GET', KEYS[5]) == ARGV[4] then redis.call('DEL', KEYS[5]) end
    redis.call('SREM', KEYS[7], ARGV[4])
  elseif redis.call('GET', KEYS[5]) == ARGV[4] then
    redis.call('EXPIRE', KEYS[5], ARGV[3])
    redis.call('EXPIRE', KEYS[7], ARGV[3])
  end
end
if KEYS[4] ~= '' then${takeDeviceKey('KEYS[4]', 'KEYS[6]', 'ARGV[4]', 'ARGV[3]')}
end
return 1
`;

/**
 * Ends up to ARGV[3] sessions whose life ran out: those due in the index of session expiries
 * (KEYS[1]) whose hash is gone. Each leaves the index, its outbox's purge is owed if it holds
 * events (KEYS[2], keys.ts endsOwed, at time 0: due for the sweep's owed step at once; nothing
 * is published to a session once its hash is gone, so an empty outbox stays empty), and every
 * node is told to kick its connections (KEYS[3], the kick channel), all in this step, so that a
 * sweep that dies after it leaves the rest to the owed step of any node. A due session whose
 * hash is still there (extended where the index was not written: a node of an earlier version)
 * is moved to its new time; one whose hash has no TTL leaves the index. ARGV[1], ARGV[2]: what
 * comes before and after a session id in its keys (keys.ts sessionKeyParts). Each ended one's
 * audit end is recorded as owed (KEYS[4], keys.ts auditOwed, `sid expired <expiry>` at now) until
 * its row is written. When it ends any, it keeps what it returns under KEYS[5] (a receipt named by
 * the call) for ARGV[4] ms: a node whose wait for the reply ran out (a Redis frozen or slow past
 * its timeout runs the call later, and the reply is dropped) reads it there.
 * Returns session id, expiry (ms), ... of the sessions it ended.
 */
const EXPIRED = `
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local ended = {}
for i = 1, #due, 2 do
  local sid = due[i]
  local ttl = redis.call('PTTL', ARGV[1] .. sid .. ARGV[2] .. 'sess')
  if ttl >= 0 then
    redis.call('ZADD', KEYS[1], now + ttl, sid)
  else
    redis.call('ZREM', KEYS[1], sid)
    if ttl == -2 then
      if redis.call('EXISTS', ARGV[1] .. sid .. ARGV[2] .. 'q') == 1 then
        redis.call('ZADD', KEYS[2], 0, sid .. ' expired ')
      end
      redis.call('PUBLISH', KEYS[3], cjson.encode({sessionId = sid, code = 'session_revoked'}))
      redis.call('ZADD', KEYS[4], now, sid .. ' expired ' .. due[i + 1])
      ended[#ended + 1] = sid
      ended[#ended + 1] = due[i + 1]
    end
  end
end
if #ended > 0 then redis.call('SET', KEYS[5], table.concat(ended, ' '), 'PX', ARGV[4]) end
return ended
`;

/** A session the sweep ended because its life ran out. */
export interface ExpiredSession {
  sessionId: string;
  /** When its hash expired (ms). */
  at: number;
  /** Its owed audit end (keys.ts auditOwed). */
  audit: string;
}

/** EXPIRED's reply (session id, expiry, ...) as sessions. */
function expiredFrom(flat: string[]): ExpiredSession[] {
  const out: ExpiredSession[] = [];
  for (let i = 0; i + 1 < flat.length; i += 2) {
    out.push({
      sessionId: flat[i],
      at: Number(flat[i + 1]),
      audit: auditOwed(flat[i], 'expired', flat[i + 1]),
    });
  }
  return out;
}

/** Deletes KEYS[1] only if it still holds ARGV[1] (a device key still naming this session). */
const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`;

/**
 * The device key (KEYS[1]) handed from session ARGV[1] to ARGV[2] for ARGV[3] s, only while it
 * names ARGV[1] and ARGV[2] lives (KEYS[2], its hash); ARGV[2] joins the device's sessions
 * (KEYS[3]). A login of the device that set the key since keeps it.
 */
const HAND = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1`;

/**
 * A resume of a session with a device: the session is among the device's sessions (KEYS[2]; it
 * may have been made by a node that kept none), whose life is extended, and the device key
 * (KEYS[1]) is extended by ARGV[2] s only if it still names the session (ARGV[1]).
 */
const EXTEND = `
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0`;

function parseSession(sid: string, h: Record<string, string>): LiveSession | null {
  if (!h.userId) return null;
  return {
    sessionId: sid,
    userId: h.userId,
    username: h.username,
    device: h.device ? JSON.parse(h.device) : null,
    ip: h.ip,
    ...(h.userAgent ? { userAgent: h.userAgent } : {}),
    createdAt: Number(h.createdAt),
    lastSeenAt: Number(h.lastSeenAt),
    refreshHash: h.refreshHash,
    refreshExpiresAt: Number(h.refreshExpiresAt),
    deviceInfo: h.deviceInfo ? JSON.parse(h.deviceInfo) : null,
    location: h.location || null,
  };
}

export type RotateResult =
  | { status: 'ok'; sessionId: string }
  | { status: 'again'; sessionId: string; sealed: string }
  | { status: 'reused'; sessionId: string }
  | { status: 'invalid' };

interface SessionCommands {
  gwSessionCreate(...args: (string | number)[]): Promise<number>;
  gwSessionResume(...args: (string | number)[]): Promise<string[]>;
  gwSessionTouch(...args: (string | number)[]): Promise<number>;
  gwSessionsExpired(...args: (string | number)[]): Promise<string[]>;
}

/** The `endsOwed` member of a session's end (keys.ts): `sid reason successor`. */
export function endOwed(sid: string, reason: string, successor?: string): string {
  return `${sid} ${reason} ${successor ?? ''}`;
}

/** The `auditOwed` member of a session's end (keys.ts): `sid reason at`, `at` in ms. */
export function auditOwed(sid: string, reason: string, at: number | string): string {
  return `${sid} ${reason} ${at}`;
}

/** An `auditOwed` member read back; undefined if it is not one. */
export function parseAuditOwed(member: string): { sid: string; reason: string; at: number } | undefined {
  const [sid, reason, at] = member.split(' ');
  const ms = Number(at);
  if (!sid || !reason || !at || !Number.isFinite(ms)) return undefined;
  return { sid, reason, at: ms };
}

/** An `endsOwed` member read back; undefined if it is not one. */
export function parseEndOwed(
  member: string,
): { sid: string; reason: string; successor?: string } | undefined {
  const [sid, reason, successor] = member.split(' ');
  if (!sid || !reason || successor === undefined) return undefined;
  return { sid, reason, ...(successor ? { successor } : {}) };
}

export class SessionStore {
  private readonly scripts: SessionCommands;

  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly ttlSeconds: number,
  ) {
    const r = redis as Redis & Partial<SessionCommands>;
    if (!r.gwSessionCreate) {
      redis.defineCommand('gwSessionCreate', { numberOfKeys: 6, lua: CREATE });
      redis.defineCommand('gwSessionResume', { numberOfKeys: 9, lua: RESUME });
      redis.defineCommand('gwSessionTouch', { numberOfKeys: 14, lua: TOUCH });
      redis.defineCommand('gwSessionsExpired', { numberOfKeys: 5, lua: EXPIRED });
    }
    this.scripts = r as Redis & SessionCommands;
  }

  async create(s: LiveSession, refreshTtlMs: number): Promise<void> {
    const k = this.keys;
    const fields: (string | number)[] = [
      'userId',
      s.userId,
      'username',
      s.username,
      'device',
      JSON.stringify(s.device),
      'ip',
      s.ip,
      'userAgent',
      s.userAgent ?? '',
      'createdAt',
      s.createdAt,
      'lastSeenAt',
      s.lastSeenAt,
      'refreshHash',
      s.refreshHash,
      'refreshExpiresAt',
      s.refreshExpiresAt,
    ];
    if (s.deviceInfo) fields.push('deviceInfo', JSON.stringify(s.deviceInfo));
    if (s.location) fields.push('location', s.location);
    // A device target resolves to the session from now on, connected or not (PROTOCOL.md §4).
    await this.scripts.gwSessionCreate(
      k.session(s.sessionId),
      k.userSessions(s.userId),
      k.refresh(s.refreshHash),
      s.device?.id ? k.device(s.device.id) : '',
      s.device?.id ? k.deviceSessions(s.device.id) : '',
      k.sessionExpiries,
      s.sessionId,
      this.ttlSeconds,
      refreshTtlMs,
      ...fields,
    );
  }

  async get(sid: string): Promise<LiveSession | null> {
    return parseSession(sid, await this.redis.hgetall(this.keys.session(sid)));
  }

  /**
   * A resume's read of the session and its `touch` (without a device change) in one call: the
   * session as it was, touched only if it is `userId`'s. A session with a device still needs
   * `extendDevice` (after the device's ownership is checked).
   */
  async resume(sid: string, userId: string): Promise<LiveSession | null> {
    const k = this.keys;
    const flat = await this.scripts.gwSessionResume(
      k.session(sid),
      k.userSessions(userId),
      k.sessionExpiries,
      ...k.outbox(sid).slice(0, 6),
      userId,
      Date.now(),
      this.ttlSeconds,
      sid,
      this.ttlSeconds + OUTBOX_TTL_GRACE_S,
    );
    const h: Record<string, string> = {};
    for (let i = 0; i < flat.length; i += 2) h[flat[i]] = flat[i + 1];
    return parseSession(sid, h);
  }

  /**
   * Ends up to `limit` sessions whose life ran out (EXPIRED): each with the time its hash expired.
   * What it ended is also kept for RECEIPT_MS under `receipt` (keys.ts expiryReceipt), for
   * `takenExpired` when the reply does not come in time.
   */
  async takeExpired(limit: number, receipt: string): Promise<ExpiredSession[]> {
    const [before, after] = this.keys.sessionKeyParts;
    const flat = await this.scripts.gwSessionsExpired(
      this.keys.sessionExpiries,
      this.keys.endsOwed,
      this.keys.kickChannel,
      this.keys.auditOwed,
      receipt,
      before,
      after,
      limit,
      RECEIPT_MS,
    );
    return expiredFrom(flat);
  }

  /**
   * What `takeExpired` calls whose replies were lost ended, read from their receipts in one
   * command; null for one with none: the call has not run yet, ended nothing, or ran more than
   * RECEIPT_MS ago. Read, not taken (GETDEL): a reply that can be lost itself would lose the
   * receipt with it. They expire.
   */
  async takenExpired(receipts: string[]): Promise<(ExpiredSession[] | null)[]> {
    const kept = await this.redis.mget(...receipts);
    return kept.map((k) => (k === null ? null : expiredFrom(k.split(' '))));
  }

  /** Extends the device key's life if it still names the session (a resume's `touch` of it). */
  async extendDevice(sid: string, deviceId: string): Promise<void> {
    await this.redis.eval(
      EXTEND,
      2,
      this.keys.device(deviceId),
      this.keys.deviceSessions(deviceId),
      sid,
      this.ttlSeconds,
    );
  }

  /**
   * The live sessions among `sids` with their expiry and whether they are online, in one
   * round trip (the hashes, their TTLs and the presence records of messaging/presence.ts).
   */
  private async views(sids: string[]): Promise<SessionView[]> {
    if (sids.length === 0) return [];
    const p = this.redis.pipeline();
    for (const sid of sids) p.hgetall(this.keys.session(sid)).pttl(this.keys.session(sid));
    p.hmget(this.keys.presence, ...sids);
    const res = (await p.exec())!;
    for (const [err] of res) if (err) throw err;
    const presence = res[sids.length * 2][1] as (string | null)[];
    const now = Date.now();
    const out: SessionView[] = [];
    sids.forEach((sid, i) => {
      const session = parseSession(sid, res[i * 2][1] as Record<string, string>);
      const ttl = res[i * 2 + 1][1] as number;
      if (!session || ttl < 0) return;
      out.push({ session, expiresAt: now + ttl, online: presence[i] !== null });
    });
    return out;
  }

  /**
   * The user's live sessions as `views` shows them, from one read of their hashes; ids whose
   * session is gone are pruned from the user's set (as `ofUser` does).
   */
  async viewsOfUser(userId: string): Promise<SessionView[]> {
    const sids = await this.recordedOfUser(userId);
    const views = await this.views(sids);
    if (views.length < sids.length) {
      const live = new Set(views.map((v) => v.session.sessionId));
      const gone = sids.filter((sid) => !live.has(sid));
      await this.forgetOfUser(userId, gone);
    }
    return views;
  }

  alive(sid: string): Promise<boolean> {
    return this.redis.exists(this.keys.session(sid)).then((n) => n === 1);
  }

  /**
   * Marks activity and extends the session's life, its node key's and its device key's (the
   * TOUCH script). With `device` (a resume naming one) the session's device becomes it; a
   * previous device of the session is released. False, and nothing written, when the session
   * is gone or not `userId`'s: an ended session stays ended.
   */
  async touch(
    sid: string,
    userId: string,
    device?: Device | null,
    previous?: Device | null,
  ): Promise<boolean> {
    const k = this.keys;
    const newKey = device?.id ? k.device(device.id) : '';
    const prevKey = previous?.id && previous.id !== device?.id ? k.device(previous.id) : '';
    const touched = await this.scripts.gwSessionTouch(
      k.session(sid),
      k.userSessions(userId),
      k.sessionNode(sid),
      newKey,
      prevKey,
      device?.id ? k.deviceSessions(device.id) : '',
      prevKey && previous?.id ? k.deviceSessions(previous.id) : '',
      k.sessionExpiries,
      ...k.outbox(sid).slice(0, 6),
      userId,
      Date.now(),
      this.ttlSeconds,
      sid,
      device ? JSON.stringify(device) : '',
      device?.id ? 'release' : 'extend',
      this.ttlSeconds + OUTBOX_TTL_GRACE_S,
    );
    return touched === 1;
  }

  /**
   * Session ids recorded for a user, live or expired, in one command: for qos-1 publishes,
   * whose script skips a session that is gone (and the caller then forgets it).
   */
  recordedOfUser(userId: string): Promise<string[]> {
    return this.redis.smembers(this.keys.userSessions(userId));
  }

  /** Removes ids of sessions found gone from the user's set. */
  async forgetOfUser(userId: string, sids: string[]): Promise<void> {
    if (sids.length) await this.redis.srem(this.keys.userSessions(userId), ...sids);
  }

  /** Live session ids of a user; ids whose session expired are pruned from the set. */
  async ofUser(userId: string): Promise<string[]> {
    const sids = await this.redis.smembers(this.keys.userSessions(userId));
    if (sids.length === 0) return [];
    const p = this.redis.pipeline();
    for (const sid of sids) p.exists(this.keys.session(sid));
    const res = (await p.exec())!;
    const live: string[] = [];
    const dead: string[] = [];
    sids.forEach((sid, i) => {
      (res[i][1] === 1 ? live : dead).push(sid);
    });
    if (dead.length) await this.redis.srem(this.keys.userSessions(userId), ...dead);
    return live;
  }

  /**
   * The sessions created or resumed with the device (a takeover's candidates: a few, however
   * many sessions its account has). Some may have ended or moved to another device since.
   */
  ofDevice(deviceId: string): Promise<string[]> {
    return this.redis.smembers(this.keys.deviceSessions(deviceId));
  }

  /** Removes ids of sessions found gone or carrying another device from the device's sessions. */
  async forgetOfDevice(deviceId: string, sids: string[]): Promise<void> {
    if (sids.length) await this.redis.srem(this.keys.deviceSessions(deviceId), ...sids);
  }

  /** The session a refresh token names: as the current token, or as a used one. */
  async lookupRefresh(hash: string): Promise<{ sessionId: string; current: boolean } | null> {
    const [cur, used] = await this.redis.mget(this.keys.refresh(hash), this.keys.refreshUsed(hash));
    if (cur) return { sessionId: cur, current: true };
    return used ? { sessionId: used, current: false } : null;
  }

  /**
   * Hands the device key from session `from` to `to` (HAND): only while it names `from` and `to`
   * lives. True if it did.
   */
  async handDevice(deviceId: string, from: string, to: string): Promise<boolean> {
    const k = this.keys;
    const r = await this.redis.eval(
      HAND,
      3,
      k.device(deviceId),
      k.session(to),
      k.deviceSessions(deviceId),
      from,
      to,
      this.ttlSeconds,
    );
    return r === 1;
  }

  /** The session the device key names (the last one created or resumed with the device). */
  deviceHolder(deviceId: string): Promise<string | null> {
    return this.redis.get(this.keys.device(deviceId));
  }

  /** Whether a used refresh token is in its grace period: rotated lately, successor unused. */
  async inGrace(hash: string, sid: string): Promise<boolean> {
    const [next, current] = await Promise.all([
      this.redis.hget(this.keys.refreshGrace(hash), 'next'),
      this.redis.hget(this.keys.session(sid), 'refreshHash'),
    ]);
    return next !== null && next === current;
  }

  /**
   * Rotates the refresh token `oldHash` of session `sid` to `newHash` (see ROTATE). `sealed` is
   * the successor pair sealed for the grace record ('' when the session was not found).
   */
  async rotate(
    sid: string,
    oldHash: string,
    newHash: string,
    o: { refreshTtlMs: number; usedMemoryMs: number; graceMs: number; sealed: string },
  ): Promise<RotateResult> {
    const k = this.keys;
    const r = (await this.redis.eval(
      ROTATE,
      6,
      k.refresh(oldHash),
      k.refreshUsed(oldHash),
      k.refresh(newHash),
      k.session(sid),
      k.refreshGrace(oldHash),
      k.refreshHold(oldHash),
      o.refreshTtlMs,
      o.usedMemoryMs,
      newHash,
      Date.now() + o.refreshTtlMs,
      o.sealed,
      o.graceMs,
    )) as string[];
    if (r[0] === 'invalid') return { status: 'invalid' };
    if (r[0] === 'again') return { status: 'again', sessionId: r[1], sealed: r[2] };
    return { status: r[0] as 'ok' | 'reused', sessionId: r[1] };
  }

  /**
   * Keeps the grace period of refresh token `hash` open for at least `ms` from now, whether it
   * is rotated already or later (HOLD_GRACE): for a refresh of it refused with `rate_limited`.
   */
  async holdGrace(hash: string, ms: number): Promise<void> {
    await this.redis.eval(HOLD_GRACE, 2, this.keys.refreshHold(hash), this.keys.refreshGrace(hash), ms);
  }

  /**
   * Removes a session with its keys (and its entry in the index of expiries); returns it if this
   * call removed it (so it is ended once); `owed` records the end's outbox work, and `notice` (the
   * end's kick, JSON) is published on the kick channel, both in the same `MULTI`: a removal
   * that Redis runs late (a call timed out in a frozen Redis, run at the thaw) still tells every
   * node to kick the session's connections. Before, the notice was a call after the removal, and
   * a removal whose reply timed out left the session gone and its connections open, bound to it.
   * `audit` (an `auditOwed` member) records its audit row's end as owed, in the same `MULTI`.
   */
  async remove(sid: string, owed?: string, notice?: string, audit?: string): Promise<LiveSession | null> {
    const s = await this.get(sid);
    if (!s) return null;
    const k = this.keys;
    const m = this.redis.multi();
    m.del(k.session(sid));
    m.zrem(k.sessionExpiries, sid);
    m.srem(k.userSessions(s.userId), sid);
    m.del(k.refresh(s.refreshHash));
    if (s.device?.id) {
      m.eval(RELEASE, 1, k.device(s.device.id), sid);
      m.srem(k.deviceSessions(s.device.id), sid);
    }
    if (owed) m.zadd(k.endsOwed, Date.now(), owed);
    if (audit) m.zadd(k.auditOwed, Date.now(), audit);
    if (notice) m.publish(k.kickChannel, notice);
    const res = await m.exec();
    return res![0][1] === 1 ? s : null;
  }
}
