/**
 * Builds one gateway node with all its services from a validated config: Redis connections,
 * PostgreSQL, identity, delivery, messaging, presence and the HTTP routes. `main.ts` runs it as
 * a process; tests and benches can run it in-process.
 */
import { Redis } from 'ioredis';
import { Gauge } from 'prom-client';
import type { CryptoBackend } from '../protocol/index.ts';
import { AdminService } from './admin/admin.ts';
import { Limits } from './admin/limits.ts';
import { pendingMigrations } from './auth/migrate.ts';
import { createAuthModule } from './auth/module.ts';
import { endOwed, parseEndOwed } from './auth/session-store.ts';
import { BackendEvents } from './backend-events.ts';
import { SessionBinding } from './binding.ts';
import { Bus } from './bus.ts';
import type { Config } from './config.ts';
import { OUTBOX_TTL_GRACE_S, Outbox, PUBLISH_CONNECTIONS } from './delivery/outbox.ts';
import { Publisher, type SessionDirectory } from './delivery/publisher.ts';
import { DeliveryService, type ResyncCause } from './delivery/service.ts';
import {
  DependencyMonitor,
  endpointOf,
  logFailure,
  logQueueErrors,
  READONLY_RECONNECT_MS,
  reconnectOnReadonly,
  StartError,
  type StartStep,
  whenReachable,
} from './faults.ts';
import { Gateway, type ListeningPorts } from './gateway.ts';
import { GrpcServer } from './grpc/server.ts';
import { mountAdminApi } from './http/admin-api.ts';
import { mountEventsApi } from './http/events-api.ts';
import { Keys } from './keys.ts';
import { ListLimit } from './list-limit.ts';
import type { Logger } from './log.ts';
import { NodeIdInUseError, Presence } from './messaging/presence.ts';
import { Rooms } from './messaging/rooms.ts';
import { Messaging } from './messaging/service.ts';
import { COLLECT_WAIT_MS } from './metrics.ts';
import { loadServerIdentity } from './server-identity.ts';
import { RetryUntilDone } from './wait.ts';

/** How long a shutdown waits for gRPC calls in flight (and health watches) after the drain. */
const GRPC_CLOSE_GRACE_MS = 2000;

/** Owed session ends the sweep finishes one by one at once (`owedEnds`: moves, and purges of a failed batch). */
const OWED_ENDS_AT_ONCE = 16;

export interface NodeParts {
  gateway: Gateway;
  ports: ListeningPorts;
  delivery: DeliveryService;
  redis: Redis;
  keys: Keys;
}

/** What identity provides to the rest of the node. */
export interface IdentityModule {
  directory: SessionDirectory;
  start(gateway: Gateway, startStep?: StartStep): Promise<void>;
  close(): Promise<void>;
}

export async function startNode(
  config: Config,
  log: Logger,
  backend: CryptoBackend,
  options: { serveMetrics?: boolean } = {},
): Promise<NodeParts> {
  const id = loadServerIdentity(backend, config.identityFile);
  if (id.modeWarning) log.warn(id.modeWarning);
  log.info(
    { fingerprint: id.fingerprint, created: id.created, file: config.identityFile },
    'server identity',
  );

  // Every Redis call a request waits on is bounded (docs/ARCHITECTURE.md, "Faults"): a connect
  // and a command take at most GW_REDIS_TIMEOUT_MS, and with the offline queue off a command
  // sent while disconnected fails at once; the request then answers `overloaded`. BullMQ
  // workers block on their own connection (`maxRetriesPerRequest: null`, as BullMQ requires);
  // the queues the request paths add jobs to use `producer`, bounded like the others
  // (BullMQ's "failing fast when Redis is down").
  // A connection that finds itself on a read-only replica (a failover behind the same address)
  // reconnects, at most once a second each (faults.ts, reconnectOnReadonly).
  const t = config.redisTimeoutMs;
  // The subscriber never gets READONLY (SUBSCRIBE and PING are a replica's too), but a replica
  // that is resyncing with the new primary passes on nothing published meanwhile (a full resync
  // waits `repl-diskless-sync-delay`, 5 s by default): it is moved with the others, at most once
  // a second, and its return resyncs every local session (app.ts, restoreNode).
  let subscriberMovedAt = 0;
  const readonly = (connection: string) =>
    reconnectOnReadonly((e) => {
      log.warn({ connection, err: e.message }, 'redis connection reached a read-only replica: reconnecting');
      if (connection !== 'subscriber' && Date.now() - subscriberMovedAt >= READONLY_RECONNECT_MS) {
        subscriberMovedAt = Date.now();
        sub.disconnect(true);
      }
    });
  const bounded = {
    connectTimeout: t,
    commandTimeout: t,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
  };
  const redis = new Redis(config.redisUrl, {
    ...bounded,
    enableAutoPipelining: true,
    lazyConnect: true,
    reconnectOnError: readonly('main'),
  });
  const sub = new Redis(config.redisUrl, {
    ...bounded,
    lazyConnect: true,
    reconnectOnError: readonly('subscriber'),
  });
  const producer = new Redis(config.redisUrl, {
    ...bounded,
    lazyConnect: true,
    reconnectOnError: readonly('producer'),
  });
  const bull = new Redis(config.redisUrl, {
    connectTimeout: t,
    maxRetriesPerRequest: null,
    lazyConnect: true,
    reconnectOnError: readonly('workers'),
  });
  // GW_REDIS_MIN_REPLICAS: publishes go on connections of their own, whose WAITs (each holds
  // its connection until the replicas answer) hold nothing else; several, so that a publish
  // call finds one whose WAIT is not out (Outbox.publishConnection). Not auto-pipelined: ioredis
  // settles an auto-pipeline's commands together, so a publish call's reply (and the sends from
  // it) would wait for the WAIT sent with it.
  const publishing =
    config.redisMinReplicas > 0
      ? Array.from(
          { length: PUBLISH_CONNECTIONS },
          () =>
            new Redis(config.redisUrl, {
              ...bounded,
              lazyConnect: true,
              reconnectOnError: readonly('publishes'),
            }),
        )
      : [];
  const clients = [redis, sub, producer, bull, ...publishing];
  // Reconnect attempts of an outage: the dependency monitor logs the outage once.
  // The last one is named by a start that fails to connect (ioredis's own rejection says only
  // "Connection is closed.").
  let connectionError: string | undefined;
  for (const r of clients)
    r.on('error', (e) => {
      connectionError = e.message;
      log.debug({ err: e.message }, 'redis connection error');
    });
  try {
    // Redis not up yet (a stack started at once) is waited for, GW_START_WAIT_MS.
    await whenReachable(() => Promise.all(clients.map((r) => r.connect())), {
      dependency: 'redis',
      endpoint: endpointOf(config.redisUrl),
      waitMs: config.startWaitMs,
      log,
      undo: () => {
        for (const r of clients) r.disconnect();
      },
      cause: (e) => connectionError ?? (e as Error).message,
    });
  } catch (e) {
    for (const r of clients) r.disconnect();
    const why = connectionError ?? (e as Error).message;
    throw new StartError(
      'redis_unavailable',
      `could not connect to Redis at ${endpointOf(config.redisUrl)} (${why})`,
      e,
    );
  }
  // A Redis that evicts keys at `maxmemory` drops sessions, outboxes and queued jobs without a
  // trace (docs/OPERATIONS.md asks for `noeviction`): said at start and at each reconnect (a
  // failover may land on a server set up otherwise), as an error line with its policy.
  void checkEvictionPolicy(redis, log);
  redis.on('ready', () => void checkEvictionPolicy(redis, log));

  const keys = new Keys(config.redisPrefix);
  const bus = new Bus(sub, log);
  const binding = new SessionBinding(redis);
  const backendEvents = new BackendEvents(producer, keys.bullPrefix);
  logQueueErrors(backendEvents.queue, log);
  const gateway = new Gateway({
    config,
    log,
    backend,
    identity: id.identity,
    fingerprint: id.fingerprint,
    serveMetrics: options.serveMetrics,
  });
  gateway.counters.timeRedis(redis, 'commands');
  gateway.counters.timeRedis(producer, 'queues');
  for (const r of publishing) gateway.counters.timeRedis(r, 'publishes');

  // One budget for the list requests of both modules (users, rooms; sessions).
  const listLimit = new ListLimit(redis, keys, config.listPerMinute);
  const identity = await createAuthModule(config, log, {
    redis,
    bus,
    keys,
    binding,
    backend: backendEvents,
    metrics: gateway.counters,
    listLimit,
  });
  const outbox = new Outbox(redis, keys, {
    max: config.outboxMax,
    policy: config.outboxPolicy,
    ttlSeconds: config.sessionTtlSeconds + OUTBOX_TTL_GRACE_S,
    forwardWindow: config.maxInflight,
    ...(publishing.length > 0
      ? {
          replicas: {
            min: config.redisMinReplicas,
            waitMs: config.redisReplicaWaitMs,
            connections: publishing,
          },
        }
      : {}),
  });
  const publisher = new Publisher(outbox, identity.directory);
  const delivery = new DeliveryService({
    gateway,
    redis,
    bullConnection: bull,
    queueConnection: producer,
    bus,
    keys,
    binding,
    outbox,
    publisher,
    backend: backendEvents,
    log,
    registry: gateway.metrics,
    options: {
      ackTimeoutMs: config.ackTimeoutMs,
      maxAttempts: config.maxAttempts,
      maxInflight: config.maxInflight,
      ackFlushMs: config.ackFlushMs,
      retryBaseMs: config.retryBaseMs,
      retryMaxMs: config.retryMaxMs,
      sessionTtlSeconds: config.sessionTtlSeconds,
      workerCheckMs: config.workerCheckMs,
    },
  });
  const rooms = new Rooms({
    redis,
    bus,
    keys,
    nodeId: gateway.nodeId,
    binding,
    log,
    options: {
      defaultRoom: config.defaultRoom,
      maxBody: config.maxBodyChars,
      historyMs: config.roomHistoryMs,
      historyMax: config.roomHistoryMax,
    },
  });
  delivery.localRoomSessions = (room) => rooms.localSessions(room);
  const presence = new Presence({
    gateway,
    redis,
    bullConnection: bull,
    binding,
    keys,
    log,
    options: {
      staleMs: config.presenceStaleMs,
      sweepIntervalMs: config.sweepIntervalMs,
      workerCheckMs: config.workerCheckMs,
      sessionTtlSeconds: config.sessionTtlSeconds,
    },
  });
  const limits = new Limits({ redis, bus, keys, log, registry: gateway.metrics });
  const messaging = new Messaging({
    gateway,
    redis,
    keys,
    binding,
    rooms,
    presence,
    delivery,
    publisher,
    backend: backendEvents,
    log,
    limits,
    listLimit,
  });

  // Before this node writes anything of its own (its beat, a session) or serves: what an
  // earlier process under the same node id left in Redis is swept as a dead node's, or the
  // start stops if another live process beats under that id (docs/ARCHITECTURE.md, "A node
  // id that starts again"). Redis refusing or timing out here (a replica's READONLY during a
  // failover, a Redis too slow) is waited for as its connect is (GW_START_WAIT_MS): each try
  // reads the id's beat again, so one whose claim Redis wrote before its reply was lost watches
  // its own beat a stale time, then sweeps it as a dead process's and claims the id.
  // A Redis call of the start, tried again on an outage for GW_START_WAIT_MS.
  const startStep: StartStep = (step) =>
    whenReachable(step, {
      dependency: 'redis',
      endpoint: endpointOf(config.redisUrl),
      waitMs: config.startWaitMs,
      log,
    });
  try {
    await startStep(() => presence.sweepPreviousLife((now) => rooms.sweepRoomLeft(now)));
  } catch (e) {
    if (!(e instanceof NodeIdInUseError))
      log.error(
        { err: e, code: 'previous_life_sweep_failed' },
        'could not check or sweep what an earlier process of this node id left in Redis; not starting',
      );
    throw e;
  }

  // From here the id is this process's (its first beat, the claim). A start that fails from
  // here on gives it back if it holds nothing yet, so that the restart does not wait for the
  // beat to go stale (GW_PRESENCE_STALE_MS) as if a live process held it.
  try {
    // Back from a disconnect, Redis may have lost its last writes: re-pump every local session
    // from its outbox and restore its presence and room members (docs/ARCHITECTURE.md, "Faults").
    // A restore Redis refuses or times out is tried again until it is done: nothing else would
    // start it again when the connection stayed up (a silence, a Redis that stalled and went on).
    const restorer = (part: 'presence' | 'rooms', task: () => Promise<void>, failure: string) =>
      new RetryUntilDone(task, {
        failed: (e, tries, retryInMs) => logFailure(log, e, { tries, retryInMs }, failure),
        doneAfterRetry: (tries) => log.info({ part, tries }, 'node restored after a retry'),
      });
    const restores = [
      restorer('presence', () => presence.restore(), 'could not restore presence'),
      restorer('rooms', () => rooms.restore(), 'could not restore room members'),
    ];
    gateway.onClose(() => {
      for (const r of restores) r.stop();
    });
    const restoreNode = (cause: ResyncCause) => {
      delivery.resyncAll(cause);
      for (const r of restores) r.run();
    };
    for (const [name, r] of [
      ['redis', redis],
      ['subscriber', sub],
    ] as const) {
      // Connected above: every 'ready' from here on is a reconnect.
      r.on('ready', () => restoreNode(`${name}_reconnect`));
    }
    // The same after a silence in which another node may have swept this one as dead (its
    // process or Redis stalled past GW_PRESENCE_STALE_MS; Presence.beat).
    presence.onSilence(() => restoreNode('node_silence'));

    // A session that ends takes its undelivered events with it, each reported delivery.failed;
    // one taken over by a new session of its device hands them to it (PROTOCOL.md §4).
    // The successor's outbox stays within GW_OUTBOX_MAX: what the policy drops is reported, and
    // under `reject` what did not fit is reported failed (`outbox_full`). The end recorded that
    // work as owed (keys.ts endsOwed) in the step that ended the session; it is tried until
    // done (a Redis that refused or timed out) and then forgotten. What a node that died left
    // owed, the sweep does (owedEnds below). Every step may run twice: a move finds the events
    // gone, a purge takes nothing, and reports are deduplicated by their job ids.
    const endOutbox = async (sid: string, reason: string, successor?: string) => {
      const purge = (why = `session_${reason}`) => delivery.purge(sid, why);
      if (!successor) return purge();
      const r = await outbox.move(sid, successor);
      if (r === -1) return purge();
      await delivery.reportDropped(successor, r.dropped);
      return r.left > 0 ? purge('outbox_full') : r.moved;
    };
    const ending = new Set<RetryUntilDone>();
    gateway.onClose(() => {
      for (const r of ending) r.stop();
    });
    identity.service.onSessionEnded((sid, reason, successor) => {
      const member = endOwed(sid, reason, successor);
      const retry: RetryUntilDone = new RetryUntilDone(
        async () => {
          await endOutbox(sid, reason, successor);
          await redis.zrem(keys.endsOwed, member);
          ending.delete(retry);
        },
        {
          failed: (e, tries, retryInMs) =>
            logFailure(log, e, { sessionId: sid, tries, retryInMs }, 'could not purge or move an outbox'),
          doneAfterRetry: (tries) =>
            log.info({ sessionId: sid, tries }, 'outbox purged or moved after a retry'),
        },
      );
      ending.add(retry);
      retry.run();
    });
    // The Redis calls of the modules' starts (their subscriptions, the first beat, the sweep's
    // schedule, the limits' first read) are waited out as the sweep above is (startStep): a
    // Redis slow past GW_REDIS_TIMEOUT_MS, or refusing them as an outage, for GW_START_WAIT_MS
    // each. Before, one such call that timed out stopped the start (exit 1).
    await identity.start(gateway, startStep);
    await delivery.start(startStep);
    await presence.start(
      {
        roomLeft: (now) => rooms.sweepRoomLeft(now),
        owedReports: (cutoff, limit) => delivery.reportOwed(cutoff, limit),
        // The purges in one batch; the moves OWED_ENDS_AT_ONCE at a time (each of its own
        // session's keys: a few round trips, which the others overlap).
        owedEnds: async (cutoff, limit) => {
          const members = await redis.zrangebyscore(keys.endsOwed, '-inf', cutoff, 'LIMIT', 0, limit);
          const done: { sid: string; reason: string }[] = [];
          // The purges together (a fleet's expired sessions, a dead node's logouts): a few round
          // trips for the batch (Delivery.purgeAll) instead of four or five for each session.
          // Should the batch fail, its purges go one by one with the moves, so that one the batch
          // cannot finish (a key of the wrong type) holds up no other.
          let oneByOne: string[] = [];
          const purges: { member: string; sid: string; reason: string }[] = [];
          for (const member of members) {
            const end = parseEndOwed(member);
            if (end && !end.successor) purges.push({ member, sid: end.sid, reason: end.reason });
            else oneByOne.push(member);
          }
          if (purges.length > 0) {
            try {
              await delivery.purgeAll(
                purges.map((p) => ({ sessionId: p.sid, reason: `session_${p.reason}` })),
              );
              await redis.zrem(keys.endsOwed, ...purges.map((p) => p.member));
              for (const p of purges) done.push({ sid: p.sid, reason: p.reason });
            } catch (e) {
              logFailure(
                log,
                e,
                { sessions: purges.length },
                'could not purge outboxes together, purging one by one',
              );
              oneByOne = oneByOne.concat(purges.map((p) => p.member));
            }
          }
          let next = 0;
          // A put-off Redis refused too: the sweep fails (logged) once the others are done.
          let putOffFailed: unknown;
          const finish = async () => {
            while (next < oneByOne.length) {
              const member = oneByOne[next++];
              const end = parseEndOwed(member);
              try {
                if (end) await endOutbox(end.sid, end.reason, end.successor);
                await redis.zrem(keys.endsOwed, member);
                if (end) done.push({ sid: end.sid, reason: end.reason });
              } catch (e) {
                // Left for a stale time more, not for every sweep; the others go on.
                logFailure(log, e, { sessionId: end?.sid }, 'could not purge or move an outbox');
                await redis.zadd(keys.endsOwed, 'XX', Date.now(), member).catch((e2) => {
                  putOffFailed ??= e2;
                });
              }
            }
          };
          await Promise.all(Array.from({ length: Math.min(OWED_ENDS_AT_ONCE, oneByOne.length) }, finish));
          if (putOffFailed !== undefined) throw putOffFailed;
          return { done, found: members.length };
        },
        expiredSessions: (limit) => identity.service.endExpired(limit),
        auditEnds: (cutoff, limit) => identity.service.writeOwedEnds(cutoff, limit),
        lostSessions: () => identity.service.endLostSessions(config.auditCheckBatch),
        resurrectedSessions: () => identity.service.endResurrected(config.auditCheckBatch),
        // Reported first, then removed (with their members): a report Redis refuses leaves them
        // due for the next sweep, and the job ids keep a second report from being queued.
        expire: async (members, now) => {
          await delivery.reportExpiredAll(await outbox.peekExpired(members, now));
          await delivery.takeExpired(members, now);
        },
      },
      startStep,
    );
    await limits.start(startStep);
    messaging.start();
    mountEventsApi(gateway.app, delivery, config.apiKey, log);
    const admin = new AdminService({
      pool: identity.pool,
      redis,
      queueConnection: producer,
      keys,
      outbox,
      identity: {
        userIdOf: (name) => identity.service.userIdOf(name),
        sessionIdsOf: (userId) => identity.service.store.ofUser(userId),
        session: (sid) => identity.service.store.get(sid),
        revoke: (sid) => identity.service.endSession(sid, 'revoked'),
      },
      backendQueue: backendEvents.queue,
      log,
      sessionTtlSeconds: config.sessionTtlSeconds,
    });
    mountAdminApi(gateway.app, { admin, limits }, { adminKey: config.adminKey, apiKey: config.apiKey }, log);
    // Redis is probed with a write: one that answers PING but refuses writes (OOM at
    // `maxmemory`, MISCONF when it cannot persist, READONLY after a failover) serves no
    // publish, login or join, and is down for the gateway (docs/ARCHITECTURE.md, "A Redis that
    // refuses writes").
    // PostgreSQL the same way: one that answers but is read-only (a standby, a failover's old
    // primary still reached through a pooled connection) takes no registration or login; the
    // connection that found it so is discarded, and the pool connects again through the address.
    const probePostgres = async () => {
      const client = await identity.pool.connect();
      let failed: unknown;
      try {
        const r = await client.query<{ ro: boolean }>(
          "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean AS ro",
        );
        if (r.rows[0]?.ro)
          failed = Object.assign(
            new Error('PostgreSQL is read-only (a standby, or transaction_read_only on)'),
            {
              code: '25006',
            },
          );
      } catch (e) {
        failed = e;
      } finally {
        client.release(failed instanceof Error ? failed : undefined);
      }
      if (failed) throw failed;
    };
    const probeKey = keys.probe(gateway.nodeId);
    const probeRedis = () => redis.set(probeKey, String(Date.now()), 'PX', 60_000);
    const monitor = new DependencyMonitor(
      log,
      { redis: probeRedis, postgres: probePostgres },
      { intervalMs: 1000, timeoutMs: Math.max(config.redisTimeoutMs, config.dbQueryTimeoutMs) },
    );
    monitor.start();
    new Gauge({
      name: 'gateway_dependency_up',
      help: 'Whether the last probe of a dependency (redis, postgres) succeeded (1) or failed (0); redis_subscriber: whether the pub/sub connection is up with its subscriptions applied.',
      labelNames: ['dependency'],
      registers: [gateway.metrics],
      // Over the processes of a machine: up only if every process reaches it.
      aggregator: 'min',
      collect() {
        for (const d of ['redis', 'postgres'] as const) this.labels(d).set(monitor.isDown(d) ? 0 : 1);
        this.labels('redis_subscriber').set(bus.live ? 1 : 0);
      },
    });
    new Gauge({
      name: 'gateway_ready',
      help: 'Whether /health/ready would answer 200 (1) or 503 (0), checked at scrape.',
      registers: [gateway.metrics],
      aggregator: 'min',
      async collect() {
        // A check that does not answer within COLLECT_WAIT_MS fails here: a scrape must not wait
        // on a hung dependency (gateway/metrics.ts).
        this.set((await gateway.readiness(Math.min(config.readyTimeoutMs, COLLECT_WAIT_MS))).ready ? 1 : 0);
      },
    });
    gateway.onReadiness('redis', async () => {
      await probeRedis();
      return undefined;
    });
    // PostgreSQL not answering leaves the node ready, degraded, unless GW_READY_REQUIRES_POSTGRES:
    // resumes, refreshes, events and rooms go on without it. Pending migrations (an answer) fail.
    const degrades = !config.readyRequiresPostgres;
    gateway.onReadiness(
      'postgres',
      async () => {
        await probePostgres();
        return undefined;
      },
      { degrades },
    );
    gateway.onReadiness(
      'migrations',
      async () => {
        const pending = await pendingMigrations((sql, params) => identity.pool.query(sql, params));
        return pending.length ? `pending: ${pending.join(', ')}` : undefined;
      },
      { degrades },
    );

    // The gRPC server (GW_GRPC_PORT; off when 0): not ready when /health/ready is not, drained
    // with the device listeners, closed before the identity service it calls.
    const grpc =
      config.grpcPort > 0
        ? new GrpcServer({
            host: config.host,
            port: config.grpcPort,
            log,
            registry: gateway.metrics,
            operations: identity.operations,
            serving: () => !gateway.shuttingDown && !monitor.isDown('redis') && !monitor.isDown('postgres'),
          })
        : undefined;
    if (grpc) {
      gateway.onShutdown(() => grpc.shuttingDown());
      gateway.onDrain(() => grpc.drain());
      gateway.onClose(() => grpc.close(GRPC_CLOSE_GRACE_MS));
    }

    gateway.onClose(async (deadline) => {
      monitor.stop();
      messaging.close();
      limits.close();
      // The room leaves still owed are tried (while the sweep's worker closes) until the drain's
      // deadline but for two Redis timeouts: a try still out then, and the deregistration behind
      // it, fail within the deadline. The node deregisters only if Redis then holds no session
      // or membership of it, else the sweep of dead nodes removes them.
      await presence.close(rooms.settle(deadline - 2 * config.redisTimeoutMs));
      await delivery.close();
      await admin.close();
      await identity.close();
      await backendEvents.close();
      await Promise.allSettled(clients.map((r) => r.quit()));
    });

    const ports = await gateway.start();
    if (grpc) ports.grpcPort = await grpc.start();
    return { gateway, ports, delivery, redis, keys };
  } catch (e) {
    await presence.release();
    throw e;
  }
}

/**
 * Logs an error (`redis_eviction_policy`) when Redis's `maxmemory-policy` is not `noeviction`.
 * Read from `INFO memory`, which managed servers that refuse `CONFIG GET` still answer. A
 * failed read is left to the dependency monitor.
 */
async function checkEvictionPolicy(redis: Redis, log: Logger): Promise<void> {
  let info: string;
  try {
    info = await redis.info('memory');
  } catch (e) {
    log.debug({ err: (e as Error).message }, 'could not read the eviction policy of Redis');
    return;
  }
  const policy = /^maxmemory_policy:(\S+)/m.exec(info)?.[1];
  if (policy && policy !== 'noeviction') {
    log.error(
      { code: 'redis_eviction_policy', policy },
      'Redis evicts keys at maxmemory: sessions, undelivered events and queued jobs can vanish without a trace; set maxmemory-policy noeviction',
    );
  }
}
