/**
 * The gateway's own Prometheus metrics that are not a single service's: the wire (handshakes,
 * frames, bytes, errors sent, kicks), identity results and HTTP requests. Labels are of bounded
 * cardinality only: a transport, a result or error code, a route pattern, a status; never a
 * device, user or session id.
 *
 * Per-frame figures are plain integers bumped on the hot path and read by prom-client at
 * scrape time (`collect`), so a frame costs an addition, not a label lookup.
 */
import type { Redis } from 'ioredis';
import { Counter, collectDefaultMetrics, Histogram, type Registry } from 'prom-client';
import { settledWithin } from './wait.ts';

/**
 * Node.js's process metrics (prom-client's defaults) on `registry`, less the gauges named like
 * counters that promtool rejects (their per-type twins stay).
 */
export function collectProcessMetrics(registry: Registry): void {
  collectDefaultMetrics({ register: registry });
  for (const name of [
    'nodejs_active_handles_total',
    'nodejs_active_requests_total',
    'nodejs_active_resources_total',
  ]) {
    registry.removeSingleMetric(name);
  }
}

/**
 * A counter whose value lives in plain numbers bumped on a hot path, read into it at each
 * scrape (`read` sets it from them after a reset): prom-client's `inc` makes a label hash, or an
 * empty labels object, per call.
 */
export function counterReadAtScrape<L extends string = string>(o: {
  name: string;
  help: string;
  labelNames?: L[];
  registers: Registry[];
  read: (c: Counter<L>) => void;
}): Counter<L> {
  const { read, ...config } = o;
  return new Counter<L>({
    ...config,
    labelNames: config.labelNames ?? [],
    collect() {
      this.reset();
      read(this);
    },
  });
}

/**
 * The longest a scrape waits for a figure read from a dependency (Redis, a readiness check) at
 * collect time. A supervisor of several processes gives each 2 s to answer (gateway/cluster.ts):
 * a collect that waited on a hung Redis for `GW_REDIS_TIMEOUT_MS` (3 s) lost the whole process
 * from the scrape, its `gateway_dependency_up` and `gateway_ready` with it.
 */
export const COLLECT_WAIT_MS = 1000;

/**
 * A figure read from a dependency at scrape without holding the scrape: the returned collect
 * starts `read` (one at a time) and waits for it at most `waitMs`; `apply` sets the metric when
 * the read answers, so a late answer serves the next scrape and a scrape meanwhile shows the
 * last one. A read that fails leaves the last figures (gateway_dependency_up says why).
 */
export function readAtScrape<T>(
  read: () => Promise<T>,
  apply: (value: T) => void,
  waitMs = COLLECT_WAIT_MS,
): () => Promise<void> {
  let pending: Promise<void> | undefined;
  return async () => {
    pending ??= read()
      .then(apply, () => {})
      .finally(() => {
        pending = undefined;
      });
    await settledWithin(pending, waitMs);
  };
}

/** Totals bumped per frame by connections; exported at scrape. */
export interface WireTotals {
  framesIn: number;
  framesOut: number;
  bytesIn: number;
  bytesOut: number;
  decryptFailures: number;
  /** Times a connection's reading was paused for its frame rate (GW_FRAMES_PER_SECOND). */
  throttles: number;
}

export class GatewayMetrics {
  readonly wire: WireTotals = {
    framesIn: 0,
    framesOut: 0,
    bytesIn: 0,
    bytesOut: 0,
    decryptFailures: 0,
    throttles: 0,
  };
  readonly accepted: Counter<'transport'>;
  readonly handshakes: Counter<'result'>;
  readonly handshakeSeconds: Histogram;
  readonly errorsSent: Counter<'code'>;
  readonly kicks: Counter<'code'>;
  readonly auth: Counter<'operation' | 'result'>;
  readonly authFailures: Counter<'reason'>;
  readonly lockouts: Counter;
  readonly sessionsExpired: Counter;
  readonly auditEndsSwept: Counter;
  readonly auditRowsChecked: Counter;
  readonly sessionsLostEnded: Counter;
  readonly sessionsResurrected: Counter;
  readonly httpRequests: Counter<'method' | 'route' | 'status'>;
  readonly httpSeconds: Histogram<'method' | 'route'>;
  readonly redisSeconds: Histogram<'client' | 'result'>;
  readonly postgresSeconds: Histogram<'result'>;
  readonly listRequests: Counter<'list'>;
  readonly listReads: Counter<'list'>;

  constructor(registry: Registry) {
    const registers = [registry];
    const wire = this.wire;
    const collected = (name: string, help: string, read: (c: Counter<'direction'>) => void) =>
      counterReadAtScrape({ name, help, labelNames: ['direction'], registers, read });
    collected('gateway_frames_total', 'Frames received (in) and sent (out), handshake included.', (c) => {
      c.labels('in').inc(wire.framesIn);
      c.labels('out').inc(wire.framesOut);
    });
    collected('gateway_bytes_total', 'Frame bytes received (in) and sent (out).', (c) => {
      c.labels('in').inc(wire.bytesIn);
      c.labels('out').inc(wire.bytesOut);
    });
    counterReadAtScrape({
      name: 'gateway_decrypt_failures_total',
      help: 'Frames that failed to open (replayed, reordered, skipped or forged): decrypt_failed.',
      registers,
      read: (c) => c.inc(wire.decryptFailures),
    });
    counterReadAtScrape({
      name: 'gateway_connection_throttles_total',
      help: 'Times a TCP connection was read no more until its frame budget was back (GW_FRAMES_PER_SECOND).',
      registers,
      read: (c) => c.inc(wire.throttles),
    });
    this.accepted = new Counter({
      name: 'gateway_connections_accepted_total',
      help: 'Connections accepted, by transport (refused ones are not counted).',
      labelNames: ['transport'],
      registers,
    });
    this.handshakes = new Counter({
      name: 'gateway_handshakes_total',
      help: 'Handshakes by result: ok, or the error code that ended them.',
      labelNames: ['result'],
      registers,
    });
    this.handshakeSeconds = new Histogram({
      name: 'gateway_handshake_duration_seconds',
      help: 'From the connection opening to the welcome sent.',
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10],
      registers,
    });
    this.errorsSent = new Counter({
      name: 'gateway_errors_sent_total',
      help: 'Errors sent to devices, by code (PROTOCOL.md §7).',
      labelNames: ['code'],
      registers,
    });
    this.kicks = new Counter({
      name: 'gateway_kicks_total',
      help: 'Connections closed with a kick, by reason (heartbeat_timeout counts silent devices).',
      labelNames: ['code'],
      registers,
    });
    this.auth = new Counter({
      name: 'gateway_auth_total',
      help: 'Identity operations (login, register, refresh, otp_send) by result: ok or the error code.',
      labelNames: ['operation', 'result'],
      registers,
    });
    this.authFailures = new Counter({
      name: 'auth_failures_total',
      help: 'Failed authentications by reason (the error code), as the RealChat auth service counts them.',
      labelNames: ['reason'],
      registers,
    });
    this.lockouts = new Counter({
      name: 'gateway_lockouts_total',
      help: 'Accounts locked by failed logins.',
      registers,
    });
    this.sessionsExpired = new Counter({
      name: 'gateway_sessions_expired_total',
      help: 'Sessions this node ended because their life (SESSION_TTL from the login, or the last resume or refresh) ran out: found by the cluster-wide sweep, which runs on one node at a time.',
      registers,
    });
    this.auditEndsSwept = new Counter({
      name: 'gateway_session_ends_swept_total',
      help: 'Session ends whose audit row the cluster-wide sweep wrote on this node because the node that ended them did not (it died first, or could not reach PostgreSQL for longer than GW_PRESENCE_STALE_MS).',
      registers,
    });
    this.auditRowsChecked = new Counter({
      name: 'gateway_audit_rows_checked_total',
      help: "Open session audit rows the cluster-wide sweep checked on this node against Redis (GW_AUDIT_CHECK_BATCH a sweep): a row whose session is gone from Redis with no end recorded is ended 'lost'.",
      registers,
    });
    this.sessionsLostEnded = new Counter({
      name: 'gateway_sessions_lost_total',
      help: "Open session audit rows the cluster-wide sweep ended 'lost' on this node: their sessions were gone from Redis with no end recorded (Redis lost them: a restart without persistence, a failover, a rollback; or a node died before it settled a failed login).",
      registers,
    });
    this.sessionsResurrected = new Counter({
      name: 'gateway_sessions_resurrected_total',
      help: 'Live sessions in Redis whose audit row says they ended, ended again on this node, found by the cluster-wide sweep or by their first resume, refresh or access token use: brought back by a Redis rolled back (restored from a backup, a failover to a replica behind). Their connections are kicked session_revoked and their tokens refused again.',
      registers,
    });
    this.listRequests = new Counter({
      name: 'gateway_list_requests_total',
      help: 'Requests for a list that grows with the fleet, within the per-session limit (GW_LIST_PER_MINUTE), by list: users, users_room (users of a room), rooms, sessions (GET /auth/user/sessions included).',
      labelNames: ['list'],
      registers,
    });
    this.listReads = new Counter({
      name: 'gateway_list_reads_total',
      help: 'Reads of those lists from Redis, by list. Requests that come while a read of the same list is out share the next read: a fleet asking together shows many requests and few reads.',
      labelNames: ['list'],
      registers,
    });
    this.httpRequests = new Counter({
      name: 'http_requests_total',
      help: 'HTTP requests by method, route pattern and status.',
      labelNames: ['method', 'route', 'status'],
      registers,
    });
    this.httpSeconds = new Histogram({
      name: 'http_request_duration_seconds',
      help: 'HTTP request duration by method and route pattern.',
      labelNames: ['method', 'route'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers,
    });
    // Round trips as the gateway sees them: sent to answered, the server's queue included.
    const roundTrip = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5];
    this.redisSeconds = new Histogram({
      name: 'gateway_redis_command_duration_seconds',
      help: 'Redis commands (a script call is one) from sent to answered, by connection and result (ok, error).',
      labelNames: ['client', 'result'],
      buckets: roundTrip,
      registers,
    });
    this.postgresSeconds = new Histogram({
      name: 'gateway_postgres_query_duration_seconds',
      help: 'PostgreSQL queries from sent to answered, by result: error for no connection (refused, lost, none free in time), a timeout or a server fault; ok otherwise (a constraint violation is an answer).',
      labelNames: ['result'],
      buckets: roundTrip,
      registers,
    });
    // Both results are exported from the start, so a rate of errors reads 0 rather than nothing.
    for (const result of ['ok', 'error']) this.postgresSeconds.zero({ result });
  }

  /**
   * Times every command `redis` sends, under `client` (a connection's role). Only for
   * connections whose commands answer at once: a BullMQ worker's blocking reads would read as
   * slow round trips. A command sent again after a reconnect is timed once, from its first send.
   */
  timeRedis(redis: Redis, client: string): void {
    const ok = this.redisSeconds.labels(client, 'ok');
    const failed = this.redisSeconds.labels(client, 'error');
    for (const result of ['ok', 'error']) this.redisSeconds.zero({ client, result });
    const timed = new WeakSet<object>();
    const send = redis.sendCommand.bind(redis) as (...args: unknown[]) => unknown;
    (redis as { sendCommand: unknown }).sendCommand = (...args: unknown[]) => {
      const command = args[0] as { promise?: Promise<unknown> };
      if (command?.promise && !timed.has(command)) {
        timed.add(command);
        const t0 = performance.now();
        command.promise.then(
          () => ok.observe((performance.now() - t0) / 1000),
          () => failed.observe((performance.now() - t0) / 1000),
        );
      }
      return send(...args);
    };
  }

  /** The PostgreSQL pool's query hook (gateway/auth/db.ts). */
  readonly observeQuery = (seconds: number, ok: boolean): void => {
    this.postgresSeconds.labels(ok ? 'ok' : 'error').observe(seconds);
  };

  /** One identity operation's outcome; a failure of login or refresh is an auth failure too. */
  authResult(operation: 'login' | 'register' | 'refresh' | 'otp_send' | 'otp_verify', result: string): void {
    this.auth.labels(operation, result).inc();
    if (result !== 'ok' && (operation === 'login' || operation === 'refresh' || operation === 'otp_verify')) {
      this.authFailures.labels(result).inc();
    }
  }
}
