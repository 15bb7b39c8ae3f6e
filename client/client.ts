/**
 * The reference client: speaks PROTOCOL.md over TCP or WebSocket using only `protocol/`.
 * Handshake with an optional pinned fingerprint, `request()` with id correlation and timeouts,
 * automatic pong, events with optional automatic ack, and reconnection with backoff that
 * resumes the session. The interactive CLI and the simulator are built on it.
 */

import { EventEmitter } from 'node:events';
import { connect as netConnect, type Socket } from 'node:net';
import { decodeJwt } from 'jose';
import WebSocket from 'ws';
import {
  Channel,
  ClientHandshake,
  type CryptoBackend,
  type EventMsg,
  encodeFrame,
  FrameDecoder,
  isProtocolError,
  type Kick,
  MAX_ACK_EIDS,
  ProtocolError,
  pack,
  parseServerMessage,
  parseWelcome,
  SEAL_OVERHEAD,
  type SessionData,
  selectBackend,
  serverError,
  unpackMessage,
  type Welcome,
} from '../protocol/index.ts';

export interface ReconnectOptions {
  initialDelayMs?: number;
  maxDelayMs?: number;
  /**
   * Give up after this many consecutive failed attempts, a connection or a resume retried on an
   * open connection (default: never): `reconnectFailed`, the session kept.
   */
  maxAttempts?: number;
  /**
   * The gateway's refresh grace period (its `GW_REFRESH_GRACE_SECONDS`; default 30 000 ms,
   * `DEFAULT_REFRESH_GRACE_MS`): how long after a refresh ran the refresh token it used may be
   * presented again to get the same pair (PROTOCOL.md §4). While a refresh is in doubt (sent,
   * and not answered: a timeout, the connection lost, `overloaded` or `internal`), the attempts
   * come at most a quarter of this apart (and no sooner than a `retryAfter`), so that the
   * refresh is presented again within it.
   */
  refreshGraceMs?: number;
}

export interface ClientOptions {
  /** `tcp://host:port` or `ws://host:port/ws`. */
  url: string;
  /** Lowercase hex SHA-256 of the server identity key; any other key is refused. */
  pinnedFingerprint?: string;
  backend?: CryptoBackend;
  clientName?: string;
  /** Default timeout of `request()` (ms). */
  requestTimeoutMs?: number;
  /**
   * Acknowledge qos-1 events as they arrive (default true): once the events of one read from
   * the socket have been emitted, all of them in one `ack` frame.
   */
  autoAck?: boolean;
  /**
   * Reconnect after an unexpected close, resuming the session (default: off). Not after a
   * `session_revoked` or `session_takeover` kick (`TERMINAL_KICKS`).
   */
  reconnect?: ReconnectOptions | false;
  /** Handshake timeout (ms). */
  connectTimeoutMs?: number;
  /**
   * Largest frame accepted from the server, over TCP or WebSocket (default 16 MiB); a longer one
   * closes the connection.
   * `welcome`'s `max` bounds what the server reads, not what it sends (docs/PROTOCOL.md §8).
   */
  maxFrameBytes?: number;
  /**
   * TCP only: send the `hello` frame in this many writes, 2 ms apart, as a device on a slow
   * link would (the server must reassemble it). Default 1.
   */
  helloChunks?: number;
  /** WebSocket only: headers of the upgrade request (e.g. what a proxy in between would add). */
  wsHeaders?: Record<string, string>;
  /**
   * Where the client keeps a refresh in doubt (default: a new one of its own). A device that
   * makes a new client for each connection passes the same one to each, so that the next
   * connection's `resume()` presents a refresh the last one left in doubt again first.
   */
  refreshDoubt?: RefreshDoubt;
  /**
   * Keep the session alive while connected (default true): once 70-90% of the access token's
   * life has passed (at random, so that a fleet connected at once does not refresh at once;
   * from the token's `iat` and `exp` claims, so the device's clock does not matter) the client
   * refreshes the token pair. The refresh extends the session too: a gateway ends a
   * session `SESSION_TTL` after its login or its last resume or refresh, and kicks its
   * connections `session_revoked` (docs/PROTOCOL.md §4), so a device that stays connected
   * without it is kicked and must log in again once a day by default. It also keeps a token
   * valid for the next reconnection, whose resume then needs no refresh first. A refresh that
   * fails for a moment (a timeout, `overloaded`, `rate_limited`, `internal`) is tried again
   * (within a quarter of the refresh grace period while it is in doubt, else after `retryAfter`
   * or 30 s); a definitive refusal stops it for that session (`refreshFailed`).
   */
  keepSession?: boolean;
}

/** How long the client waits before an automatic refresh that failed for a moment is tried again. */
const KEEP_RETRY_MS = 30_000;

/**
 * The life (ms) of an access token from its `iat` and `exp` claims (the gateway's clock), or
 * undefined if it has none.
 */
export function tokenLifeMs(token: string | undefined): number | undefined {
  try {
    const { iat, exp } = decodeJwt(token ?? '');
    return typeof iat === 'number' && typeof exp === 'number' && exp > iat ? (exp - iat) * 1000 : undefined;
  } catch {
    return undefined;
  }
}

export type Session = SessionData;

export interface CloseInfo {
  /** The kick or fatal error code that preceded the close, if any. */
  code?: string;
  retryAfter?: number;
  /** True when `close()` was called. */
  byClient: boolean;
}

interface Pending {
  resolve: (data: Record<string, unknown>) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

/** A wire the client writes frame bodies to, whatever the transport. */
interface Wire {
  write(body: Buffer): void;
  end(): void;
  destroy(): void;
}

/** An `ack` map's bytes besides its eids, packed: the map, `type`, `ack`, `eids` and the array's header, rounded up. */
const ACK_FRAME_BASE = 24;

/** `ClientOptions.maxFrameBytes` when not given: 16 MiB. */
const DEFAULT_MAX_SERVER_FRAME = 16 * 1024 * 1024;

const SESSION_TYPES = new Set(['login', 'resume', 'otp.verify']);

/**
 * Kicks after which reconnecting cannot help: the session has ended (`session_revoked`), or
 * another connection holds it now (`session_takeover`; resuming would take it back and start a
 * tug of war between the two). The client stays closed after these.
 */
export const TERMINAL_KICKS: ReadonlySet<string> = new Set(['session_revoked', 'session_takeover']);

/**
 * Answers to the reconnection's `resume` (or its `refresh`) that a later try may not get: the
 * server is busy or a dependency is down (`overloaded`, PROTOCOL §8), a limit's window
 * (`rate_limited`), a failure of its own (`internal`). The session is kept and the resume tried
 * again after `retryAfter` (or the backoff); so is it after a timeout or a lost connection. Any
 * other answer (`session_revoked`, `token_invalid`, `token_expired` with no refresh that
 * worked, `refresh_reused`, `forbidden`, …) is definitive: the session is dropped
 * (`sessionLost`).
 */
export const TRANSIENT_RESUME_ERRORS: ReadonlySet<string> = new Set([
  'overloaded',
  'rate_limited',
  'internal',
]);

/** The gateway's default refresh grace period (`GW_REFRESH_GRACE_SECONDS`, 30 s), in ms. */
export const DEFAULT_REFRESH_GRACE_MS = 30_000;

/**
 * A refresh in doubt: a refresh token was presented and no answer settled it (it timed out, its
 * connection closed, or it was answered `overloaded` or `internal`), and since when. The
 * gateway may have rotated the token, which it takes back only within its grace period
 * (PROTOCOL.md §4): until a later answer or a definitive refusal ends the doubt, a resume
 * presents the token again first (`GatewayClient.resume`), and attempts come at most a quarter
 * of the grace period apart (`bound`). A client keeps one; `ClientOptions.refreshDoubt` carries
 * one from a client to the next.
 */
export class RefreshDoubt {
  private doubt: { token: string; at: number } | undefined;

  /** True when `token` (a session's refresh token) is the one in doubt. */
  holds(token: string | undefined): boolean {
    return token !== undefined && this.doubt?.token === token;
  }

  /**
   * A refresh presenting `token` failed with `e`. Unanswered (a timeout, the connection closed),
   * `overloaded` or `internal`: it may have run on the gateway, so it is in doubt. `rate_limited`
   * was refused before it ran and changes nothing; any other answer is definitive.
   */
  failed(token: string, e: Error): void {
    if (!isProtocolError(e) || e.code === 'overloaded' || e.code === 'internal') {
      this.doubt = { token, at: Date.now() };
    } else if (e.code !== 'rate_limited') this.doubt = undefined;
  }

  /** No refresh in doubt any more: one was answered, a new session began, or the session is gone. */
  clear(): void {
    this.doubt = undefined;
  }

  /**
   * `backoffMs`, or at most a quarter of `graceMs` while the doubt is younger than `graceMs`, so
   * that the refresh in doubt is presented again within the gateway's grace period.
   */
  bound(backoffMs: number, graceMs = DEFAULT_REFRESH_GRACE_MS): number {
    if (this.doubt && Date.now() - this.doubt.at < graceMs) {
      return Math.min(backoffMs, Math.max(1, Math.floor(graceMs / 4)));
    }
    return backoffMs;
  }
}

function transient(e: unknown): boolean {
  return !isProtocolError(e) || TRANSIENT_RESUME_ERRORS.has(e.code);
}

/** Where a gateway URL points: `tcp://host:port` (port 9000 by default) or `ws[s]://host:port/path`. */
export interface GatewayAddress {
  transport: 'tcp' | 'ws';
  /** Host name or IP address, an IPv6 address without its brackets (`::1`). */
  host: string;
  port: number;
  /** The URL as parsed (for WebSocket, what is dialled). */
  url: URL;
}

/**
 * Parses a gateway URL. IPv6 literals go in brackets, as in any URL (`tcp://[::1]:9000`);
 * `host` comes back without them, as `net.connect` wants it. Throws a clear Error otherwise.
 */
export function parseGatewayUrl(raw: string): GatewayAddress {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(`invalid gateway URL ${JSON.stringify(raw)}: use tcp://host:port or ws://host:port/ws`);
  }
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  if (!host) throw new Error(`gateway URL ${JSON.stringify(raw)} has no host`);
  if (url.protocol === 'tcp:') {
    if (url.pathname && url.pathname !== '/') {
      throw new Error(`gateway URL ${JSON.stringify(raw)}: a tcp:// URL has no path`);
    }
    return { transport: 'tcp', host, port: url.port ? Number(url.port) : 9000, url };
  }
  if (url.protocol === 'ws:' || url.protocol === 'wss:') {
    const port = url.port ? Number(url.port) : url.protocol === 'wss:' ? 443 : 80;
    return { transport: 'ws', host, port, url };
  }
  throw new Error(`unsupported gateway URL ${JSON.stringify(raw)}: use tcp://host:port or ws://host:port/ws`);
}

export class GatewayClient extends EventEmitter {
  readonly options: ClientOptions;
  readonly backend: CryptoBackend;
  welcome: Welcome | undefined;
  session: Session | undefined;
  private wire: Wire | undefined;
  private channel: Channel | undefined;
  private handshake: ClientHandshake | undefined;
  private readonly pending = new Map<number, Pending>();
  /** Pings waiting for their pong: each rejects its promise (on close). */
  private readonly pings = new Set<(err: Error) => void>();
  /**
   * `refresh` requests of this connection that timed out, by id, with the refresh token each
   * presented: an answer that comes after all is still applied (`lateAnswer`).
   */
  private readonly lateRefreshes = new Map<number, string>();
  /**
   * A refresh in doubt (`RefreshDoubt`): the reconnection presents it again first, soon
   * (`refreshGraceMs`), and a later answer or a definitive refusal ends the doubt.
   */
  private readonly refreshDoubt: RefreshDoubt;
  /** Eids to auto-ack once the current read has been handled (ackSoon). */
  private acksDue: string[] = [];
  private nextId = 1;
  private userClosed = false;
  /**
   * The reconnection's generation: bumped by `close()`, `connect()` and a terminal close, so that
   * a step of the reconnection already under way (a handshake, a resume) ends there.
   */
  private reconnectGen = 0;
  private lastKick: Kick | undefined;
  private lastFatal: string | undefined;
  private connected = false;
  private reconnectAttempt = 0;
  /** The one scheduled step of the reconnection, if any: a new connection, or the resume again. */
  private reconnectTimer: NodeJS.Timeout | undefined;
  private reconnectStep: 'connect' | 'resume' = 'connect';
  private tcpSocket: Socket | undefined;
  /** The automatic refresh that keeps the session alive (`keepSession`). */
  private keepTimer: NodeJS.Timeout | undefined;

  constructor(options: ClientOptions) {
    super();
    this.options = options;
    this.backend = options.backend ?? selectBackend('auto').backend;
    this.refreshDoubt = options.refreshDoubt ?? new RefreshDoubt();
  }

  get isOpen(): boolean {
    return this.connected;
  }

  /**
   * Connects and completes the handshake; resolves with the server's welcome. Ends a
   * reconnection still scheduled or under way: the caller's connection replaces it.
   */
  connect(): Promise<Welcome> {
    this.userClosed = false;
    this.cancelReconnect();
    this.reconnectAttempt = 0;
    return this.dial();
  }

  /** Opens a connection and completes the handshake (for `connect()` and the reconnection). */
  private dial(): Promise<Welcome> {
    return new Promise<Welcome>((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(
        () => fail(new Error('handshake timed out')),
        this.options.connectTimeoutMs ?? 10000,
      );
      const fail = (e: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.wire?.destroy();
        reject(e);
      };
      const done = (w: Welcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(w);
      };
      this.handshake = new ClientHandshake(this.backend, {
        ...(this.options.pinnedFingerprint ? { pinnedFingerprint: this.options.pinnedFingerprint } : {}),
        client: this.options.clientName ?? 'gateway-client/0.1',
      });
      this.channel = undefined;
      this.welcome = undefined;
      this.lastKick = undefined;
      this.lastFatal = undefined;
      const onBody = (body: Buffer) => {
        try {
          if (!this.channel) {
            const welcome = parseWelcome(unpackMessage(body));
            const keys = this.handshake!.finish(welcome);
            this.channel = new Channel(this.backend, keys, 'client');
            this.welcome = welcome;
            this.connected = true;
            done(welcome);
            return;
          }
          this.onMessage(this.channel.open(body));
        } catch (e) {
          if (!this.channel) fail(e as Error);
          else {
            this.emit('protocolError', e);
            this.wire?.destroy();
          }
        }
      };
      const onClose = () => {
        const wasConnected = this.connected;
        this.connected = false;
        this.channel?.dispose();
        fail(
          new Error(
            this.lastFatal ? `connection closed: ${this.lastFatal}` : 'connection closed during handshake',
          ),
        );
        for (const [, p] of this.pending) {
          clearTimeout(p.timer);
          p.reject(new ProtocolError('internal', 'connection closed'));
        }
        this.pending.clear();
        this.lateRefreshes.clear();
        for (const rejectPing of [...this.pings])
          rejectPing(new ProtocolError('internal', 'connection closed'));
        if (wasConnected) {
          const info: CloseInfo = {
            byClient: this.userClosed,
            ...(this.lastKick
              ? { code: this.lastKick.code }
              : this.lastFatal
                ? { code: this.lastFatal }
                : {}),
            ...(this.lastKick?.retryAfter !== undefined ? { retryAfter: this.lastKick.retryAfter } : {}),
          };
          this.emit('close', info);
          const terminal = info.code !== undefined && TERMINAL_KICKS.has(info.code);
          // A terminal kick also ends a reconnection under way (its resume is cut by this close).
          if (terminal) this.cancelReconnect();
          else if (!this.userClosed && this.options.reconnect) this.scheduleReconnect(info.retryAfter);
        }
      };
      try {
        this.wire = this.open(onBody, onClose, fail);
      } catch (e) {
        fail(e as Error);
        return;
      }
      this.writeHello(pack(this.handshake.hello));
    });
  }

  /** Writes the hello frame, in `helloChunks` TCP writes when asked. */
  private writeHello(body: Buffer): void {
    const chunks = this.options.helloChunks ?? 1;
    const socket = this.tcpSocket;
    if (chunks <= 1 || !socket || !this.options.url.startsWith('tcp:')) {
      this.wire!.write(body);
      return;
    }
    const frame = encodeFrame(body);
    const size = Math.ceil(frame.length / chunks);
    let i = 0;
    const next = () => {
      if (socket.destroyed) return;
      socket.write(frame.subarray(i, i + size));
      i += size;
      if (i < frame.length) setTimeout(next, 2);
    };
    // Chunks written before the connection is up would leave in one segment.
    if (socket.connecting) socket.once('connect', next);
    else next();
  }

  private open(onBody: (b: Buffer) => void, onClose: () => void, onError: (e: Error) => void): Wire {
    const address = parseGatewayUrl(this.options.url);
    if (address.transport === 'tcp') {
      const socket = netConnect({ host: address.host, port: address.port, noDelay: true });
      this.tcpSocket = socket;
      socket.once('connect', () => this.emit('transportOpen'));
      const decoder = new FrameDecoder(this.options.maxFrameBytes ?? DEFAULT_MAX_SERVER_FRAME);
      socket.on('data', (chunk) => {
        try {
          decoder.push(chunk, onBody);
        } catch (e) {
          this.emit('protocolError', e);
          socket.destroy();
        }
      });
      socket.on('error', (e) => onError(e));
      socket.on('close', onClose);
      return {
        write: (body) => socket.write(encodeFrame(body)),
        end: () => socket.end(),
        destroy: () => socket.destroy(),
      };
    }
    const ws = new WebSocket(address.url, {
      perMessageDeflate: false,
      maxPayload: this.options.maxFrameBytes ?? DEFAULT_MAX_SERVER_FRAME,
      ...(this.options.wsHeaders ? { headers: this.options.wsHeaders } : {}),
    });
    ws.binaryType = 'nodebuffer';
    const queue: Buffer[] = [];
    ws.on('open', () => {
      this.emit('transportOpen');
      for (const b of queue) ws.send(b);
      queue.length = 0;
    });
    ws.on('message', (data, isBinary) => {
      if (isBinary) onBody(data as Buffer);
    });
    ws.on('error', (e) => onError(e));
    ws.on('close', onClose);
    return {
      write: (body) => (ws.readyState === WebSocket.OPEN ? ws.send(body) : queue.push(body)),
      end: () => ws.close(1000),
      destroy: () => ws.terminate(),
    };
  }

  private onMessage(map: Record<string, unknown> & { type: string }): void {
    const msg = parseServerMessage(map);
    switch (msg.type) {
      case 'ok':
      case 'error': {
        if (msg.type === 'error' && msg.fatal) this.lastFatal = msg.code;
        const p = msg.id !== undefined ? this.pending.get(msg.id) : undefined;
        if (!p) {
          if (msg.type === 'ok' && this.lateAnswer(msg.id, msg.data ?? {})) return;
          if (msg.id !== undefined) this.lateRefreshes.delete(msg.id);
          if (msg.type === 'error') this.emit('serverError', serverError(msg));
          return;
        }
        this.pending.delete(msg.id!);
        clearTimeout(p.timer);
        if (msg.type === 'ok') p.resolve(msg.data ?? {});
        else p.reject(serverError(msg));
        return;
      }
      case 'ping':
        this.sendMessage({ type: 'pong', ts: msg.ts });
        this.emit('ping', msg.ts);
        return;
      case 'pong':
        this.emit('pong', msg.ts);
        return;
      case 'kick':
        this.lastKick = msg;
        this.emit('kick', msg);
        return;
      case 'event':
        if (msg.qos === 1 && this.options.autoAck !== false) this.ackSoon(msg.eid);
        this.emit('event', msg as EventMsg);
        return;
      default:
        return;
    }
  }

  /**
   * Sends a request and resolves with the `ok` data; rejects with the server's ProtocolError.
   * A request whose frame would be larger than the server reads (`welcome`'s `max`) is not sent:
   * it rejects with `frame_too_large` (not fatal), and the connection goes on. Sent, it would be
   * the server's fatal `frame_too_large`, the connection closed with every request on it.
   */
  request<T = Record<string, unknown>>(
    type: string,
    fields: Record<string, unknown> = {},
    options: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (!this.connected || !this.channel) return Promise.reject(new Error('not connected'));
    const id = this.nextId++;
    let plain: Buffer;
    try {
      plain = pack({ ...fields, type, id });
    } catch (e) {
      // (A BigInt past 64 bits, say: rejected, as when the pack was inside the promise.)
      return Promise.reject(e);
    }
    const max = this.welcome?.max;
    if (max !== undefined && plain.length + SEAL_OVERHEAD > max) {
      return Promise.reject(
        new ProtocolError(
          'frame_too_large',
          `the ${type} request's frame would be ${plain.length + SEAL_OVERHEAD} bytes; the server reads at most ${max}: not sent`,
          { fatal: false },
        ),
      );
    }
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(
        () => {
          this.pending.delete(id);
          const e = new Error(`${type} timed out`);
          if (type === 'refresh' && typeof fields.refresh === 'string') {
            this.lateRefreshes.set(id, fields.refresh);
            this.refreshDoubt.failed(fields.refresh, e);
          }
          reject(e);
        },
        options.timeoutMs ?? this.options.requestTimeoutMs ?? 10000,
      );
      this.pending.set(id, {
        resolve: (data) => {
          if (SESSION_TYPES.has(type)) this.rememberSession(type, data);
          else if (type === 'refresh' && this.session) this.refreshed(data);
          else if (type === 'logout' && fields.token === undefined) this.session = undefined;
          resolve(data as T);
        },
        reject: (e) => {
          if (type === 'refresh' && typeof fields.refresh === 'string')
            this.refreshDoubt.failed(fields.refresh, e);
          reject(e);
        },
        timer,
      });
      this.sendPacked(plain);
    });
  }

  /** A refresh's new pair: the session's tokens are now these (`refreshed`). */
  private refreshed(data: Record<string, unknown>): void {
    Object.assign(this.session!, data);
    this.refreshDoubt.clear();
    this.scheduleKeep();
    this.emit('refreshed', this.session);
  }

  /**
   * The next automatic refresh (`keepSession`): at 70-90% of the current access token's life
   * from now, or after `inMs`.
   */
  private scheduleKeep(inMs?: number): void {
    if (this.keepTimer) clearTimeout(this.keepTimer);
    this.keepTimer = undefined;
    if (this.options.keepSession === false || !this.session?.refresh) return;
    const life = tokenLifeMs(this.session.token);
    const delay =
      inMs ??
      (life === undefined ? undefined : Math.max(1000, Math.floor(life * (0.7 + 0.2 * Math.random()))));
    if (delay === undefined) return;
    this.keepTimer = setTimeout(() => void this.keepNow(), delay);
    this.keepTimer.unref();
  }

  /** The gateway's refresh grace period, as the options give it (`ReconnectOptions.refreshGraceMs`). */
  private get refreshGraceMs(): number {
    const r = this.options.reconnect;
    return (r ? r.refreshGraceMs : undefined) ?? DEFAULT_REFRESH_GRACE_MS;
  }

  /** The automatic refresh: on the connection that is up, as the session it was scheduled for. */
  private async keepNow(): Promise<void> {
    this.keepTimer = undefined;
    const s = this.session;
    // Not connected: the reconnection's resume schedules the next one.
    if (!s?.refresh || !this.connected || this.userClosed) return;
    try {
      await this.request('refresh', { refresh: s.refresh });
    } catch (e) {
      if (this.session !== s || this.keepTimer) return;
      if (!transient(e)) {
        this.emit('refreshFailed', { sessionId: s.sessionId, error: e });
        return;
      }
      const after = isProtocolError(e) && e.retryAfter !== undefined ? e.retryAfter : KEEP_RETRY_MS;
      this.scheduleKeep(this.refreshDoubt.bound(after, this.refreshGraceMs));
    }
  }

  /**
   * The `ok` of a `refresh` that timed out here: the gateway did rotate the token, and a device
   * that dropped this answer would hold a refresh token already used, which only the gateway's
   * short grace period lets it present again (PROTOCOL.md §4). Applied if the session still
   * holds the token that request presented. True when `id` was such a request.
   */
  private lateAnswer(id: number | undefined, data: Record<string, unknown>): boolean {
    if (id === undefined) return false;
    const presented = this.lateRefreshes.get(id);
    if (presented === undefined) return false;
    this.lateRefreshes.delete(id);
    if (this.session?.refresh === presented) this.refreshed(data);
    return true;
  }

  private rememberSession(type: string, data: Record<string, unknown>): void {
    const s = data as unknown as Session;
    if (type === 'resume' && this.session) this.session = { ...this.session, ...s };
    else {
      this.session = s;
      this.refreshDoubt.clear();
    }
    this.scheduleKeep();
  }

  /** Seals and sends one message (no id bookkeeping). */
  sendMessage(message: Record<string, unknown>): void {
    this.sendPacked(pack(message));
  }

  /** Seals and sends a packed message. */
  private sendPacked(plain: Buffer): void {
    if (!this.channel || !this.wire) throw new Error('not connected');
    this.wire.write(this.channel.sealBytes(plain));
  }

  /**
   * Acks `eids`, in as many frames as the protocol's bounds take: at most MAX_ACK_EIDS eids a
   * frame, and no frame larger than the server reads (`welcome`'s `max`: long eids, or a gateway
   * whose `GW_MAX_FRAME` is low, would otherwise make an ack the server's fatal
   * `frame_too_large`, and every event it acked come again on the next connection).
   */
  ack(eids: string[]): void {
    if (!this.connected) return;
    const max = (this.welcome?.max ?? Number.POSITIVE_INFINITY) - SEAL_OVERHEAD;
    let from = 0;
    let bytes = ACK_FRAME_BASE;
    for (let i = 0; i < eids.length; i++) {
      // A MessagePack string: its bytes and a header of 1 to 3 bytes (eids are at most 128).
      const size = Buffer.byteLength(eids[i]) + 3;
      if (i > from && (i - from === MAX_ACK_EIDS || bytes + size > max)) {
        this.sendMessage({ type: 'ack', eids: eids.slice(from, i) });
        from = i;
        bytes = ACK_FRAME_BASE;
      }
      bytes += size;
    }
    if (from < eids.length) this.sendMessage({ type: 'ack', eids: from === 0 ? eids : eids.slice(from) });
  }

  /**
   * Auto-acks wait for the rest of the read they came in (a microtask): a burst of events to
   * this device costs it, and the gateway, one sealed frame instead of one per event.
   */
  private ackSoon(eid: string): void {
    this.acksDue.push(eid);
    if (this.acksDue.length === 1) queueMicrotask(this.sendAcksDue);
  }

  private readonly sendAcksDue = (): void => {
    const eids = this.acksDue;
    this.acksDue = [];
    this.ack(eids);
  };

  /**
   * Client-initiated ping; resolves with the round trip in ms. Rejected, like `request()`, when
   * no pong comes within the timeout (`requestTimeoutMs`) or the connection closes first.
   */
  ping(options: { timeoutMs?: number } = {}): Promise<number> {
    if (!this.connected || !this.channel) return Promise.reject(new Error('not connected'));
    const ts = Date.now();
    return new Promise((resolve, reject) => {
      const settle = () => {
        clearTimeout(timer);
        this.off('pong', onPong);
        this.pings.delete(onClosed);
      };
      const onPong = (got: number) => {
        if (got !== ts) return;
        settle();
        resolve(Date.now() - ts);
      };
      const onClosed = (e: Error) => {
        settle();
        reject(e);
      };
      const timer = setTimeout(
        () => onClosed(new Error('ping timed out')),
        options.timeoutMs ?? this.options.requestTimeoutMs ?? 10000,
      );
      this.on('pong', onPong);
      this.pings.add(onClosed);
      this.sendMessage({ type: 'ping', ts });
    });
  }

  /**
   * Says `bye` (best effort) and closes; no reconnect follows, and a reconnection scheduled or
   * under way ends (a handshake in progress is dropped, a resume's answer is not acted on).
   */
  async close(): Promise<void> {
    this.userClosed = true;
    this.cancelReconnect();
    this.stopKeep();
    if (!this.connected) {
      this.wire?.destroy();
      return;
    }
    const closed = new Promise<void>((resolve) => this.once('close', () => resolve()));
    try {
      await this.request('bye', {}, { timeoutMs: 2000 });
    } catch {
      // closing anyway
    }
    this.wire?.end();
    const t = setTimeout(() => this.wire?.destroy(), 2000);
    await closed;
    clearTimeout(t);
  }

  /** Drops the connection without a goodbye (tests, churn). */
  destroy(): void {
    this.stopKeep();
    this.wire?.destroy();
  }

  private stopKeep(): void {
    if (this.keepTimer) clearTimeout(this.keepTimer);
    this.keepTimer = undefined;
  }

  /** Writes raw bytes to the TCP socket (tests of malformed input). */
  writeRaw(bytes: Buffer): void {
    if (!this.tcpSocket) throw new Error('writeRaw needs a TCP connection');
    this.tcpSocket.write(bytes);
  }

  /** Ends the reconnection: the scheduled step is cleared, a step under way stops at its next await. */
  private cancelReconnect(): void {
    this.reconnectGen++;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
  }

  /**
   * Schedules the reconnection's next step, a new connection or (`resume`) the session's resume
   * again on the connection that is up: after at least `retryAfter`, else the backoff of this
   * attempt with jitter. One at a time: a drop during a reconnection's resume is seen both by the
   * close and by the failed resume, and only the first schedules; a drop while a resume waits
   * replaces it with a connection.
   */
  private scheduleReconnect(retryAfter: number | undefined, step: 'connect' | 'resume' = 'connect'): void {
    if (this.userClosed) return;
    if (this.reconnectTimer) {
      if (!(step === 'connect' && this.reconnectStep === 'resume')) return;
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
    }
    const r = this.options.reconnect || {};
    if (r.maxAttempts !== undefined && this.reconnectAttempt >= r.maxAttempts) {
      this.emit('reconnectFailed');
      return;
    }
    const initial = r.initialDelayMs ?? 500;
    const max = r.maxDelayMs ?? 30000;
    // A refresh in doubt is presented again within the gateway's grace period.
    const backoff = this.refreshDoubt.bound(
      Math.min(max, initial * 2 ** this.reconnectAttempt),
      this.refreshGraceMs,
    );
    const delay = Math.max(retryAfter ?? 0, Math.floor(backoff / 2 + (Math.random() * backoff) / 2));
    this.reconnectAttempt++;
    const gen = this.reconnectGen;
    this.reconnectStep = step;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (gen !== this.reconnectGen || this.userClosed) return;
      void (step === 'connect' ? this.reconnectNow(gen) : this.resumeNow(gen));
    }, delay);
    this.emit('reconnecting', {
      attempt: this.reconnectAttempt,
      delayMs: delay,
      ...(step === 'resume' ? { resume: true } : {}),
    });
  }

  /**
   * One attempt: a connection, then the session's resume. Backoff grows until an attempt has
   * resumed (a handshake alone does not reset it: a gateway that drops every resume is not
   * retried at the initial delay for ever).
   */
  private async reconnectNow(gen: number): Promise<void> {
    try {
      await this.dial();
    } catch (e) {
      if (gen !== this.reconnectGen) return;
      this.emit('reconnectError', e);
      this.scheduleReconnect(undefined);
      return;
    }
    if (gen !== this.reconnectGen) return;
    await this.resumeNow(gen);
  }

  /**
   * The attempt's resume, on the connection that is up. A transient failure keeps the session
   * and tries again; a definitive one drops it and ends the reconnection with `sessionLost`.
   */
  private async resumeNow(gen: number): Promise<void> {
    if (this.session) {
      try {
        await this.resumeSession();
      } catch (e) {
        if (gen !== this.reconnectGen) return;
        this.emit('reconnectError', e);
        // The connection dropped before the answer: the session is as good as before, for the
        // next attempt, which that close has scheduled (or refused: maxAttempts, a terminal kick).
        if (!this.connected) return;
        if (transient(e)) {
          this.scheduleReconnect(isProtocolError(e) ? e.retryAfter : undefined, 'resume');
          return;
        }
        const lost = this.session;
        this.session = undefined;
        this.refreshDoubt.clear();
        this.reconnectAttempt = 0;
        this.emit('sessionLost', { sessionId: lost?.sessionId, error: e });
        return;
      }
      if (gen !== this.reconnectGen) return;
    }
    this.reconnectAttempt = 0;
    this.emit('reconnected', this.session);
  }

  /**
   * Resumes `session` (by default the remembered one, `this.session`, which it becomes) on the
   * connection that is up, as the reconnection does (`resumeSession`), and resolves with the
   * session resumed. For a device that makes a new client for each connection: given the same
   * `refreshDoubt`, each client presents a refresh that an earlier one left in doubt again first.
   * Rejects with the error of the request that failed; the session is kept (updated by a
   * refresh that succeeded), whatever the error.
   */
  async resume(session: Session | undefined = this.session): Promise<Session> {
    if (!session) throw new Error('no session to resume');
    this.session = session;
    await this.resumeSession();
    return this.session ?? session;
  }

  /**
   * Resumes the remembered session, refreshing the access token first if it expired. A refresh
   * that succeeded updates the session before the resume, so a retry resumes with the new token.
   * A refresh of the session's token in doubt (its answer never came) is settled first, whatever
   * the access token: the gateway may have rotated the token, which it takes back only within
   * its grace period; resumed without it, the device would keep a used refresh token and lose
   * the session to `refresh_reused` at its next refresh.
   */
  private async resumeSession(): Promise<void> {
    const s = this.session!;
    if (this.refreshDoubt.holds(s.refresh)) {
      await this.refreshAndResume();
      return;
    }
    try {
      await this.request('resume', { token: s.token });
    } catch (e) {
      if (!(isProtocolError(e) && e.code === 'token_expired' && s.refresh)) throw e;
      await this.refreshAndResume();
    }
  }

  /**
   * Refreshes, then resumes with the new access token. A pair the gateway hands out again (a
   * retry within its grace period, or another connection's refresh of the same token) is the
   * one made when the token was rotated, and its access token may have expired since when
   * access tokens are short-lived; its refresh token is unused: one more refresh gets a pair of
   * now.
   */
  private async refreshAndResume(): Promise<void> {
    for (let again = false; ; again = true) {
      await this.request('refresh', { refresh: this.session!.refresh });
      try {
        await this.request('resume', { token: this.session!.token });
        return;
      } catch (e) {
        if (again || !(isProtocolError(e) && e.code === 'token_expired')) throw e;
      }
    }
  }
}
