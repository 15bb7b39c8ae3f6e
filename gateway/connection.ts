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
  Channel,
  type CryptoBackend,
  type Ed25519Identity,
  type KickCode,
  PRE_AUTH_TYPES,
  ProtocolError,
  pack,
  parseClientMessage,
  parseHello,
  unpackMessage,
} from '../protocol/index.ts';
import { wireError } from './faults.ts';
import type { Logger } from './log.ts';

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

/** A request handler: returns the `ok` data (or undefined for `{}`), or throws ProtocolError. */
export type Handler = (conn: Connection, msg: Record<string, unknown> & { id: number }) => unknown;

/** The gateway side of a connection: shared state and collaborators, built once. */
export interface ConnectionHost {
  readonly backend: CryptoBackend;
  readonly identity: Ed25519Identity;
  readonly nodeId: string;
  readonly heartbeatMs: number;
  readonly maxFrameBytes: number;
  readonly maxPendingBytes: number;
  readonly rekeyAfterFrames: number;
  readonly log: Logger;
  /** Handler for a request type, or undefined if no service provides it. */
  handler(type: string): Handler | undefined;
  /** Handles `ack` frames (delivery); undefined until delivery exists. */
  onAck?(conn: Connection, eids: string[]): void;
  connectionClosed(conn: Connection): void;
}

export const ConnState = { handshake: 0, open: 1, closing: 2, closed: 3 } as const;
export type ConnState = (typeof ConnState)[keyof typeof ConnState];

/** Requests of one connection allowed in progress at once; more is `overloaded`. */
const MAX_PENDING_REQUESTS = 64;

let nextConnectionId = 1;

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
  /** Free slot for services (rooms joined, delivery window, ...). */
  readonly attachments = new Map<string, unknown>();
  private channel: Channel | undefined;
  private pendingRequests = 0;
  private readingPaused = false;

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

  /** One frame body from the transport. The body may be a view: nothing here keeps it. */
  receive(body: Buffer): void {
    if (this.state >= ConnState.closing) return;
    this.lastRxMs = Date.now();
    this.traffic.bytesIn += body.length;
    try {
      if (this.state === ConnState.handshake) this.handshake(body);
      else this.onMessage(this.channel!.open(body));
    } catch (e) {
      this.fail(e, undefined);
    }
  }

  /** A framing error raised by the transport (bad length, text frame). */
  frameError(err: ProtocolError): void {
    this.fail(err, undefined);
  }

  /** Sends one message: plaintext before the handshake completes, sealed after. */
  send(message: object): void {
    if (this.state >= ConnState.closed) return;
    const t = this.transport;
    let frame: Buffer;
    if (this.channel) {
      frame = this.channel.seal(message, t.headroom);
    } else {
      const body = pack(message);
      frame = Buffer.allocUnsafe(t.headroom + body.length);
      body.copy(frame, t.headroom);
    }
    if (t.headroom === 4) frame.writeUInt32BE(frame.length - 4, 0);
    this.traffic.bytesOut += frame.length;
    if ((message as { type?: string }).type === 'event') this.traffic.eventsOut++;
    t.write(frame);
    this.checkBackpressure();
  }

  sendError(err: ProtocolError, id: number | undefined): void {
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
    if (this.state === ConnState.open) {
      this.send({
        type: 'kick',
        code,
        message,
        ...(retryAfterMs !== undefined ? { retryAfter: retryAfterMs } : {}),
      });
    }
    this.close();
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
    if (this.readingPaused && this.transport.bufferedBytes() <= this.host.maxPendingBytes / 4) {
      this.readingPaused = false;
      this.transport.resumeReading();
    }
  }

  // ---- internals ---------------------------------------------------------------------------

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
    this.lastPingMs = Date.now();
  }

  private onMessage(map: Record<string, unknown> & { type: string }): void {
    const id = typeof map.id === 'number' && Number.isSafeInteger(map.id) && map.id >= 0 ? map.id : undefined;
    try {
      const msg = parseClientMessage(map);
      switch (msg.type) {
        case 'ping':
          this.send({ type: 'pong', ts: msg.ts });
          break;
        case 'pong':
          break;
        case 'ack':
          if (!this.session) throw new ProtocolError('unauthenticated');
          this.host.onAck?.(this, msg.eids);
          break;
        case 'bye':
          this.send({ type: 'ok', id: msg.id, data: {} });
          this.close();
          break;
        default:
          this.request(msg.type, msg as unknown as Record<string, unknown> & { id: number });
      }
    } catch (e) {
      this.fail(e, id);
    }
    if (this.state === ConnState.open && this.channel!.exhausted) {
      this.kick('rekey_required', 'key usage limit reached; reconnect');
    }
  }

  private request(type: string, msg: Record<string, unknown> & { id: number }): void {
    if (!this.session && !PRE_AUTH_TYPES.has(type)) throw new ProtocolError('unauthenticated');
    const handler = this.host.handler(type);
    if (!handler) {
      throw new ProtocolError(
        this.session ? 'not_found' : 'unauthenticated',
        `${type} is not available on this gateway`,
      );
    }
    if (this.pendingRequests >= MAX_PENDING_REQUESTS) {
      throw new ProtocolError('overloaded', 'too many requests in progress on this connection', {
        retryAfter: 100,
      });
    }
    const result = handler(this, msg);
    if (result instanceof Promise) {
      this.pendingRequests++;
      result.then(
        (data) => {
          this.pendingRequests--;
          this.reply(msg.id, data);
        },
        (e) => {
          this.pendingRequests--;
          if (this.state === ConnState.open) this.fail(e, msg.id);
        },
      );
    } else {
      this.reply(msg.id, result);
    }
  }

  private reply(id: number, data: unknown): void {
    if (this.state !== ConnState.open) return;
    this.send({ type: 'ok', id, data: data ?? {} });
  }

  /** Sends the error (if the connection can still talk) and closes when it is fatal. */
  private fail(e: unknown, id: number | undefined): void {
    // A dependency fault is `overloaded` with retryAfter (faults.ts), logged once per outage.
    let err = wireError(e);
    if (!err) {
      this.host.log.error({ err: e, conn: this.id }, 'request failed');
      err = new ProtocolError('internal');
    }
    if (this.state >= ConnState.closing) return;
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
    } else if (!this.readingPaused && pending > this.host.maxPendingBytes / 2) {
      this.readingPaused = true;
      this.transport.pauseReading();
    }
  }
}
