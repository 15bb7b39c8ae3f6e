/**
 * One virtual device: a GatewayClient (the reference client, as any device would use it) with
 * the behaviour of the simulation: register + login the first time, resume after a drop,
 * acks (or withholds them, with a probability), publishes, rooms, churn. A new client for each
 * connection; what must outlive one (a refresh left in doubt) is kept here and handed to the next.
 */
import {
  type CloseInfo,
  DEFAULT_REFRESH_GRACE_MS,
  GatewayClient,
  RefreshDoubt,
  type Session,
  TRANSIENT_RESUME_ERRORS,
} from '../../client/client.ts';
import { type EventMsg, isProtocolError } from '../../protocol/index.ts';
import type { Ledger } from './ledger.ts';
import { errorCode, type RunMetrics } from './metrics.ts';
import type { Rng } from './rng.ts';

export const PASSWORD = 'sim-device-password';

/** Errors after which a device stops (counted once, not retried). */
const PERMANENT = new Set(['invalid_credentials', 'forbidden']);
/** Longest wait a device accepts from a `retryAfter` (ms). */
const MAX_RETRY_AFTER_MS = 30_000;

export interface DeviceContext {
  readonly ledger: Ledger;
  readonly metrics: RunMetrics;
  readonly helloChunks: number;
  readonly pinnedFingerprint?: string;
  /** Probability of not acking one receipt of a qos-1 event. */
  readonly noAckProb: number;
  /**
   * The gateway's refresh grace period (its `GW_REFRESH_GRACE_SECONDS`), ms; default 30 000.
   * While a refresh is in doubt, a device's retries come at most a quarter of it apart.
   */
  readonly refreshGraceMs?: number;
  /** Refresh while connected, keeping the session (the client's `keepSession`); default true. */
  readonly keepSession?: boolean;
  /** Room this device joins after authenticating, if any. */
  room(index: number): string | undefined;
  /** Milliseconds on the run's clock (the producer uses the same one). */
  now(): number;
  /** False once the run stops: no reconnect, no new work. */
  running(): boolean;
  /** False while draining: every receipt is acked. */
  mayWithholdAcks(): boolean;
}

export class VirtualDevice {
  client: GatewayClient | undefined;
  session: Session | undefined;
  online = false;
  /** Logged in or resumed on the current connection. */
  private authed = false;
  private registered = false;
  /** Registers sent so far without a success: a later `username_taken` may be one of them made. */
  private registerTries = 0;
  /** A retried register found the name taken: counted when the login tells whose it is. */
  private takenOnRetry = false;
  /** What the current (re)connection is doing: the step its errors are counted under. */
  private step = 'connect';
  private dropping = false;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private failures = 0;
  /** The wait the gateway asked for with its last error (ms), for the next retry. */
  private retryAfterMs = 0;
  /** Set after a permanent error: the device does not reconnect. */
  private gaveUp = false;
  private pendingAcks: string[] = [];
  private ackScheduled = false;
  /** Resolves when the current connection attempt settles (started, stopped or given up). */
  private attempt: Promise<void> | undefined;
  /**
   * A refresh left in doubt (timed out, its connection closed before the answer, or answered
   * `overloaded`/`internal`: the gateway may have rotated the token), given to every connection's
   * client: the next resume presents it again first (`GatewayClient.resume`), and the retry
   * comes within a quarter of the grace period (`retryLater`).
   */
  private readonly refreshDoubt = new RefreshDoubt();

  constructor(
    readonly index: number,
    readonly username: string,
    readonly url: string,
    /** The device's own random stream (acks, churn, backoff). */
    readonly rng: Rng,
    private readonly ctx: DeviceContext,
  ) {}

  get deviceId(): string {
    return `${this.username}-dev`;
  }

  /** Connects (and registers/logs in or resumes); failures are counted and retried. */
  start(): Promise<void> {
    this.attempt = this.connectOnce();
    return this.attempt;
  }

  private async connectOnce(): Promise<void> {
    const { ctx } = this;
    const m = ctx.metrics;
    const c = new GatewayClient({
      url: this.url,
      autoAck: false,
      helloChunks: ctx.helloChunks,
      connectTimeoutMs: 15000,
      requestTimeoutMs: 20000,
      clientName: 'gateway-sim/0.1',
      refreshDoubt: this.refreshDoubt,
      keepSession: ctx.keepSession !== false,
      ...(ctx.pinnedFingerprint ? { pinnedFingerprint: ctx.pinnedFingerprint } : {}),
    });
    this.client = c;
    const t0 = ctx.now();
    let tOpen = 0;
    c.once('transportOpen', () => {
      tOpen = ctx.now();
      m.connect.record(tOpen - t0);
    });
    c.on('event', (ev: EventMsg) => this.onEvent(ev));
    c.on('refreshed', () => m.refreshes++);
    c.on('serverError', (e) => m.error(errorCode(e), 'server'));
    c.on('protocolError', () => m.error('protocol_error', 'protocol'));
    c.on('close', (info: CloseInfo) => this.onClose(c, info));
    this.step = 'connect';
    try {
      await c.connect();
      m.handshake.record(ctx.now() - (tOpen || t0));
      this.online = true;
      m.connected++;
      if (this.session) await this.resume(c);
      else await this.signIn(c);
      this.authed = true;
      m.authenticated++;
      this.failures = 0;
      const room = ctx.room(this.index);
      this.step = 'join';
      if (room) await c.request('join', { room });
    } catch (e) {
      const code = errorCode(e);
      m.error(code, this.step);
      if (c !== this.client) return;
      // Another account holds this name or device id: retrying cannot help.
      if (PERMANENT.has(code)) this.gaveUp = true;
      // `overloaded` / `rate_limited` say when to come back (ms): heed it, within a bound.
      const retryAfter = isProtocolError(e) ? e.retryAfter : undefined;
      if (retryAfter !== undefined) this.retryAfterMs = Math.min(retryAfter, MAX_RETRY_AFTER_MS);
      if (this.online) {
        // The close handler schedules the retry; the error is already counted.
        this.dropping = true;
        c.destroy();
      } else this.retryLater();
    }
  }

  private async signIn(c: GatewayClient): Promise<void> {
    const { ctx } = this;
    // An earlier register whose answer was lost (the connection dropped under it, or a fault
    // after its commit) may have made the account: `username_taken` then, and the login below
    // tells whether the account is this device's. Such a retry is not an error.
    if (!this.registered) {
      this.step = 'register';
      const retried = this.registerTries++ > 0;
      const t = ctx.now();
      try {
        await c.request('register', {
          username: this.username,
          email: `${this.username}@sim.example`,
          password: PASSWORD,
        });
        ctx.metrics.register.record(ctx.now() - t);
      } catch (e) {
        if (!isProtocolError(e) || e.code !== 'username_taken') throw e;
        if (retried) this.takenOnRetry = true;
        else ctx.metrics.error(e.code, 'register');
      }
      this.registered = true;
    }
    this.step = 'login';
    const t = ctx.now();
    try {
      this.session = await c.request<Session>('login', {
        username: this.username,
        password: PASSWORD,
        device: { id: this.deviceId, model: 'sim' },
      });
    } catch (e) {
      // Not this device's account after all: the taken name was an error.
      if (this.takenOnRetry && isProtocolError(e) && e.code === 'invalid_credentials') {
        this.takenOnRetry = false;
        ctx.metrics.error('username_taken', 'register');
      }
      throw e;
    }
    if (this.takenOnRetry) {
      this.takenOnRetry = false;
      ctx.metrics.registersFoundMade++;
    }
    ctx.metrics.login.record(ctx.now() - t);
  }

  /**
   * The client's resume of the session: a refresh left in doubt by an earlier connection first,
   * else `resume`, and `refresh` then `resume` when the access token expired. A refresh that
   * succeeded updates `this.session` (the object the client was given) even if the resume fails.
   */
  private async resume(c: GatewayClient): Promise<void> {
    const { ctx } = this;
    const s = this.session!;
    if (this.refreshDoubt.holds(s.refresh)) ctx.metrics.refreshesInDoubt++;
    this.step = 'resume';
    const t = ctx.now();
    try {
      this.session = await c.resume(s);
    } catch (e) {
      // Refused for good (revoked, ended, a refresh token reused, a token the gateway does not
      // take): the session is gone, and the next attempt logs in again, as a device would.
      // Before, the device presented the dead session on every retry for the rest of the run.
      if (isProtocolError(e) && !TRANSIENT_RESUME_ERRORS.has(e.code)) {
        this.session = undefined;
        this.refreshDoubt.clear();
        ctx.metrics.sessionsLost++;
      }
      throw e;
    }
    ctx.metrics.resume.record(ctx.now() - t);
    ctx.metrics.reconnects++;
  }

  private onEvent(ev: EventMsg): void {
    const { ctx } = this;
    if (ev.qos !== 1) {
      if (ev.name === 'room.message') ctx.metrics.roomMessages++;
      return;
    }
    const t = ctx.now();
    ctx.ledger.received(ev.eid, ev.attempt ?? 1, this.index, t);
    if (ctx.mayWithholdAcks() && this.rng() < ctx.noAckProb) return;
    ctx.ledger.acked(ev.eid, t);
    this.pendingAcks.push(ev.eid);
    if (!this.ackScheduled) {
      // One ack message for the events of one tick.
      this.ackScheduled = true;
      setImmediate(() => this.flushAcks());
    }
  }

  private flushAcks(): void {
    this.ackScheduled = false;
    const eids = this.pendingAcks;
    this.pendingAcks = [];
    if (eids.length === 0 || !this.client?.isOpen) return;
    try {
      this.client.ack(eids);
    } catch (e) {
      this.ctx.metrics.error(errorCode(e), 'ack');
    }
  }

  private onClose(c: GatewayClient, info: CloseInfo): void {
    if (c !== this.client) return;
    const m = this.ctx.metrics;
    if (this.online) {
      this.online = false;
      m.connected--;
    }
    if (this.authed) {
      this.authed = false;
      m.authenticated--;
    }
    const dropped = this.dropping;
    this.dropping = false;
    if (!dropped && !info.byClient) m.error(info.code ?? 'closed_by_server', 'connection');
    if (info.byClient) return;
    const wait = info.retryAfter !== undefined ? Math.min(info.retryAfter, 5000) : undefined;
    this.retryLater(wait);
  }

  private retryLater(delayMs?: number): void {
    if (!this.ctx.running() || this.gaveUp) return;
    this.failures++;
    // Backoff on repeated failures, jittered from the device's own stream; a retryAfter the
    // gateway gave is a floor. While a refresh is in doubt, at most a quarter of the grace
    // period: it is presented again while the gateway still gives its pair back.
    const told = Math.max(delayMs ?? 0, this.retryAfterMs);
    this.retryAfterMs = 0;
    const backoff = this.refreshDoubt.bound(
      Math.min(5000, 100 * 2 ** Math.min(this.failures, 6)),
      this.ctx.refreshGraceMs ?? DEFAULT_REFRESH_GRACE_MS,
    );
    const delay =
      told > 0
        ? told + Math.round(this.rng() * Math.min(1000, told / 4))
        : Math.round(backoff / 2 + (this.rng() * backoff) / 2);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (this.ctx.running()) void this.start();
    }, delay);
  }

  /** Churn: drops the connection without a goodbye; the device resumes shortly after. */
  drop(): void {
    if (!this.online || !this.client) return;
    this.ctx.metrics.churns++;
    this.dropping = true;
    this.client.destroy();
  }

  /** The session the producer addresses (it survives drops: resume keeps it). */
  get target(): string | undefined {
    return this.session?.sessionId;
  }

  get ready(): boolean {
    return this.authed;
  }

  async publish(name: string, data: unknown): Promise<void> {
    const c = this.client!;
    const t = this.ctx.now();
    try {
      await c.request('publish', { name, data });
      this.ctx.metrics.devicePublish.record(this.ctx.now() - t);
      this.ctx.metrics.devicePublishes++;
    } catch (e) {
      this.ctx.metrics.error(errorCode(e), 'publish');
    }
  }

  async say(body: string): Promise<void> {
    const room = this.ctx.room(this.index);
    if (!room) return;
    try {
      await this.client!.request('say', { room, body });
      this.ctx.metrics.says++;
    } catch (e) {
      this.ctx.metrics.error(errorCode(e), 'say');
    }
  }

  /** Ends the device: `bye` when connected, then close; no reconnect follows. */
  async stop(): Promise<void> {
    clearTimeout(this.reconnectTimer);
    await this.attempt?.catch(() => undefined);
    const c = this.client;
    if (!c) return;
    this.flushAcks();
    await c.close().catch(() => c.destroy());
  }
}
