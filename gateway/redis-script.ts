/**
 * A Lua script a module runs long after the Redis client was made (a sweep's step, not a
 * request's), by its SHA1 (EVALSHA), sent whole (EVAL) when Redis has no such script: a
 * restarted or flushed Redis, or one whose script cache was emptied.
 *
 * Not ioredis's `defineCommand`: an auto-pipelined client builds each pipeline with the commands
 * defined when it made it, and a pipeline stays open for the commands of later ticks while the
 * one before it is still out (Redis slow or restarting). A command defined after that and called
 * meanwhile throws `TypeError: pipeline[functionName] is not a function`: the sweep's first check
 * of the audit rows on a node failed so in a Redis restart. EVALSHA and EVAL are Redis's own
 * commands, on every pipeline.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';

export class RedisScript {
  readonly sha: string;

  constructor(readonly lua: string) {
    this.sha = createHash('sha1').update(lua).digest('hex');
  }

  /** Runs the script with `keys` (KEYS) and `args` (ARGV); its reply as Redis gives it. */
  async run(redis: Redis, keys: string[], args: (string | number)[]): Promise<unknown> {
    try {
      return await redis.evalsha(this.sha, keys.length, ...keys, ...args);
    } catch (e) {
      if (!String((e as Error).message).startsWith('NOSCRIPT')) throw e;
      return redis.eval(this.lua, keys.length, ...keys, ...args);
    }
  }
}
