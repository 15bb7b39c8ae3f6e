/**
 * One device connection, whatever its transport: it owns the handshake, the encrypted channel,
 * dispatch of requests, heartbeat bookkeeping, backpressure and the close sequence.
 *
 * Transports (transport/tcp.ts, transport/ws.ts) only hand it frame bodies and carry its output;
 * services never see the transport. Hot path per frame: open → unpack → validate → dispatch →
 * pack → seal → write, with no closures or promises created for synchronous handlers.
 */
import {
  acceptHello,
  badMessage,
  Channel,
  type CryptoBackend,
  type Ed25519Identity,
  isRequestType,
  type KickCode,
  PRE_AUTH_TYPES,
  ProtocolError,
  pack,
  parseClientMessage,
  parseHello,
  unpack,
  unpackMessage,
} from '../protocol/index.ts';
import { RequesterGone, wireError } from './faults.ts';
import type { Logger } from './log.ts';
import type { GatewayMetrics } from './metrics.ts';

/** What a connection needs from its transport: accept, forward bytes, write, pause, close. */
export interface TransportSocket {
  readonly kind: 'tcp' | 'ws';
  readonly ip: string;
  /** Bytes reserved before each body in what `write` receives (4 for TCP's length prefix). */
  readonly headroom: number;
  /** Queues one frame: `headroom` bytes, then the body. Output of one tick goes out in one write. */
  write(frame: Buffer): void;
  /** Bytes written but not yet handed to the kernel. */
  bufferedBytes(): number;
  /** Whether `pauseReading` stops what the client sends from being read (uWS's WebSocket: no). */
  readonly canPauseReading: boolean;
  pauseReading(): void;
  resumeReading(): void;
  /** Flushes what is queued, then closes. */
  end(): void;
  /** Closes at once, dropping unsent output. */
  destroy(): void;
}

/** The authenticated identity a connection acts as. */
export interface SessionInfo {
  userId: string;
  username: string;
  sessionId: string;
  deviceId?: string;
}

/**
 * Runs `effect` once every earlier request of the connection has taken effect, and marks this
 * request as having taken effect when `effect` has run (synchronously). Pipelined handlers do
 * their lookups first, then make their change through it, so changes stay in the order sent.
 */
export type Turn = <T>(effect: () => T) => Promise<T>;

/**
 * A request handler: returns the `ok` data (or undefined for `{}`), or throws ProtocolError.
 * `turn` matters only to pipelined handlers (see `HandlerOptions`).
 */
export type Handler = (
  conn: Connection,
  msg: Record<string, unknown> & { id: number },
  turn: Turn,
) => unknown;

export interface HandlerOptions {
  /**
   * The handler may start before earlier pipelined requests of the connection have finished:
   * it changes no authentication state, and makes any change through `turn`. A request that
   * is not pipelined starts only when every earlier request of the connection has finished.
   */
  pipelined?: boolean;
}

export interface RegisteredHandler {
  fn: Handler;
  pipelined: boolean;
}

/** The gateway side of a connection: shared state and collaborators, built once. */
export interface ConnectionHost {
  readonly backend: CryptoBackend;
  readonly identity: Ed25519Identity;
  readonly nodeId: string;
  readonly heartbeatMs: number;
  readonly maxFrameBytes: number;
  readonly maxPendingBytes: number;
  readonly rekeyAfterFrames: number;
  /**
   * The frame rate a connection may keep (GW_FRAMES_PER_SECOND), as the milliseconds one frame
   * spends of its budget; 0: unlimited. `frameBurstMs` is the burst (GW_FRAMES_BURST) in the same
   * unit: how far ahead of the clock a connection's frames may run.
   */
  readonly frameIntervalMs: number;
  readonly frameBurstMs: number;
  readonly log: Logger;
  readonly counters: GatewayMetrics;
  /** Handler for a request type, or undefined if no service provides it. */
  handler(type: string): RegisteredHandler | undefined;
  /** A connection stopped being read for its frame rate: `unthrottle` it when its budget is back. */
  throttled?(conn: Connection): void;
  /** Handles `ack` frames (delivery); undefined until delivery exists. */
  onAck?(conn: Connection, eids: string[]): void;
  /** An authenticated request of a session started (identity's throttled `lastSeenAt`). */
  onActivity?(sessionId: string): void;
  connectionClosed(conn: Connection): void;
}

export const ConnState = { handshake: 0, open: 1, closing: 2, closed: 3 } as const;
export type ConnState = (typeof ConnState)[keyof typeof ConnState];

/** Requests of one connection allowed in progress at once; more is `overloaded`. */
const MAX_PENDING_REQUESTS = 64;
/**
 * Requests of one connection not yet answered, those refused or failed at once included (their
 * errors wait for the answers before them): a client that goes on sending past this is closed
 * with a fatal `overloaded`, so that what it sends while one request is slow cannot grow the
 * queue, and the gateway's memory, without bound.
 */
const MAX_UNANSWERED = 4 * MAX_PENDING_REQUESTS;

/**
 * One request in the connection's queue. Requests take effect in the order sent and are
 * answered in that order (PROTOCOL.md §4, "Ordering"): a request starts when the ones before
 * it allow (see `HandlerOptions.pipelined`), and its answer waits for the answers before it.
 */
interface Pending {
  readonly id: number;
  readonly map: Record<string, unknown> & { type: string; id: number };
  readonly pipelined: boolean;
  started: boolean;
  /** The handler returned or threw: the answer is known. */
  settled: boolean;
  /** Later requests may make their changes (see `Turn`). */
  effected: boolean;
  data?: unknown;
  error?: unknown;
  /** Set while the handler waits in `turn` for the requests before it. */
  waiting?: () => void;
}

let nextConnectionId = 1;

/** Reasons a connection's reading is paused (`readPaused`): its output is backed up, its frame rate. */
const READ_PAUSED_OUTPUT = 1;
const READ_PAUSED_RATE = 2;

/**
 * A connection's service state by key: the `get`/`set`/`delete` of a Map over a flat array. A
 * connection holds two or three entries, and a Map's hash table costs ~200 bytes even empty,
 * per connection (docs/ARCHITECTURE.md, "Memory").
 */
export class Attachments {
  private entries: unknown[] = [];

  get(key: string): unknown {
    const e = this.entries;
    for (let i = 0; i < e.length; i += 2) if (e[i] === key) return e[i + 1];
    return undefined;
  }

  set(key: string, value: unknown): this {
    const e = this.entries;
    for (let i = 0; i < e.length; i += 2) {
      if (e[i] === key) {
        e[i + 1] = value;
        return this;
      }
    }
    e.push(key, value);
    return this;
  }

  delete(key: string): boolean {
    const e = this.entries;
    for (let i = 0; i < e.length; i += 2) {
      if (e[i] === key) {
        e.splice(i, 2);
        return true;
      }
    }
    return false;
  }
}

export class Connection {
  readonly id = nextConnectionId++;
  state: ConnState = ConnState.handshake;
  readonly openedAtMs: number;
  /** Last time any frame arrived (heartbeat). */
  lastRxMs: number;
  /** Last time the server pinged. */
  lastPingMs = 0;
  /** When the close sequence started (the sweep destroys a connection that lingers). */
  closingSinceMs = 0;
  session: SessionInfo | undefined;
  /** Wire totals of this connection (usage counters read the deltas). */
  readonly traffic = { bytesIn: 0, bytesOut: 0, eventsOut: 0 };
  /** Free slot for services (rooms joined, usage counters, ...). */
  readonly attachments = new Attachments();
  private channel: Channel | undefined;
  /** Requests not yet answered, in the order received. */
  private readonly queue: Pending[] = [];
  /**
   * How many requests at the head of `queue` are known to have started, and to have taken
   * effect. Both only grow (but for answers shifted off the head), so `advance` looks at each
   * request a bounded number of times instead of walking the queue on every call.
   */
  private startedHead = 0;
  private effectedHead = 0;
  private advancing = false;
  private advanceAgain = false;
  /** Why reading is paused: READ_PAUSED_OUTPUT, READ_PAUSED_RATE, both, or 0. */
  private readPaused = 0;
  /**
   * The frame budget, as a virtual clock (the generic cell rate algorithm): each frame moves it
   * `frameIntervalMs` on from the later of itself and now. It runs ahead of now by the frames
   * sent above the rate; past `frameBurstMs` ahead, the connection is over its budget. One number
   * per connection, no timer.
   */
  private frameClockMs = 0;
  /** Reading was paused for the frame rate once already (logged once per connection). */
  private throttledBefore = false;
  /** The kick is being sent: it may take the key's last frame. */
  private kicking = false;

  constructor(
    readonly host: ConnectionHost,
    readonly transport: TransportSocket,
    nowMs: number,
  ) {
    this.openedAtMs = nowMs;
    this.lastRxMs = nowMs;
  }

  get ip(): string {
    return this.transport.ip;
  }

  /**
   * One frame body from the transport. The body may be a view: nothing here keeps it. Returns
   * false when reading is paused: a transport holding more frames keeps them until
   * `resumeReading`.
   */
  receive(body: Buffer): boolean {
    if (this.state >= ConnState.closing) return true;
    const now = Date.now();
    this.lastRxMs = now;
    const interval = this.host.frameIntervalMs;
    if (interval > 0) {
      const clock = Math.max(this.frameClockMs, now) + interval;
      this.frameClockMs = clock;
      if (clock - now > this.host.frameBurstMs && this.overBudget(now)) return true;
    }
    this.traffic.bytesIn += body.length;
    const wire = this.host.counters.wire;
    wire.framesIn++;
    wire.bytesIn += body.length;
    try {
      if (this.state === ConnState.handshake) this.handshake(body);
      else this.onMessage(body);
    } catch (e) {
      this.fail(e, undefined);
    }
    return this.readPaused === 0;
  }

  /** A framing error raised by the transport (bad length, text frame). */
  frameError(err: ProtocolError): void {
    this.fail(err, undefined);
  }

  /** Sends one message: plaintext before the handshake completes, sealed after. */
  send(message: object): void {
    if (this.state >= ConnState.closed) return;
    this.sendPacked(pack(message), (message as { type?: string }).type === 'event');
  }

  /**
   * Sends a message already packed: a room event is packed once and only sealed per member
   * (each connection has its own keys and counters, PROTOCOL.md §3).
   */
  sendPacked(body: Uint8Array, isEvent: boolean): void {
    if (this.state >= ConnState.closed) return;
    // The kick is the last message (PROTOCOL.md §6), and it may have taken the key's last
    // frame: what is sent after it (the rest of an outbox call's events, a room's held messages)
    // is not sent. A qos-1 event stays in its outbox for the next connection.
    if (this.kicking && this.state === ConnState.closing) return;
    const t = this.transport;
    let frame: Buffer;
    if (this.channel) {
      if (this.channel.lastSendLeft && !this.kicking) {
        // The key's last frame is the kick that ends the connection (PROTOCOL.md §3); this
        // message is not sent (an event stays in its outbox and comes on the next connection).
        this.kick('rekey_required', 'key usage limit reached; reconnect');
        return;
      }
      frame = this.channel.sealBytes(body, t.headroom);
    } else {
      frame = Buffer.allocUnsafe(t.headroom + body.length);
      frame.set(body, t.headroom);
    }
    if (t.headroom === 4) frame.writeUInt32BE(frame.length - 4, 0);
    this.traffic.bytesOut += frame.length;
    const wire = this.host.counters.wire;
    wire.framesOut++;
    wire.bytesOut += frame.length;
    if (isEvent) this.traffic.eventsOut++;
    t.write(frame);
    this.checkBackpressure();
  }

  sendError(err: ProtocolError, id: number | undefined): void {
    this.host.counters.errorsSent.labels(err.code).inc();
    this.send({
      type: 'error',
      ...(id !== undefined ? { id } : {}),
      code: err.code,
      message: err.message,
      ...(err.retryAfter !== undefined ? { retryAfter: err.retryAfter } : {}),
      ...(err.fatal ? { fatal: true } : {}),
      ...(err.field !== undefined ? { field: err.field } : {}),
      ...err.extra,
    });
  }

  /** PROTOCOL.md §6: tell the client why, then close. */
  kick(code: KickCode, message: string, retryAfterMs?: number): void {
    if (this.state >= ConnState.closing) return;
    this.host.counters.kicks.labels(code).inc();
    // A shutdown's going_away kicks are counted in one line by the gateway.
    if (code !== 'going_away') {
      this.host.log.info(
        { conn: this.id, ip: this.ip, code, ...(this.session ? { sessionId: this.session.sessionId } : {}) },
        'kick',
      );
    }
    if (this.state === ConnState.open) {
      this.kicking = true;
      this.send({
        type: 'kick',
        code,
        message,
        ...(retryAfterMs !== undefined ? { retryAfter: retryAfterMs } : {}),
      });
    }
    this.close();
  }

  /** Whether requests of this connection are still waiting for their answers. */
  get busy(): boolean {
    return this.queue.length > 0;
  }

  /** Flushes queued output, then closes. Idempotent. */
  close(): void {
    if (this.state >= ConnState.closing) return;
    this.state = ConnState.closing;
    this.closingSinceMs = Date.now();
    this.transport.end();
  }

  /** Closes at once. */
  destroy(): void {
    if (this.state === ConnState.closed) return;
    this.state = ConnState.closing;
    this.transport.destroy();
  }

  /** Called by the transport when the socket is gone, whatever the reason. Idempotent. */
  transportClosed(): void {
    if (this.state === ConnState.closed) return;
    this.state = ConnState.closed;
    this.channel?.dispose();
    this.host.connectionClosed(this);
  }

  /** Called by the transport when its output drained. */
  drained(): void {
    if (
      this.readPaused & READ_PAUSED_OUTPUT &&
      this.transport.bufferedBytes() <= this.host.maxPendingBytes / 4
    ) {
      this.resumeFor(READ_PAUSED_OUTPUT);
    }
  }

  /**
   * Resumes reading a connection paused for its frame rate once its budget is back (the sweep
   * asks, gateway.ts). Returns false while it is still paused for it: over budget, or over it
   * again at once with what the transport held (it is then still the sweep's).
   */
  unthrottle(now: number): boolean {
    if (!(this.readPaused & READ_PAUSED_RATE)) return true;
    if (this.state >= ConnState.closing) return true;
    if (this.frameClockMs - now > this.host.frameBurstMs) return false;
    // Its silence counts from here: it was sending all along, unread.
    this.lastRxMs = now;
    this.resumeFor(READ_PAUSED_RATE);
    return !(this.readPaused & READ_PAUSED_RATE);
  }

  /** Whether reading is paused for the frame rate (tests, metrics). */
  get throttled(): boolean {
    return (this.readPaused & READ_PAUSED_RATE) !== 0;
  }

  // ---- internals ---------------------------------------------------------------------------

  private pauseFor(reason: number): void {
    if (this.readPaused === 0) this.transport.pauseReading();
    this.readPaused |= reason;
  }

  private resumeFor(reason: number): void {
    if (!(this.readPaused & reason)) return;
    this.readPaused &= ~reason;
    if (this.readPaused === 0) this.transport.resumeReading();
  }

  /**
   * The frame just received ran the connection's budget past its burst. A TCP connection is
   * read no more until the sweep finds its budget back: the frame itself is handled, and the
   * transport keeps the rest of what it read, undecoded (`receive` answers false). A WebSocket
   * cannot be paused: it is let run one more burst, then closed with a fatal `rate_limited`.
   * Returns true when the frame is not to be handled.
   */
  private overBudget(now: number): boolean {
    const h = this.host;
    const ahead = this.frameClockMs - now;
    if (this.transport.canPauseReading) {
      if (!(this.readPaused & READ_PAUSED_RATE)) {
        this.pauseFor(READ_PAUSED_RATE);
        h.counters.wire.throttles++;
        h.throttled?.(this);
        if (!this.throttledBefore) {
          this.throttledBefore = true;
          h.log.info(
            { conn: this.id, ip: this.ip, ...(this.session ? { sessionId: this.session.sessionId } : {}) },
            'frame rate over GW_FRAMES_PER_SECOND: reading paused until its budget is back',
          );
        }
      }
      return false;
    }
    if (ahead <= 2 * h.frameBurstMs) return false;
    h.log.info(
      { conn: this.id, ip: this.ip, ...(this.session ? { sessionId: this.session.sessionId } : {}) },
      'frame rate over GW_FRAMES_PER_SECOND past twice the burst: closed as rate_limited',
    );
    this.fail(
      new ProtocolError('rate_limited', 'frame rate over the connection limit', {
        fatal: true,
        retryAfter: Math.ceil(ahead - h.frameBurstMs),
      }),
      undefined,
    );
    return true;
  }

  private handshake(body: Buffer): void {
    let map: Record<string, unknown> & { type: string };
    try {
      map = unpackMessage(body);
    } catch {
      throw new ProtocolError('handshake_required', 'the first frame must be a plaintext hello map');
    }
    const hello = parseHello(map);
    const h = this.host;
    const { welcome, keys } = acceptHello(h.backend, h.identity, hello, {
      node: h.nodeId,
      heartbeatMs: h.heartbeatMs,
      maxFrameBytes: h.maxFrameBytes,
    });
    this.send(welcome);
    this.channel = new Channel(h.backend, keys, 'server', { maxFramesPerKey: h.rekeyAfterFrames });
    this.state = ConnState.open;
    h.counters.handshakes.labels('ok').inc();
    h.counters.handshakeSeconds.observe((Date.now() - this.openedAtMs) / 1000);
    this.lastPingMs = Date.now();
  }

  private onMessage(body: Buffer): void {
    let id: number | undefined;
    try {
      const value = unpack(this.channel!.openBytes(body));
      if (value === null || typeof value !== 'object' || Array.isArray(value) || Buffer.isBuffer(value)) {
        throw badMessage('frame', 'not a map');
      }
      const map = value as Record<string, unknown>;
      if (typeof map.id === 'number' && Number.isSafeInteger(map.id) && map.id >= 0) id = map.id;
      const type = map.type;
      if (typeof type !== 'string') throw badMessage('type', 'missing or not a string');
      switch (type) {
        case 'ping': {
          const ping = parseClientMessage(map as Record<string, unknown> & { type: string });
          this.send({ type: 'pong', ts: (ping as { ts: number }).ts });
          break;
        }
        case 'pong':
          break;
        case 'ack': {
          if (!this.session) throw new ProtocolError('unauthenticated');
          const ack = parseClientMessage(map as Record<string, unknown> & { type: string });
          this.host.onActivity?.(this.session.sessionId);
          this.host.onAck?.(this, (ack as { eids: string[] }).eids);
          break;
        }
        default:
          if (!isRequestType(type)) {
            throw new ProtocolError('unknown_type', `unknown type ${JSON.stringify(type.slice(0, 64))}`);
          }
          if (id === undefined)
            throw badMessage('id', map.id === undefined ? 'missing' : 'must be an unsigned integer');
          this.enqueue(id, map as Pending['map']);
      }
    } catch (e) {
      if (id !== undefined) this.answerInOrder(id, e);
      else this.fail(e, undefined);
    }
    if (this.state === ConnState.open && this.channel!.exhausted) {
      this.kick('rekey_required', 'key usage limit reached; reconnect');
    }
  }

  // ---- requests, in order ------------------------------------------------------------------

  /** An error for request `id` found before it could be queued: answered after the ones before it. */
  private answerInOrder(id: number, error: unknown): void {
    if (this.queue.length === 0) {
      this.fail(error, id);
      return;
    }
    if (this.queue.length >= MAX_UNANSWERED) {
      this.fail(
        new ProtocolError(
          'overloaded',
          `more than ${MAX_UNANSWERED} requests unanswered on this connection`,
          {
            fatal: true,
            retryAfter: 1000,
          },
        ),
        undefined,
      );
      return;
    }
    this.queue.push({
      id,
      map: { type: '', id },
      pipelined: true,
      started: true,
      settled: true,
      effected: true,
      error,
    });
  }

  private enqueue(id: number, map: Pending['map']): void {
    if (this.queue.length >= MAX_PENDING_REQUESTS) {
      this.answerInOrder(
        id,
        new ProtocolError('overloaded', 'too many requests in progress on this connection', {
          retryAfter: 100,
        }),
      );
      return;
    }
    const registered = this.host.handler(map.type);
    const p: Pending = {
      id,
      map,
      // `bye` closes the connection: it waits for everything before it.
      pipelined: map.type !== 'bye' && !!registered?.pipelined,
      started: false,
      settled: false,
      effected: false,
    };
    this.queue.push(p);
    this.advance();
  }

  /**
   * Starts what may start, wakes handlers whose turn came, and sends the answers at the head.
   * A pipelined request starts when every request before it is pipelined too; any other
   * request starts when it is at the head (everything before it answered).
   */
  private advance(): void {
    if (this.advancing) {
      this.advanceAgain = true;
      return;
    }
    this.advancing = true;
    try {
      do {
        this.advanceAgain = false;
        this.advanceOnce();
      } while (this.advanceAgain);
    } finally {
      this.advancing = false;
    }
  }

  private advanceOnce(): void {
    const q = this.queue;
    while (q.length > 0 && q[0].settled) {
      // (The heads are bounds from below: one that has not reached the answer stays at 0.)
      const p = q.shift()!;
      if (this.startedHead > 0) this.startedHead--;
      if (this.effectedHead > 0) this.effectedHead--;
      if (this.state !== ConnState.open) continue;
      if (p.error !== undefined) this.fail(p.error, p.id);
      else {
        this.send({ type: 'ok', id: p.id, data: p.data ?? {} });
        if (p.map.type === 'bye') this.close();
      }
    }
    // A request that is not pipelined starts only at the head, and holds back everything after
    // it until it is answered; a pipelined one starts when every request before it has.
    // A connection that is closing or closed starts nothing more: the requests it still holds
    // are not answered, and their work (a join, a send, a bind) would be for a client gone.
    const head = q[0];
    if (
      this.state === ConnState.open &&
      (head === undefined || !head.started || head.pipelined || head.settled)
    ) {
      for (let i = this.startedHead; i < q.length; i++) {
        const p = q[i];
        if (!p.started) {
          if (i === 0 || p.pipelined) this.start(p);
          else break;
        }
        this.startedHead = i + 1;
        if (!p.pipelined && !p.settled) break;
      }
    }
    this.wakeTurns();
  }

  /**
   * Moves `effectedHead` past the requests that took effect, waking a handler waiting in `turn`
   * once every request before it has (the one the head stops at, or one it passes: a handler
   * may settle while it waits).
   */
  private wakeTurns(): void {
    const q = this.queue;
    let e = this.effectedHead;
    for (; e < q.length; e++) {
      const r = q[e];
      if (r.waiting) {
        const wake = r.waiting;
        r.waiting = undefined;
        wake();
      }
      if (!r.effected) break;
    }
    this.effectedHead = e;
  }

  /**
   * Whether every request queued before `p` has taken effect: then `p` is the first one that
   * has not, as `p` itself has not; unless this is its second `turn`, when the queue is walked
   * up to it (the head may be past it).
   */
  private effectedBefore(p: Pending): boolean {
    const q = this.queue;
    if (p.effected) {
      for (const r of q) {
        if (r === p) return true;
        if (!r.effected) return false;
      }
      return true;
    }
    this.wakeTurns();
    return this.effectedHead >= q.length || q[this.effectedHead] === p;
  }

  private start(p: Pending): void {
    p.started = true;
    let result: unknown;
    try {
      const type = p.map.type;
      if (!this.session && !PRE_AUTH_TYPES.has(type)) throw new ProtocolError('unauthenticated');
      if (this.session) this.host.onActivity?.(this.session.sessionId);
      parseClientMessage(p.map);
      if (type === 'bye') {
        this.settle(p, {}, undefined);
        return;
      }
      const registered = this.host.handler(type);
      if (!registered) {
        throw new ProtocolError(
          this.session ? 'not_found' : 'unauthenticated',
          `${type} is not available on this gateway`,
        );
      }
      result = registered.fn(this, p.map, (effect) => this.turn(p, effect));
    } catch (e) {
      this.settle(p, undefined, e);
      return;
    }
    if (result instanceof Promise) {
      result.then(
        (data) => this.settle(p, data, undefined),
        (e) => this.settle(p, undefined, e),
      );
    } else this.settle(p, result, undefined);
  }

  private turn<T>(p: Pending, effect: () => T): Promise<T> {
    const run = () => {
      try {
        return effect();
      } finally {
        p.effected = true;
        this.advance();
      }
    };
    if (this.effectedBefore(p)) {
      try {
        return Promise.resolve(run());
      } catch (e) {
        return Promise.reject(e);
      }
    }
    return new Promise<void>((resolve) => {
      p.waiting = resolve;
    }).then(run);
  }

  private settle(p: Pending, data: unknown, error: unknown): void {
    p.settled = true;
    p.effected = true;
    if (error !== undefined) p.error = error;
    else p.data = data;
    this.advance();
  }

  /** Sends the error (if the connection can still talk) and closes when it is fatal. */
  private fail(e: unknown, id: number | undefined): void {
    // A request left undone because this connection went (auth/service.ts): nobody to tell.
    if (e instanceof RequesterGone) return;
    // A dependency fault is `overloaded` with retryAfter (faults.ts), logged once per outage.
    let err = wireError(e);
    if (!err) {
      this.host.log.error({ err: e, conn: this.id }, 'request failed');
      err = new ProtocolError('internal');
    }
    if (this.state >= ConnState.closing) return;
    if (err.code === 'decrypt_failed') this.host.counters.wire.decryptFailures++;
    if (this.state === ConnState.handshake) this.host.counters.handshakes.labels(err.code).inc();
    this.sendError(err, id);
    if (err.fatal) this.close();
  }

  private checkBackpressure(): void {
    if (this.state >= ConnState.closing) return;
    const pending = this.transport.bufferedBytes();
    if (pending > this.host.maxPendingBytes) {
      // Design note (STYLE.md §6): one slow device must not grow the gateway's memory; the
      // error is queued behind what is pending and the sweep destroys the socket if it lingers.
      this.host.log.warn(
        { conn: this.id, ip: this.ip, pending },
        'output bound exceeded; closing as overloaded',
      );
      this.state = ConnState.closing;
      this.closingSinceMs = Date.now();
      this.sendError(
        new ProtocolError('overloaded', 'connection output bound exceeded', { fatal: true }),
        undefined,
      );
      this.transport.end();
    } else if (!(this.readPaused & READ_PAUSED_OUTPUT) && pending > this.host.maxPendingBytes / 2) {
      this.pauseFor(READ_PAUSED_OUTPUT);
    }
  }
}
