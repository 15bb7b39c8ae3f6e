/**
 * Live sessions in Redis: one hash per session with a TTL (SESSION_TTL), the set of each
 * user's sessions, and the refresh-token index (current and used hashes). Rotation is one Lua
 * script, so two concurrent refreshes of one token cannot both win.
 */
import type { Redis } from 'ioredis';
import type { Device } from '../../protocol/index.ts';
import type { Keys } from '../keys.ts';

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
}

/**
 * KEYS[1] current refresh key, KEYS[2] used refresh key, KEYS[3] new refresh key, KEYS[4] session
 * ARGV[1] new refresh TTL (ms), ARGV[2] how long a used token is remembered (ms), ARGV[3] new hash,
 * ARGV[4] new refresh expiry (ms)
 * Returns {"ok", sid} | {"reused", sid} | {"invalid"}
 */
const ROTATE = `
local sid = redis.call('GET', KEYS[1])
if not sid then
  local used = redis.call('GET', KEYS[2])
  if used then return {'reused', used} end
  return {'invalid'}
end
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[1])
  return {'invalid'}
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], sid, 'PX', ARGV[2])
redis.call('SET', KEYS[3], sid, 'PX', ARGV[1])
redis.call('HSET', KEYS[4], 'refreshHash', ARGV[3], 'refreshExpiresAt', ARGV[4])
return {'ok', sid}
`;

export class SessionStore {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly ttlSeconds: number,
  ) {}

  async create(s: LiveSession, refreshTtlMs: number): Promise<void> {
    const k = this.keys;
    const m = this.redis.multi();
    m.hset(k.session(s.sessionId), {
      userId: s.userId,
      username: s.username,
      device: JSON.stringify(s.device),
      ip: s.ip,
      userAgent: s.userAgent ?? '',
      createdAt: s.createdAt,
      lastSeenAt: s.lastSeenAt,
      refreshHash: s.refreshHash,
      refreshExpiresAt: s.refreshExpiresAt,
    });
    m.expire(k.session(s.sessionId), this.ttlSeconds);
    m.sadd(k.userSessions(s.userId), s.sessionId);
    m.expire(k.userSessions(s.userId), this.ttlSeconds);
    m.set(k.refresh(s.refreshHash), s.sessionId, 'PX', refreshTtlMs);
    await m.exec();
  }

  async get(sid: string): Promise<LiveSession | null> {
    const h = await this.redis.hgetall(this.keys.session(sid));
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
    };
  }

  alive(sid: string): Promise<boolean> {
    return this.redis.exists(this.keys.session(sid)).then((n) => n === 1);
  }

  /** Marks activity and extends the session's life; updates the device if given. */
  async touch(sid: string, userId: string, device?: Device | null): Promise<void> {
    const m = this.redis.multi();
    m.hset(
      this.keys.session(sid),
      'lastSeenAt',
      Date.now(),
      ...(device ? ['device', JSON.stringify(device)] : []),
    );
    m.expire(this.keys.session(sid), this.ttlSeconds);
    m.expire(this.keys.userSessions(userId), this.ttlSeconds);
    await m.exec();
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

  async rotate(
    oldHash: string,
    newHash: string,
    refreshTtlMs: number,
    usedMemoryMs: number,
  ): Promise<{ status: 'ok' | 'reused' | 'invalid'; sessionId?: string }> {
    const k = this.keys;
    const sidGuess = await this.redis.get(k.refresh(oldHash));
    const sessionKey = k.session(sidGuess ?? 'none');
    const r = (await this.redis.eval(
      ROTATE,
      4,
      k.refresh(oldHash),
      k.refreshUsed(oldHash),
      k.refresh(newHash),
      sessionKey,
      refreshTtlMs,
      usedMemoryMs,
      newHash,
      Date.now() + refreshTtlMs,
    )) as string[];
    return { status: r[0] as 'ok' | 'reused' | 'invalid', ...(r[1] ? { sessionId: r[1] } : {}) };
  }

  /** Removes a live session; returns it if this call removed it (so it is ended once). */
  async remove(sid: string): Promise<LiveSession | null> {
    const s = await this.get(sid);
    if (!s) return null;
    const k = this.keys;
    const m = this.redis.multi();
    m.del(k.session(sid));
    m.srem(k.userSessions(s.userId), sid);
    m.del(k.refresh(s.refreshHash));
    const res = await m.exec();
    return res![0][1] === 1 ? s : null;
  }
}
