/**
 * PostgreSQL access: one pool, on the native libpq driver (pg-native) when it loads, else the
 * pure-JS driver. Every connection gets the configured schema as its search_path and a
 * statement timeout; connecting and every query are also bounded on the client side, so a
 * server that stops answering fails a request instead of holding it. Parameterised queries only.
 */
import pg from 'pg';

export interface DbOptions {
  url: string;
  /** Schema for this node's tables (tests use one each). */
  schema: string;
  statementTimeoutMs: number;
  /** Opening a connection, or waiting for a free one (pg-pool), and libpq's connect_timeout. */
  connectTimeoutMs: number;
  /** Client-side bound of a query: holds when the server never answers (frozen, cut off). */
  queryTimeoutMs: number;
  max: number;
  /** Told of every query's round trip (seconds, and whether it succeeded): the metrics' hook. */
  observeQuery?: (seconds: number, ok: boolean) => void;
}

export interface Db {
  pool: pg.Pool;
  driver: 'native' | 'js';
}

export function createDb(o: DbOptions): Db {
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(o.schema)) throw new Error(`invalid schema name ${o.schema}`);
  let native: typeof pg | null = null;
  try {
    native = pg.native;
  } catch {
    native = null;
  }
  const Pool = (native ?? pg).Pool;
  const pool = new Pool({
    ...(native ? { Client: endedSafelyWhileConnecting(native.Client) } : {}),
    connectionString: o.url,
    max: o.max,
    // Both drivers honour these: pg-native reads query_timeout in its query() and turns
    // connectionTimeoutMillis into libpq's connect_timeout; pg-pool bounds the wait for a client.
    connectionTimeoutMillis: o.connectTimeoutMs,
    query_timeout: o.queryTimeoutMs,
    options: `-c search_path=${o.schema} -c statement_timeout=${o.statementTimeoutMs}`,
  });
  // pg-pool removes its error listener from a client it hands out; a connection that breaks
  // while checked out (server shut down, backend terminated) would then emit an unhandled
  // 'error' and end the process. Its queries fail on their own (that is how callers learn of
  // it), and a client released with the error is discarded.
  pool.on('connect', (client) => {
    client.on('error', () => {});
    instrument(client, o.observeQuery);
  });
  if (o.observeQuery) countFailedConnects(pool, o.observeQuery);
  return { pool, driver: native ? 'native' : 'js' };
}

type Callback = (err?: Error | null) => void;

/** What `endedSafelyWhileConnecting` needs of pg's native client. */
interface NativeClient {
  connect(callback?: Callback): Promise<void> | undefined;
  end(callback?: Callback): Promise<void> | undefined;
}

/**
 * pg's native client, with `end` held back while its connect is out. pg-pool ends a client whose
 * connect outlasts `connectionTimeoutMillis`, and pg's native client then closes libpq's handle
 * at once; but libpq's connect runs on in a thread of its own, and when it succeeds after all
 * (the server answered between the pool's timeout and libpq's own, whole-second one), the client
 * went on as connected and libpq threw "Must be connected to start reader" out of the connect
 * callback, which ended the process (pg's issue brianc/node-pg-native#49). Here an end asked
 * for while the connect is out waits for it; the connection is then ended, and the connect
 * fails, as pg-pool expects of a client it ended.
 */
function endedSafelyWhileConnecting(Base: typeof pg.Client): typeof pg.Client {
  const B = Base as unknown as new (options: unknown) => NativeClient;
  class Client extends B {
    #connecting = false;
    /** Ends asked for while the connect was out: resolved once the connection is ended. */
    #ends: (() => void)[] | null = null;

    override connect(callback?: Callback): Promise<void> | undefined {
      this.#connecting = true;
      const settle = (err?: Error | null): Error | null => {
        this.#connecting = false;
        const ends = this.#ends;
        if (!ends) return err ?? null;
        this.#ends = null;
        super.end(() => {
          for (const resolve of ends) resolve();
        });
        return err ?? new Error('Connection terminated while connecting');
      };
      if (callback) {
        super.connect((err) => callback(settle(err)));
        return undefined;
      }
      return new Promise<void>((resolve, reject) => {
        super.connect((err) => {
          const e = settle(err);
          if (e) reject(e);
          else resolve();
        });
      });
    }

    override end(callback?: Callback): Promise<void> | undefined {
      if (!this.#connecting) return callback ? super.end(callback) : super.end();
      const ended = new Promise<void>((resolve) => {
        this.#ends ??= [];
        this.#ends.push(resolve);
      });
      if (!callback) return ended;
      void ended.then(() => callback(null));
      return undefined;
    }
  }
  return Client as unknown as typeof pg.Client;
}

const QUERY_TIMEOUT = 'Query read timeout';
/** SQLSTATE read_only_sql_transaction: a write on a standby or a read-only server. */
const READ_ONLY = '25006';

/**
 * Every query of a pooled connection (pool.query goes through one too) is seen here on its way
 * back: its round trip goes to `observe`, and a query that hit `query_timeout` marks its
 * connection unqueryable. Such a query is still running on its connection: with pg-native the
 * next query on that client fails with "another command is already in progress", and whoever
 * releases it without the error (a transaction's `finally`) would hand it to the next request.
 * Marking it unqueryable makes pg-pool discard it on release (pg-pool checks `_queryable`).
 */
function instrument(client: pg.PoolClient, observe?: (seconds: number, ok: boolean) => void): void {
  const c = client as pg.PoolClient & { _queryable: boolean };
  const done = (t0: number, e: unknown) => {
    // Also a connection to a read-only server (a failover's old primary, which the address no
    // longer leads to): discarded, so that the pool connects again through the address.
    if ((e as Error | undefined)?.message === QUERY_TIMEOUT || (e && pgError(e).code === READ_ONLY))
      c._queryable = false;
    observe?.((performance.now() - t0) / 1000, !e || !dependencyFault(e));
  };
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  (c as { query: unknown }).query = (...args: unknown[]) => {
    const t0 = performance.now();
    const last = args[args.length - 1];
    if (typeof last === 'function') {
      args[args.length - 1] = (e: unknown, r: unknown) => {
        done(t0, e);
        (last as (e: unknown, r: unknown) => void)(e, r);
      };
      return query(...args);
    }
    const r = query(...args);
    if (r instanceof Promise)
      r.then(
        () => done(t0, null),
        (e) => done(t0, e ?? new Error('query failed')),
      );
    return r;
  };
}

/**
 * Whether a failed query says something about PostgreSQL's health rather than about the
 * request: no SQLSTATE (a lost connection, a client-side timeout), or a connection exception
 * (08), insufficient resources (53), operator intervention such as statement_timeout (57),
 * a system or internal error (58, XX). A unique violation is an answer, not a fault.
 */
function dependencyFault(e: unknown): boolean {
  const code = pgError(e).code;
  return !code || /^(08|53|57|58|XX)/.test(code) || code === READ_ONLY;
}

/**
 * A query that finds no connection (the server refused it, or none was free in time) never
 * reaches `instrument`: its failed `pool.connect` (pool.query goes through it too) is counted
 * as a failed round trip, so an outage shows in the query metric and not only in readiness.
 */
function countFailedConnects(pool: pg.Pool, observe: (seconds: number, ok: boolean) => void): void {
  const connect = pool.connect.bind(pool) as (...args: unknown[]) => unknown;
  (pool as { connect: unknown }).connect = (...args: unknown[]) => {
    const t0 = performance.now();
    const failed = () => observe((performance.now() - t0) / 1000, false);
    const cb = args[0];
    if (typeof cb === 'function') {
      return connect((e: unknown, ...rest: unknown[]) => {
        if (e) failed();
        (cb as (...a: unknown[]) => void)(e, ...rest);
      });
    }
    const r = connect() as Promise<unknown>;
    r.catch(failed);
    return r;
  };
}

/** A pg error's SQLSTATE and constraint, for mapping at the store's edge. */
export function pgError(e: unknown): { code?: string; constraint?: string } {
  const err = e as { code?: string; constraint?: string; sqlState?: string; message?: string };
  const code = err.code ?? err.sqlState;
  let constraint = err.constraint;
  // pg-native reports the constraint only in the message.
  if (!constraint && typeof err.message === 'string')
    constraint = /constraint "([^"]+)"/.exec(err.message)?.[1];
  return { ...(code ? { code } : {}), ...(constraint ? { constraint } : {}) };
}
