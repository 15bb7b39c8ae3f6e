/**
 * A node's Presence in the test's process (gateway/messaging/presence.ts), with a stand-in for
 * the gateway: what Presence reads of it (its node id, connections, metrics, and the hooks it
 * registers), and a sweep timer that runs the sweep hooks every 50 ms once `sweeping()` is
 * called. Its two Redis connections (commands bounded, with `redisOptions` added, and BullMQ's
 * unbounded one) are closed by
 * `disconnect()`; `lines` holds what it logged.
 */
import { randomUUID } from 'node:crypto';
import type { RedisOptions } from 'ioredis';
import { Registry } from 'prom-client';
import { SessionBinding } from '../../gateway/binding.ts';
import type { Connection } from '../../gateway/connection.ts';
import type { Gateway } from '../../gateway/gateway.ts';
import type { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { Presence, type PresenceOptions } from '../../gateway/messaging/presence.ts';
import { REDIS_URL, redisClient } from './cleanup.ts';
import { captureLog } from './log-capture.ts';

export function testPresence(
  keys: Keys,
  options: PresenceOptions,
  {
    nodeId = `node-${randomUUID().slice(0, 8)}`,
    url = REDIS_URL,
    redisOptions = {},
    connections = [],
  }: {
    nodeId?: string;
    url?: string;
    redisOptions?: RedisOptions;
    /** The node's connections, as `gateway.connections` (stand-ins will do: id and session). */
    connections?: Iterable<Connection>;
  } = {},
) {
  const redis = redisClient(url, redisOptions);
  const bull = redisClient(url, { maxRetriesPerRequest: null, commandTimeout: undefined });
  const { lines, stream } = captureLog();
  const log = createLogger('debug', {}, stream);
  const metrics = new Registry();
  const hooks: ((now: number) => void)[] = [];
  let sweepTimer: NodeJS.Timeout | undefined;
  const gateway = {
    nodeId,
    connections,
    metrics,
    onSessionBound() {},
    onSessionUnbound() {},
    onSweep(h: (now: number) => void) {
      hooks.push(h);
    },
  } as unknown as Gateway;
  const binding = new SessionBinding(redis);
  const presence = new Presence({
    gateway,
    redis,
    bullConnection: bull,
    binding,
    keys,
    log,
    options,
  });
  return {
    presence,
    binding,
    redis,
    metrics,
    lines,
    /** Runs the sweep hooks Presence registered, every 50 ms from now; returns their stop. */
    sweeping(): () => void {
      sweepTimer ??= setInterval(() => {
        for (const h of hooks) h(Date.now());
      }, 50);
      return () => clearInterval(sweepTimer);
    },
    disconnect() {
      clearInterval(sweepTimer);
      redis.disconnect();
      bull.disconnect();
    },
  };
}
