/**
 * Publishing to devices from a TypeScript back end, without a gateway process: the same
 * durable path as `POST /v1/events` and the `gw-publish` queue.
 *
 *   import { connectPublisher } from 'device-gateway/publish';
 *   const pub = await connectPublisher({ redisUrl: 'redis://127.0.0.1:6379', prefix: 'gw:' });
 *   const { eid } = await pub.publish({ device: 'sensor-17' }, { name: 'config.update', data: { rate: 5 } });
 *   await pub.close();
 *
 * `username` targets need PostgreSQL (`databaseUrl`, `schema`); the other targets need only Redis.
 * Every Redis call and username look-up is bounded as the gateway's are (`commandTimeoutMs`,
 * GW_REDIS_TIMEOUT_MS's default): a publish that meets a slow or unreachable Redis or
 * PostgreSQL fails with `overloaded` and a `retryAfter`, as `POST /v1/events` answers 503.
 */
import { Redis } from 'ioredis';
import pg from 'pg';
import { UserIds } from './auth/user-ids.ts';
import { BackendEvents } from './backend-events.ts';
import { Outbox, type OverflowPolicy, PUBLISH_CONNECTIONS } from './delivery/outbox.ts';
import {
  type EventInput,
  Publisher,
  type PublishOutcome,
  type SessionDirectory,
  type Target,
  validateEventInput,
} from './delivery/publisher.ts';
import { dependencyUnavailable, isDependencyFault, reconnectOnReadonly } from './faults.ts';
import { Keys } from './keys.ts';

export interface PublisherOptions {
  redisUrl?: string;
  /** GW_REDIS_PREFIX of the gateways (default `gw:`). */
  prefix?: string;
  /** For `username` targets. */
  databaseUrl?: string;
  schema?: string;
  /** Must match the gateways' GW_OUTBOX_MAX / GW_OUTBOX_POLICY / SESSION_TTL. */
  outboxMax?: number;
  outboxPolicy?: OverflowPolicy;
  sessionTtlSeconds?: number;
  /**
   * The gateways' GW_MAX_INFLIGHT (default 32, theirs): an event for a connected device goes to
   * the node holding its session with the publish, which sends it without reading it back from
   * Redis, while the device's unacked events leave a slot. 0: never; the node is woken and reads
   * it. Another value than the gateways' is safe, only slower.
   */
  maxInflight?: number;
  /**
   * The longest a Redis connect or command, or a PostgreSQL connect or username look-up, may
   * take (default 3000, the gateways' GW_REDIS_TIMEOUT_MS); a publish that meets a longer one,
   * or a Redis or PostgreSQL that is unreachable, fails with `overloaded`.
   */
  commandTimeoutMs?: number;
  /**
   * The gateways' GW_REDIS_MIN_REPLICAS (default 0): a qos-1 publish resolves only once this
   * many Redis replicas have the event (`WAIT`, on a connection of the publishes' own), else
   * fails with `overloaded` (stored on the primary all the same: publish again with the same
   * `eid`). `replicaWaitMs` (default 250, below commandTimeoutMs) bounds each wait.
   */
  minReplicas?: number;
  replicaWaitMs?: number;
}

export interface GatewayPublisher {
  /**
   * Resolves once every qos-1 copy is durable in Redis; throws a ProtocolError: `not_found`,
   * `bad_message`, or `overloaded` (with `retryAfter`) when Redis (or PostgreSQL, for a
   * username) does not answer in time or is unreachable. After `overloaded` the event may or
   * may not be stored: publish again with the same `eid`.
   */
  publish(target: Target, event: EventInput): Promise<PublishOutcome>;
  close(): Promise<void>;
}

export type { EventInput, PublishOutcome, Target };

export async function connectPublisher(o: PublisherOptions = {}): Promise<GatewayPublisher> {
  // Bounded as the gateway's request-path clients are (gateway/app.ts): a command waits at most
  // commandTimeoutMs, and one sent while disconnected fails at once (no offline queue). The
  // `delivery.dropped` reports go through a BullMQ producer, which may be bounded the same way
  // (BullMQ's "failing fast when Redis is down"); only blocking workers need retries for ever.
  const url = o.redisUrl ?? 'redis://127.0.0.1:6379';
  const t = o.commandTimeoutMs ?? 3000;
  const bounded = {
    connectTimeout: t,
    commandTimeout: t,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    lazyConnect: true,
  };
  // A failover behind the same address: reconnect on READONLY (faults.ts).
  const redis = new Redis(url, {
    ...bounded,
    enableAutoPipelining: true,
    reconnectOnError: reconnectOnReadonly(),
  });
  const bull = new Redis(url, { ...bounded, reconnectOnError: reconnectOnReadonly() });
  const minReplicas = o.minReplicas ?? 0;
  const replicaWaitMs = o.replicaWaitMs ?? 250;
  if (minReplicas > 0 && replicaWaitMs >= t)
    throw new Error(`replicaWaitMs (${replicaWaitMs}) must be below commandTimeoutMs (${t})`);
  // Not auto-pipelined, and several: see gateway/app.ts.
  const publishing =
    minReplicas > 0
      ? Array.from(
          { length: PUBLISH_CONNECTIONS },
          () => new Redis(url, { ...bounded, reconnectOnError: reconnectOnReadonly() }),
        )
      : [];
  const clients = [redis, bull, ...publishing];
  // Reconnect attempts while Redis is away: a publish meanwhile fails with `overloaded`.
  for (const r of clients) r.on('error', () => {});
  try {
    await Promise.all(clients.map((r) => r.connect()));
  } catch (e) {
    for (const r of clients) r.disconnect();
    throw e;
  }
  const keys = new Keys(o.prefix ?? 'gw:');
  const ttl = o.sessionTtlSeconds ?? 86400;
  const pool = o.databaseUrl
    ? new pg.Pool({
        connectionString: o.databaseUrl,
        max: 2,
        // Bounded as the Redis calls are: a frozen PostgreSQL fails a username look-up with
        // `overloaded` (faults.ts reads these timeouts as a dependency fault), never a wait for
        // ever. The server ends a statement that outlasts it too.
        connectionTimeoutMillis: t,
        query_timeout: t,
        options: `-c search_path=${o.schema ?? 'public'} -c statement_timeout=${t}`,
      })
    : null;
  const userIds = new UserIds(
    async (username) => {
      if (!pool) throw new Error('username targets need databaseUrl');
      const r = await pool.query('SELECT id FROM users WHERE lower(username) = lower($1)', [username]);
      return r.rowCount ? (r.rows[0].id as string) : null;
    },
    () => redis.get(keys.usersGeneration),
  );
  const directory: SessionDirectory = {
    userIdOf: (username) => userIds.of(username),
    userIdKnown: (username) => userIds.known(username),
  };
  const outbox = new Outbox(redis, keys, {
    max: o.outboxMax ?? 1000,
    policy: o.outboxPolicy ?? 'reject',
    ttlSeconds: ttl,
    forwardWindow: o.maxInflight ?? 32,
    ...(publishing.length > 0
      ? { replicas: { min: minReplicas, waitMs: replicaWaitMs, connections: publishing } }
      : {}),
  });
  const publisher = new Publisher(outbox, directory);
  const backend = new BackendEvents(bull, keys.bullPrefix);
  return {
    async publish(target, event) {
      const checked = validateEventInput(target, event);
      try {
        const outcome = await publisher.publish(checked.target, checked.event);
        for (const d of outcome.dropped) {
          await backend.dropped(d.sessionId, d.event);
          // Owed until queued (publish.lua keeps it): a publisher that dies before this line, or
          // whose removal fails, leaves it to the gateway's sweep (the same job id).
          await outbox.dropSettled(d.sessionId, d.event.eid).catch(() => {});
        }
        return outcome;
      } catch (e) {
        throw isDependencyFault(e) ? dependencyUnavailable() : e;
      }
    },
    async close() {
      await backend.close();
      await pool?.end();
      for (const r of clients) r.disconnect();
    },
  };
}
