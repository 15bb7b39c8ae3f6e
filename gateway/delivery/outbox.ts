/**
 * A session's durable outbox of qos-1 events in Redis, through the Lua scripts in `lua/`
 * (each documents its keys and arguments). One script call does one step atomically:
 * publish (store + tell the holding node), ack-and-pump, resend, take.
 *
 * The happy path is batched: every `publish` of one tick goes to Redis in one script call, and
 * the delivery service hands the ack-pumps of all its sessions with news in one tick to
 * `ackPumpMany`, also one call. A script call costs Redis ~10 µs before it does any work, more
 * than the commands an event needs, so this is what keeps Redis off the critical path.
 */
import { readFileSync } from 'node:fs';
import type { Redis } from 'ioredis';
import { pack, unpack } from '../../protocol/index.ts';
import type { Keys } from '../keys.ts';

/** What the outbox stores of an event (packed with MessagePack). */
export interface StoredEvent {
  eid: string;
  name: string;
  data: unknown;
  ts: number;
  from?: string;
  room?: string;
}

export type OverflowPolicy = 'reject' | 'drop-oldest';

export interface PublishResult {
  /** `sent`: added, and handed to this node's connection of the session by the publish itself. */
  status: 'added' | 'sent' | 'duplicate' | 'rejected' | 'gone';
  /** The node holding the session, if it is online. */
  node: string | null;
  dropped?: StoredEvent;
}

export interface ToSend {
  event: StoredEvent;
  seq: number;
  attempt: number;
}

export interface AckPumpResult {
  acked: number;
  receipts: StoredEvent[];
  send: ToSend[];
  expired: StoredEvent[];
  /** Redis lost writes this connection saw: `send` starts from the outbox's beginning. */
  resynced: boolean;
}

export interface TakenEvent {
  event: StoredEvent;
  attempts: number;
}

const lua = (path: string) => readFileSync(new URL(`./lua/${path}.lua`, import.meta.url), 'utf8');
/** A script with the shared helpers in lua/includes/ put before it. */
const script = (name: string) => `${lua('includes/remove-event')}\n${lua(name)}`;

type Reply = (Buffer | number | null | Reply)[];

/** One session's share of an `ackPumpMany` call. */
export interface AckPumpRequest {
  sid: string;
  /** The last sequence already sent on this connection. */
  afterSeq: number;
  /** Free slots of the in-flight window. */
  slots: number;
  acks: string[];
}

/** publish.lua's status codes, from -2, as results. */
const PUBLISH_STATUS = ['gone', 'rejected', 'duplicate', 'added', 'sent'] as const;

/** Events per publish script call, sessions per ack-pump call: bounds how long Redis is busy. */
const MAX_PUBLISH_BATCH = 256;
const MAX_PUMP_BATCH = 64;

/**
 * This node's side of sending from the publish (docs/ARCHITECTURE.md, "Sending from the
 * publish"): the delivery service, which knows the connections and their in-flight windows.
 */
export interface DirectSender {
  /** This node's id, as in the sessions' node keys. */
  readonly nodeId: string;
  /**
   * Asked once per event as a publish call is built: a claim carrying the last sequence sent
   * on this node's connection of the session if the event may go out from the publish (a free
   * window slot), else null. Every claim made is answered by `settle`, once, in claim order.
   */
  claim(sid: string): DirectClaim | null;
  /** The script's answer to a claim: `seq` granted (send `event` now), or null (refused or failed). */
  settle(claim: DirectClaim, event: StoredEvent, seq: number | null): void;
}

/** A claim to send an event from its publish, tied to one connection of the session. */
export interface DirectClaim {
  /** The last sequence sent on that connection. */
  readonly after: number;
}

interface PendingPublish {
  sid: string;
  event: StoredEvent;
  packed: Buffer;
  receipt: boolean;
  expiresAtMs: number;
  /** Filled in when the call is built: see DirectSender.claim. */
  claim: DirectClaim | null;
  resolve: (r: PublishResult) => void;
  reject: (e: unknown) => void;
}

interface OutboxCommands {
  gwPublishBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwAckPumpBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwResendBuffer(...args: (string | Buffer | number)[]): Promise<Reply | null>;
  gwTakeBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwMoveBuffer(...args: (string | number)[]): Promise<number | unknown[]>;
}

const decode = (payload: Buffer): StoredEvent => unpack(payload) as StoredEvent;

function parsePump(reply: Reply): AckPumpResult {
  const receiptsRaw = reply[1] as Buffer[];
  const sendRaw = reply[2] as (Buffer | number)[];
  const expiredRaw = reply[3] as Buffer[];
  const receipts: StoredEvent[] = [];
  for (let i = 1; i < receiptsRaw.length; i += 2) receipts.push(decode(receiptsRaw[i]));
  const send: ToSend[] = [];
  for (let i = 0; i < sendRaw.length; i += 4) {
    send.push({
      seq: Number((sendRaw[i + 1] as Buffer).toString()),
      attempt: sendRaw[i + 2] as number,
      event: decode(sendRaw[i + 3] as Buffer),
    });
  }
  const expired: StoredEvent[] = [];
  for (let i = 1; i < expiredRaw.length; i += 2) expired.push(decode(expiredRaw[i]));
  return { acked: reply[0] as number, receipts, send, expired, resynced: reply[4] === 1 };
}

export class Outbox {
  private readonly redis: Redis & OutboxCommands;
  private pendingPublishes: PendingPublish[] = [];
  /** Set by the delivery service of a gateway node; absent in a back end's publisher. */
  direct: DirectSender | null = null;

  constructor(
    redis: Redis,
    private readonly keys: Keys,
    private readonly options: { max: number; policy: OverflowPolicy; ttlSeconds: number },
  ) {
    const r = redis as Redis & Partial<OutboxCommands>;
    if (!r.gwPublishBuffer) {
      // Key counts vary with the batch: the caller passes it first.
      redis.defineCommand('gwPublish', { lua: script('publish') });
      redis.defineCommand('gwAckPump', { lua: script('ack-pump') });
      redis.defineCommand('gwResend', { numberOfKeys: 6, lua: script('resend') });
      redis.defineCommand('gwTake', { numberOfKeys: 6, lua: script('take') });
      redis.defineCommand('gwMove', { numberOfKeys: 14, lua: script('move') });
    }
    this.redis = r as Redis & OutboxCommands;
  }

  /** Stores one event in a session's outbox; batched with the other publishes of this tick. */
  publish(sid: string, event: StoredEvent, receipt: boolean, expiresAtMs: number): Promise<PublishResult> {
    const packed = pack(event);
    return new Promise((resolve, reject) => {
      this.pendingPublishes.push({ sid, event, packed, receipt, expiresAtMs, claim: null, resolve, reject });
      if (this.pendingPublishes.length === 1) process.nextTick(this.flushPublishes);
    });
  }

  private readonly flushPublishes = (): void => {
    const all = this.pendingPublishes;
    this.pendingPublishes = [];
    for (let i = 0; i < all.length; i += MAX_PUBLISH_BATCH) {
      this.publishBatch(all.slice(i, i + MAX_PUBLISH_BATCH));
    }
  };

  private publishBatch(batch: PendingPublish[]): void {
    const o = this.options;
    const direct = this.direct;
    const keys: string[] = [];
    const args: (string | Buffer | number)[] = [
      o.max,
      o.policy,
      o.ttlSeconds,
      this.keys.nodeChannelPrefix,
      direct?.nodeId ?? '',
    ];
    for (const p of batch) {
      p.claim = direct ? direct.claim(p.sid) : null;
      keys.push(...this.keys.outbox(p.sid), this.keys.session(p.sid), this.keys.sentMark(p.sid));
      args.push(
        p.event.eid,
        p.packed,
        p.sid,
        p.receipt ? '1' : '0',
        p.expiresAtMs > 0 ? String(p.expiresAtMs) : '0',
        p.claim ? p.claim.after : -1,
      );
    }
    this.redis.gwPublishBuffer(keys.length, ...keys, ...args).then(
      (reply) => {
        batch.forEach((p, i) => {
          const status = reply[5 * i] as number;
          const dropped = reply[5 * i + 3] as Buffer | null;
          if (p.claim) direct!.settle(p.claim, p.event, status === 2 ? (reply[5 * i + 4] as number) : null);
          p.resolve({
            status: PUBLISH_STATUS[status + 2],
            node: reply[5 * i + 1] ? (reply[5 * i + 1] as Buffer).toString() : null,
            ...(dropped ? { dropped: decode(dropped) } : {}),
          });
        });
      },
      (e) => {
        for (const p of batch) {
          // The call may have been applied: the pump sends what the connection was not sent.
          if (p.claim) direct!.settle(p.claim, p.event, null);
          p.reject(e);
        }
      },
    );
  }

  /**
   * For each session: applies its acks, then takes the next events that fit its window, in
   * publish order. Results are in request order. One script call per 64 sessions.
   */
  async ackPumpMany(requests: AckPumpRequest[], nowMs: number): Promise<AckPumpResult[]> {
    const calls: Promise<Reply>[] = [];
    for (let i = 0; i < requests.length; i += MAX_PUMP_BATCH) {
      const keys: string[] = [];
      const args: (string | number)[] = [nowMs];
      for (const r of requests.slice(i, i + MAX_PUMP_BATCH)) {
        keys.push(...this.keys.outbox(r.sid).slice(0, 6), this.keys.sentMark(r.sid));
        args.push(r.afterSeq, r.slots, r.acks.length, ...r.acks);
      }
      calls.push(this.redis.gwAckPumpBuffer(keys.length, ...keys, ...args));
    }
    const replies = (await Promise.all(calls)).flat() as Reply[];
    return replies.map(parsePump);
  }

  /** Takes one event again for a retry: null if it is gone. */
  async resend(
    sid: string,
    eid: string,
    nowMs: number,
  ): Promise<null | { expired: StoredEvent } | { event: StoredEvent; attempt: number }> {
    const reply = await this.redis.gwResendBuffer(...this.keys.outbox(sid).slice(0, 6), eid, nowMs);
    if (!reply) return null;
    if ((reply[0] as Buffer).toString() === 'expired') return { expired: decode(reply[1] as Buffer) };
    return { attempt: reply[1] as number, event: decode(reply[2] as Buffer) };
  }

  /** Removes the given events (or all with `eids` undefined); returns those this call removed. */
  async take(sid: string, eids?: string[]): Promise<TakenEvent[]> {
    const reply = await this.redis.gwTakeBuffer(
      ...this.keys.outbox(sid).slice(0, 6),
      eids ? 'some' : 'all',
      ...(eids ?? []),
    );
    const out: TakenEvent[] = [];
    for (let i = 0; i < reply.length; i += 3) {
      out.push({ attempts: reply[i + 1] as number, event: decode(reply[i + 2] as Buffer) });
    }
    return out;
  }

  /**
   * Moves a session's events to the session that took over its device (move.lua), keeping
   * eids, attempts, receipts and expiries, within the outbox bound; -1 if `to` is gone.
   * `dropped`: events the drop-oldest policy dropped from `to`'s outbox; `left`: events that
   * did not fit under the reject policy, still in `from`'s outbox for the caller to purge.
   */
  async move(
    from: string,
    to: string,
  ): Promise<-1 | { moved: number; dropped: StoredEvent[]; left: number }> {
    const o = this.options;
    const reply = await this.redis.gwMoveBuffer(
      ...this.keys.outbox(from).slice(0, 6),
      ...this.keys.outbox(to),
      this.keys.session(to),
      o.ttlSeconds,
      this.keys.nodeChannelPrefix,
      to,
      o.max,
      o.policy,
    );
    if (typeof reply === 'number') return reply as -1;
    const [moved, droppedRaw, left] = reply as [(Buffer | null)[], Buffer[], number];
    // The expiry index names events by session: re-key the moved ones.
    const p = this.redis.pipeline();
    for (let i = 0; i < moved.length; i += 2) {
      const expiry = moved[i + 1];
      if (!expiry) continue;
      const eid = moved[i]!.toString();
      p.zrem(this.keys.expiries, `${from}|${eid}`);
      p.zadd(this.keys.expiries, expiry.toString(), `${to}|${eid}`);
    }
    if (p.length > 0) await p.exec();
    const dropped: StoredEvent[] = [];
    for (let i = 1; i < droppedRaw.length; i += 2) dropped.push(decode(droppedRaw[i]));
    return { moved: moved.length / 2, dropped, left };
  }

  /** Events waiting in a session's outbox. */
  depth(sid: string): Promise<number> {
    return this.redis.zcard(this.keys.outbox(sid)[0]);
  }
}
