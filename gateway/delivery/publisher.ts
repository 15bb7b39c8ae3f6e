/**
 * Publishing events to devices: the one function behind all three publish paths (this module's
 * `Publisher` for TypeScript back ends, `POST /v1/events`, and the `gw-publish` BullMQ queue).
 *
 * qos 1: the event is in each target session's Redis outbox (one atomic script per session)
 * before `publish` resolves, and the node holding the session is told in the same script.
 * qos 0: sent to the sessions online now, through their nodes' channels; not stored.
 */
import { randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import { ProtocolError, pack } from '../../protocol/index.ts';
import type { Keys } from '../keys.ts';
import type { Outbox, StoredEvent } from './outbox.ts';

/** Sessions a target resolved to; `owner`: the user whose session set they came from. */
export interface Recipients {
  sids: string[];
  owner?: string;
}

/** Who an event is for. `user` is a user id; `username` is resolved to it. */
export type Target =
  | { session: string }
  | { device: string }
  | { user: string }
  | { username: string }
  | { room: string };

export interface EventInput {
  name: string;
  data?: unknown;
  /** 1 (default): at least once, acked, retried. 0: best effort to whoever is online. */
  qos?: 0 | 1;
  /** Milliseconds after which an undelivered event is dropped and reported `delivery.expired`. */
  ttl?: number;
  /** Report `delivery.acked` to the back-end queue when a device acks it. */
  receipt?: boolean;
  /** Sender shown to the device (`from`). */
  from?: string;
  room?: string;
  /** Idempotency: publishing the same eid twice to a session stores it once. */
  eid?: string;
}

export interface PublishOutcome {
  eid: string;
  /** Sessions the target resolved to. */
  sessions: number;
  /** qos 1: stored in this many outboxes; qos 0: sent to this many online sessions. */
  accepted: number;
  /** Sessions whose outbox was full under the `reject` policy. */
  rejected: number;
  /** Events dropped to make room under the `drop-oldest` policy. */
  dropped: { sessionId: string; event: StoredEvent }[];
}

/** How targets resolve to live sessions: identity knows users' sessions. */
export interface SessionDirectory {
  /** Live session ids of a user (empty if none). */
  sessionsOfUser(userId: string): Promise<string[]>;
  /**
   * Session ids recorded for a user, some possibly expired, in one Redis command: enough for a
   * qos-1 publish, whose script skips sessions that are gone.
   */
  recordedSessionsOfUser(userId: string): Promise<string[]>;
  /** Forgets ids of a user's sessions that a publish found gone. */
  forgetSessionsOfUser(userId: string, sids: string[]): Promise<void>;
  /** The user id of a username, or null. */
  userIdOf(username: string): Promise<string | null>;
  /** Whether a session is live. */
  sessionAlive(sessionId: string): Promise<boolean>;
}

const NAME = /^[A-Za-z0-9_.:-]{1,128}$/;

/** Checks a publish request from any path; throws `bad_message` naming the field. */
export function validateEventInput(target: unknown, event: unknown): { target: Target; event: EventInput } {
  const bad = (field: string, problem: string) =>
    new ProtocolError('bad_message', `${field}: ${problem}`, { field });
  if (!target || typeof target !== 'object') throw bad('target', 'must be an object');
  const t = target as Record<string, unknown>;
  const kinds = ['session', 'device', 'user', 'username', 'room'].filter((k) => t[k] !== undefined);
  if (kinds.length !== 1)
    throw bad('target', 'must have exactly one of session, device, user, username, room');
  const kind = kinds[0];
  if (typeof t[kind] !== 'string' || (t[kind] as string).length === 0 || (t[kind] as string).length > 256) {
    throw bad(`target.${kind}`, 'must be a non-empty string');
  }
  if (!event || typeof event !== 'object') throw bad('event', 'must be an object');
  const e = event as Record<string, unknown>;
  if (typeof e.name !== 'string' || !NAME.test(e.name)) throw bad('name', 'must be 1-128 of [A-Za-z0-9_.:-]');
  if (e.qos !== undefined && e.qos !== 0 && e.qos !== 1) throw bad('qos', 'must be 0 or 1');
  if (e.ttl !== undefined && (typeof e.ttl !== 'number' || !Number.isInteger(e.ttl) || e.ttl <= 0)) {
    throw bad('ttl', 'must be a positive integer (ms)');
  }
  if (e.receipt !== undefined && typeof e.receipt !== 'boolean') throw bad('receipt', 'must be a boolean');
  if (e.eid !== undefined && (typeof e.eid !== 'string' || !/^[A-Za-z0-9_.-]{1,128}$/.test(e.eid))) {
    throw bad('eid', 'must be 1-128 of [A-Za-z0-9_.-]');
  }
  return {
    target: { [kind]: t[kind] } as Target,
    event: {
      name: e.name,
      data: e.data ?? null,
      ...(e.qos !== undefined ? { qos: e.qos as 0 | 1 } : {}),
      ...(e.ttl !== undefined ? { ttl: e.ttl as number } : {}),
      ...(e.receipt !== undefined ? { receipt: e.receipt as boolean } : {}),
      ...(e.eid !== undefined ? { eid: e.eid as string } : {}),
    },
  };
}

export class Publisher {
  constructor(
    private readonly redis: Redis,
    private readonly keys: Keys,
    private readonly outbox: Outbox,
    private readonly directory: SessionDirectory,
  ) {}

  /** Resolves a target to live session ids; `not_found` when there are none. */
  async resolve(target: Target): Promise<string[]> {
    let sids: string[];
    if ('session' in target)
      sids = (await this.directory.sessionAlive(target.session)) ? [target.session] : [];
    else if ('device' in target) {
      const sid = await this.redis.get(this.keys.device(target.device));
      sids = sid ? [sid] : [];
    } else if ('user' in target) sids = await this.directory.sessionsOfUser(target.user);
    else if ('username' in target) {
      const uid = await this.directory.userIdOf(target.username);
      sids = uid ? await this.directory.sessionsOfUser(uid) : [];
    } else sids = await this.redis.zrange(this.keys.roomMembers(target.room), '0', '-1');
    if (sids.length === 0) throw new ProtocolError('not_found', 'the target has no live session');
    return sids;
  }

  /**
   * The sessions an event goes to. A qos-1 event needs no liveness check first: the publish
   * script checks that each session is alive in the same step. So a session target costs no
   * lookup, and a user or username target one `SMEMBERS` (the username's user id is
   * remembered, user-ids.ts), where checking each session first cost two more round trips.
   */
  async recipientsFor(target: Target, input: EventInput): Promise<Recipients> {
    if (input.qos === 0) return { sids: await this.resolve(target) };
    if ('session' in target) return { sids: [target.session] };
    let owner: string | null = null;
    if ('user' in target) owner = target.user;
    else if ('username' in target) owner = await this.directory.userIdOf(target.username);
    else return { sids: await this.resolve(target) };
    const sids = owner ? await this.directory.recordedSessionsOfUser(owner) : [];
    if (sids.length === 0) throw new ProtocolError('not_found', 'the target has no live session');
    return { sids, owner: owner! };
  }

  async publish(target: Target, input: EventInput): Promise<PublishOutcome> {
    return this.publishTo(await this.recipientsFor(target, input), input);
  }

  /** Publishes to known session ids; sessions found gone are forgotten from `owner`'s set. */
  async publishTo({ sids, owner }: Recipients, input: EventInput): Promise<PublishOutcome> {
    const now = Date.now();
    const event: StoredEvent = {
      eid: input.eid ?? randomUUID(),
      name: input.name,
      data: input.data ?? null,
      ts: now,
      ...(input.from !== undefined ? { from: input.from } : {}),
      ...(input.room !== undefined ? { room: input.room } : {}),
    };
    const outcome: PublishOutcome = {
      eid: event.eid,
      sessions: sids.length,
      accepted: 0,
      rejected: 0,
      dropped: [],
    };
    if (input.qos === 0) {
      const packed = pack(event);
      const nodes = await this.redis.mget(sids.map((s) => this.keys.sessionNode(s)));
      const pipe = this.redis.pipeline();
      sids.forEach((sid, i) => {
        const node = nodes[i];
        if (!node) return;
        outcome.accepted++;
        pipe.publish(this.keys.nodeChannel(node), Buffer.concat([Buffer.from(`e${sid}\n`), packed]));
      });
      await pipe.exec();
      return outcome;
    }
    const expiresAt = input.ttl ? now + input.ttl : 0;
    const results = await Promise.all(
      sids.map((sid) => this.outbox.publish(sid, event, !!input.receipt, expiresAt)),
    );
    const gone: string[] = [];
    results.forEach((r, i) => {
      if (r.status === 'gone') gone.push(sids[i]);
      else if (r.status === 'rejected') outcome.rejected++;
      else outcome.accepted++;
      if (r.dropped) outcome.dropped.push({ sessionId: sids[i], event: r.dropped });
    });
    if (owner && gone.length > 0) {
      // Housekeeping only: a failure leaves the ids for the next publish or `ofUser` to prune.
      this.directory.forgetSessionsOfUser(owner, gone).catch(() => {});
    }
    if (gone.length === sids.length) throw new ProtocolError('not_found', 'the target has no live session');
    outcome.sessions -= gone.length;
    if (expiresAt > 0) {
      await this.redis.zadd(this.keys.expiries, ...sids.flatMap((sid) => [expiresAt, `${sid}|${event.eid}`]));
    }
    return outcome;
  }
}
