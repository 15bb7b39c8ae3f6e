/**
 * A session's durable outbox of qos-1 events in Redis, through the Lua scripts in `lua/`
 * (each documents its keys and arguments). One script call does one step atomically:
 * publish (store + tell the holding node), ack-and-pump, resend, take.
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
  status: 'added' | 'duplicate' | 'rejected' | 'gone';
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
}

export interface TakenEvent {
  event: StoredEvent;
  attempts: number;
}

const lua = (path: string) => readFileSync(new URL(`./lua/${path}.lua`, import.meta.url), 'utf8');
/** A script with the shared helpers in lua/includes/ put before it. */
const script = (name: string) => `${lua('includes/remove-event')}\n${lua(name)}`;

type Reply = (Buffer | number | null | Reply)[];

interface OutboxCommands {
  gwPublishBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwAckPumpBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwResendBuffer(...args: (string | Buffer | number)[]): Promise<Reply | null>;
  gwTakeBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
}

const decode = (payload: Buffer): StoredEvent => unpack(payload) as StoredEvent;

export class Outbox {
  private readonly redis: Redis & OutboxCommands;

  constructor(
    redis: Redis,
    private readonly keys: Keys,
    private readonly options: { max: number; policy: OverflowPolicy; ttlSeconds: number },
  ) {
    const r = redis as Redis & Partial<OutboxCommands>;
    if (!r.gwPublishBuffer) {
      redis.defineCommand('gwPublish', { numberOfKeys: 8, lua: script('publish') });
      redis.defineCommand('gwAckPump', { numberOfKeys: 6, lua: script('ack-pump') });
      redis.defineCommand('gwResend', { numberOfKeys: 6, lua: script('resend') });
      redis.defineCommand('gwTake', { numberOfKeys: 6, lua: script('take') });
    }
    this.redis = r as Redis & OutboxCommands;
  }

  async publish(
    sid: string,
    event: StoredEvent,
    receipt: boolean,
    expiresAtMs: number,
  ): Promise<PublishResult> {
    const o = this.options;
    const reply = await this.redis.gwPublishBuffer(
      ...this.keys.outbox(sid),
      this.keys.session(sid),
      event.eid,
      pack(event),
      o.max,
      o.policy,
      o.ttlSeconds,
      this.keys.nodeChannelPrefix,
      sid,
      receipt ? '1' : '0',
      expiresAtMs > 0 ? String(expiresAtMs) : '0',
    );
    const status = reply[0] as number;
    return {
      status: status === 1 ? 'added' : status === 0 ? 'duplicate' : status === -1 ? 'rejected' : 'gone',
      node: reply[1] ? (reply[1] as Buffer).toString() : null,
      ...(reply[3] ? { dropped: decode(reply[3] as Buffer) } : {}),
    };
  }

  async ackPump(
    sid: string,
    afterSeq: number,
    slots: number,
    acks: string[],
    nowMs: number,
  ): Promise<AckPumpResult> {
    const reply = await this.redis.gwAckPumpBuffer(
      ...this.keys.outbox(sid).slice(0, 6),
      afterSeq,
      slots,
      nowMs,
      acks.length,
      ...acks,
    );
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
    return { acked: reply[0] as number, receipts, send, expired };
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

  /** Events waiting in a session's outbox. */
  depth(sid: string): Promise<number> {
    return this.redis.zcard(this.keys.outbox(sid)[0]);
  }
}
