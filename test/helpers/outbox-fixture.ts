/**
 * An Outbox on the shared Redis under a key prefix of its own (the unit tests of its scripts):
 * sessions and events to put in it, and the cleanup of its keys.
 */
import { randomUUID } from 'node:crypto';
import { after, before } from 'node:test';
import { Redis } from 'ioredis';
import {
  type DirectClaim,
  type DirectGrant,
  type DirectSender,
  type Fanout,
  Outbox,
  type StoredEvent,
} from '../../gateway/delivery/outbox.ts';
import { Keys } from '../../gateway/keys.ts';
import { unpack } from '../../protocol/index.ts';
import { dropRedisPrefix, REDIS_URL } from './cleanup.ts';
import { type RedisProxy, startRedisProxy } from './redis-proxy.ts';

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

/**
 * An Outbox on the same keys whose Redis is behind a proxy with a 300 ms command timeout: the
 * proxy can hold a reply past it (a reply lost to a Redis slow past the node's timeout). Started
 * and stopped by the calling file's `before` and `after` hooks, registered here.
 */
export function slowOutboxFor(keys: Keys): { readonly proxy: RedisProxy; readonly outbox: Outbox } {
  let started: { proxy: RedisProxy; outbox: Outbox; slow: Redis } | undefined;
  before(async () => {
    const shared = new URL(REDIS_URL);
    const proxy = await startRedisProxy({ host: shared.hostname, port: Number(shared.port || 6379) });
    const slow = new Redis(proxy.url, { commandTimeout: 300, maxRetriesPerRequest: 1 });
    started = {
      proxy,
      slow,
      outbox: new Outbox(slow, keys, { max: 1000, policy: 'reject', ttlSeconds: 3600 }),
    };
  });
  after(async () => {
    started?.slow.disconnect();
    await started?.proxy.close();
  });
  const get = () => {
    if (!started) throw new Error('the slow outbox is used before its before() hook ran');
    return started;
  };
  return {
    get proxy() {
      return get().proxy;
    },
    get outbox() {
      return get().outbox;
    },
  };
}

/**
 * A node's side of sending from the publish (the outbox's DirectSender) for the scripts' tests:
 * one connection per session given a last sequence in `last`, with what the publishes granted
 * it (`grants`) and the qos-0 events it was given to send (`now`).
 */
export class RecordingSender implements DirectSender {
  readonly last = new Map<string, number>();
  readonly grants: { sid: string; eid: string; seq: number }[] = [];
  readonly now: { sid: string; eid: string; qos: unknown }[] = [];
  constructor(readonly nodeId: string) {}
  claim(to: Fanout): DirectClaim[] {
    if (!('session' in to) || !this.last.has(to.session)) return [];
    return [{ sid: to.session, after: this.last.get(to.session)! }];
  }
  settle(claim: DirectClaim, eid: string, grant: DirectGrant | null): void {
    if (!grant) return;
    this.grants.push({ sid: claim.sid, eid, seq: grant.seq });
    this.last.set(claim.sid, grant.seq);
  }
  sendNow(sid: string, message: Buffer): void {
    const m = unpack(message) as { eid: string; qos: unknown };
    this.now.push({ sid, eid: m.eid, qos: m.qos });
  }
}
