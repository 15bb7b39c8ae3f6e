/**
 * An Outbox on the shared Redis under a key prefix of its own (the unit tests of its scripts):
 * sessions and events to put in it, and the cleanup of its keys.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { Outbox, type StoredEvent } from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { dropRedisPrefix, REDIS_URL } from './cleanup.ts';

export function outboxFixture(name: string) {
  const prefix = `gwtest:${name}:${randomUUID().slice(0, 8)}:`;
  const keys = new Keys(prefix);
  const redis = new Redis(REDIS_URL, { commandTimeout: 10_000 });
  const outbox = new Outbox(redis, keys, { max: 1000, policy: 'reject', ttlSeconds: 3600 });
  return {
    prefix,
    keys,
    redis,
    outbox,
    /** A live session's id (its record in Redis). */
    async session(): Promise<string> {
      const sid = randomUUID();
      await redis.hset(keys.session(sid), 'userId', 'u1');
      return sid;
    },
    /** An event named `${name}.test`. */
    event: (eid: string, data: unknown): StoredEvent => ({
      eid,
      name: `${name}.test`,
      data,
      ts: 1_764_633_600_000,
    }),
    async close(): Promise<void> {
      redis.disconnect();
      await dropRedisPrefix(prefix);
    },
  };
}
