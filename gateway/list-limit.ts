/**
 * Requests that answer with a list whose size grows with the fleet: `users` (without a room it
 * reads every online session's presence record), `rooms` and `sessions` (every live session of
 * the account). One of them costs the node O(list) of CPU: with 5,000 sessions online a `users`
 * took 22-35 ms of the event loop (bench:lists), so one device asking in a loop kept a core busy
 * and delayed every other device of its node. Each session may ask `GW_LIST_PER_MINUTE` of them
 * a minute, counted in Redis across nodes and connections (rate-limiter-flexible, one window a
 * minute); past it `rate_limited` with `retryAfter`, from the node's memory once spent. Per
 * session, not per account: a device maker's account holds a session per device, and each
 * device has its own budget.
 */
import type { Redis } from 'ioredis';
import { RateLimiterRedis, RateLimiterRes } from 'rate-limiter-flexible';
import { ProtocolError } from '../protocol/index.ts';
import type { Keys } from './keys.ts';

export class ListLimit {
  private readonly limiter: RateLimiterRedis;

  constructor(redis: Redis, keys: Keys, perMinute: number) {
    this.limiter = new RateLimiterRedis({
      storeClient: redis,
      keyPrefix: keys.rateLimit('list-session'),
      points: perMinute,
      duration: 60,
      // Spent: refused on this node from memory until the window ends, with no Redis call (a
      // device that goes on asking costs about three pings a refusal).
      inMemoryBlockOnConsumed: perMinute,
    });
  }

  /** Takes one of the session's list requests, or throws `rate_limited` with `retryAfter`. */
  async take(sessionId: string): Promise<void> {
    try {
      await this.limiter.consume(sessionId);
    } catch (e) {
      if (!(e instanceof RateLimiterRes)) throw e;
      throw new ProtocolError(
        'rate_limited',
        'too many users, rooms and sessions requests from this session (GW_LIST_PER_MINUTE)',
        { retryAfter: e.msBeforeNext },
      );
    }
  }
}
