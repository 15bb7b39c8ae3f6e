/**
 * Identity on a gateway node: builds the PostgreSQL pool, migrations, hashing pool, tokens,
 * mailer and IdentityService from the config; registers the wire requests of PROTOCOL.md §4
 * (`register` … `otp.verify`), the HTTP auth API, the kick channel between nodes, and the
 * outbox relay.
 */
import { Counter } from 'prom-client';
import type { Device } from '../../protocol/index.ts';
import type { IdentityModule } from '../app.ts';
import type { BackendEvents } from '../backend-events.ts';
import type { SessionBinding } from '../binding.ts';
import type { Bus } from '../bus.ts';
import type { Config } from '../config.ts';
import { type Connection, ConnState } from '../connection.ts';
import type { SessionDirectory } from '../delivery/publisher.ts';
import { endpointOf, logFailure, onceAtStart, StartError, type StartStep, whenReachable } from '../faults.ts';
import type { Gateway } from '../gateway.ts';
import { mountAuthApi } from '../http/auth-api.ts';
import type { KeptKick, Keys } from '../keys.ts';
import type { ListLimit } from '../list-limit.ts';
import type { Logger } from '../log.ts';
import type { GatewayMetrics } from '../metrics.ts';
import { RetryUntilDone } from '../wait.ts';
import { ActivityTracker } from './activity.ts';
import { createDb } from './db.ts';
import { Hasher } from './hasher.ts';
import { Mailer } from './mailer.ts';
import { migrate } from './migrate.ts';
import { OutboxRelay } from './outbox-relay.ts';
import { IdentityService, type RequestContext, type SessionGrant, type TokenPair } from './service.ts';
import { Locator } from './session-details.ts';
import { Tokens } from './tokens.ts';

type Msg = Record<string, unknown> & { id: number };

/**
 * A kick for a session; `keep` (`<node>:<connection id>`) names the connection to spare.
 * `going_away` is an operator's kick of a device (the admin API): its session stays.
 */
interface KickNotice {
  sessionId: string;
  code: 'session_revoked' | 'session_takeover' | 'going_away';
  keep?: string;
  retryAfter?: number;
}

/**
 * The identity operations as every transport calls them (HTTP, gRPC; the wire handlers do the
 * same): a request that hashes is refused first while the hash pool is full (`overloaded`),
 * and a registration wakes the outbox relay.
 */
export interface AuthOperations {
  register(
    req: { username?: string; email: string; password: string },
    ctx: RequestContext,
  ): Promise<{ userId: string }>;
  login(
    req: { username?: string; email?: string; password: string; device?: Device },
    ctx: RequestContext,
  ): Promise<SessionGrant>;
  refresh(req: { refresh: string }, ctx: RequestContext): Promise<TokenPair>;
  logout(req: { token?: string }, ctx: RequestContext): Promise<unknown>;
  validate(req: { token: string }): Promise<Record<string, unknown>>;
}
const KICK_MESSAGE: Record<KickNotice['code'], string> = {
  session_revoked: 'the session has ended',
  session_takeover: 'the session connected again elsewhere',
  going_away: 'disconnected by an operator',
};

/**
 * A connection's name across the cluster (`node:conn`), as kick notices and kept kicks name the
 * connection to spare or to kick.
 */
const connName = (gateway: Gateway, conn: Connection) => `${gateway.nodeId}:${conn.id}`;

/**
 * How long a connection whose session was found gone (by an activity write, the periodic check,
 * the look when the subscriber is back) waits for the session's end notice (which kicks it as a
 * revoke, a takeover or an expiry) before it is kicked as found gone, when the subscriber's
 * connection did not answer the PING that would have shown every such notice come (kickGone).
 */
const GONE_NOTICE_GRACE_MS = 1000;

/**
 * Connections ending their own session (a `logout {}`, a `revoke` of it: endOwn in
 * createAuthModule), with the kick of that session that came meanwhile from another end (a
 * revoke on another connection or node, a takeover). The kick is held back, and the connection
 * answered as when it had been detached before its end (as it was before): a logout finds the
 * session gone and answers `{}`, a revoke `not_found`, and either leaves it unauthenticated. The
 * look for sessions found gone leaves them to that answer too.
 */
const ending = new WeakMap<Connection, KickNotice | undefined>();

/**
 * Connections with a login, `otp.verify` or `resume` under way, and how many: each binds the
 * connection to a session when it is done, and a login with the connection's own device id
 * ends the session the connection is bound to first (its takeover). The look for sessions found
 * gone leaves them alone (kickGone): an activity write of the request that found the old
 * session already ended would otherwise kick the connection (`session_takeover`) before the
 * bind, and the login's answer was lost with it (`internal`). Once done, the connection is bound
 * to the new session; one whose request failed is still bound to the gone one, and is kicked
 * then: `passed` is the session a look found it bound to while a request was under way, and its
 * kick. The first of its requests to end kicks it, once its answer is sent, if it is still bound
 * to that session (the request failed: a wrong password, a refusal), so that a device whose
 * session is gone cannot keep the session's connection by keeping a login under way, and one
 * whose login failed is not left to the next look (with the periodic check off, a device that
 * sends nothing more is never looked at again).
 */
const binding = new WeakMap<
  Connection,
  { requests: number; passed?: { session: NonNullable<Connection['session']>; kick: () => void } }
>();

/** Runs `op` with `conn` counted in `binding`. */
async function whileBinding<T>(conn: Connection, op: () => Promise<T>): Promise<T> {
  let entry = binding.get(conn);
  if (entry) entry.requests++;
  else binding.set(conn, (entry = { requests: 1 }));
  try {
    return await op();
  } finally {
    if (--entry.requests === 0) binding.delete(conn);
    const passed = entry.passed;
    if (passed) {
      entry.passed = undefined;
      // After the request's answer is sent (it settles once this returns): a kick now would close
      // the connection before it, and the device would not learn that its login failed.
      setImmediate(() => {
        if (conn.session === passed.session && conn.state < ConnState.closing && !ending.has(conn))
          passed.kick();
      });
    }
  }
}

/**
 * Kicks connections whose session record is gone from Redis, as the session's end notice would
 * have: `session_takeover` if the device key now names another session, else `session_revoked`.
 * A session still in the index of expiries ran out and is not yet swept: the sweep ends it,
 * kick included (session-store.ts, EXPIRED), so it is left alone here and not counted as lost
 * (which would raise `GatewaySessionsLost` for a normal end). The same rule for every way a
 * session is found gone: a subscriber back, an activity write, the periodic check.
 *
 * The kick comes after those reads and a PING answered on the subscriber's connection, to a
 * connection still bound then: a session ended just before the reads (the sweep's script takes
 * it out of the index and publishes its notice in one step; a revoke or a takeover on another
 * node) has its notice on that connection ahead of the PING's answer, which kicks it as what it
 * was, and it is no lost session. A PING that fails (the subscriber away, or slower than
 * `GW_REDIS_TIMEOUT_MS`) is a wait of GONE_NOTICE_GRACE_MS instead.
 */
async function kickGone(
  gone: { conn: Connection; session: NonNullable<Connection['session']> }[],
  redis: import('ioredis').Redis,
  keys: Keys,
  log: Logger,
  msg: string,
  /** Called for each connection kicked (the metric of how the session was found gone). */
  kicked: () => void,
  /** Bus.synced of the node's subscriber: a PING answered on its connection. */
  synced: () => Promise<void>,
): Promise<void> {
  // The connection has gone, been kicked (its end notice came) or moved to another session
  // meanwhile. Or it is ending its session itself, and is answered instead.
  // One with a login, otp.verify or resume under way is passed over: the request's end kicks it
  // if it is still bound to the session then (whileBinding).
  const bound = ({ conn, session }: (typeof gone)[number]) =>
    conn.session === session && conn.state < ConnState.closing && !ending.has(conn);
  const due: { conn: Connection; session: NonNullable<Connection['session']>; code: KickNotice['code'] }[] =
    [];
  for (let i = 0; i < gone.length; i += 1000) {
    const chunk = gone.slice(i, i + 1000);
    // One auto-pipelined round trip for both reads.
    const [successors, expiring] = await Promise.all([
      Promise.all(
        chunk.map(({ session }) => (session.deviceId ? redis.get(keys.device(session.deviceId)) : null)),
      ),
      Promise.all(chunk.map(({ session }) => redis.zscore(keys.sessionExpiries, session.sessionId))),
    ]);
    chunk.forEach((g, j) => {
      if (expiring[j] !== null || !bound(g)) return;
      const successor = successors[j];
      const code = successor && successor !== g.session.sessionId ? 'session_takeover' : 'session_revoked';
      due.push({ ...g, code });
    });
  }
  if (due.length === 0) return;
  // A notice published before the reads is ahead of the PING's answer on the subscriber's
  // connection, and has kicked its connections when the answer comes.
  try {
    await synced();
  } catch (e) {
    // The subscriber is away or slow: a notice on the way may still come, for a while.
    log.warn(
      { sessions: due.length, waitMs: GONE_NOTICE_GRACE_MS, err: (e as Error).message },
      "the subscriber's connection did not answer a PING: sessions found gone are kicked after a fixed wait",
    );
    await new Promise((resolve) => setTimeout(resolve, GONE_NOTICE_GRACE_MS).unref());
  }
  for (const g of due) {
    if (!bound(g)) continue;
    const kick = (fields: Record<string, unknown>) => {
      log.info({ conn: g.conn.id, sessionId: g.session.sessionId, code: g.code, ...fields }, msg);
      kicked();
      g.conn.kick(g.code, KICK_MESSAGE[g.code]);
    };
    const requests = binding.get(g.conn);
    if (requests) {
      log.info(
        { conn: g.conn.id, sessionId: g.session.sessionId },
        "session gone while its connection's login, otp.verify or resume is under way: left to that request",
      );
      requests.passed = { session: g.session, kick: () => kick({ afterRequest: true }) };
      continue;
    }
    kick({});
  }
}

/**
 * Applies the kicks this node's subscriber missed: kicks this node's connections whose session
 * record is gone from Redis (ended by logout, revoke, expiry or takeover while the kick notice
 * could not reach this node, or lost in a Redis rollback), and, with `keptKicks`, those an
 * operator kicked meanwhile (the kick kept under `Keys.sessionKick` names the connection). Also
 * the node's periodic check (`GW_SESSION_CHECK_MS`), without the kept kicks.
 */
async function kickMissed(
  gateway: Gateway,
  redis: import('ioredis').Redis,
  keys: Keys,
  log: Logger,
  kicked: () => void,
  msg: string,
  keptKicks: boolean,
  /** As kickGone's. */
  synced: () => Promise<void>,
): Promise<void> {
  const bound = [...gateway.connections].flatMap((conn) =>
    conn.session ? [{ conn, session: conn.session }] : [],
  );
  const gone: typeof bound = [];
  for (let i = 0; i < bound.length; i += 1000) {
    const chunk = bound.slice(i, i + 1000);
    // One auto-pipelined round trip for the records and kept kicks.
    const [held, kept] = await Promise.all([
      Promise.all(chunk.map(({ session }) => redis.exists(keys.session(session.sessionId)))),
      keptKicks
        ? Promise.all(chunk.map(({ session }) => redis.get(keys.sessionKick(session.sessionId))))
        : [],
    ]);
    chunk.forEach((b, j) => {
      if (held[j] === 0) gone.push(b);
    });
    if (!keptKicks) continue;
    chunk.forEach(({ conn, session }, j) => {
      if (held[j] === 0 || conn.session !== session || !kept[j]) return;
      let k: KeptKick;
      try {
        k = JSON.parse(kept[j]!);
      } catch {
        return;
      }
      // A kick of an earlier connection of the session (the device has come back since) is
      // spent. A connection opened after the kick is not the one kicked either, even with the
      // same name: a node restarted with a fixed GW_NODE_ID counts its connections from 1 again.
      if (k.conn !== connName(gateway, conn) || conn.openedAtMs > k.at) return;
      log.info(
        { conn: conn.id, sessionId: session.sessionId },
        'admin kick applied after the subscriber was away',
      );
      conn.kick('going_away', KICK_MESSAGE.going_away, k.retryAfter);
    });
  }
  if (gone.length > 0) await kickGone(gone, redis, keys, log, msg, kicked, synced);
}

export interface AuthModule extends IdentityModule {
  service: IdentityService;
  operations: AuthOperations;
  relay: OutboxRelay;
  /** For the dependency monitor's probe. */
  pool: import('pg').Pool;
}

export async function createAuthModule(
  config: Config,
  log: Logger,
  deps: {
    redis: import('ioredis').Redis;
    bus: Bus;
    keys: Keys;
    /** Binding sessions' Redis work, one call per tick: the kick of a bound session's other connections rides on it. */
    binding: SessionBinding;
    backend: BackendEvents;
    metrics?: GatewayMetrics;
    /** List requests per session (GW_LIST_PER_MINUTE), one budget with messaging's. */
    listLimit: ListLimit;
  },
): Promise<AuthModule> {
  deps.binding.define('publish', `return redis.call('PUBLISH', ARGV[1], ARGV[2])`);
  const db = createDb({
    url: config.databaseUrl,
    schema: config.dbSchema,
    statementTimeoutMs: config.dbStatementTimeoutMs,
    connectTimeoutMs: config.dbConnectTimeoutMs,
    queryTimeoutMs: config.dbQueryTimeoutMs,
    max: config.dbPoolMax,
    observeQuery: deps.metrics?.observeQuery,
  });
  // An idle client's error is an outage symptom: faults.ts's monitor reports the outage once.
  db.pool.on('error', (e) => log.debug({ err: e.message }, 'postgres pool error'));
  log.info({ driver: db.driver }, 'postgres driver');
  if (config.migrateOnStart) {
    let applied: string[];
    try {
      // PostgreSQL not up yet (a stack started at once) is waited for, GW_START_WAIT_MS.
      applied = await whenReachable(
        () => migrate({ url: config.databaseUrl, schema: config.dbSchema, direction: 'up' }),
        { dependency: 'postgres', endpoint: endpointOf(config.databaseUrl), waitMs: config.startWaitMs, log },
      );
    } catch (e) {
      await db.pool.end().catch(() => {});
      throw new StartError(
        'migrations_failed',
        `could not apply the pending migrations to PostgreSQL at ${endpointOf(config.databaseUrl)} (GW_MIGRATE_ON_START)`,
        e,
      );
    }
    if (applied.length) log.info({ applied }, 'migrations applied');
  }
  const hasher = new Hasher({
    params: {
      memoryCost: config.argon2MemoryKib,
      timeCost: config.argon2Iterations,
      parallelism: config.argon2Parallelism,
    },
    threads: config.hashThreads,
    maxQueue: config.hashMaxQueue,
    maxWaitMs: config.hashMaxWaitMs,
    nice: config.hashNice,
  });
  await hasher.ready;
  const tokens = new Tokens({
    keyFile: config.jwtKeyFile,
    issuer: config.jwtIssuer,
    audience: config.jwtAudience,
    accessTtlSeconds: config.accessTtlSeconds,
  });
  await tokens.init();
  let mailer: Mailer | null = null;
  if (config.smtpHost) {
    mailer = new Mailer({
      host: config.smtpHost,
      port: config.smtpPort,
      secure: config.smtpSecure,
      requireTls: config.smtpRequireTls,
      tlsRejectUnauthorized: config.smtpTlsRejectUnauthorized,
      ...(config.smtpUser ? { user: config.smtpUser, password: config.smtpPassword } : {}),
      from: config.smtpFrom,
    });
  } else {
    log.warn('SMTP_HOST is not set: email login (otp.request) answers forbidden');
  }
  const locator = await Locator.open(config.geoipDb);
  if (config.geoipDb) log.info({ file: config.geoipDb }, 'geoip database loaded');
  const service = new IdentityService({
    pool: db.pool,
    redis: deps.redis,
    keys: deps.keys,
    hasher,
    tokens,
    mailer,
    log,
    ...(deps.metrics ? { metrics: deps.metrics } : {}),
    locator,
    listLimit: deps.listLimit,
    options: {
      usernameMin: config.usernameMin,
      usernameMax: config.usernameMax,
      sessionTtlSeconds: config.sessionTtlSeconds,
      refreshTtlSeconds: config.refreshTtlSeconds,
      lockoutAttempts: config.lockoutAttempts,
      lockoutSeconds: config.lockoutSeconds,
      ipFailureBudget: config.ipFailureBudget,
      registerPerMinute: config.registerPerMinute,
      refreshPerMinute: config.refreshPerMinute,
      otpPerMinute: config.otpPerMinute,
      otpExpirationMinutes: config.otpExpirationMinutes,
      otpMaxRetries: config.otpMaxRetries,
      refreshGraceSeconds: config.refreshGraceSeconds,
      statementTimeoutMs: config.dbStatementTimeoutMs,
    },
  });
  /** Sessions whose record an activity write found gone (set at start, once the gateway is known). */
  let activityGone: (sessionIds: string[]) => void = () => {};
  const activity = new ActivityTracker(deps.redis, deps.keys, config.activityWriteMs, log, Date.now, (sids) =>
    activityGone(sids),
  );
  const relay = new OutboxRelay({ pool: db.pool, backend: deps.backend, log, intervalMs: 1000, batch: 100 });

  const directory: SessionDirectory = {
    userIdOf: (username) => service.userIdOf(username),
    userIdKnown: (username) => service.userIdKnown(username),
  };

  const operations: AuthOperations = {
    register: (req, ctx) => service.register(req, ctx).finally(() => relay.kick()),
    login: (req, ctx) => service.login(req, ctx),
    refresh: (req, ctx) => service.refresh(req, ctx),
    logout: (req, ctx) => service.logout(req, ctx),
    validate: (req) => service.validate(req),
  };

  /**
   * Authenticates the connection as the granted session. A resumed session's older connections
   * are kicked (on every node); a session just made (`fresh`: a login, an `otp.verify`) has
   * none, and sends no notice. When the notice cannot be sent (Redis refused or timed out) the
   * connection is put back as it was before the error is answered, as for any failed request:
   * unauthenticated, or authenticated as the session it had (the same one, left bound; another
   * one, bound again). Before, it was left unauthenticated even when it had been authenticated,
   * and a device whose resume of its own session on its own connection met a Redis blip lost
   * the session there (test/e2e/takeover-faults.test.ts).
   */
  const bind = async (gateway: Gateway, conn: Connection, g: SessionGrant, fresh: boolean) => {
    const previous = conn.session;
    const bound = gateway.bindSession(conn, {
      userId: g.userId,
      username: g.username,
      sessionId: g.sessionId,
      ...(g.deviceId ? { deviceId: g.deviceId } : {}),
    });
    // A connection gone before its answer keeps nothing, and takes the session from no other.
    if (bound && !fresh) {
      const notice: KickNotice = {
        sessionId: g.sessionId,
        code: 'session_takeover',
        keep: connName(gateway, conn),
      };
      try {
        await deps.binding.run('publish', [], [deps.keys.kickChannel, JSON.stringify(notice)]);
      } catch (e) {
        if (conn.session?.sessionId === g.sessionId && previous?.sessionId !== g.sessionId) {
          gateway.unbindSession(conn);
          if (previous) gateway.bindSession(conn, previous);
        }
        throw e;
      }
    }
    const { deviceId: _omit, ...wire } = g;
    return wire;
  };

  /**
   * Ends the connection's own session on its request (`end`: a `logout {}`, a `revoke` of it),
   * then detaches the connection from it. The end's kick spares this connection (it is answered
   * instead), so it stays bound until the end is done; an end that fails (Redis refused it or
   * did not answer: `overloaded`) leaves it as it was, still its session's, and the device's
   * retry on it works. Before, it was detached first: the retry was answered `unauthenticated`
   * (neither request is allowed before authentication, PROTOCOL.md §4) and the session lived on,
   * its tokens valid, though its device had logged out.
   */
  const endOwn = async <T>(gateway: Gateway, conn: Connection, end: (spare: string) => Promise<T>) => {
    const sid = conn.session?.sessionId;
    ending.set(conn, undefined);
    try {
      const done = await end(connName(gateway, conn));
      if (sid && conn.session?.sessionId === sid) gateway.unbindSession(conn);
      return done;
    } catch (e) {
      // Ended meanwhile by another end (a revoke elsewhere; its kick held for this answer): the
      // connection is its session's no more, and is answered the error unauthenticated.
      if (ending.get(conn) && sid && conn.session?.sessionId === sid) gateway.unbindSession(conn);
      throw e;
    } finally {
      ending.delete(conn);
    }
  };

  return {
    service,
    operations,
    relay,
    pool: db.pool,
    directory,
    async start(gateway: Gateway, startStep: StartStep = onceAtStart) {
      hasher.registerMetrics(gateway.metrics);
      gateway.onSweep((now) => service.sweep(now));
      gateway.onActivity = (sid) => activity.touch(sid);
      const synced = () => deps.bus.synced();
      const goneFound = new Counter({
        name: 'gateway_sessions_found_gone_total',
        help: "Connections kicked because their session's record was gone from Redis with no end notice heard: found when the node's subscriber came back (subscriber_back), by the session's activity write (activity), or by the node's periodic check of its sessions (check, GW_SESSION_CHECK_MS). A rise is Redis losing data (a restart without persistence, a rollback, a flush) or notices lost while the subscriber was away.",
        labelNames: ['by'],
        registers: [gateway.metrics],
      });
      // A session that is active here but whose record is gone ended where no notice reached
      // this node, or Redis lost it without closing the subscriber's connection (a rollback,
      // a flush): nothing else would find it, and its connections would stay bound to nothing.
      // Kicked a moment after kickGone's reads: a session ended just before the write (a
      // takeover, a revoke on another node) has its notice on the way, which kicks it as such.
      activityGone = (sids) => {
        const found = sids.flatMap((sid) =>
          gateway
            .connectionsOf(sid)
            .flatMap((conn) => (conn.session ? [{ conn, session: conn.session }] : [])),
        );
        if (found.length === 0) return;
        kickGone(
          found,
          deps.redis,
          deps.keys,
          log,
          'session gone, found by its activity',
          () => goneFound.inc({ by: 'activity' }),
          synced,
        ).catch((e) => logFailure(log, e, {}, 'could not kick the connections of a session found gone'));
      };
      const ctx = (conn: Connection) => ({
        ip: conn.ip,
        ...(conn.session ? { sessionId: conn.session.sessionId } : {}),
        gone: () => conn.state >= ConnState.closing,
        connection: connName(gateway, conn),
      });
      // Requests that hash are refused before any other work while the hash pool is full (the
      // identity service asks the pool first).
      gateway.handle('register', (conn, m: Msg) => operations.register(m as never, ctx(conn)));
      gateway.handle('login', (conn, m: Msg) =>
        whileBinding(conn, async () =>
          bind(gateway, conn, await operations.login(m as never, ctx(conn)), true),
        ),
      );
      gateway.handle('resume', (conn, m: Msg) =>
        whileBinding(conn, async () =>
          bind(gateway, conn, await service.resume(m as never, ctx(conn)), false),
        ),
      );
      gateway.handle('otp.verify', (conn, m: Msg) =>
        whileBinding(conn, async () => {
          const grant = await service.otpVerify(m as never, {
            ...ctx(conn),
            ...(m.device ? { device: m.device as Device } : {}),
          });
          relay.kick();
          return bind(gateway, conn, grant, true);
        }),
      );
      gateway.handle('refresh', (conn, m: Msg) => service.refresh(m as never, ctx(conn)));
      gateway.handle('validate', (_conn, m: Msg) => operations.validate(m as never));
      gateway.handle('otp.request', (conn, m: Msg) => service.otpRequest(m as never, ctx(conn)));
      gateway.handle('logout', (conn, m: Msg) =>
        m.token === undefined
          ? endOwn(gateway, conn, (spare) => service.logout({}, ctx(conn), spare))
          : service.logout(m as never, ctx(conn)),
      );
      gateway.handle('sessions', (conn) => service.sessions(conn.session!.userId, conn.session!.sessionId));
      gateway.handle('revoke', (conn, m: Msg) => {
        const s = conn.session!;
        return m.sessionId === s.sessionId
          ? endOwn(gateway, conn, (spare) => service.revoke(s.userId, s.sessionId, spare))
          : service.revoke(s.userId, m.sessionId as string);
      });

      await startStep(() =>
        deps.bus.subscribe(deps.keys.kickChannel, (raw) => {
          let n: KickNotice;
          try {
            n = JSON.parse(raw.toString());
          } catch {
            return;
          }
          for (const conn of gateway.connectionsOf(n.sessionId)) {
            if (n.keep === connName(gateway, conn)) continue;
            if (ending.has(conn) && n.code !== 'going_away') {
              ending.set(conn, n);
              continue;
            }
            if (n.code === 'going_away')
              log.info({ conn: conn.id, sessionId: n.sessionId }, 'admin kick applied');
            conn.kick(n.code, KICK_MESSAGE[n.code] ?? 'the session has ended', n.retryAfter);
          }
        }),
      );
      // The look for sessions found gone (kickMissed), counted by how it was run.
      const look = (by: 'subscriber_back' | 'check', msg: string, keptKicks: boolean) =>
        kickMissed(gateway, deps.redis, deps.keys, log, () => goneFound.inc({ by }), msg, keptKicks, synced);
      // A kick published while this node's subscriber was away never came: once it is back,
      // a connection whose session Redis no longer holds is kicked as its notice would have
      // kicked it (taken over if its device key names another session, else revoked), and one
      // an operator kicked meanwhile is kicked `going_away`. Tried until done: the subscriber
      // is often back before the connection that reads the sessions (Redis restarted), and a
      // look given up left the sessions Redis lost bound to their connections for good, each
      // device answered but sent nothing (test/e2e/list-limit.test.ts).
      const missed = new RetryUntilDone(
        () => look('subscriber_back', 'session gone while the subscriber was away', true),
        {
          failed: (e, tries, retryInMs) =>
            logFailure(
              log,
              e,
              { tries, retryInMs },
              'could not look for kicks missed while the subscriber was away',
            ),
          doneAfterRetry: (tries) =>
            log.info({ tries }, 'looked for kicks missed while the subscriber was away, after a retry'),
        },
      );
      gateway.onClose(() => missed.stop());
      deps.bus.onBack(() => missed.run());
      // The same look every GW_SESSION_CHECK_MS, for what neither a reconnect nor an activity
      // write finds: a session Redis lost while keeping the node's connections (a rollback, a
      // flush, an eviction), of a device that only pings. One EXISTS per connection, pipelined;
      // a look that fails is tried at the next interval.
      let checking = false;
      let checkedAt = Date.now();
      if (config.sessionCheckMs > 0)
        gateway.onSweep((now) => {
          if (checking || now - checkedAt < config.sessionCheckMs) return;
          checking = true;
          checkedAt = now;
          look('check', 'session gone, found by the periodic check', false)
            .catch((e) => logFailure(log, e, {}, 'could not check the sessions of this node'))
            .finally(() => {
              checking = false;
            });
        });

      mountAuthApi(
        gateway.app,
        {
          register: operations.register,
          login: (r, c) => operations.login(r as never, c) as never,
          refresh: operations.refresh,
          logout: operations.logout,
          validate: operations.validate,
          authenticate: async (t) => {
            const a = await service.authenticate(t);
            activity.touch(a.sessionId);
            return a;
          },
          me: (uid) => service.me(uid),
          sessions: (uid, cur) => service.sessions(uid, cur),
          revoke: (uid, sid) => service.revoke(uid, sid),
          jwks: () => tokens.jwks(),
        },
        {
          cookieSecure: config.cookieSecure,
          maxBodyBytes: config.httpMaxBodyBytes,
          trustedProxies: config.trustedProxies,
        },
        log,
      );
      relay.start();
    },
    async close() {
      await activity.close();
      await service.close();
      await relay.stop();
      await hasher.close();
      mailer?.close();
      await db.pool.end();
    },
  };
}
