/**
 * The messaging requests of PROTOCOL.md §4 (`join`, `leave`, `rooms`, `users`, `say`, `send`,
 * `publish`), the default room, and per-device usage counters. Rooms and presence do the Redis
 * work; direct messages are qos-1 events through the delivery service; device publishes go to
 * the back-end BullMQ queue before the device gets its `ok`.
 */
import type { Redis } from 'ioredis';
import { isProtocolError, ProtocolError, pack } from '../../protocol/index.ts';
import type { LimitedOp, Limits } from '../admin/limits.ts';
import type { BackendEvents } from '../backend-events.ts';
import type { SessionBinding } from '../binding.ts';
import type { Connection, Turn } from '../connection.ts';
import { keyedEid, newEid } from '../delivery/eid.ts';
import type { EventInput, Publisher, PublishOutcome } from '../delivery/publisher.ts';
import type { DeliveryService } from '../delivery/service.ts';
import { logFailure } from '../faults.ts';
import type { Gateway } from '../gateway.ts';
import type { Keys } from '../keys.ts';
import type { ListLimit } from '../list-limit.ts';
import type { Logger } from '../log.ts';
import { SharedRead } from '../shared-read.ts';
import type { Presence } from './presence.ts';
import { normalizeRoom, type Rooms } from './rooms.ts';

/** Per-connection usage not yet written to Redis. */
interface Usage {
  eventsIn: number;
  bytesIn: number;
  eventsOut: number;
  bytesOut: number;
}

const USAGE_FLUSH_MS = 1000;

/**
 * Binding operation (gateway/binding.ts): KEYS: the device's usage hash; ARGV: events in,
 * events out, bytes in, bytes out, now (ms). Adds the counts that are not 0, sets last seen.
 */
const USAGE_OP = `
local fields = {'events_in', 'events_out', 'bytes_in', 'bytes_out'}
for i = 1, 4 do
  if ARGV[i] ~= '0' then redis.call('HINCRBY', KEYS[1], fields[i], ARGV[i]) end
end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[5])
return 0`;

/** The key of `users` without a room in `Messaging.names` (a room's key is its name). */
const ONLINE: unique symbol = Symbol('online');

export class Messaging {
  private usageTimer: NodeJS.Timeout | undefined;
  /**
   * `users` answers, sorted, one read at a time per room (and one for the whole node's list)
   * shared by every session that asks meanwhile (shared-read.ts): with 5,000 sessions online a
   * read of the presence records costs the node ~14 ms of CPU, and a fleet that reconnects and
   * asks together would otherwise read them once per device. An answer is never from a read
   * begun before its request came. The list is shared by those answers: never changed after.
   */
  private readonly names = new SharedRead<string | typeof ONLINE, readonly string[]>(async (room) => {
    const { rooms, presence, gateway } = this.deps;
    gateway.counters.listReads.labels(room === ONLINE ? 'users' : 'users_room').inc();
    const names =
      room === ONLINE
        ? await presence.usernames()
        : await presence.usernames(await rooms.memberSessions(room));
    return [...names].sort();
  });
  /** `rooms` answers, shared in the same way. */
  private readonly roomList = new SharedRead<typeof ONLINE, readonly { room: string; members: number }[]>(
    () => {
      this.deps.gateway.counters.listReads.labels('rooms').inc();
      return this.deps.rooms.list();
    },
  );

  constructor(
    private readonly deps: {
      gateway: Gateway;
      redis: Redis;
      keys: Keys;
      /** Binding and unbinding sessions' Redis work, one call per tick (the usage flush rides on it). */
      binding: SessionBinding;
      rooms: Rooms;
      presence: Presence;
      delivery: DeliveryService;
      publisher: Publisher;
      backend: BackendEvents;
      log: Logger;
      /** Runtime limits of the admin API; absent: none. */
      limits?: Limits;
      /** `users` and `rooms` requests per session (GW_LIST_PER_MINUTE). */
      listLimit: ListLimit;
    },
  ) {
    deps.binding.define('usage', USAGE_OP);
  }

  /** Waits for the device's and user's limits of `op` (PROTOCOL.md §8): none, no Redis call. */
  private limited(conn: Connection, op: LimitedOp, bytes: () => number): Promise<void> | undefined {
    const s = conn.session;
    if (!s || !this.deps.limits) return undefined;
    return this.deps.limits.check(op, { deviceId: s.deviceId, userId: s.userId }, bytes);
  }

  start(): void {
    const { gateway, rooms } = this.deps;
    type Msg = Record<string, unknown> & { id: number };
    // Requests that change no membership are pipelined: consecutive ones overlap their lookups
    // and make their change in the order sent, through `turn`.
    const pipelined = { pipelined: true };
    gateway.handle('join', (conn, m: Msg) => rooms.join(conn, m.room as string));
    gateway.handle('leave', (conn, m: Msg) => rooms.leave(conn, m.room as string));
    const listed = (conn: Connection) => this.deps.listLimit.take(conn.session!.sessionId);
    gateway.handle(
      'rooms',
      async (conn) => {
        await listed(conn);
        gateway.counters.listRequests.labels('rooms').inc();
        return { rooms: await this.roomList.get(ONLINE) };
      },
      pipelined,
    );
    gateway.handle(
      'users',
      async (conn, m: Msg) => {
        await listed(conn);
        return this.users(m.room as string | undefined);
      },
      pipelined,
    );
    gateway.handle(
      'say',
      async (conn, m: Msg, turn) => {
        const limit = this.limited(conn, 'say', () => Buffer.byteLength(String(m.body)));
        if (limit) await limit;
        await rooms.say(conn, m.room as string, m.body as string, turn);
        return {};
      },
      pipelined,
    );
    gateway.handle(
      'send',
      (conn, m: Msg, turn) =>
        this.send(conn, m.to as string, m.body as string, m.key as string | undefined, turn),
      pipelined,
    );
    gateway.handle(
      'publish',
      (conn, m: Msg, turn) => this.publish(conn, m.name as string, m.data, m.key as string | undefined, turn),
      pipelined,
    );
    // Tried again until it is done (Rooms.joinDefault).
    gateway.onSessionBound((conn) => rooms.joinDefault(conn));
    gateway.onSessionUnbound((conn) => {
      this.flushUsageOf(conn);
      rooms.leaveAll(conn).catch((e) => logFailure(this.deps.log, e, {}, 'could not leave rooms'));
    });
    this.usageTimer = setInterval(() => this.flushUsage(), USAGE_FLUSH_MS);
    this.usageTimer.unref();
  }

  close(): void {
    if (this.usageTimer) clearInterval(this.usageTimer);
    this.flushUsage();
  }

  private async users(rawRoom: string | undefined): Promise<{ users: readonly string[] }> {
    const key = rawRoom === undefined ? ONLINE : normalizeRoom(rawRoom);
    this.deps.gateway.counters.listRequests.labels(key === ONLINE ? 'users' : 'users_room').inc();
    return { users: await this.names.get(key) };
  }

  /**
   * A direct message: no PostgreSQL (the recipient's user id is remembered) and one Redis
   * round trip, the publish script's, which finds the user's sessions, skips the expired ones
   * and appends to the outboxes of the others. With a `key`, its eid is made from it
   * (`keyedEid`): sent again with the same key, it is stored once in each outbox.
   */
  private async send(
    conn: Connection,
    to: string,
    body: string,
    key: string | undefined,
    turn: Turn,
  ): Promise<{ eid: string }> {
    this.deps.rooms.checkBody(body);
    // Most devices have no runtime limit: no promise, and no await (one suspension fewer).
    const limit = this.limited(conn, 'send', () => Buffer.byteLength(body));
    if (limit) await limit;
    const { delivery, publisher } = this.deps;
    const s = conn.session!;
    const input: EventInput = { name: 'direct.message', data: { body }, qos: 1, from: s.username };
    if (key !== undefined) input.eid = keyedEid('send', s.userId, key);
    // A not_found of the lookup or of the publish names the recipient (try/catch rather than
    // `.catch`: no extra promise per message).
    let outcome: PublishOutcome;
    try {
      const target = { username: to };
      const recipients =
        publisher.recipientsKnown(target, input) ?? (await publisher.recipientsFor(target, input));
      outcome = await turn(() => delivery.publishTo(recipients, input));
    } catch (e) {
      throw isProtocolError(e) && e.code === 'not_found'
        ? new ProtocolError('not_found', `${to} has no live session`)
        : e;
    }
    if (outcome.accepted === 0) {
      // No outbox took it: full (rejected), or, with none full, unwritable (a key of another
      // type: publish.lua; logged by the delivery service).
      if (outcome.rejected === 0 && outcome.failed.length > 0)
        throw new ProtocolError('internal', `${to}'s outbox could not be written`);
      throw new ProtocolError('overloaded', `${to}'s outbox is full`, { retryAfter: 5000 });
    }
    return { eid: outcome.eid };
  }

  /**
   * A device's event for the back end, queued on `gw-backend` under its eid. With a `key`, the
   * eid is made from it (`keyedEid`): sent again with the same key, the job is queued once while
   * BullMQ keeps the first.
   */
  private async publish(
    conn: Connection,
    name: string,
    data: unknown,
    key: string | undefined,
    turn: Turn,
  ): Promise<{ eid: string }> {
    if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) {
      throw new ProtocolError('bad_message', 'name: must be 1-128 of [A-Za-z0-9_.:-]', { field: 'name' });
    }
    const limit = this.limited(conn, 'publish', () => pack(data ?? null).length);
    if (limit) await limit;
    const s = conn.session!;
    const eid = key === undefined ? newEid() : keyedEid('publish', s.userId, key);
    await turn(() =>
      this.deps.backend.emit(
        'device.event',
        {
          eid,
          user: s.userId,
          username: s.username,
          session: s.sessionId,
          device: s.deviceId ?? null,
          name,
          data,
          ts: Date.now(),
        },
        eid,
      ),
    );
    this.usage(conn).eventsIn++;
    return { eid };
  }

  // ---- usage counters ------------------------------------------------------------------------

  private usage(conn: Connection): Usage {
    let u = conn.attachments.get('usage') as Usage | undefined;
    if (!u) conn.attachments.set('usage', (u = { eventsIn: 0, bytesIn: 0, eventsOut: 0, bytesOut: 0 }));
    return u;
  }

  private usageKey(conn: Connection): string | null {
    const s = conn.session;
    if (!s) return null;
    return this.deps.keys.usage(s.deviceId ?? `session:${s.sessionId}`);
  }

  private flushUsage(): void {
    for (const conn of this.deps.gateway.connections) this.flushUsageOf(conn);
  }

  /** Adds what a connection did since the last flush to its device's counters in Redis. */
  private flushUsageOf(conn: Connection): void {
    const key = this.usageKey(conn);
    if (!key) return;
    const u = this.usage(conn);
    const t = conn.traffic;
    const bytesIn = t.bytesIn - u.bytesIn;
    const bytesOut = t.bytesOut - u.bytesOut;
    const eventsOut = t.eventsOut - u.eventsOut;
    const eventsIn = u.eventsIn;
    if (bytesIn === 0 && bytesOut === 0 && eventsIn === 0 && eventsOut === 0) return;
    u.bytesIn = t.bytesIn;
    u.bytesOut = t.bytesOut;
    u.eventsOut = t.eventsOut;
    u.eventsIn = 0;
    this.deps.binding
      .run('usage', [key], [eventsIn, eventsOut, bytesIn, bytesOut, Date.now()])
      .catch((e) => logFailure(this.deps.log, e, {}, 'usage counters not written'));
  }
}
