/**
 * Dependency faults, in one place (docs/ARCHITECTURE.md, "Faults").
 *
 * - Which errors mean "Redis or PostgreSQL is unavailable or too slow": a refused or cut
 *   connection, a client-side timeout (every Redis command and PostgreSQL query is bounded, see
 *   app.ts and auth/db.ts), a server that is loading, read-only or shutting down. The wire
 *   answers those `overloaded` with `retryAfter` (HTTP 503 + Retry-After), not `internal`:
 *   the request may succeed later, the client should retry (PROTOCOL.md §8).
 * - `DependencyMonitor` probes each dependency while the node runs and logs one line when it
 *   goes down and one when it is back, so an outage is one line per dependency, not a stack
 *   trace per failed request.
 *
 * The drivers report these faults by message text or SQLSTATE; the patterns are kept here so
 * that a driver upgrade that rewords one is fixed in one file.
 */
import { isProtocolError, ProtocolError } from '../protocol/index.ts';
import type { Logger } from './log.ts';

export type Dependency = 'redis' | 'postgres';

/** `retryAfter` of an `overloaded` answer: 2-3 s, spread so clients do not return together. */
const RETRY_AFTER_MS = 2000;
const RETRY_JITTER_MS = 1000;

/** Socket errors of a dependency that is down or unreachable. */
const NETWORK_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EAI_AGAIN',
]);

/**
 * SQLSTATEs of an unavailable or overloaded PostgreSQL: class 08 (connection exception),
 * class 53 (insufficient resources), 57014 (statement_timeout), 57P01-57P03 (shutdown, crash,
 * cannot connect now), 25006 (a write on a read-only server: a standby, or the old primary
 * of a failover; the gateway opens no read-only transaction of its own).
 */
const PG_STATE = /^(08|53)|^57014$|^57P0[123]$|^25006$/;

/** Redis's reply to a blocking read it ended because it became a replica. */
const BECAME_REPLICA = /^UNBLOCKED force unblock from blocking operation, instance state changed/;

/**
 * Messages of ioredis (offline queue disabled, command timeout, closed connection, a pipeline
 * cut by it, retries exhausted), Redis replies (LOADING, BUSY, READONLY, MASTERDOWN, TRYAGAIN, CLUSTERDOWN, OOM,
 * MISCONF: writes refused because it cannot persist, NOREPLICAS: too few replicas to write;
 * UNBLOCKED: a blocking read ended by the server turning replica)
 * and pg / pg-pool / libpq (pool wait or connect timeout, query read timeout, lost connection).
 */
const MESSAGES = [
  /^Stream isn't writeable/,
  /^Command timed out/,
  /^Connection is closed/,
  // An auto-pipeline's commands after one answered, when the connection closed under them.
  /^Command aborted due to connection close/,
  /max retries per request/i,
  /^(LOADING|BUSY|READONLY|MASTERDOWN|TRYAGAIN|CLUSTERDOWN|OOM|MISCONF|NOREPLICAS)\b/,
  BECAME_REPLICA,
  /^timeout exceeded when trying to connect/,
  /^Connection terminated/,
  /^Query read timeout/,
  /not queryable/,
  /could not connect to server|connection to server .* failed|server closed the connection unexpectedly/,
  /no connection to the server|timeout expired|terminating connection due to administrator command/,
];

/**
 * BullMQ's worker reports a failure to schedule a job scheduler's next job as a new error whose
 * message is this prefix and the cause's message (the cause itself is not kept).
 */
const BULLMQ_WRAPPED = /^Failed to add repeatable job for next iteration: /;

/**
 * Replies of a server that became a replica: to a write, and to a blocking read it ended.
 */
const READONLY = new RegExp(`^READONLY\\b|${BECAME_REPLICA.source}`);

/** The shortest time between two reconnects of one client on `READONLY` (reconnectOnReadonly). */
export const READONLY_RECONNECT_MS = 1000;

/**
 * ioredis's `reconnectOnError` for every client of the gateway: a `READONLY` reply means the
 * connection reaches a replica, as a failover leaves the connections open to the old primary
 * while the address (a DNS name, a virtual IP, a Sentinel-managed service) leads new ones to the
 * promoted replica. The client reconnects, through the address, at most once per
 * READONLY_RECONNECT_MS (a Redis that stays a replica, misconfigured, is not reconnected to in a
 * loop); the command that got the reply fails as it is (its caller answers `overloaded`), not
 * sent again. `onReconnect` hears each reconnect it asks for. Duplicates of a client (BullMQ's
 * blocking connections) share its timer.
 */
export function reconnectOnReadonly(onReconnect: (e: Error) => void = () => {}): (e: Error) => 1 | false {
  let last = 0;
  return (e) => {
    if (!READONLY.test(e.message)) return false;
    const now = Date.now();
    if (now - last < READONLY_RECONNECT_MS) return false;
    last = now;
    onReconnect(e);
    return 1;
  };
}

/**
 * The requester went (its connection closed, its HTTP request was aborted) before the work
 * that needed it: nothing was done, and there is nobody to answer. Not an error to log.
 */
export class RequesterGone extends Error {
  constructor(what = 'the requester is gone') {
    super(what);
    this.name = 'RequesterGone';
  }
}

/**
 * True when `e` says a Redis command was refused before it was written (ioredis with its
 * offline queue off, while disconnected): Redis never ran it, so running it again later cannot
 * apply it twice. A timeout or a connection closed under a command says nothing of the kind.
 */
export function neverSent(e: unknown): boolean {
  return e instanceof Error && /^Stream isn't writeable/.test(e.message);
}

/** True when `e` says a dependency is unavailable or too slow (not a bug, not a bad request). */
export function isDependencyFault(e: unknown, depth = 0): boolean {
  if (!e || typeof e !== 'object' || depth > 3) return false;
  const err = e as {
    code?: unknown;
    sqlState?: unknown;
    message?: unknown;
    cause?: unknown;
    errors?: unknown;
    previousErrors?: unknown;
  };
  const code = typeof err.code === 'string' ? err.code : undefined;
  if (code && NETWORK_CODES.has(code)) return true;
  const state = typeof err.sqlState === 'string' ? err.sqlState : code;
  if (state && /^[0-9A-Z]{5}$/.test(state) && PG_STATE.test(state)) return true;
  if (typeof err.message === 'string') {
    const message = err.message.replace(BULLMQ_WRAPPED, '');
    if (MESSAGES.some((m) => m.test(message))) return true;
  }
  if (Array.isArray(err.errors) && err.errors.some((x) => isDependencyFault(x, depth + 1))) return true;
  // A MULTI whose queued commands Redis refused (OOM when full, READONLY): ioredis rejects its
  // EXEC's `EXECABORT` with the refusals in `previousErrors`.
  if (
    Array.isArray(err.previousErrors) &&
    err.previousErrors.length > 0 &&
    err.previousErrors.every((x) => isDependencyFault(x, depth + 1))
  )
    return true;
  return isDependencyFault(err.cause, depth + 1);
}

/**
 * Whether Redis refused a command because a key holds another type than the command works on
 * (`WRONGTYPE`): a key of the gateway's name written by something else. Such a refusal belongs
 * to the key's owner (a session), not to Redis: the sweep of a dead node leaves that session
 * out and goes on with the others.
 */
export function isWrongType(e: unknown): boolean {
  return e instanceof Error && /^WRONGTYPE /.test(e.message);
}

/** The `overloaded` answer to a request that met a dependency fault. */
export function dependencyUnavailable(): ProtocolError {
  return new ProtocolError('overloaded', 'a dependency is unavailable; retry later', {
    retryAfter: RETRY_AFTER_MS + Math.floor(Math.random() * RETRY_JITTER_MS),
  });
}

/**
 * What the wire says about an error a request ended with: its own code, `overloaded` for a
 * dependency fault, or undefined for an unexpected error (the caller logs it and answers
 * `internal`).
 */
export function wireError(e: unknown): ProtocolError | undefined {
  if (isProtocolError(e)) return e;
  if (isDependencyFault(e)) return dependencyUnavailable();
  return undefined;
}

/**
 * Logs a failure of background work: at debug level when it is a dependency fault (the
 * monitor has already said the dependency is down), else as an error.
 */
export function logFailure(log: Logger, e: unknown, fields: Record<string, unknown>, msg: string): void {
  if (isDependencyFault(e)) log.debug({ ...fields, err: (e as Error).message }, msg);
  else log.error({ ...fields, err: e }, msg);
}

/**
 * A BullMQ queue re-emits its connection's errors, and one without an 'error' listener prints
 * each with `console.error`: during a Redis outage, a stack trace on stderr per reconnect
 * attempt. They go to the log instead (at debug for a dependency fault: the dependency
 * monitor reports the outage once).
 */
export function logQueueErrors(
  queue: { readonly name: string; on(event: 'error', f: (e: Error) => void): unknown },
  log: Logger,
): void {
  queue.on('error', (e) => logFailure(log, e, { queue: queue.name }, 'queue error'));
}

export interface MonitorOptions {
  /** How often each dependency is probed. */
  intervalMs: number;
  /** A probe that takes longer counts as down. */
  timeoutMs: number;
}

/**
 * Probes every dependency on a timer (a Redis PING, a PostgreSQL `SELECT 1`) and logs
 * `dependency down` once when a probe fails and `dependency recovered` with `downMs` when one
 * succeeds again. Nothing waits on it: requests fail or succeed on their own bounded calls.
 */
export class DependencyMonitor {
  private readonly downSince = new Map<Dependency, number>();
  private readonly probing = new Set<Dependency>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly log: Logger,
    private readonly probes: Record<Dependency, () => Promise<unknown>>,
    private readonly options: MonitorOptions,
  ) {}

  start(): void {
    this.timer = setInterval(() => {
      for (const d of Object.keys(this.probes) as Dependency[]) this.probe(d);
    }, this.options.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  private probe(d: Dependency): void {
    if (this.probing.has(d)) return;
    this.probing.add(d);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`probe timed out after ${this.options.timeoutMs} ms`)),
        this.options.timeoutMs,
      );
    });
    Promise.race([this.probes[d](), timeout])
      .then(
        () => this.up(d),
        (e) => this.down(d, e),
      )
      .finally(() => {
        clearTimeout(timer);
        this.probing.delete(d);
      });
  }

  /** Whether the last probe of `d` failed (the `gateway_dependency_up` gauge). */
  isDown(d: Dependency): boolean {
    return this.downSince.has(d);
  }

  private down(d: Dependency, e: unknown): void {
    if (this.downSince.has(d)) return;
    this.downSince.set(d, Date.now());
    this.log.warn({ dependency: d, err: (e as Error)?.message ?? String(e) }, 'dependency down');
  }

  private up(d: Dependency): void {
    const since = this.downSince.get(d);
    if (since === undefined) return;
    this.downSince.delete(d);
    this.log.info({ dependency: d, downMs: Date.now() - since }, 'dependency recovered');
  }
}

/**
 * A start that cannot go on, with a stable code for the fatal line the process writes before it
 * exits 1 (main.ts): `redis_unavailable`, `migrations_failed`. A service manager restarts it.
 */
export class StartError extends Error {
  constructor(
    readonly code: 'redis_unavailable' | 'migrations_failed',
    message: string,
    cause: unknown,
  ) {
    super(message, { cause });
    this.name = 'StartError';
  }
}

/**
 * Runs a start step that needs a dependency (Redis's connections, the migrations) until it
 * succeeds or `waitMs` have passed: a failure that `transient` says is the dependency not
 * reachable yet (refused, timed out, still starting up) is tried again after a pause that
 * doubles from 250 ms to 5 s, with a warn line each time naming the dependency's host and port
 * and the cause, never its URL. Any other failure, or one past `waitMs`, is thrown. `undo` runs
 * after each failure (the step's half-open connections closed).
 */
export async function whenReachable<T>(
  step: () => Promise<T>,
  o: {
    dependency: Dependency;
    endpoint: string;
    waitMs: number;
    log: Logger;
    transient?: (e: unknown) => boolean;
    undo?: () => void;
    /** The cause to log (a connection's own error, when the step's says less). */
    cause?: (e: unknown) => string;
  },
): Promise<T> {
  const deadline = Date.now() + o.waitMs;
  const transient = o.transient ?? isDependencyFault;
  let pause = 250;
  for (let attempt = 1; ; attempt++) {
    try {
      return await step();
    } catch (e) {
      o.undo?.();
      if (!transient(e) || Date.now() + pause > deadline) throw e;
      o.log.warn(
        {
          dependency: o.dependency,
          endpoint: o.endpoint,
          attempt,
          retryInMs: pause,
          waitLeftMs: deadline - Date.now(),
          err: o.cause?.(e) ?? (e instanceof Error ? e.message : String(e)),
        },
        'a dependency is not reachable at start; trying again (GW_START_WAIT_MS)',
      );
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 5000);
    }
  }
}

/**
 * Runs one Redis call of a module's start (a subscription, the first beat, the first read of a
 * table) as `whenReachable` runs a start step: the start's wrapper (app.ts) tries it again while
 * Redis times out or refuses it as an outage, for up to GW_START_WAIT_MS. Without one (a module
 * started alone, as some tests do), the call is made once.
 */
export type StartStep = <T>(step: () => Promise<T>) => Promise<T>;

/** A StartStep that makes the call once. */
export const onceAtStart: StartStep = (step) => step();

/**
 * `host:port` of a dependency's URL, for a log line: never its credentials (a URL that does not
 * parse is not quoted either).
 */
export function endpointOf(url: string): string {
  try {
    const u = new URL(url);
    return u.host || u.searchParams.get('host') || '(a local socket)';
  } catch {
    return '(unparsed URL)';
  }
}
