/**
 * A session's durable outbox of qos-1 events in Redis, through the Lua scripts in `lua/`
 * (each documents its keys and arguments). One script call does one step atomically:
 * publish (expand the target to sessions, store + tell the holding nodes), ack-and-pump,
 * resend, take.
 *
 * The happy path is batched: every `publish` made while the last publish call is out (or in one
 * tick) goes to Redis in the next script call, one call out at a time, and
 * the delivery service hands the ack-pumps of all its sessions with news in one tick to
 * `ackPumpMany`, also one call. A script call costs Redis ~10 µs before it does any work, more
 * than the commands an event needs, so this is what keeps Redis off the critical path.
 */
import { readFileSync } from 'node:fs';
import type { Redis } from 'ioredis';
import { ProtocolError, pack, packEvent, unpack } from '../../protocol/index.ts';
import type { Keys } from '../keys.ts';
import { RECEIPT_MS } from '../receipts.ts';
import { ScriptArgs } from './script-args.ts';
import { readScriptReply } from './script-reply.ts';

/** What the outbox stores of an event (packed with MessagePack). */
export interface StoredEvent {
  eid: string;
  name: string;
  data: unknown;
  ts: number;
  from?: string;
  room?: string;
}

/** What a full outbox does to a publish (GW_OUTBOX_POLICY). */
export const OVERFLOW_POLICIES = ['reject', 'drop-oldest'] as const;
export type OverflowPolicy = (typeof OVERFLOW_POLICIES)[number];

export interface PublishResult {
  /**
   * `sent`: added, and handed to this node's connection of the session by the publish itself.
   * `failed`: not stored, a key of the session holding another type than the script uses
   * (`error`, Redis's WRONGTYPE; publish.lua).
   */
  status: 'added' | 'sent' | 'duplicate' | 'rejected' | 'gone' | 'failed';
  /** The node holding the session, if it is online. */
  node: string | null;
  dropped?: StoredEvent;
  /** Why it `failed`. */
  error?: string;
}

export interface ToSend {
  eid: string;
  /** The `event` message to send, put together around the stored bytes (packEvent). */
  message: Buffer;
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
  /** The sent mark as the call found it (0 when it took nothing; ack-pump.lua). */
  mark: number;
  /**
   * Set when the session's part of the call failed in Redis (a key of the session Redis could
   * not use: WRONGTYPE), to the error's message; the other sessions of the call went on.
   * `acked`, `receipts` and `expired` say what it did before (to be reported); `send` is what it
   * took, not to be sent: the session is tried again as after a failed call (`lostTakes`).
   */
  error?: string | undefined;
  /**
   * Eids of events the call found in the session's index without their payload (evicted or
   * deleted apart from it, a write that failed part-way): removed, never to be sent or reported.
   * Mostly empty (one shared array).
   */
  unreadable: readonly string[];
}

const NO_EIDS: readonly string[] = Object.freeze([]);

export interface TakenEvent {
  event: StoredEvent;
  attempts: number;
}

/**
 * A receipt of take.lua "kept": `<#eid>:<eid><attempts>:<#payload>:<payload>` for each event
 * taken (lengths in bytes).
 */
export function parseKept(b: Buffer): TakenEvent[] {
  const out: TakenEvent[] = [];
  let i = 0;
  const upTo = (sep: number) => {
    const j = b.indexOf(sep, i);
    if (j < 0) throw new Error('malformed take receipt');
    const n = Number(b.toString('latin1', i, j));
    i = j + 1;
    return n;
  };
  const COLON = 0x3a;
  while (i < b.length) {
    const eidLength = upTo(COLON);
    i += eidLength; // the eid is in the payload too
    const attempts = upTo(COLON);
    const length = upTo(COLON);
    out.push({ attempts, event: decode(b.subarray(i, i + length)) });
    i += length;
  }
  return out;
}

/** An ack-pump call's receipt (ack-pump.lua): `{sid, receipts, expired, ...}`. */
function parsePumped(v: Buffer): { sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[] {
  const kept = readScriptReply(v) as Reply;
  const out: { sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[] = [];
  for (let i = 0; i < kept.length; i += 3)
    out.push({
      sid: (kept[i] as Buffer).toString(),
      receipts: eventsOf(kept[i + 1] as Reply),
      expired: eventsOf(kept[i + 2] as Reply),
    });
  return out;
}

/** A member of the expiries index (`sid|eid`, publish.lua) as its session and event. */
function memberOf(member: string): { sid: string; eid: string } {
  const bar = member.indexOf('|');
  return { sid: member.slice(0, bar), eid: member.slice(bar + 1) };
}

/** A drop receipt (publish.lua, move.lua): `{sid, payload}`. */
function parseDropped(v: Buffer): { sid: string; event: StoredEvent } {
  const [sid, payload] = readScriptReply(v) as Buffer[];
  return { sid: sid.toString(), event: decode(payload) };
}

/** What an owed receipt holds, by its kind (Outbox.owedKept). */
export type OwedReceipt =
  | { kind: 'pump'; sessions: { sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[] }
  | { kind: 'deadLetter'; sid: string; taken: TakenEvent[] }
  | { kind: 'resend'; sid: string; event: StoredEvent }
  | { kind: 'drop'; sid: string; event: StoredEvent }
  | { kind: 'unreadable'; error: unknown };

const lua = (path: string) => readFileSync(new URL(`./lua/${path}.lua`, import.meta.url), 'utf8');
/** A script with the shared helpers in lua/includes/ put before it. */
const script = (name: string) =>
  `${lua('includes/remove-event')}\n${lua('includes/own-error')}\n${lua(name)}`;

type Reply = (Buffer | number | boolean | null | Reply)[];

/** One session's share of an `ackPumpMany` call. */
export interface AckPumpRequest {
  sid: string;
  /** The last sequence already sent on this connection. */
  afterSeq: number;
  /** Free slots of the in-flight window. */
  slots: number;
  acks: string[];
  /**
   * Acks of bare events: sent from their publish by this node, first attempt, without a receipt
   * or an expiry (`DirectGrant.bare`). Stored in q and ev only (a first attempt from the publish
   * writes no att entry), so the script removes them from those two, with one ZREM and one HDEL
   * for all of a session's, and looks nowhere else.
   */
  bare: string[];
  /**
   * A sequence from which events were never sent on this connection nor on one before it,
   * whatever the sent mark says (0 or absent: none): a forward the connection did not send, or
   * the first past the mark at the bind and the connection's last (DeliveryService
   * `unsentFromOf`). Those events go out as first attempts (ack-pump.lua).
   */
  unsentFrom?: number;
  /**
   * The take records (`ackPumpCalls`' `take`) of this session's earlier calls whose reply did not
   * come: what such a call took, if Redis ran it, is taken again with the attempt it counted.
   */
  lostTakes?: readonly string[] | undefined;
}

/** publish.lua's per-event flags: a receipt (+1), an eid made for this publish (+2). */
const PUBLISH_FLAGS = ['0', '1', '2', '3'] as const;

/**
 * A publish whose target's key (a device key, a user's or a room's set) holds another type than
 * the gateway writes (Redis's `WRONGTYPE`: written by something else): that event fails alone,
 * answered `internal` (publish.lua).
 */
export class TargetKeyError extends ProtocolError {
  constructor(
    readonly target: Fanout,
    /** Absent for a qos-0 event (its eid is inside its packed bytes). */
    readonly eid: string | undefined,
    readonly redisError: string,
  ) {
    super('internal', "the target's record in Redis is unreadable");
  }
}

/** publish.lua's status codes, from -3, as results. */
const PUBLISH_STATUS = ['failed', 'gone', 'rejected', 'duplicate', 'added', 'sent'] as const;

/** Events per publish script call, sessions per ack-pump call: bounds how long Redis is busy. */
const MAX_PUBLISH_BATCH = 256;
/**
 * Take records a session names after failed calls (`AckPumpRequest.lostTakes`): a call that never
 * reached Redis left none, so more than the last are kept, each read with one `GET`.
 */
const MAX_LOST_TAKES = 4;
const MAX_PUMP_BATCH = 64;
/** Bytes forwarded to one node in one publish call at most, by default (publish.lua). */
const FORWARD_BUDGET = 1 << 20;
/** How long publishes wait for the publish call before them at most (see flushPublishes). */
const PUBLISH_WAIT_MS = 100;

/**
 * Who a qos-1 event is stored for. The publish script expands a device, user or room to its
 * sessions in the same step as it stores the event (publish.lua).
 */
export type Fanout = { session: string } | { device: string } | { user: string } | { room: string };

/** One session's part of a publish: the session a fanout reached and what it did there. */
export interface SessionPublishResult extends PublishResult {
  sid: string;
}

/**
 * This node's side of sending from the publish (docs/ARCHITECTURE.md, "Sending from the
 * publish"): the delivery service, which knows the connections and their in-flight windows.
 */
export interface DirectSender {
  /** This node's id, as in the sessions' node keys. */
  readonly nodeId: string;
  /**
   * Asked once per event as a publish call is built: a claim for each connection on this node
   * of a session the fanout may reach (the script decides which it does reach) whose event may
   * go out from the publish (a free window slot). Every claim made is answered by `settle`,
   * once, in claim order.
   */
  claim(to: Fanout): DirectClaim[];
  /**
   * The script's answer to a claim on event `eid`: granted with its sequence and the `event`
   * message to send now (built once per event, however many claims it granted), or null
   * (refused or failed). `failed`: the call got no answer (a timeout, a lost connection), so it
   * may still have run, and granted the claim, in Redis.
   */
  settle(claim: DirectClaim, eid: string, grant: DirectGrant | null, failed?: boolean): void;
  /** Sends a qos-0 `event` message to this node's connection of session `sid`, if it is open. */
  sendNow(sid: string, message: Buffer): void;
}

/** A granted claim: the event's sequence and its `event` message, shared by the event's claims. */
export interface DirectGrant {
  seq: number;
  message: Buffer;
  /** The event asked for no receipt and has no expiry: its ack may be applied as bare. */
  bare: boolean;
}

/** A claim to send an event from its publish, tied to one connection of a session. */
export interface DirectClaim {
  readonly sid: string;
  /** The last sequence sent on that connection. */
  readonly after: number;
}

/** One event of `Outbox.publishMany`. */
export interface PublishEntry {
  to: Fanout;
  event: StoredEvent;
  receipt: boolean;
  expiresAtMs: number;
  /** The eid was made for this publish (see `Outbox.publishTo`). */
  newEid: boolean;
}

/**
 * Who waits for a pending publish: one promise per event (`publishTo`), or one for a batch
 * (`publishMany`), which saves the per-event promise, closures and settled wrappers.
 */
interface PublishWaiter {
  fulfilled(index: number, r: SessionPublishResult[]): void;
  rejected(index: number, e: unknown): void;
}

class OneWaiter implements PublishWaiter {
  constructor(
    private readonly resolve: (r: SessionPublishResult[]) => void,
    private readonly reject: (e: unknown) => void,
  ) {}
  fulfilled(_index: number, r: SessionPublishResult[]): void {
    this.resolve(r);
  }
  rejected(_index: number, e: unknown): void {
    this.reject(e);
  }
}

class BatchWaiter implements PublishWaiter {
  private left: number;
  constructor(
    private readonly results: PromiseSettledResult<SessionPublishResult[]>[],
    private readonly resolve: (r: PromiseSettledResult<SessionPublishResult[]>[]) => void,
  ) {
    this.left = results.length;
  }
  fulfilled(index: number, value: SessionPublishResult[]): void {
    this.results[index] = { status: 'fulfilled', value };
    if (--this.left === 0) this.resolve(this.results);
  }
  rejected(index: number, reason: unknown): void {
    this.results[index] = { status: 'rejected', reason };
    if (--this.left === 0) this.resolve(this.results);
  }
}

interface PendingPublish extends PublishEntry {
  packed: Buffer;
  /** Filled in when the call is built: see DirectSender.claim. */
  claims: DirectClaim[];
  waiter: PublishWaiter;
  /** This event's place in its waiter's batch. */
  index: number;
}

/** A qos-0 publish waiting for its tick's call (Outbox.publishNow). */
interface PendingNow {
  to: Fanout;
  packed: Buffer;
  resolve: (r: NowResult) => void;
  reject: (e: unknown) => void;
}

/**
 * What a qos-0 publish did: the sessions its target reached, those sent it, and those it could
 * not be sent to because a key of theirs holds another type (publish-now.lua, WRONGTYPE).
 */
export interface NowResult {
  sessions: number;
  sent: number;
  failed: { sessionId: string; error: string }[];
}

interface OutboxCommands {
  /** publish.lua and ack-pump.lua answer with one MessagePack string (script-reply.ts). */
  gwPublishBuffer(...args: (string | Buffer | number)[]): Promise<Buffer>;
  gwAckPumpBuffer(...args: (string | Buffer | number)[]): Promise<Buffer>;
  gwResendBuffer(...args: (string | Buffer | number)[]): Promise<Reply | null>;
  gwTakeBuffer(...args: (string | Buffer | number)[]): Promise<Reply>;
  gwExpireBuffer(...args: (string | Buffer | number)[]): Promise<Reply | number>;
  gwMoveBuffer(...args: (string | number)[]): Promise<number | unknown[]>;
  /**
   * publish-now.lua: per event, {sessions, sent, failed, the caller's own session ids...,
   * (failed session id, error)...}, or an error (its target's key of another type).
   */
  gwPublishNow(...args: (string | Buffer)[]): Promise<((number | string)[] | Error)[]>;
}

const decode = (payload: Buffer): StoredEvent => unpack(payload) as StoredEvent;

/**
 * A publish call whose WAIT found too few replicas: a Redis `NOREPLICAS` reply's word, so that
 * it is a dependency fault (faults.ts) and answered `overloaded` with `retryAfter`.
 */
function notReplicated(n: number, replicas: { min: number; waitMs: number }): Error {
  return new Error(
    `NOREPLICAS the event reached ${n} of the ${replicas.min} replicas GW_REDIS_MIN_REPLICAS asks for within ${replicas.waitMs} ms (it is stored on the primary: publish it again with the same eid)`,
  );
}

/** The events of a script's `{eid, payload, ...}` list. */
function eventsOf(list: Reply): StoredEvent[] {
  const out: StoredEvent[] = [];
  for (let i = 1; i < list.length; i += 2) out.push(decode(list[i] as Buffer));
  return out;
}

function parsePump(reply: Reply): AckPumpResult {
  const sendRaw = reply[2] as (Buffer | number)[];
  const receipts = eventsOf(reply[1] as Reply);
  const send: ToSend[] = [];
  for (let i = 0; i < sendRaw.length; i += 4) {
    const attempt = sendRaw[i + 2] as number;
    send.push({
      eid: (sendRaw[i] as Buffer).toString(),
      message: packEvent(sendRaw[i + 3] as Buffer, 1, attempt),
      seq: Number((sendRaw[i + 1] as Buffer).toString()),
      attempt,
    });
  }
  const expired = eventsOf(reply[3] as Reply);
  return {
    acked: reply[0] as number,
    receipts,
    send,
    expired,
    resynced: reply[4] === 1,
    mark: (reply[5] as number | undefined) ?? 0,
    // Always present (undefined mostly): one shape for every result.
    error: reply[6] === undefined || reply[6] === false ? undefined : (reply[6] as Buffer).toString(),
    unreadable: reply[7] === undefined ? NO_EIDS : (reply[7] as Buffer[]).map(String),
  };
}

/**
 * Connections of a node's publishes with GW_REDIS_MIN_REPLICAS: a publish call goes on one whose
 * WAIT is not out (Outbox.publishConnection); calls are sent one at a time, so a few suffice.
 */
export const PUBLISH_CONNECTIONS = 4;

/** Members of the expiries index per expire.lua call (`Outbox.expireCalls`). */
const EXPIRE_CALL = 200;

/** The outbox's scripts, defined once per connection. */
function withCommands(redis: Redis): Redis & OutboxCommands {
  const r = redis as Redis & Partial<OutboxCommands>;
  if (!r.gwPublishBuffer) {
    // Key counts vary with the batch: the caller passes it first.
    redis.defineCommand('gwPublish', { lua: `${lua('includes/own-error')}\n${lua('publish')}` });
    redis.defineCommand('gwAckPump', { lua: script('ack-pump') });
    redis.defineCommand('gwResend', { numberOfKeys: 6, lua: script('resend') });
    redis.defineCommand('gwTake', { numberOfKeys: 6, lua: script('take') });
    redis.defineCommand('gwExpire', { numberOfKeys: 0, lua: script('expire') });
    redis.defineCommand('gwMove', { numberOfKeys: 14, lua: script('move') });
    redis.defineCommand('gwPublishNow', {
      numberOfKeys: 0,
      lua: `${lua('includes/own-error')}\n${lua('publish-now')}`,
    });
  }
  return r as Redis & OutboxCommands;
}

/**
 * How much longer than SESSION_TTL an outbox lives after the last publish to it, or the last
 * resume or refresh of its session (which extend it too: auth/session-store.ts, extendOutbox).
 * A publish finds its session alive, so the session ends within SESSION_TTL of the last of
 * those; the outbox then still holds its events (its TTL is refreshed once it ran down by up to
 * a minute) for the sweep that ends the expired session to report them `delivery.failed`
 * (`session_expired`). With the outbox's TTL equal to SESSION_TTL, events
 * published right after a login expired with the session, before any sweep could see them, and
 * went unreported.
 */
export const OUTBOX_TTL_GRACE_S = 120;

export class Outbox {
  private readonly redis: Redis & OutboxCommands;
  /**
   * Where publish calls go: `redis`, or the publishes' own connections (options.replicas), each
   * with the WAITs it has out: a call goes on one with none, so that it does not queue at Redis
   * behind another call's WAIT (a client blocked in WAIT is served nothing else until it returns).
   */
  private readonly publishRedis: { redis: Redis & OutboxCommands; waits: number }[];
  private publishTurn = 0;
  /**
   * Events whose publish call's WAIT found fewer replicas than GW_REDIS_MIN_REPLICAS: answered
   * `overloaded` though stored on the primary. Read at scrape
   * (gateway_publish_unreplicated_total).
   */
  unreplicated = 0;
  private pendingPublishes: PendingPublish[] = [];
  /** Publish script calls sent and not answered; while there are any, publishes wait. */
  private publishCallsOut = 0;
  /** Bounds that wait (PUBLISH_WAIT_MS): armed while publishes wait behind a call. */
  private publishWait: NodeJS.Timeout | undefined;
  /**
   * Publish calls sent while an earlier one was still unanswered, its PUBLISH_WAIT_MS run out
   * (a slow or frozen Redis): their claims may be refused, which sends those events through
   * the pump. Read at scrape (gateway_publish_calls_past_wait_total).
   */
  callsPastWait = 0;
  /** Set by the delivery service of a gateway node; absent in a back end's publisher. */
  direct: DirectSender | null = null;
  /**
   * Told of events a take or a move found in a session's index without their payload (evicted
   * or deleted apart, a write that failed part-way): removed, not returned (take.lua,
   * move.lua). The delivery service counts and logs them.
   */
  onUnreadable?: (sid: string, eids: string[]) => void;

  constructor(
    redis: Redis,
    private readonly keys: Keys,
    private readonly options: {
      max: number;
      policy: OverflowPolicy;
      /** The outbox's life after the last publish to it (SESSION_TTL + OUTBOX_TTL_GRACE_S). */
      ttlSeconds: number;
      /**
       * The in-flight window of the nodes (GW_MAX_INFLIGHT): an event for a session another
       * node holds is forwarded to it when the session's events before it were all sent and
       * leave a slot (publish.lua). 0 or absent: never forwarded, the node is woken.
       */
      forwardWindow?: number;
      /**
       * Bytes forwarded to one node in one publish call at most (default 1 MiB, well under
       * Redis's default `client-output-buffer-limit pubsub` of 8 MB for a minute): the sessions
       * past it are woken instead.
       */
      forwardBudget?: number;
      /**
       * GW_REDIS_MIN_REPLICAS: a publish call is followed by `WAIT min waitMs` and its events
       * are answered only once `min` replicas have them; else `NOREPLICAS` (a dependency fault:
       * `overloaded`). The calls and their WAITs go on `connections`, the publishes' own (not
       * auto-pipelined): a WAIT holds its connection until it returns, and covers what that
       * connection wrote.
       */
      replicas?: { min: number; waitMs: number; connections: Redis[] };
    },
  ) {
    this.redis = withCommands(redis);
    this.publishRedis = (options.replicas?.connections ?? [redis]).map((r) => ({
      redis: withCommands(r),
      waits: 0,
    }));
  }

  /**
   * A qos-0 event, `packed` as stored for qos 1: sent to the sessions `to` reaches that are
   * online now, stored nowhere. The qos-0 publishes of a tick go in one call
   * (lua/publish-now.lua), which sends through their nodes' channels to the sessions on other
   * nodes and answers with this node's own, sent here. Resolves with how many live sessions
   * `to` reached, to how many the event went, and those it could not go to because their node
   * key holds another type; rejects with a TargetKeyError when the target's own key does.
   */
  publishNow(to: Fanout, packed: Buffer): Promise<NowResult> {
    return new Promise((resolve, reject) => {
      this.pendingNow.push({ to, packed, resolve, reject });
      if (this.pendingNow.length === 1) process.nextTick(this.flushNow);
    });
  }

  private pendingNow: PendingNow[] = [];

  private readonly flushNow = (): void => {
    const all = this.pendingNow;
    this.pendingNow = [];
    for (let i = 0; i < all.length; i += MAX_PUBLISH_BATCH)
      this.publishNowBatch(all.slice(i, i + MAX_PUBLISH_BATCH));
  };

  private publishNowBatch(batch: PendingNow[]): void {
    const direct = this.direct;
    const events = new ScriptArgs(batch.length * 160);
    for (const p of batch) {
      const [kind, target] = this.fanoutArgs(p.to);
      events.str(kind).str(target).bytes(p.packed);
    }
    const [head, tail] = this.keys.sessionKeyParts;
    this.redis
      .gwPublishNow(this.keys.nodeChannelPrefix, head, tail, direct?.nodeId ?? '', events.finish())
      .then(
        (reply) => {
          batch.forEach((p, i) => {
            const r = reply[i];
            if (r instanceof Error) {
              // The target's key holds another type (publish-now.lua): this event fails alone.
              p.reject(new TargetKeyError(p.to, undefined, r.message));
              return;
            }
            const nFailed = r[2] as number;
            const own = r.length - 2 * nFailed;
            if (own > 3 && direct) {
              // Packed once for this node's sessions of the event; each connection only seals it.
              const message = packEvent(p.packed, 0);
              for (let j = 3; j < own; j++) direct.sendNow(r[j] as string, message);
            }
            const failed: NowResult['failed'] = [];
            for (let j = own; j < r.length; j += 2)
              failed.push({ sessionId: String(r[j]), error: String(r[j + 1]) });
            p.resolve({ sessions: r[0] as number, sent: r[1] as number, failed });
          });
        },
        (e) => {
          for (const p of batch) p.reject(e);
        },
      );
  }

  /** Stores one event in a session's outbox; batched with the other publishes of this tick. */
  async publish(
    sid: string,
    event: StoredEvent,
    receipt: boolean,
    expiresAtMs: number,
  ): Promise<PublishResult> {
    const [r] = await this.publishTo({ session: sid }, event, receipt, expiresAtMs);
    return r;
  }

  /**
   * Stores one event in the outbox of every session `to` reaches, found by the script in the
   * same call (none for a device or user without sessions); batched with the other publishes
   * of this tick, in order. Results are per session reached, gone ones included. `newEid`: the
   * event's eid was just made for it (a random UUID), so no outbox can hold it and the script
   * does not look for it; an eid chosen by the publisher is looked for, and publishing it
   * again stores nothing (`duplicate`).
   */
  publishTo(
    to: Fanout,
    event: StoredEvent,
    receipt: boolean,
    expiresAtMs: number,
    newEid = false,
  ): Promise<SessionPublishResult[]> {
    const packed = pack(event);
    return new Promise((resolve, reject) => {
      const first = this.pendingPublishes.length === 0;
      this.queue(to, event, packed, receipt, expiresAtMs, newEid, new OneWaiter(resolve, reject), 0);
      if (first) this.publishesWaiting();
    });
  }

  /**
   * `publishTo` for many events at once, in order, with one promise for all: each event's
   * results or error, in the order given. What a back end's batch (`POST /v1/events`) takes.
   */
  publishMany(entries: PublishEntry[]): Promise<PromiseSettledResult<SessionPublishResult[]>[]> {
    if (entries.length === 0) return Promise.resolve([]);
    return new Promise((resolve) => {
      const waiter = new BatchWaiter(new Array(entries.length), resolve);
      const first = this.pendingPublishes.length === 0;
      entries.forEach((e, index) => {
        let packed: Buffer;
        try {
          packed = pack(e.event);
        } catch (err) {
          // This event alone fails, before anything of it is queued (as publishTo's would).
          waiter.rejected(index, err);
          return;
        }
        this.queue(e.to, e.event, packed, e.receipt, e.expiresAtMs, e.newEid, waiter, index);
      });
      if (first && this.pendingPublishes.length > 0) this.publishesWaiting();
    });
  }

  /** Adds a publish to the next call (its fields as arguments: callers make no object to pass). */
  private queue(
    to: Fanout,
    event: StoredEvent,
    packed: Buffer,
    receipt: boolean,
    expiresAtMs: number,
    newEid: boolean,
    waiter: PublishWaiter,
    index: number,
  ): void {
    this.pendingPublishes.push({
      to,
      event,
      packed,
      receipt,
      expiresAtMs,
      newEid,
      claims: [],
      waiter,
      index,
    });
  }

  /**
   * The first publishes since the last call were added (later ones find the call scheduled): it
   * goes at the end of this tick, or when the call out is answered (or PUBLISH_WAIT_MS).
   */
  private publishesWaiting(): void {
    if (this.publishCallsOut === 0) process.nextTick(this.flushPublishes);
    else this.armPublishWait();
  }

  /** The kind and target of a fanout, as publish.lua takes them. */
  private fanoutArgs(to: Fanout): [string, string] {
    if ('session' in to) return ['s', to.session];
    if ('device' in to) return ['k', this.keys.device(to.device)];
    if ('user' in to) return ['u', this.keys.userSessions(to.user)];
    return ['r', this.keys.roomMembers(to.room)];
  }

  /**
   * Sends what is pending (up to 256 events), unless a publish call is still out: then its
   * answer sends it, or PUBLISH_WAIT_MS, whichever comes first. One call at a time lets every
   * claim (DirectSender) be made knowing what the calls before it granted; a claim made behind
   * an unanswered call names a stale last sequence and is refused, which sends that event, and
   * the session's next ones, through the pump. The bound keeps a stalled call (a frozen Redis
   * answers only at the command timeout) from holding the publishes behind it that long again.
   */
  private readonly flushPublishes = (): void => {
    if (this.publishCallsOut === 0) this.sendPending();
  };

  private sendPending(): void {
    if (this.publishWait) clearTimeout(this.publishWait);
    this.publishWait = undefined;
    const all = this.pendingPublishes;
    if (all.length === 0) return;
    if (this.publishCallsOut > 0) this.callsPastWait++;
    this.pendingPublishes = all.length > MAX_PUBLISH_BATCH ? all.slice(MAX_PUBLISH_BATCH) : [];
    this.publishBatch(all.length > MAX_PUBLISH_BATCH ? all.slice(0, MAX_PUBLISH_BATCH) : all);
    if (this.pendingPublishes.length > 0) this.armPublishWait();
  }

  private armPublishWait(): void {
    this.publishWait ??= setTimeout(() => this.sendPending(), PUBLISH_WAIT_MS);
  }

  /** A publish call was answered: what waited for it goes once this tick's callbacks ran. */
  private publishCallDone(): void {
    if (--this.publishCallsOut === 0 && this.pendingPublishes.length > 0)
      process.nextTick(this.flushPublishes);
  }

  /** A publish connection with no WAIT out if there is one, else the next in turn. */
  private publishConnection(): { redis: Redis & OutboxCommands; waits: number } {
    const all = this.publishRedis;
    for (let i = 0; i < all.length; i++) {
      const c = all[(this.publishTurn + i) % all.length];
      if (c.waits === 0) return c;
    }
    return all[this.publishTurn++ % all.length];
  }

  private publishBatch(batch: PendingPublish[]): void {
    const o = this.options;
    const direct = this.direct;
    const [head, tail] = this.keys.sessionKeyParts;
    const args: (string | Buffer | number)[] = [
      o.max,
      o.policy,
      o.ttlSeconds,
      this.keys.nodeChannelPrefix,
      direct?.nodeId ?? '',
      head,
      tail,
      this.keys.expiries,
    ];
    const events = new ScriptArgs(batch.length * 160);
    // Whether a target comes more than once: publish.lua then holds a session's events and
    // writes them together (one ZADD, one HSET per session), else it writes each as it comes.
    const targets = new Set<string>();
    for (const p of batch) {
      if (direct) p.claims = direct.claim(p.to);
      const [kind, target] = this.fanoutArgs(p.to);
      targets.add(target);
      events
        .str(kind)
        .str(target)
        .str(p.event.eid)
        .bytes(p.packed)
        .str(PUBLISH_FLAGS[(p.receipt ? 1 : 0) + (p.newEid ? 2 : 0)])
        .num(Math.max(p.expiresAtMs, 0))
        .num(p.claims.length);
      for (const c of p.claims) events.str(c.sid).num(c.after);
    }
    args.push(
      events.finish(),
      targets.size < batch.length ? '1' : '0',
      o.forwardWindow ?? 0,
      this.keys.forwardChannelPrefix,
      o.forwardBudget ?? FORWARD_BUDGET,
      // Dropped events are kept until reported (`dropSettled`).
      this.keys.dropReceiptPrefix,
      this.keys.owedReports,
      Date.now(),
    );
    this.publishCallsOut++;
    const replicas = this.options.replicas;
    const conn = this.publishConnection();
    const call = conn.redis.gwPublishBuffer(0, ...args);
    // Sent right after the call, on its connection: it returns once `min` replicas have what
    // the connection wrote, the call included, or after waitMs with how many do.
    let replicated: Promise<number> | undefined;
    if (replicas) {
      conn.waits++;
      replicated = conn.redis.wait(replicas.min, replicas.waitMs);
      const done = () => {
        conn.waits--;
      };
      replicated.then(done, done);
    }
    // Read by `answer`; a call that failed reads it never.
    replicated?.catch(() => {});
    // The call's results are answered only once the WAIT has returned enough replicas.
    const answer = (p: PendingPublish, results: SessionPublishResult[]) => {
      if (!replicated) p.waiter.fulfilled(p.index, results);
      else
        replicated.then(
          (n) => {
            if (n >= replicas!.min) p.waiter.fulfilled(p.index, results);
            else {
              this.unreplicated++;
              p.waiter.rejected(p.index, notReplicated(n, replicas!));
            }
          },
          (e) => p.waiter.rejected(p.index, e),
        );
    };
    call.then(
      (packedReply) => {
        this.publishCallDone();
        const reply = readScriptReply(packedReply) as Reply;
        let i = 0;
        for (const p of batch) {
          const n = reply[i++] as number;
          if (n < 0) {
            // The target's key holds another type (publish.lua): this event fails alone.
            const error = String(reply[i++]);
            for (const c of p.claims) direct!.settle(c, p.event.eid, null);
            p.waiter.rejected(p.index, new TargetKeyError(p.to, p.event.eid, error));
            continue;
          }
          const results: SessionPublishResult[] = [];
          // A room's claims and results can both run to thousands: match them by session id
          // (a Map for several claims; one claim, the usual case, needs only its session's).
          const one = p.claims.length === 1 ? p.claims[0].sid : undefined;
          let oneSeq: number | null = null;
          const seqOf = p.claims.length > 1 ? new Map<string, number | null>() : null;
          for (let j = 0; j < n; j++, i += 6) {
            const status = reply[i + 1] as number;
            const node = reply[i + 2] as Buffer | false;
            const dropped = reply[i + 4] as Buffer | false;
            const sid = (reply[i] as Buffer).toString();
            const r: SessionPublishResult = {
              sid,
              status: PUBLISH_STATUS[status + 3],
              node: node ? node.toString() : null,
            };
            if (dropped) r.dropped = decode(dropped);
            if (status === -3) r.error = String(reply[i + 5]);
            results.push(r);
            if (sid === one) oneSeq = status === 2 ? (reply[i + 5] as number) : null;
            else seqOf?.set(sid, status === 2 ? (reply[i + 5] as number) : null);
          }
          // A room's granted members share one message: only the sealing is per connection.
          let message: Buffer | undefined;
          const bare = !p.receipt && p.expiresAtMs <= 0;
          for (const c of p.claims) {
            const seq = seqOf ? (seqOf.get(c.sid) ?? null) : oneSeq;
            if (seq === null) direct!.settle(c, p.event.eid, null);
            else
              direct!.settle(c, p.event.eid, { seq, message: (message ??= packEvent(p.packed, 1, 1)), bare });
          }
          answer(p, results);
        }
      },
      (e) => {
        this.publishCallDone();
        for (const p of batch) {
          // The call may have been applied: the pump sends what the connection was not sent.
          for (const c of p.claims) direct!.settle(c, p.event.eid, null, true);
          p.waiter.rejected(p.index, e);
        }
      },
    );
  }

  /**
   * For each session: applies its acks, then takes the next events that fit its window, in
   * publish order. Results are in request order. One script call per 64 sessions; rejects with
   * the first call's error that failed (`ackPumpCalls` keeps the others).
   */
  async ackPumpMany(requests: AckPumpRequest[], nowMs: number): Promise<AckPumpResult[]> {
    const { results, error } = await this.ackPumpCalls(requests, nowMs);
    if (error !== undefined) throw error;
    return results as AckPumpResult[];
  }

  /**
   * `ackPumpMany`, each call settled apart: a request of a failed call has no result; one
   * whose session's part failed within its call has a result with `error`. With a
   * `receipt`, each call names one of its own (`receipt:0`, `receipt:1`, ...), where it keeps
   * the receipts and expired events it found, owed until reported (ack-pump.lua, Keys.owedReports):
   * Redis may run a failed call after all and drop its reply, and those events are gone with
   * their reports. `lost` names the receipts of the failed calls; `owed` those of the calls whose
   * reply came with something to report, for the caller to `settle` once it reported it.
   *
   * With a `take` too (only with a `receipt`), each call that takes events keeps what it took
   * under `take:0`, `take:1`, ... for 5 minutes: a failed call may have been run, and raised the
   * attempt counters of events it never sent. `lostTakes` gives, for each request of a failed
   * call, the records to name in its next call (`AckPumpRequest.lostTakes`): the failed call's if
   * it took, and those the request named, the last `MAX_LOST_TAKES` of them.
   */
  async ackPumpCalls(
    requests: AckPumpRequest[],
    nowMs: number,
    receipt?: string,
    take?: string,
  ): Promise<{
    results: (AckPumpResult | undefined)[];
    lost: string[];
    owed: string[];
    lostTakes: (readonly string[] | undefined)[];
    error?: unknown;
  }> {
    const calls: Promise<Buffer>[] = [];
    const [head, tail] = this.keys.sessionKeyParts;
    for (let i = 0; i < requests.length; i += MAX_PUMP_BATCH) {
      const end = Math.min(requests.length, i + MAX_PUMP_BATCH);
      const sessions = new ScriptArgs((end - i) * 128);
      let named: string[] | undefined;
      for (let j = i; j < end; j++) {
        const r = requests[j];
        if (r.lostTakes !== undefined)
          for (const k of r.lostTakes) {
            named ??= [];
            named.push(r.sid, k);
          }
        sessions
          .str(r.sid)
          .num(r.afterSeq)
          .num(r.slots)
          .num(r.acks.length)
          .num(r.bare.length)
          .num(r.unsentFrom ?? 0);
        for (const eid of r.acks) sessions.str(eid);
        for (const eid of r.bare) sessions.str(eid);
      }
      const args: (string | number | Buffer)[] = [
        0,
        nowMs,
        head,
        tail,
        sessions.finish(),
        this.keys.expiries,
      ];
      if (receipt !== undefined) {
        args.push(`${receipt}:${calls.length}`, this.keys.owedReports);
        if (take !== undefined) {
          args.push(`${take}:${calls.length}`);
          if (named) args.push(pack(named));
        }
      }
      calls.push(this.redis.gwAckPumpBuffer(...args));
    }
    const settled = await Promise.allSettled(calls);
    // What a session of a failed call, or whose part failed, names next: the call's record if
    // it took, and those it named, the last MAX_LOST_TAKES.
    const failedTakes = (r: AckPumpRequest, call: number) =>
      take !== undefined && r.slots > 0
        ? [...(r.lostTakes ?? []), `${take}:${call}`].slice(-MAX_LOST_TAKES)
        : r.lostTakes;
    const results: (AckPumpResult | undefined)[] = [];
    const lost: string[] = [];
    const owed: string[] = [];
    const lostTakes: (readonly string[] | undefined)[] = [];
    let error: unknown;
    settled.forEach((r, call) => {
      const n = Math.min(MAX_PUMP_BATCH, requests.length - call * MAX_PUMP_BATCH);
      let parsed: AckPumpResult[] | undefined;
      let failure: unknown = r.status === 'rejected' ? r.reason : undefined;
      if (r.status === 'fulfilled') {
        try {
          parsed = (readScriptReply(r.value) as Reply[]).map(parsePump);
        } catch (e) {
          failure = e; // a reply not read is one lost: what it said is in the receipt
        }
      }
      if (parsed === undefined) {
        if (receipt !== undefined) lost.push(`${receipt}:${call}`);
        error ??= failure;
        for (let j = 0; j < n; j++) {
          results.push(undefined);
          lostTakes.push(failedTakes(requests[call * MAX_PUMP_BATCH + j], call));
        }
        return;
      }
      results.push(...parsed);
      // A session whose part failed (`error`) names the call's record next, as after a failed call.
      for (let j = 0; j < n; j++)
        lostTakes.push(
          parsed[j].error === undefined ? undefined : failedTakes(requests[call * MAX_PUMP_BATCH + j], call),
        );
      if (receipt !== undefined && parsed.some((p) => p.receipts.length > 0 || p.expired.length > 0))
        owed.push(`${receipt}:${call}`);
    });
    return error === undefined
      ? { results, lost, owed, lostTakes }
      : { results, lost, owed, lostTakes, error };
  }

  /**
   * Removes receipts whose reports are queued, and their entries in the owed reports (one round
   * trip). The receipt first: an entry left by a failure here finds no receipt and is dropped by
   * the sweep; a receipt left is reported again (with the same job ids).
   */
  async settle(receipts: string[]): Promise<void> {
    if (receipts.length === 0) return;
    await Promise.all([this.redis.unlink(...receipts), this.redis.zrem(this.keys.owedReports, ...receipts)]);
  }

  /** Removes the receipt of an event dropped from `sid`'s outbox (its report is queued). */
  dropSettled(sid: string, eid: string): Promise<void> {
    return this.settle([this.keys.dropReceipt(sid, eid)]);
  }

  /**
   * What owed receipts (Keys.owedReports) hold, read in one `MGET` and each decoded alone: null
   * for one gone, `unreadable` for one whose kind is unknown or whose bytes do not decode (kept
   * for an operator, never read again by the sweep: the caller forgets its entry).
   */
  async owedKept(receipts: string[]): Promise<(OwedReceipt | null)[]> {
    const values = await this.redis.mgetBuffer(...receipts);
    return receipts.map((receipt, i): OwedReceipt | null => {
      const v = values[i];
      if (v === null) return null;
      const kind = this.keys.receiptKind(receipt);
      try {
        switch (kind) {
          case 'pump':
            return { kind, sessions: parsePumped(v) };
          case 'deadLetter':
            return { kind, sid: this.keys.receiptSession(receipt), taken: parseKept(v) };
          case 'resend':
            return { kind, sid: this.keys.receiptSession(receipt), event: decode(v) };
          case 'drop':
            return { kind, ...parseDropped(v) };
          default:
            return { kind: 'unreadable', error: new Error('not a receipt of removed events') };
        }
      } catch (e) {
        return { kind: 'unreadable', error: e };
      }
    });
  }

  /** Removes entries of the owed reports whose receipts are gone. */
  async forgetOwed(receipts: string[]): Promise<void> {
    if (receipts.length > 0) await this.redis.zrem(this.keys.owedReports, ...receipts);
  }

  /**
   * Receipts owed since `cutoffMs` or earlier (Keys.owedReports), oldest first, at most `limit`,
   * each with when it was written (ms).
   */
  async owedSince(cutoffMs: number, limit: number): Promise<{ receipt: string; at: number }[]> {
    const r = await this.redis.zrangebyscore(
      this.keys.owedReports,
      '-inf',
      cutoffMs,
      'WITHSCORES',
      'LIMIT',
      0,
      limit,
    );
    const out: { receipt: string; at: number }[] = [];
    for (let i = 0; i < r.length; i += 2) out.push({ receipt: r[i], at: Number(r[i + 1]) });
    return out;
  }

  /**
   * What the ack-pump calls whose receipts these are found to report, by session (null: none
   * kept there: the call did not run, found nothing, or its reply came).
   */
  async pumpedKept(
    receipts: string[],
  ): Promise<({ sid: string; receipts: StoredEvent[]; expired: StoredEvent[] }[] | null)[]> {
    return (await this.redis.mgetBuffer(...receipts)).map((v) => (v === null ? null : parsePumped(v)));
  }

  /**
   * Takes one event again for a retry: null if it is gone, `unreadable` if its payload was gone
   * (removed: resend.lua). With a `receipt`, an event removed as
   * expired is kept there, owed until reported (resend.lua, Keys.owedReports), for
   * `resentExpired` when the reply is lost. With `sentAttempt` too (the attempt the node last
   * sent it as), the resend is that attempt's next, counted once however many resends whose
   * reply was lost Redis ran before it.
   */
  async resend(
    sid: string,
    eid: string,
    nowMs: number,
    receipt?: string,
    sentAttempt?: number,
  ): Promise<null | { unreadable: true } | { expired: StoredEvent } | { message: Buffer; attempt: number }> {
    const args: (string | number)[] = [...this.keys.outbox(sid).slice(0, 6), eid, nowMs];
    if (receipt !== undefined) {
      args.push(receipt, this.keys.owedReports);
      if (sentAttempt !== undefined) args.push(sentAttempt);
    }
    const reply = await this.redis.gwResendBuffer(...args);
    if (!reply) return null;
    const kind = (reply[0] as Buffer).toString();
    if (kind === 'unreadable') return { unreadable: true };
    if (kind === 'expired') return { expired: decode(reply[1] as Buffer) };
    const attempt = reply[1] as number;
    return { attempt, message: packEvent(reply[2] as Buffer, 1, attempt) };
  }

  /** The events the resends whose receipts these are removed as expired (null: none kept there). */
  async resentExpired(receipts: string[]): Promise<(StoredEvent | null)[]> {
    return (await this.redis.mgetBuffer(...receipts)).map((v) => (v === null ? null : decode(v)));
  }

  /** Removes the given events (or all with `eids` undefined); returns those this call removed. */
  take(sid: string, eids?: string[]): Promise<TakenEvent[]> {
    return this.takeAs(sid, eids ? 'some' : 'all', eids ?? []);
  }

  /**
   * `take` of the given events that also keeps what it removed under `receipt`, owed until
   * dead-lettered (take.lua "kept", Keys.owedReports), for `takenKept` when the reply is lost.
   */
  takeKept(sid: string, eids: string[], receipt: string, nowMs = Date.now()): Promise<TakenEvent[]> {
    return this.takeAs(sid, 'kept', [receipt, this.keys.owedReports, String(nowMs), ...eids]);
  }

  /** What `takeKept` calls whose receipts these are removed (null: none kept there). */
  async takenKept(receipts: string[]): Promise<(TakenEvent[] | null)[]> {
    return (await this.redis.mgetBuffer(...receipts)).map((v) => (v === null ? null : parseKept(v)));
  }

  /** Every event of the outbox, as `take` would return them, none removed. */
  peek(sid: string): Promise<TakenEvent[]> {
    return this.takeAs(sid, 'peek', []);
  }

  /**
   * The due events of the expiries index's `members` (`sid|eid`) still in their outboxes, none
   * removed (expire.lua "peek"), so that they are reported before `takeExpired` removes them.
   */
  async peekExpired(members: string[], nowMs: number): Promise<{ sid: string; event: StoredEvent }[]> {
    const out: { sid: string; event: StoredEvent }[] = [];
    for (const reply of await Promise.all(this.expireCalls('peek', members, nowMs, ''))) {
      const r = reply as Reply;
      for (let i = 0; i < r.length; i += 2) {
        out.push({ sid: memberOf((r[i] as Buffer).toString()).sid, event: decode(r[i + 1] as Buffer) });
      }
    }
    return out;
  }

  /**
   * Removes the due events of `members` and the members themselves (expire.lua "take"). Each call
   * (EXPIRE_CALL members) names a receipt of its own, `receipt` and its index (`receipt:0`,
   * `receipt:1`, ...), where it keeps how many events it removed for RECEIPT_MS. Returns how many
   * events the calls that answered removed, the members whose own step failed (`failed`: a key
   * of their session Redis could not use; they left the index, their events in place), and the
   * receipts of the calls that failed with the first failure: Redis may run such a call after
   * all, and drop its reply.
   */
  async takeExpired(
    members: string[],
    nowMs: number,
    receipt: string,
  ): Promise<{
    removed: number;
    failed: { sid: string; eid: string; error: string }[];
    lost: string[];
    error?: unknown;
  }> {
    const settled = await Promise.allSettled(this.expireCalls('take', members, nowMs, receipt));
    let removed = 0;
    const failed: { sid: string; eid: string; error: string }[] = [];
    const lost: string[] = [];
    let error: unknown;
    settled.forEach((r, i) => {
      if (r.status === 'rejected') {
        lost.push(`${receipt}:${i}`);
        error ??= r.reason;
      } else if (typeof r.value === 'number') removed += r.value;
      else {
        const v = r.value;
        removed += v[0] as number;
        for (let j = 1; j < v.length; j += 2)
          failed.push({ ...memberOf(String(v[j])), error: String(v[j + 1]) });
      }
    });
    return error === undefined ? { removed, failed, lost } : { removed, failed, lost, error };
  }

  /** How many events the takes whose receipts these are removed (null: none kept there). */
  async takenExpired(receipts: string[]): Promise<(number | null)[]> {
    return (await this.redis.mget(...receipts)).map((v) => (v === null ? null : Number(v)));
  }

  /**
   * expire.lua over `members`, EXPIRE_CALL of them a call, the calls sent at once: one call of a
   * sweep's thousand members would hold Redis for every one of their sessions in one step. A take's
   * calls name their receipts (`receipt:<index>`).
   */
  private expireCalls(
    mode: 'peek' | 'take',
    members: string[],
    nowMs: number,
    receipt: string,
  ): Promise<Reply | number>[] {
    const [head, tail] = this.keys.sessionKeyParts;
    const calls: Promise<Reply | number>[] = [];
    for (let i = 0; i < members.length; i += EXPIRE_CALL) {
      calls.push(
        this.redis.gwExpireBuffer(
          mode,
          head,
          tail,
          this.keys.expiries,
          nowMs,
          receipt === '' ? '' : `${receipt}:${calls.length}`,
          RECEIPT_MS,
          ...members.slice(i, i + EXPIRE_CALL),
        ),
      );
    }
    return calls;
  }

  private async takeAs(
    sid: string,
    mode: 'all' | 'some' | 'peek' | 'kept',
    eids: string[],
  ): Promise<TakenEvent[]> {
    const reply = await this.redis.gwTakeBuffer(...this.keys.outbox(sid).slice(0, 6), mode, ...eids);
    const out: TakenEvent[] = [];
    let unreadable: string[] | undefined;
    for (let i = 0; i < reply.length; i += 3) {
      const attempts = reply[i + 1] as number;
      // Its payload was gone: removed, nothing to return (take.lua).
      if (attempts === -1) (unreadable ??= []).push(String(reply[i]));
      else out.push({ attempts, event: decode(reply[i + 2] as Buffer) });
    }
    if (unreadable) {
      // The expiry index names events by session (expire.lua drops such a member too, once due).
      void this.redis.zrem(this.keys.expiries, ...unreadable.map((eid) => `${sid}|${eid}`)).catch(() => {});
      this.onUnreadable?.(sid, unreadable);
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
      this.keys.dropReceiptPrefix,
      this.keys.owedReports,
      Date.now(),
    );
    if (typeof reply === 'number') return reply as -1;
    const [moved, droppedRaw, left, unreadable, unreadableNew] = reply as [
      (Buffer | null)[],
      Buffer[],
      number,
      Buffer[] | undefined,
      Buffer[] | undefined,
    ];
    // The expiry index names events by session: re-key the moved ones.
    const p = this.redis.pipeline();
    for (const [sid, found] of [
      [from, unreadable],
      [to, unreadableNew],
    ] as const) {
      if (!found || found.length === 0) continue;
      const eids = found.map(String);
      for (const eid of eids) p.zrem(this.keys.expiries, `${sid}|${eid}`);
      this.onUnreadable?.(sid, eids);
    }
    for (let i = 0; i < moved.length; i += 2) {
      const expiry = moved[i + 1];
      if (!expiry) continue;
      const eid = moved[i]!.toString();
      p.zrem(this.keys.expiries, `${from}|${eid}`);
      p.zadd(this.keys.expiries, expiry.toString(), `${to}|${eid}`);
    }
    if (p.length > 0) await p.exec();
    const dropped = eventsOf(droppedRaw);
    return { moved: moved.length / 2, dropped, left };
  }

  /** Events waiting in a session's outbox. */
  depth(sid: string): Promise<number> {
    return this.redis.zcard(this.keys.outbox(sid)[0]);
  }
}
