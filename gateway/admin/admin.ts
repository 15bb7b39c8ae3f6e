/**
 * What the admin API reads and does (docs/OPERATIONS.md, "Admin API"): devices (PostgreSQL
 * `devices`) joined to their live state in Redis (device key, presence, session, usage counters,
 * outbox), a user's sessions with presence, the delivery state of one event, dead letters and
 * their retry, and the two actions that reach every node: revoking a session and kicking a
 * device. No socket here: `gateway/http/admin-api.ts` maps HTTP onto it.
 *
 * Every list is a bounded page (`limit` at most 100) with an opaque `nextCursor`. Nothing here
 * is on a device's path: each call costs a few batched Redis reads and at most two queries.
 */
import { type Job, Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type pg from 'pg';
import { hasControlChars, ProtocolError, unpack } from '../../protocol/index.ts';
import type { LiveSession } from '../auth/session-store.ts';
import type { Outbox, StoredEvent } from '../delivery/outbox.ts';
import { logQueueErrors } from '../faults.ts';
import { KEPT_KICK_MS, type KeptKick, type Keys, QueueName } from '../keys.ts';
import type { Logger } from '../log.ts';
import type { PresenceRecord } from '../messaging/presence.ts';

export const MAX_PAGE = 100;
export const DEFAULT_PAGE = 50;

/** What the admin service needs of identity (gateway/auth/service.ts). */
export interface AdminIdentity {
  userIdOf(username: string): Promise<string | null>;
  sessionIdsOf(userId: string): Promise<string[]>;
  /** The live session, or null. */
  session(sid: string): Promise<LiveSession | null>;
  /** Ends the session on every node (kick `session_revoked`); false if it was not live. */
  revoke(sid: string): Promise<boolean>;
}

export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

export interface DeviceUsage {
  eventsIn: number;
  eventsOut: number;
  bytesIn: number;
  bytesOut: number;
}

export interface DeviceDetail {
  id: string;
  owner: { userId: string; username: string };
  name: string | null;
  model: string | null;
  fw: string | null;
  firstSeen: number;
  lastSeen: number;
  online: boolean;
  node: string | null;
  connectedSince: number | null;
  sessionId: string | null;
  inFlight: number;
  outboxDepth: number;
  usage: DeviceUsage;
}

export type DeviceSummary = Omit<DeviceDetail, 'inFlight' | 'outboxDepth' | 'usage'>;

export type EventState =
  | { state: 'queued'; eid: string; sessionId: string; name: string; attempt: 0; expiresAt: number | null }
  | {
      state: 'in_flight';
      eid: string;
      sessionId: string;
      name: string;
      attempt: number;
      expiresAt: number | null;
    }
  | {
      state: 'dead';
      eid: string;
      sessionId: string;
      name: string;
      attempts: number;
      reason: string;
      at: number;
    }
  | { state: 'acked' | 'expired' | 'dropped'; eid: string; sessionId: string; name: string; at: number }
  | { state: 'unknown'; eid: string; sessionId: string };

export interface DeadLetter {
  id: string;
  sessionId: string;
  eid: string;
  name: string;
  attempts: number;
  reason: string;
  at: number;
}

interface DeviceRow {
  id: string;
  owner: string;
  username: string;
  name: string | null;
  model: string | null;
  fw: string | null;
  first_seen: Date;
  last_seen: Date;
}

/** Parses `limit` (1..MAX_PAGE, default DEFAULT_PAGE): `bad_message` naming the field. */
export function pageLimit(raw: string | null): number {
  if (raw === null || raw === '') return DEFAULT_PAGE;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > MAX_PAGE) {
    throw new ProtocolError('bad_message', `limit: an integer from 1 to ${MAX_PAGE}`, { field: 'limit' });
  }
  return n;
}

const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');

function unb64<T>(raw: string, check: (v: unknown) => v is T): T {
  try {
    const v = JSON.parse(Buffer.from(raw, 'base64url').toString('utf8'));
    if (check(v)) return v;
  } catch {
    // answered below
  }
  throw new ProtocolError('bad_message', 'cursor: not a cursor this API returned', { field: 'cursor' });
}

const num = (v: string | undefined) => (v ? Number(v) : 0);

export class AdminService {
  private readonly deadLetters: Queue;

  constructor(
    private readonly deps: {
      pool: pg.Pool;
      redis: Redis;
      /** Bounded like every request-path connection (BullMQ reads). */
      queueConnection: Redis;
      keys: Keys;
      outbox: Outbox;
      identity: AdminIdentity;
      /** The `gw-backend` queue, where receipts, expiries and drops are reported. */
      backendQueue: Queue;
      log: Logger;
      sessionTtlSeconds: number;
    },
  ) {
    this.deadLetters = new Queue(QueueName.deadLetters, {
      connection: deps.queueConnection,
      prefix: deps.keys.bullPrefix,
    });
    logQueueErrors(this.deadLetters, deps.log);
  }

  close(): Promise<void> {
    return this.deadLetters.close();
  }

  userIdOf(username: string): Promise<string | null> {
    return this.deps.identity.userIdOf(username);
  }

  // ---- devices -----------------------------------------------------------------------------------

  private static readonly DEVICE_SQL =
    `SELECT d.id, d.owner, u.username, d.name, d.model, d.fw, d.first_seen, d.last_seen
    FROM devices d JOIN users u ON u.id = d.owner`;

  /** Live state of devices: their session (device key) and that session's presence record. */
  private async liveState(ids: string[]): Promise<{ sid: string | null; rec: PresenceRecord | null }[]> {
    if (ids.length === 0) return [];
    const { redis, keys } = this.deps;
    const sids = await redis.mget(...ids.map((id) => keys.device(id)));
    const held = sids.filter((s): s is string => !!s);
    const recs = held.length ? await redis.hmget(keys.presence, ...held) : [];
    const byS = new Map(held.map((s, i) => [s, recs[i]]));
    return sids.map((sid) => {
      const raw = sid ? byS.get(sid) : null;
      return { sid, rec: raw ? (JSON.parse(raw) as PresenceRecord) : null };
    });
  }

  private summary(row: DeviceRow, live: { sid: string | null; rec: PresenceRecord | null }): DeviceSummary {
    return {
      id: row.id,
      owner: { userId: row.owner, username: row.username },
      name: row.name,
      model: row.model,
      fw: row.fw,
      firstSeen: new Date(row.first_seen).getTime(),
      lastSeen: new Date(row.last_seen).getTime(),
      online: live.rec !== null,
      node: live.rec?.node ?? null,
      connectedSince: live.rec?.since ?? null,
      sessionId: live.sid,
    };
  }

  async device(id: string): Promise<DeviceDetail> {
    const { pool, redis, keys } = this.deps;
    const r = await pool.query<DeviceRow>(`${AdminService.DEVICE_SQL} WHERE d.id = $1`, [id]);
    if (r.rowCount === 0) throw new ProtocolError('not_found', 'no such device');
    const [live] = await this.liveState([id]);
    const s = this.summary(r.rows[0], live);
    const p = redis.pipeline();
    p.hgetall(keys.usage(id));
    if (live.sid) {
      const [q] = keys.outbox(live.sid);
      p.zcard(q);
      p.get(keys.sessionSent(live.sid));
      p.hget(keys.session(live.sid), 'lastSeenAt');
    }
    const res = (await p.exec())!;
    for (const [e] of res) if (e) throw e;
    const usage = (res[0][1] ?? {}) as Record<string, string>;
    const depth = live.sid ? (res[1][1] as number) : 0;
    // An event at or below the sent mark was sent and not acked yet: in flight (or waiting for
    // a retry). Events sent from their publish have no attempt entry to count.
    const mark = live.sid ? num(res[2][1] as string | undefined) : 0;
    const inFlight = live.sid && mark > 0 ? await redis.zcount(keys.outbox(live.sid)[0], '-inf', mark) : 0;
    const sessionSeen = live.sid ? num(res[3][1] as string | undefined) : 0;
    return {
      ...s,
      // The latest of: the database row (login), the session's activity, the usage flush.
      lastSeen: Math.max(s.lastSeen, sessionSeen, num(usage.last_seen), live.rec ? Date.now() : 0),
      inFlight,
      outboxDepth: depth,
      usage: {
        eventsIn: num(usage.events_in),
        eventsOut: num(usage.events_out),
        bytesIn: num(usage.bytes_in),
        bytesOut: num(usage.bytes_out),
      },
    };
  }

  /**
   * Devices by id, optionally of one owner (username) and online or not. The cursor is the last
   * id looked at: with `online` a page may hold fewer than `limit` devices (never more rows are
   * read than 5 × limit per call); follow `nextCursor` until it is null.
   */
  async devices(q: {
    owner?: string;
    online?: boolean;
    cursor?: string;
    limit: number;
  }): Promise<Page<DeviceSummary>> {
    // The last device id of a page: a device id, so no control character (and no NUL for PostgreSQL).
    const after = q.cursor
      ? unb64(q.cursor, (v): v is string => typeof v === 'string' && !hasControlChars(v))
      : '';
    let ownerId: string | null = null;
    if (q.owner !== undefined) {
      ownerId = await this.deps.identity.userIdOf(q.owner);
      if (!ownerId) return { items: [], nextCursor: null };
    }
    const items: DeviceSummary[] = [];
    let last = after;
    for (let round = 0; round < 5 && items.length < q.limit; round++) {
      const want = q.limit - items.length;
      const r = await this.deps.pool.query<DeviceRow>(
        `${AdminService.DEVICE_SQL} WHERE d.id > $1 AND ($2::uuid IS NULL OR d.owner = $2)
         ORDER BY d.id LIMIT $3`,
        [last, ownerId, want + 1],
      );
      const rows = r.rows.slice(0, want);
      const live = await this.liveState(rows.map((row) => row.id));
      rows.forEach((row, i) => {
        const s = this.summary(row, live[i]);
        if (q.online === undefined || s.online === q.online) items.push(s);
      });
      if (rows.length > 0) last = rows[rows.length - 1].id;
      if (r.rows.length <= want) return { items, nextCursor: null };
    }
    return { items, nextCursor: b64(last) };
  }

  // ---- sessions ----------------------------------------------------------------------------------

  /** A user's live sessions joined to presence (online, node, connected since). */
  async userSessions(username: string): Promise<Record<string, unknown>[]> {
    const { identity, redis, keys } = this.deps;
    const userId = await identity.userIdOf(username);
    if (!userId) throw new ProtocolError('not_found', 'no such user');
    const sids = await identity.sessionIdsOf(userId);
    const sessions = await Promise.all(sids.map((sid) => identity.session(sid)));
    const recs = sids.length ? await redis.hmget(keys.presence, ...sids) : [];
    const out: Record<string, unknown>[] = [];
    sids.forEach((sid, i) => {
      const s = sessions[i];
      if (!s) return;
      const rec = recs[i] ? (JSON.parse(recs[i]!) as PresenceRecord) : null;
      out.push({
        sessionId: sid,
        device: s.device,
        ip: s.ip,
        userAgent: s.userAgent ?? null,
        createdAt: s.createdAt,
        lastSeenAt: s.lastSeenAt,
        online: rec !== null,
        node: rec?.node ?? null,
        connectedSince: rec?.since ?? null,
      });
    });
    return out.sort((a, b) => (a.createdAt as number) - (b.createdAt as number));
  }

  async revoke(sid: string): Promise<void> {
    if (!(await this.deps.identity.revoke(sid))) throw new ProtocolError('not_found', 'no such live session');
  }

  /**
   * Closes the device's connection wherever it is, with `kick going_away` (it may come back
   * after `retryAfterMs`); its session stays. Every node hears the kick on the kick channel.
   * The kick is also kept for an hour, naming the connection, for a node whose subscriber is
   * away now: it applies the kick once the subscriber is back (auth/module.ts, `kickMissed`).
   */
  async kick(deviceId: string, retryAfterMs: number): Promise<{ sessionId: string; node: string }> {
    const { redis, keys, log } = this.deps;
    const [live] = await this.liveState([deviceId]);
    if (!live.sid || !live.rec) throw new ProtocolError('not_found', 'the device is not connected');
    const kept: KeptKick = {
      conn: `${live.rec.node}:${live.rec.conn}`,
      at: Date.now(),
      retryAfter: retryAfterMs,
    };
    await redis
      .multi()
      .set(keys.sessionKick(live.sid), JSON.stringify(kept), 'PX', KEPT_KICK_MS)
      .publish(
        keys.kickChannel,
        JSON.stringify({ sessionId: live.sid, code: 'going_away', retryAfter: retryAfterMs }),
      )
      .exec();
    log.info({ sessionId: live.sid, node: live.rec.node }, 'admin kick');
    return { sessionId: live.sid, node: live.rec.node };
  }

  // ---- events ------------------------------------------------------------------------------------

  /**
   * Where a qos-1 event of a session is: in the outbox (`queued`, or `in_flight` with the
   * attempt it is at), in the dead-letter queue (`dead`), or reported acked (only events
   * published with `receipt: true` are), expired or dropped. An event acked without a receipt
   * leaves no trace: `unknown`.
   */
  async event(sid: string, eid: string): Promise<EventState> {
    const { redis, keys, backendQueue } = this.deps;
    const [q, ev, att, , exp] = keys.outbox(sid);
    const p = redis.pipeline();
    p.hgetBuffer(ev, eid);
    p.hget(att, eid);
    p.hget(exp, eid);
    p.zscore(q, eid);
    p.get(keys.sessionSent(sid));
    const res = (await p.exec())!;
    for (const [e] of res) if (e) throw e;
    const stored = res[0][1] as Buffer | null;
    if (stored) {
      const e = unpack(stored) as StoredEvent;
      // No attempt entry at or below the sent mark: sent once, from its publish.
      const seq = res[3][1] === null ? Number.POSITIVE_INFINITY : Number(res[3][1]);
      const attempt =
        num(res[1][1] as string | undefined) || (seq <= num(res[4][1] as string | undefined) ? 1 : 0);
      const expiresAt = res[2][1] ? Number(res[2][1]) : null;
      return attempt > 0
        ? { state: 'in_flight', eid, sessionId: sid, name: e.name, attempt, expiresAt }
        : { state: 'queued', eid, sessionId: sid, name: e.name, attempt: 0, expiresAt };
    }
    const dead = await this.deadLetters.getJob(`${sid}-${eid}`);
    if (dead) {
      const d = dead.data as { event: StoredEvent; attempts: number; reason: string; ts: number };
      return {
        state: 'dead',
        eid,
        sessionId: sid,
        name: d.event.name,
        attempts: d.attempts,
        reason: d.reason,
        at: d.ts,
      };
    }
    const reports = await Promise.all(
      (['acked', 'expired', 'dropped'] as const).map((s) =>
        backendQueue.getJob(`delivery.${s}-${sid}-${eid}`).then((j) => [s, j] as const),
      ),
    );
    for (const [state, job] of reports) {
      if (job) {
        const d = job.data as { name: string; ts: number };
        return { state, eid, sessionId: sid, name: d.name, at: d.ts };
      }
    }
    return { state: 'unknown', eid, sessionId: sid };
  }

  // ---- dead letters ------------------------------------------------------------------------------

  private static deadLetter(job: Job): DeadLetter {
    const d = job.data as {
      sessionId: string;
      event: StoredEvent;
      attempts: number;
      reason: string;
      ts: number;
    };
    return {
      id: job.id!,
      sessionId: d.sessionId,
      eid: d.event.eid,
      name: d.event.name,
      attempts: d.attempts,
      reason: d.reason,
      at: d.ts,
    };
  }

  /**
   * Dead letters, oldest first. The cursor is an offset into the queue: a retried letter leaves
   * it, so a page read after retries may skip as many letters as were retried meanwhile.
   */
  async deadLetterPage(cursor: string | undefined, limit: number): Promise<Page<DeadLetter>> {
    const start = cursor ? unb64(cursor, (v): v is number => Number.isInteger(v) && (v as number) >= 0) : 0;
    const jobs = await this.deadLetters.getJobs(['waiting'], start, start + limit, true);
    const page = jobs.filter((j): j is Job => !!j).slice(0, limit);
    return {
      items: page.map(AdminService.deadLetter),
      nextCursor: jobs.length > limit ? b64(start + limit) : null,
    };
  }

  /**
   * Puts a dead letter's event back in its session's outbox (same eid, attempts from zero) and
   * removes the letter. A marker set once per letter makes a second retry, concurrent or
   * later, a no-op (`already_retried`), so the event is not delivered twice.
   */
  async retryDeadLetter(
    id: string,
  ): Promise<{ status: 'requeued' | 'already_retried'; eid: string; sessionId: string }> {
    const { redis, keys, outbox, sessionTtlSeconds } = this.deps;
    const job = await this.deadLetters.getJob(id);
    const marker = keys.deadLetterRetry(id);
    if (!job) {
      const done = await redis.get(marker);
      if (done) {
        const m = JSON.parse(done) as { eid: string; sessionId: string };
        return { status: 'already_retried', ...m };
      }
      throw new ProtocolError('not_found', 'no such dead letter');
    }
    const d = AdminService.deadLetter(job);
    const event = (job.data as { event: StoredEvent }).event;
    const mark = JSON.stringify({ eid: d.eid, sessionId: d.sessionId });
    const first = await redis.set(marker, mark, 'EX', sessionTtlSeconds, 'NX');
    if (first === null) return { status: 'already_retried', eid: d.eid, sessionId: d.sessionId };
    let result: Awaited<ReturnType<Outbox['publish']>>;
    try {
      result = await outbox.publish(d.sessionId, event, false, 0);
    } catch (e) {
      await redis.del(marker).catch(() => undefined);
      throw e;
    }
    if (result.status === 'gone' || result.status === 'rejected') {
      await redis.del(marker);
      if (result.status === 'gone')
        throw new ProtocolError('not_found', 'the session of this dead letter has ended');
      throw new ProtocolError('overloaded', "the session's outbox is full", { retryAfter: 5000 });
    }
    await job.remove();
    return { status: 'requeued', eid: d.eid, sessionId: d.sessionId };
  }
}
