/**
 * The gateway node: listeners, the set of live connections, the per-IP limit, the one sweep
 * that drives heartbeats and handshake deadlines, request handler registration, and the
 * shutdown sequence. Services (identity, messaging, delivery) register handlers here and
 * never see a socket.
 */

import uWS from 'uWebSockets.js';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import type { Server as NetServer } from 'node:net';
import { Gauge, Registry } from 'prom-client';
import { type CryptoBackend, type Ed25519Identity, ProtocolError, pack } from '../protocol/index.ts';
import type { Config } from './config.ts';
import {
  Connection,
  type ConnectionHost,
  ConnState,
  type Handler,
  type HandlerOptions,
  type RegisteredHandler,
  type SessionInfo,
  type TransportSocket,
} from './connection.ts';
import { logFailure } from './faults.ts';
import { RouteTable } from './http/routes.ts';
import { type AccessLog, createAccessLog, type Logger } from './log.ts';
import { collectProcessMetrics, GatewayMetrics } from './metrics.ts';
import { listenTcp, type TcpAcceptor } from './transport/tcp.ts';
import { mountWebSocket } from './transport/ws.ts';

/** How long a drain waits for requests in flight to be answered before its `going_away` kicks. */
export interface GatewayOptions {
  config: Config;
  log: Logger;
  backend: CryptoBackend;
  identity: Ed25519Identity;
  fingerprint: string;
  /**
   * Serve `/metrics` on `GW_METRICS_PORT` (default). A worker of a multi-process gateway does
   * not: its supervisor serves the metrics of all workers (gateway/cluster.ts).
   */
  serveMetrics?: boolean;
}

export interface ListeningPorts {
  tcpPort: number;
  httpPort: number;
  metricsPort: number;
  /** Set when the gRPC server is on (GW_GRPC_PORT). */
  grpcPort?: number;
}

/** A hook on a connection's life; a returned promise's rejection is logged (`runHooks`). */
export type ConnectionHook = (conn: Connection) => void | Promise<void>;

/** A connection that started closing is destroyed if its socket lingers this long. */
const CLOSE_GRACE_MS = 2000;

export class Gateway implements ConnectionHost, TcpAcceptor {
  readonly nodeId: string;
  readonly heartbeatMs: number;
  readonly maxFrameBytes: number;
  readonly maxPendingBytes: number;
  readonly rekeyAfterFrames: number;
  readonly frameIntervalMs: number;
  readonly frameBurstMs: number;
  readonly backend: CryptoBackend;
  readonly identity: Ed25519Identity;
  readonly log: Logger;
  readonly app: uWS.TemplatedApp;
  /** Every HTTP route mounted on `app`, for the 404/405/HEAD answers. */
  private readonly routes: RouteTable;
  /** The HTTP access log, written in blocks (`GW_ACCESS_LOG_FLUSH_MS`). */
  private readonly accessLog: AccessLog;
  readonly metrics = new Registry();
  /** The wire's, identity's and HTTP's metrics in `metrics` (gateway/metrics.ts). */
  readonly counters = new GatewayMetrics(this.metrics);
  readonly connections = new Set<Connection>();
  /** Connections read no more for their frame rate: the sweep resumes them (`throttled`). */
  private readonly throttledConnections = new Set<Connection>();
  /** Live connections by session id (for kicks and delivery). */
  /** Connections bound to each session: the connection itself when one (almost always), else a Set. */
  private readonly bySession = new Map<string, Connection | Set<Connection>>();
  /** Stops accepting connections (the drain itself). */
  draining = false;
  /** Shutdown started: `/health/ready` answers 503 from here on, `GW_DRAIN_DELAY_MS` before draining. */
  shuttingDown = false;
  private readonly readinessChecks = new Map<string, () => Promise<string | undefined>>();
  /** Readiness checks whose dependency not answering degrades the node instead (onReadiness). */
  private readonly degradingChecks = new Set<string>();

  private readonly config: Config;
  private readonly handlers = new Map<string, RegisteredHandler>();
  private readonly perIp = new Map<string, number>();
  private readonly closeHooks: ((deadline: number) => Promise<void> | void)[] = [];
  private readonly shutdownHooks: (() => void)[] = [];
  private readonly drainHooks: (() => void)[] = [];
  private readonly closedHooks: ConnectionHook[] = [];
  private readonly boundHooks: ConnectionHook[] = [];
  private readonly unboundHooks: ConnectionHook[] = [];
  private readonly sweepHooks: ((nowMs: number) => void)[] = [];
  /** Set by the delivery service: qos-1 acks from devices. */
  onAck?: (conn: Connection, eids: string[]) => void;
  /** Set by identity: an authenticated request of a session started. */
  onActivity?: (sessionId: string) => void;
  private readonly connectionsOpen: Gauge;
  private tcpServer: NetServer | undefined;
  private listenSocket: uWS.us_listen_socket | undefined;
  private metricsServer: HttpServer | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  /** When the sweep before this one ran (its deadlines are measured there; see `sweep`). */
  private previousSweepMs = Number.NEGATIVE_INFINITY;
  private closing: Promise<void> | undefined;
  private readonly fingerprint: string;
  private readonly serveMetrics: boolean;

  constructor(options: GatewayOptions) {
    const c = options.config;
    this.serveMetrics = options.serveMetrics ?? true;
    this.config = c;
    this.nodeId = c.nodeId;
    this.heartbeatMs = c.heartbeatMs;
    this.maxFrameBytes = c.maxFrameBytes;
    this.maxPendingBytes = c.maxPendingBytes;
    this.rekeyAfterFrames = c.rekeyAfterFrames;
    this.frameIntervalMs = c.framesPerSecond > 0 ? 1000 / c.framesPerSecond : 0;
    this.frameBurstMs = this.frameIntervalMs * c.framesBurst;
    this.backend = options.backend;
    this.identity = options.identity;
    this.fingerprint = options.fingerprint;
    this.log = options.log;
    this.app = uWS.App();
    this.accessLog = createAccessLog(this.log, c.accessLogFlushMs);
    this.routes = new RouteTable(this.app, this.accessLog.log, this.counters);
    collectProcessMetrics(this.metrics);
    this.connectionsOpen = new Gauge({
      name: 'gateway_connections_open',
      help: 'Open device connections by transport.',
      labelNames: ['transport'],
      registers: [this.metrics],
    });
    new Gauge({
      name: 'gateway_crypto_backend_info',
      help: 'The crypto backend in use (value 1).',
      labelNames: ['backend'],
      aggregator: 'max',
      registers: [this.metrics],
    })
      .labels(this.backend.name)
      .set(1);
  }

  // ---- registration by services -----------------------------------------------------------

  /** Registers the handler of a request type (PROTOCOL.md §4). */
  handle(type: string, handler: Handler, options: HandlerOptions = {}): void {
    if (this.handlers.has(type)) throw new Error(`handler for ${type} registered twice`);
    this.handlers.set(type, { fn: handler, pipelined: options.pipelined ?? false });
  }

  handler(type: string): RegisteredHandler | undefined {
    return this.handlers.get(type);
  }

  throttled(conn: Connection): void {
    this.throttledConnections.add(conn);
  }

  onConnectionClosed(hook: ConnectionHook): void {
    this.closedHooks.push(hook);
  }

  /** Runs when a connection becomes authenticated as a session. */
  onSessionBound(hook: ConnectionHook): void {
    this.boundHooks.push(hook);
  }

  /** Runs when a connection stops being its session's (logout, rebind, close); `conn.session` is still set. */
  onSessionUnbound(hook: ConnectionHook): void {
    this.unboundHooks.push(hook);
  }

  /** Runs on every sweep tick (ACK deadlines and the like). */
  onSweep(hook: (nowMs: number) => void): void {
    this.sweepHooks.push(hook);
  }

  /**
   * A check of `/health/ready`: resolves undefined when fine, or a short reason; a rejection
   * or no answer within `GW_READY_TIMEOUT_MS` is not ready either, unless `degrades`: then its
   * dependency not answering leaves the node ready and names the check under `degraded` (a
   * reason it resolves still fails readiness).
   */
  onReadiness(
    name: string,
    check: () => Promise<string | undefined>,
    options: { degrades?: boolean } = {},
  ): void {
    this.readinessChecks.set(name, check);
    if (options.degrades) this.degradingChecks.add(name);
    else this.degradingChecks.delete(name);
  }

  /** Runs when a shutdown starts, as `/health/ready` turns 503 (before `GW_DRAIN_DELAY_MS`). */
  onShutdown(hook: () => void): void {
    this.shutdownHooks.push(hook);
  }

  /** Runs when the gateway stops accepting (after `GW_DRAIN_DELAY_MS`): other listeners close too. */
  onDrain(hook: () => void): void {
    this.drainHooks.push(hook);
  }

  /**
   * Runs at shutdown after every connection is gone, in registration order, with the drain's
   * deadline (ms, `GW_SHUTDOWN_TIMEOUT_MS` after it started): work it may retry stops there.
   */
  onClose(hook: (deadline: number) => Promise<void> | void): void {
    this.closeHooks.push(hook);
  }

  // ---- sessions ----------------------------------------------------------------------------

  /** The connections of this node bound to a session (a copy: kicking them unbinds them). */
  connectionsOf(sessionId: string): Connection[] {
    const held = this.bySession.get(sessionId);
    return !held ? [] : held instanceof Set ? [...held] : [held];
  }

  /**
   * Authenticates the connection as `session`; false, and nothing done, when the connection is
   * already closing or closed (a login or resume answered after its client went): its close
   * has unbound it for the last time, so a binding made now would stay, online, for good.
   */
  bindSession(conn: Connection, session: SessionInfo): boolean {
    if (conn.state >= ConnState.closing) return false;
    if (conn.session) this.unbindSession(conn);
    conn.session = session;
    const held = this.bySession.get(session.sessionId);
    if (!held) this.bySession.set(session.sessionId, conn);
    else if (held instanceof Set) held.add(conn);
    else if (held !== conn) this.bySession.set(session.sessionId, new Set([held, conn]));
    this.runHooks(this.boundHooks, conn, 'bound');
    return true;
  }

  /** The connection is no longer authenticated as its session. */
  unbindSession(conn: Connection): void {
    const sid = conn.session?.sessionId;
    if (!sid) return;
    const held = this.bySession.get(sid);
    if (held === conn) this.bySession.delete(sid);
    else if (held instanceof Set) {
      held.delete(conn);
      if (held.size === 1) this.bySession.set(sid, held.values().next().value as Connection);
    }
    this.runHooks(this.unboundHooks, conn, 'unbound');
    conn.session = undefined;
  }

  // ---- ConnectionHost / acceptor -----------------------------------------------------------

  accept(transport: TransportSocket): Connection | null {
    const ip = transport.ip;
    const limit = this.config.maxConnPerIp;
    const count = this.perIp.get(ip) ?? 0;
    if (this.draining || (limit > 0 && count >= limit)) {
      const err = this.draining
        ? new ProtocolError('overloaded', 'gateway is shutting down', { fatal: true, retryAfter: 1000 })
        : new ProtocolError('conn_limit', `at most ${limit} connection(s) per address`);
      const body = pack({ type: 'error', code: err.code, message: err.message, fatal: true });
      const frame = Buffer.allocUnsafe(transport.headroom + body.length);
      body.copy(frame, transport.headroom);
      if (transport.headroom === 4) frame.writeUInt32BE(body.length, 0);
      transport.write(frame);
      transport.end();
      return null;
    }
    this.perIp.set(ip, count + 1);
    this.counters.accepted.labels(transport.kind).inc();
    const conn = new Connection(this, transport, Date.now());
    this.connections.add(conn);
    this.connectionsOpen.labels(transport.kind).inc();
    return conn;
  }

  connectionClosed(conn: Connection): void {
    if (!this.connections.delete(conn)) return;
    this.connectionsOpen.labels(conn.transport.kind).dec();
    const ip = conn.ip;
    const n = (this.perIp.get(ip) ?? 1) - 1;
    if (n <= 0) this.perIp.delete(ip);
    else this.perIp.set(ip, n);
    this.unbindSession(conn);
    this.runHooks(this.closedHooks, conn, 'closed');
  }

  /**
   * Runs connection hooks; a hook that throws or whose promise rejects (a Redis error, say) is
   * logged and never ends the process or stops the hooks after it.
   */
  private runHooks(hooks: ConnectionHook[], conn: Connection, hook: string): void {
    for (const h of hooks) {
      try {
        const r = h(conn);
        if (r) r.catch((e) => this.hookFailed(e, hook, conn));
      } catch (e) {
        this.hookFailed(e, hook, conn);
      }
    }
  }

  private runLifecycleHooks(hooks: (() => void)[], hook: string): void {
    for (const h of hooks) {
      try {
        h();
      } catch (e) {
        logFailure(this.log, e, { hook }, 'shutdown hook failed');
      }
    }
  }

  private hookFailed(e: unknown, hook: string, conn: Connection): void {
    logFailure(
      this.log,
      e,
      { hook, conn: conn.id, sessionId: conn.session?.sessionId },
      'session hook failed',
    );
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  async start(): Promise<ListeningPorts> {
    const c = this.config;
    const live = (res: uWS.HttpResponse) => {
      res.cork(() => {
        res.writeHeader('content-type', 'application/json').end(JSON.stringify(this.health()));
      });
    };
    this.app.get('/health/live', live);
    this.app.get('/healthz', live);
    this.app.get('/health/ready', (res) => {
      let aborted = false;
      res.onAborted(() => {
        aborted = true;
      });
      this.readiness().then((r) => {
        if (aborted) return;
        res.cork(() => {
          res.writeStatus(r.ready ? '200 OK' : '503 Service Unavailable');
          res.writeHeader('content-type', 'application/json');
          res.writeHeader('cache-control', 'no-store');
          if (!r.ready) res.writeHeader('retry-after', '1');
          res.end(JSON.stringify(r.body));
        });
      });
    });
    mountWebSocket(this.app, this, '/ws', this.config.trustedProxies);
    this.routes.mountFallback(this.app);
    this.tcpServer = await listenTcp(this, c.host, c.tcpPort);
    const httpPort = await new Promise<number>((resolve, reject) => {
      this.app.listen(c.host, c.httpPort, (token) => {
        if (!token) reject(new Error(`cannot listen on HTTP ${c.host}:${c.httpPort}`));
        else {
          this.listenSocket = token;
          resolve(uWS.us_socket_local_port(token as unknown as uWS.us_socket));
        }
      });
    });
    if (this.serveMetrics) {
      const metricsServer = createHttpServer((req, res) => {
        if (req.url !== '/metrics') {
          res.writeHead(404).end();
          return;
        }
        this.metrics.metrics().then(
          (text) => res.writeHead(200, { 'content-type': this.metrics.contentType }).end(text),
          () => res.writeHead(500).end(),
        );
      });
      this.metricsServer = metricsServer;
      await new Promise<void>((resolve, reject) => {
        metricsServer.once('error', reject);
        metricsServer.listen(c.metricsPort, c.host, () => resolve());
      });
    }
    const sweepMs = Math.max(20, Math.min(250, Math.floor(this.heartbeatMs / 4)));
    this.sweepTimer = setInterval(() => this.sweep(Date.now()), sweepMs);
    const tcpAddr = this.tcpServer.address();
    const metricsAddr = this.metricsServer?.address();
    return {
      tcpPort: typeof tcpAddr === 'object' && tcpAddr ? tcpAddr.port : c.tcpPort,
      httpPort,
      metricsPort: typeof metricsAddr === 'object' && metricsAddr ? metricsAddr.port : c.metricsPort,
    };
  }

  /**
   * `/health/ready`: not while shutting down, and only when every readiness check (Redis,
   * PostgreSQL, migrations: registered by the services) passes within `GW_READY_TIMEOUT_MS`
   * (or `ms`).
   */
  async readiness(
    ms = this.config.readyTimeoutMs,
  ): Promise<{ ready: boolean; body: Record<string, unknown> }> {
    const checks: Record<string, string> = {};
    /** Checks whose dependency did not answer (a rejection or the deadline), not a reason. */
    const unanswered = new Set<string>();
    await Promise.all(
      [...this.readinessChecks].map(async ([name, check]) => {
        let timer: NodeJS.Timeout | undefined;
        const timeout = new Promise<string>((resolve) => {
          timer = setTimeout(() => {
            unanswered.add(name);
            resolve(`no answer within ${ms} ms`);
          }, ms);
        });
        const outcome = check().then(
          (problem) => problem ?? 'ok',
          (e: unknown) => {
            unanswered.add(name);
            return (e as Error)?.message ?? String(e);
          },
        );
        checks[name] = await Promise.race([outcome, timeout]);
        clearTimeout(timer);
      }),
    );
    const notOk = Object.keys(checks).filter((k) => checks[k] !== 'ok');
    const degraded = notOk.filter((k) => this.degradingChecks.has(k) && unanswered.has(k));
    const failing = notOk.filter((k) => !degraded.includes(k));
    const shuttingDown = this.shuttingDown;
    const ready = !shuttingDown && failing.length === 0;
    return {
      ready,
      body: {
        status: ready ? 'ready' : shuttingDown ? 'draining' : 'not_ready',
        node: this.nodeId,
        ...(failing.length ? { failing } : {}),
        ...(degraded.length ? { degraded } : {}),
        checks,
      },
    };
  }

  health(): Record<string, unknown> {
    return {
      status: this.shuttingDown ? 'draining' : 'ok',
      node: this.nodeId,
      crypto: this.backend.name,
      fingerprint: this.fingerprint,
      connections: this.connections.size,
      pid: process.pid,
      uptimeSeconds: Math.round(process.uptime()),
    };
  }

  /**
   * The one timer over all connections (STYLE.md §4): handshake deadlines, pings every `hb`,
   * `heartbeat_timeout` after 2×`hb` of silence (PROTOCOL.md §6), lingering closes.
   *
   * A connection is closed for its silence (or its handshake for its deadline) only when it
   * was already past the deadline at the previous sweep too, and nothing arrived since. Between
   * two callbacks of the sweep's `setInterval` the event loop always runs a poll phase, which
   * reads the sockets: Node's `listOnTimeout` (lib/internal/timers.js) runs an interval at most
   * once per timers phase (it is put back with `_idleStart` = the phase's `now`, so it is not
   * due again in it), and each iteration of libuv's `uv_run` (1.46, Node 20's) polls I/O
   * between two runs of its timers. Without this, a node whose loop stalled past 2×`hb` (a
   * long GC pause, a long synchronous callback, the process descheduled) ran the sweep right
   * after, in the timers phase before that poll, and kicked every device whose pongs and
   * requests sat unread in its socket: a mass kick and a reconnect storm of the node's own
   * making. A device that is silent for real is closed one sweep later than the deadline (at
   * most `min(hb/4, 250 ms)`), never before it. Taken at the earlier of the two sweeps, so
   * that a clock set back does not bring a deadline forward. No state per connection: each
   * one's last read (`lastRxMs`) is after the previous sweep if anything came since. The
   * shutdown's loop sweeps too, by then with every open connection kicked.
   */
  sweep(now: number): void {
    const hb = this.heartbeatMs;
    const previous = Math.min(now, this.previousSweepMs);
    this.previousSweepMs = now;
    const handshakeDeadline = previous - this.config.handshakeTimeoutMs;
    const silentSince = previous - 2 * hb;
    for (const conn of this.connections) {
      switch (conn.state) {
        case ConnState.handshake:
          if (conn.openedAtMs <= handshakeDeadline) {
            this.counters.handshakes.labels('timeout').inc();
            conn.sendError(new ProtocolError('handshake_required', 'handshake timed out'), undefined);
            conn.close();
          }
          break;
        case ConnState.open:
          // (A connection read no more for its frame rate is not silent: what it sent waits.)
          if (conn.lastRxMs <= silentSince && !conn.throttled) {
            conn.kick('heartbeat_timeout', `nothing received for ${2 * hb} ms`);
          } else if (now - conn.lastPingMs >= hb) {
            conn.lastPingMs = now;
            conn.send({ type: 'ping', ts: now });
          }
          break;
        case ConnState.closing:
          if (now - conn.closingSinceMs > CLOSE_GRACE_MS) conn.destroy();
          break;
      }
    }
    for (const conn of this.throttledConnections) {
      if (conn.unthrottle(now)) this.throttledConnections.delete(conn);
    }
    for (const hook of this.sweepHooks) {
      try {
        hook(now);
      } catch (e) {
        logFailure(this.log, e, {}, 'sweep hook failed');
      }
    }
  }

  /**
   * Graceful shutdown, in order: stop accepting, kick every connection with `going_away` and a
   * randomised `retryAfter`, wait for them to close (bounded), run the close hooks. Idempotent.
   */
  shutdown(): Promise<void> {
    this.closing ??= this.runShutdown();
    return this.closing;
  }

  private async runShutdown(): Promise<void> {
    const deadline = Date.now() + this.config.shutdownTimeoutMs;
    this.shuttingDown = true;
    this.runLifecycleHooks(this.shutdownHooks, 'shutdown');
    // Load balancers see /health/ready fail and stop sending new clients; the devices
    // connected meanwhile are served and drained with the rest.
    const delay = Math.min(this.config.drainDelayMs, Math.max(0, this.config.shutdownTimeoutMs - 1000));
    if (delay > 0) {
      this.log.info({ drainDelayMs: delay }, 'not ready; draining after the delay');
      await new Promise((r) => setTimeout(r, delay));
    }
    this.draining = true;
    this.runLifecycleHooks(this.drainHooks, 'drain');
    this.tcpServer?.close();
    if (this.listenSocket) uWS.us_listen_socket_close(this.listenSocket);
    // Requests already taken are answered before the kick (their effects happen either way, and
    // a client that saw no answer would repeat them): at most GW_DRAIN_SETTLE_MS, within the deadline.
    const settleUntil = Math.min(Date.now() + this.config.drainSettleMs, deadline - 1000);
    while (Date.now() < settleUntil && [...this.connections].some((c) => c.busy)) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const jitter = this.config.reconnectJitterMs;
    this.log.info({ code: 'going_away', connections: this.connections.size }, 'kick');
    for (const conn of this.connections) {
      if (conn.state === ConnState.open) {
        conn.kick('going_away', 'gateway shutting down', Math.floor(Math.random() * (jitter + 1)));
      } else conn.close();
    }
    while (this.connections.size > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
      this.sweep(Date.now());
    }
    for (const conn of this.connections) conn.destroy();
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    for (const hook of this.closeHooks) {
      try {
        await hook(deadline);
      } catch (e) {
        this.log.error({ err: e }, 'shutdown step failed');
      }
    }
    await new Promise<void>((resolve) =>
      this.metricsServer ? this.metricsServer.close(() => resolve()) : resolve(),
    );
    this.flushLogs();
  }

  /** Writes out the access lines held (shutdown, and the process's exit however it comes). */
  flushLogs(): void {
    this.accessLog.flush();
  }
}
