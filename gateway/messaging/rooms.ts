/**
 * Rooms (the chat seed): join, leave, list, say, with qos-0 room events that reach members on
 * every node through one Redis channel per room. A node subscribes to a room's channel while
 * it has a local member. Recent messages are kept per room for the replay on join, marked
 * `history: true`.
 *
 * Joining or leaving is one Lua step (lua/room-join.lua, lua/room-leave.lua), run in the session
 * binding's one script call per tick (gateway/binding.ts). In the default
 * room, which every session of the fleet joins, joins and leaves are not announced: a
 * `room.joined` to every member per join would make connecting N devices cost O(N²) events.
 */
import { readFileSync } from 'node:fs';
import type { Redis } from 'ioredis';
import { badMessage, ProtocolError, pack, unpack } from '../../protocol/index.ts';
import type { SessionBinding } from '../binding.ts';
import type { Bus } from '../bus.ts';
import { type Connection, ConnState, type Turn } from '../connection.ts';
import { newEid } from '../delivery/eid.ts';
import { dependencyUnavailable, logFailure } from '../faults.ts';
import type { Keys } from '../keys.ts';
import type { Logger } from '../log.ts';
import { settledWithin } from '../wait.ts';

export interface RoomOptions {
  /** Joined after authentication; '' disables (GW_DEFAULT_ROOM). */
  defaultRoom: string;
  /** Longest `say`/`send` body in characters (GW_MAX_BODY). */
  maxBody: number;
  /** How far back the replay on join reaches (GW_ROOM_HISTORY_MS; 0 disables). */
  historyMs: number;
  /** At most this many messages kept per room for replay. */
  historyMax: number;
}

/** A room event as it travels between nodes. `skip`: the session it is not for. */
interface RoomWire {
  eid: string;
  name: 'room.message' | 'room.joined' | 'room.left';
  room: string;
  from: string;
  data: unknown;
  ts: number;
  skip?: string;
}

/** A member's `room.joined` or `room.left`, packed, for a script to publish on the room's channel. */
function membershipEvent(name: 'room.joined' | 'room.left', room: string, m: Membership): Buffer {
  return pack({
    eid: newEid(),
    ts: Date.now(),
    name,
    room,
    from: m.username,
    data: {},
    skip: m.sid,
  } satisfies RoomWire);
}

/**
 * One join of a connection: its field in the session's memberships hash, `room token node`
 * (lua/room-join.lua), which its leave removes and nothing else.
 */
interface Membership {
  field: string;
  sid: string;
  username: string;
  /** room_join answered (restore writes only these again). */
  joined: boolean;
}

/** A leave whose Redis step was not answered: sent again until it is (`repair`). */
interface OwedLeave {
  m: Membership;
  room: string;
  /** Tell the room's members if the session leaves (not for a join answered as failed). */
  announce: boolean;
}

/** The first retry of owed leaves, and the longest wait between retries as they keep failing. */
const REPAIR_MIN_MS = 1000;
const REPAIR_MAX_MS = 30_000;
/** Between the tries of owed leaves at shutdown, within its deadline. */
const SETTLE_RETRY_MS = 250;

/** A live room message held for a connection whose join is under way. */
interface Held {
  eid: string;
  packed: Buffer;
}

/**
 * Live messages held for one joining connection at most; later ones are dropped (qos 0), so
 * that joins in a frozen Redis do not pile up a busy room's traffic.
 */
const HOLD_MAX = 1000;

const ROOM = /^#[a-z0-9_-]{1,32}$/;
const ROOMS_KEY = 'rooms';
/**
 * A connection's rooms whose `leave` was answered `overloaded` (owed): the same `leave` sent
 * again is answered for that membership, not `not_found`.
 */
const LEAVING_KEY = 'leaving';

const lua = (name: string) => readFileSync(new URL(`./lua/${name}.lua`, import.meta.url), 'utf8');

/** `#` + 1-32 of [a-z0-9_-]; a missing `#` is added, letters are lowercased. */
export function normalizeRoom(raw: string, field = 'room'): string {
  const name = (raw.startsWith('#') ? raw : `#${raw}`).toLowerCase();
  if (!ROOM.test(name)) throw badMessage(field, 'must be # then 1-32 of [a-z0-9_-]');
  return name;
}

/** A connection's rooms, with the membership of each. */
function roomsOf(conn: Connection): Map<string, Membership> {
  let map = conn.attachments.get(ROOMS_KEY) as Map<string, Membership> | undefined;
  if (!map) conn.attachments.set(ROOMS_KEY, (map = new Map()));
  return map;
}

export class Rooms {
  /** Local members per room. */
  private readonly local = new Map<string, Set<Connection>>();
  /** A room's SUBSCRIBE while it is out (the first local join of the room made it). */
  private readonly subscribing = new Map<string, Promise<void>>();
  /**
   * Live messages of a room held for each of its connections whose join is under way: sent
   * after the join's history, but for those the history had (PROTOCOL.md §8).
   */
  private readonly holding = new Map<string, Map<Connection, Held[]>>();
  /** The PING of `subscriberCaughtUp` for the joins answered in this tick. */
  private caughtUp: Promise<void> | undefined;
  /** The default room, normalized; '' when there is none. */
  private readonly defaultRoom: string;
  /** Makes each membership's token unique on this node. */
  private joins = 0;
  /** Leaves Redis has not answered, by membership field; `repair` sends them again. */
  private readonly owed = new Map<string, OwedLeave>();
  /**
   * Connections whose join of the default room failed (Redis or the node's subscriber away):
   * `repair` joins them again.
   */
  private readonly defaultOwed = new Set<Connection>();
  private repairTimer: NodeJS.Timeout | undefined;
  private repairing = false;
  /** The last `repair` started. */
  private repairRun: Promise<void> | undefined;
  /** Leaves whose Redis call is out, which a shutdown waits for (`settle`). */
  private readonly underway = new Set<Promise<unknown>>();
  /** Shutting down: `settle` retries the owed leaves, no timer does. */
  private closing = false;
  private repairDelay = REPAIR_MIN_MS;

  constructor(
    private readonly deps: {
      redis: Redis;
      bus: Bus;
      keys: Keys;
      /** This node's id: memberships name the node that holds them. */
      nodeId: string;
      /** Joining and leaving go in the binding's one call per tick with the rest of a (re)bind. */
      binding: SessionBinding;
      log: Logger;
      options: RoomOptions;
    },
  ) {
    deps.binding.define('room_join', lua('room-join'));
    deps.binding.define('room_leave', lua('room-leave'));
    deps.binding.define('room_broadcast', lua('room-broadcast'));
    deps.binding.define('room_restore', lua('room-restore'));
    this.defaultRoom = deps.options.defaultRoom ? normalizeRoom(deps.options.defaultRoom) : '';
    // Back after a loss, the subscriber takes a failed SUBSCRIBE again: joins owed now can work.
    deps.bus.onBack(() => this.scheduleRepair(true));
  }

  /**
   * Joins the default room after authentication (PROTOCOL.md §8). A join that fails is tried
   * again (`repair`) until it is done or the connection leaves its session; meanwhile a `say`
   * there is answered `overloaded`, not `forbidden`.
   */
  joinDefault(conn: Connection): void {
    if (!this.defaultRoom) return;
    void this.tryDefault(conn).then((owed) => {
      if (owed) this.scheduleRepair();
    });
  }

  /** One try of the default room's join; true when it is owed (failed, the session still there). */
  private async tryDefault(conn: Connection): Promise<boolean> {
    const s = conn.session;
    if (!s || conn.state !== ConnState.open) return false;
    if (roomsOf(conn).has(this.defaultRoom)) {
      this.defaultOwed.delete(conn);
      return false;
    }
    try {
      await this.join(conn, this.defaultRoom);
      this.defaultOwed.delete(conn);
      return false;
    } catch (e) {
      // Gone, or bound to another session (whose bind joins it), meanwhile: nothing owed.
      if (conn.state !== ConnState.open || conn.session !== s) return false;
      if (!this.defaultOwed.has(conn) && this.defaultOwed.size === 0) {
        logFailure(this.deps.log, e, {}, 'could not join the default room; tried again until it works');
      }
      this.defaultOwed.add(conn);
      return true;
    }
  }

  /** Joins and leaves of this room are announced (`room.joined` / `room.left`) to its members. */
  private announced(room: string): boolean {
    return room !== this.defaultRoom;
  }

  async join(conn: Connection, rawRoom: string): Promise<{ room: string; members: number }> {
    const room = normalizeRoom(rawRoom);
    const s = conn.session!;
    const { keys, options } = this.deps;
    const mine = roomsOf(conn);
    if (mine.has(room)) return { room, members: await this.deps.redis.zcard(keys.roomMembers(room)) };
    const m: Membership = {
      field: `${room} ${++this.joins} ${this.deps.nodeId}`,
      sid: s.sessionId,
      username: s.username,
      joined: false,
    };
    mine.set(room, m);
    // A leave of the room answered `overloaded` before is still owed, for its own membership.
    (conn.attachments.get(LEAVING_KEY) as Map<string, Membership> | undefined)?.delete(room);
    // From its entry in the room's local set until its history is sent, the connection's live
    // messages are held.
    this.hold(room, conn);
    let joined: [number, number, Buffer[]];
    try {
      await this.subscribeLocal(room, conn);
      // The connection closed, or left its session, while the SUBSCRIBE was out: its leave
      // ran then (leaveAll), finding nothing to leave; joining now would leave a member for
      // good.
      if (mine.get(room) !== m || conn.session?.sessionId !== s.sessionId || conn.state !== ConnState.open) {
        throw new ProtocolError('unauthenticated', 'the connection left its session while joining');
      }
      try {
        joined = (await this.deps.binding.run(
          'room_join',
          [
            keys.roomMembers(room),
            keys.sessionMemberships(s.sessionId),
            keys.rooms,
            keys.roomHistory(room),
            keys.nodeMemberships(this.deps.nodeId),
          ],
          [
            s.sessionId,
            room,
            options.historyMs > 0 ? String(Date.now() - options.historyMs) : '',
            m.field,
            s.username,
          ],
        )) as [number, number, Buffer[]];
      } catch (e) {
        // Answered `overloaded` (not acted on), but a call that timed out in a frozen Redis
        // runs when it thaws: its membership is left after it (same connection, so in order),
        // quietly (no `room.joined` was told), and owed until Redis answers.
        this.drop(m, room, false).catch((e2) => this.owe(m, room, e2, false));
        throw e;
      }
      m.joined = true;
    } catch (e) {
      // Not joined (Redis or this node's subscriber unavailable): a retry does it all again,
      // rather than finding the room among the connection's and answering at once.
      if (mine.get(room) === m) mine.delete(room);
      this.unhold(room, conn);
      this.unsubscribeLocal(room, conn);
      throw e;
    }
    const [first, members, history] = joined;
    // A message published before the history was read may not have come on the subscriber
    // connection yet (another socket): held until it has, then left out as replayed.
    if (history.length > 0) await this.subscriberCaughtUp();
    const held = this.unhold(room, conn);
    // The connection went meanwhile: its leave, sent after this join, undoes it.
    if (mine.get(room) !== m) return { room, members };
    // The history, then what came live since the connection entered the room's set, but for
    // what the history had (published after the SUBSCRIBE, before the history was read).
    const replayed = held && held.length > 0 ? new Set<string>() : undefined;
    for (const raw of history) {
      const w = unpack(raw) as RoomWire;
      replayed?.add(w.eid);
      this.deliver(conn, w, true);
    }
    if (held && conn.state === ConnState.open) {
      for (const h of held) if (!replayed!.has(h.eid)) conn.sendPacked(h.packed, true);
    }
    if (first === 1 && this.announced(room)) {
      await this.broadcast({ name: 'room.joined', room, from: s.username, data: {}, skip: s.sessionId });
    }
    return { room, members };
  }

  /**
   * Resolves once the subscriber connection has delivered what Redis published before now: a
   * PING sent on it after them, shared by the joins answered in one tick. A subscriber away
   * delivers nothing meanwhile: resolves too.
   */
  private subscriberCaughtUp(): Promise<void> {
    if (!this.caughtUp) {
      const p = this.deps.bus.synced().catch(() => {});
      this.caughtUp = p;
      setImmediate(() => {
        if (this.caughtUp === p) this.caughtUp = undefined;
      });
    }
    return this.caughtUp;
  }

  private hold(room: string, conn: Connection): void {
    let byConn = this.holding.get(room);
    if (!byConn) this.holding.set(room, (byConn = new Map()));
    byConn.set(conn, []);
  }

  /** Stops holding the connection's live messages of `room`; returns those held. */
  private unhold(room: string, conn: Connection): Held[] | undefined {
    const byConn = this.holding.get(room);
    const held = byConn?.get(conn);
    if (held === undefined) return undefined;
    byConn!.delete(conn);
    if (byConn!.size === 0) this.holding.delete(room);
    return held;
  }

  /**
   * The connection is out of the room on this node at once, whatever Redis does: it hears
   * nothing of it from here on. A leave Redis does not answer is owed (`repair`, as a closed
   * connection's are) and answered `overloaded`; the same `leave` sent again is answered once
   * Redis has it (PROTOCOL.md §8). Before, the connection stayed a member on its node, though a
   * frozen Redis ran the leave when it thawed: heard, but not counted, until its close.
   */
  async leave(conn: Connection, rawRoom: string): Promise<{ room: string; members: number }> {
    const room = normalizeRoom(rawRoom);
    const mine = roomsOf(conn);
    const m = mine.get(room);
    if (!m) {
      // Its leave was answered `overloaded`: answered now if Redis takes it (it may have already).
      const leaving = conn.attachments.get(LEAVING_KEY) as Map<string, Membership> | undefined;
      const owed = leaving?.get(room);
      if (!owed) throw new ProtocolError('not_found', `not a member of ${room}`);
      const members = await this.drop(owed, room);
      this.owed.delete(owed.field);
      leaving!.delete(room);
      return { room, members };
    }
    mine.delete(room);
    this.unhold(room, conn);
    this.unsubscribeLocal(room, conn);
    try {
      return { room, members: await this.drop(m, room) };
    } catch (e) {
      this.owe(m, room, e);
      let leaving = conn.attachments.get(LEAVING_KEY) as Map<string, Membership> | undefined;
      if (!leaving) conn.attachments.set(LEAVING_KEY, (leaving = new Map()));
      leaving.set(room, m);
      throw e;
    }
  }

  /**
   * One membership leaves its room; the session leaves when it was its last there, told to the
   * room's members if `announce` by the same Lua step (lua/room-leave.lua), so that a leave that
   * ran without its answer coming (a frozen Redis) is told too, and one sent again is not.
   */
  private async drop(m: Membership, room: string, announce = true): Promise<number> {
    const { keys } = this.deps;
    const told = announce && this.announced(room) ? membershipEvent('room.left', room, m) : '';
    const call = this.deps.binding.run(
      'room_leave',
      [
        keys.roomMembers(room),
        keys.sessionMemberships(m.sid),
        keys.rooms,
        keys.nodeMemberships(this.deps.nodeId),
      ],
      [m.sid, room, m.field, keys.roomChannel(room), told],
    );
    this.underway.add(call);
    const settled = () => this.underway.delete(call);
    call.then(settled, settled);
    const [, members] = (await call) as [number, number];
    return members;
  }

  /** Sends a leave again until Redis answers it (a leave may run twice: it removes its own field). */
  private owe(m: Membership, room: string, e: unknown, announce = true): void {
    if (this.owed.size === 0) {
      logFailure(this.deps.log, e, {}, 'room leaves not written to Redis; sent again until it answers');
    }
    this.owed.set(m.field, { m, room, announce });
    this.scheduleRepair();
  }

  /** Runs `repair` after the current wait, or at once (`now`: Redis is back). */
  private scheduleRepair(now = false): void {
    if (this.closing || this.repairing || (this.owed.size === 0 && this.defaultOwed.size === 0)) return;
    if (now) {
      clearTimeout(this.repairTimer);
      this.repairTimer = undefined;
      this.repairDelay = REPAIR_MIN_MS;
      void this.repair();
    } else if (!this.repairTimer) {
      this.repairTimer = setTimeout(() => {
        this.repairTimer = undefined;
        void this.repair();
      }, this.repairDelay);
      this.repairTimer.unref();
    }
  }

  /**
   * Sends every owed leave again and tries every owed default-room join again, all in the
   * binding's calls of one tick (256 a call), one attempt at a time; waits twice as long after
   * each that leaves some owed (up to 30 s), so that connections closed or bound during an
   * outage cost a few calls, not a storm of retries.
   */
  private repair(): Promise<void> {
    this.repairRun = this.repairOnce();
    return this.repairRun;
  }

  private async repairOnce(): Promise<void> {
    this.repairing = true;
    const batch = [...this.owed.values()];
    const joins = [...this.defaultOwed];
    let done = 0;
    let joined = 0;
    await Promise.all([
      ...batch.map(async (o) => {
        try {
          await this.drop(o.m, o.room, o.announce);
          if (this.owed.get(o.m.field) === o) this.owed.delete(o.m.field);
          done++;
        } catch {
          // still owed
        }
      }),
      ...joins.map(async (conn) => {
        if (!(await this.tryDefault(conn))) joined++;
      }),
    ]);
    this.repairing = false;
    if (this.owed.size === 0 && this.defaultOwed.size === 0) {
      this.repairDelay = REPAIR_MIN_MS;
      if (done > 0) this.deps.log.info({ leaves: done }, 'owed room leaves written to Redis');
      if (joined > 0) this.deps.log.info({ connections: joined }, 'default room joined after a retry');
    } else {
      this.repairDelay = Math.min(this.repairDelay * 2, REPAIR_MAX_MS);
      this.scheduleRepair();
    }
  }

  /**
   * At shutdown, once the connections are gone (their leaves sent): waits for the leaves under
   * way, then sends the owed ones again, a try every quarter second, until none is owed, all of
   * it within `deadline` (a try still out then is not waited for). Resolves with how many are
   * still owed: the node's set of sessions with memberships keeps them, so the node stays
   * registered and the sweep of dead nodes removes them once it is stale (Presence.close).
   */
  async settle(deadline: number): Promise<number> {
    this.closing = true;
    clearTimeout(this.repairTimer);
    this.repairTimer = undefined;
    this.defaultOwed.clear();
    const within = (p: Promise<unknown> | undefined) => settledWithin(p, deadline - Date.now());
    await within(Promise.allSettled([...this.underway]));
    // The failures' `owe` run after their calls settle.
    await new Promise((r) => setImmediate(r));
    await within(this.repairRun);
    let tries = 0;
    while (this.owed.size > 0 && !this.repairing && Date.now() < deadline) {
      if (tries++ > 0) await within(new Promise((r) => setTimeout(r, SETTLE_RETRY_MS)));
      if (Date.now() < deadline) await within(this.repair());
    }
    if (this.owed.size > 0) {
      this.deps.log.warn(
        { leaves: this.owed.size, tries },
        'room leaves still owed at shutdown; the sweep of this node removes them',
      );
    }
    return this.owed.size;
  }

  /**
   * What the presence sweep's step needs to tell a room that a dead node's session left it
   * (lua/sweep-session.lua builds each `room.left` from these, adding eid, room, from and
   * skip): the room channels' prefix, the default room (not told), and the entries every
   * `room.left` of the sweep shares, packed as in a MessagePack map but for its header.
   */
  sweepRoomLeft(now: number): [channelPrefix: string, defaultRoom: string, shared: Buffer, entries: number] {
    const map = pack({ name: 'room.left', data: {}, ts: now } satisfies Partial<RoomWire>);
    // Three entries: a fixmap, whose header is its first byte.
    if (map[0] !== 0x83) throw new Error(`room.left entries packed with header ${map[0]}`);
    return [this.deps.keys.roomChannelPrefix, this.defaultRoom, map.subarray(1), 3];
  }

  /**
   * Writes this node's memberships again (Redis came back and may have lost them, or another
   * node's sweep removed them while this node was silent), each with its session's score in
   * the room (lua/room-restore.lua); `join` and `leave` keep them from there. A membership whose
   * room a sweep told `room.left` is told `room.joined` once it is back, as a join would be.
   */
  async restore(): Promise<void> {
    this.scheduleRepair(true);
    const { keys, binding, nodeId } = this.deps;
    const writes: Promise<unknown>[] = [];
    for (const [room, conns] of this.local) {
      for (const c of conns) {
        const m = roomsOf(c).get(room);
        if (!m?.joined) continue;
        // The `room.joined` it tells if a sweep told the room it left (published by the script).
        const joined = this.announced(room) ? membershipEvent('room.joined', room, m) : '';
        writes.push(
          binding.run(
            'room_restore',
            [
              keys.roomMembers(room),
              keys.sessionMemberships(m.sid),
              keys.rooms,
              keys.nodeMemberships(nodeId),
              keys.nodeToldLeft(nodeId),
            ],
            [m.sid, room, m.field, m.username, keys.roomChannel(room), joined],
          ),
        );
      }
    }
    await Promise.all(writes);
  }

  /**
   * Leaves every room of a connection that closed or left its session. This node lets it go
   * at once, whatever Redis does: it hears none of them from now on, and a room's channel is
   * left once the room has no local member. The leaves in Redis go together (one call of the
   * binding); one Redis does not answer is owed and sent again until it does (`repair`).
   */
  async leaveAll(conn: Connection): Promise<void> {
    this.defaultOwed.delete(conn);
    conn.attachments.delete(LEAVING_KEY);
    const mine = conn.attachments.get(ROOMS_KEY) as Map<string, Membership> | undefined;
    if (!mine || mine.size === 0) return;
    const rooms = [...mine];
    mine.clear();
    for (const [room] of rooms) {
      this.unhold(room, conn);
      this.unsubscribeLocal(room, conn);
    }
    await Promise.all(rooms.map(([room, m]) => this.drop(m, room).catch((e) => this.owe(m, room, e))));
  }

  async list(): Promise<{ room: string; members: number }[]> {
    const flat = await this.deps.redis.zrange(this.deps.keys.rooms, '0', '-1', 'WITHSCORES');
    const out: { room: string; members: number }[] = [];
    for (let i = 0; i < flat.length; i += 2) {
      const members = Number(flat[i + 1]);
      if (members > 0) out.push({ room: flat[i], members });
    }
    return out;
  }

  /** Sessions with a connection on this node in `room` (normalized). */
  *localSessions(room: string): Iterable<string> {
    for (const conn of this.local.get(room) ?? []) {
      const sid = conn.session?.sessionId;
      if (sid) yield sid;
    }
  }

  memberSessions(room: string): Promise<string[]> {
    return this.deps.redis.zrange(this.deps.keys.roomMembers(normalizeRoom(room)), '0', '-1');
  }

  checkBody(body: string): void {
    if (body.length === 0) throw badMessage('body', 'must not be empty');
    if (body.length > this.deps.options.maxBody) {
      throw badMessage('body', `longer than ${this.deps.options.maxBody} characters`);
    }
  }

  /** Says `body` in a room; `turn` (the connection's order) decides when it is broadcast. */
  async say(conn: Connection, rawRoom: string, body: string, turn: Turn): Promise<void> {
    const room = normalizeRoom(rawRoom);
    if (!roomsOf(conn).has(room)) {
      // Its join is owed (Redis or the subscriber was away): it comes; retry then.
      if (room === this.defaultRoom && this.defaultOwed.has(conn)) throw dependencyUnavailable();
      throw new ProtocolError('forbidden', `join ${room} first`);
    }
    this.checkBody(body);
    const from = conn.session!.username;
    await turn(() => {
      // This node hears its rooms through its subscriber connection: while that is being
      // restored, the message would not reach this node's members, though Redis took it.
      if (!this.deps.bus.live) throw dependencyUnavailable();
      return this.broadcast({ name: 'room.message', room, from, data: { body } }, true);
    });
  }

  /**
   * Publishes a room event to every node; with `keep` (and GW_ROOM_HISTORY_MS) it is also
   * kept as history, packed once for both. It goes in the session binding's one script call per
   * tick, with every other room event of the tick (lua/room-broadcast.lua).
   */
  private async broadcast(partial: Omit<RoomWire, 'eid' | 'ts'>, keep = false): Promise<void> {
    const wire: RoomWire = { eid: newEid(), ts: Date.now(), ...partial };
    const packed = pack(wire);
    const { binding, keys, options } = this.deps;
    const channel = keys.roomChannel(wire.room);
    if (!keep || options.historyMs <= 0) {
      await binding.run('room_broadcast', [], [channel, packed]);
      return;
    }
    await binding.run(
      'room_broadcast',
      [keys.roomHistory(wire.room)],
      [
        channel,
        packed,
        String(wire.ts),
        String(wire.ts - options.historyMs),
        String(-options.historyMax - 1),
        String(options.historyMs),
      ],
    );
  }

  private deliver(conn: Connection, w: RoomWire, history: boolean): void {
    if (conn.state !== ConnState.open) return;
    conn.send(eventOf(w, history));
  }

  private async subscribeLocal(room: string, conn: Connection): Promise<void> {
    let set = this.local.get(room);
    if (!set) {
      const members = new Set<Connection>();
      set = members;
      this.local.set(room, members);
      const subscribed = this.deps.bus.subscribe(this.deps.keys.roomChannel(room), (msg) =>
        this.onRoomMessage(room, msg),
      );
      this.subscribing.set(room, subscribed);
      const settled = () => {
        if (this.subscribing.get(room) === subscribed) this.subscribing.delete(room);
      };
      subscribed.then(settled, () => {
        settled();
        // Not subscribed: the room's next join subscribes again.
        if (this.local.get(room) === members) this.local.delete(room);
      });
    }
    set.add(conn);
    // A join that comes while the room's SUBSCRIBE is out waits for it, and fails with it.
    const subscribing = this.subscribing.get(room);
    if (subscribing) await subscribing;
  }

  /**
   * The channel is left once the room has had no local member for a tick: a connection that
   * leaves and joins again at once (a login or resume on a connection that had a session)
   * costs no UNSUBSCRIBE and SUBSCRIBE.
   */
  private unsubscribeLocal(room: string, conn: Connection): void {
    const set = this.local.get(room);
    if (!set) return;
    set.delete(conn);
    if (set.size === 0) {
      setImmediate(() => {
        if (this.local.get(room) !== set || set.size > 0) return;
        this.local.delete(room);
        this.deps.bus.unsubscribe(this.deps.keys.roomChannel(room)).catch(() => {});
      });
    }
  }

  private onRoomMessage(room: string, msg: Buffer): void {
    const set = this.local.get(room);
    if (!set) return;
    let w: RoomWire;
    try {
      w = unpack(msg) as RoomWire;
    } catch (e) {
      this.deps.log.error({ err: e, room }, 'bad room message on the bus');
      return;
    }
    // Packed once for every local member; each connection only seals it.
    const packed = pack(eventOf(w, false));
    const holding = this.holding.get(room);
    for (const conn of set) {
      if (w.skip && conn.session?.sessionId === w.skip) continue;
      if (holding !== undefined) {
        const held = holding.get(conn);
        if (held !== undefined) {
          if (held.length < HOLD_MAX) held.push({ eid: w.eid, packed });
          continue;
        }
      }
      if (conn.state === ConnState.open) conn.sendPacked(packed, true);
    }
  }
}

/** The `event` message of a room message (PROTOCOL.md §5): qos 0, with the room and sender. */
function eventOf(w: RoomWire, history: boolean): object {
  return {
    type: 'event',
    eid: w.eid,
    name: w.name,
    data: w.data,
    ts: w.ts,
    qos: 0,
    room: w.room,
    from: w.from,
    ...(history ? { history: true } : {}),
  };
}
