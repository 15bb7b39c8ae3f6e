/**
 * A Lua script run by its SHA1 (EVALSHA), sent whole (EVAL) when Redis has no such script: its
 * first use, a restarted or flushed Redis, one whose script cache was emptied.
 *
 * Not ioredis's `defineCommand` for a script a module first runs long after the Redis client
 * was made (a sweep's step, the binding script built at the first bind): an auto-pipelined
 * client makes each pipeline with the commands defined by then, and a pipeline stays open for
 * the commands of later ticks while the one before it is still out (Redis slow or restarting).
 * A command defined after that and called meanwhile throws `TypeError: pipeline[functionName] is
 * not a function`, and the pipeline's reply handling throws again, uncaught: the process stops
 * (the sweep's first check of the audit rows on a node did so in a Redis restart). EVALSHA and
 * EVAL are Redis's own commands, on every pipeline.
 */
import { createHash } from 'node:crypto';
import type { Redis } from 'ioredis';

export type ScriptArg = string | number | Buffer;

/** The Buffer variants (replies as Buffers) exist at run time but are not in ioredis's types. */
interface BufferEval {
  evalshaBuffer(sha: string, numKeys: number, ...rest: ScriptArg[]): Promise<unknown>;
  evalBuffer(lua: string, numKeys: number, ...rest: ScriptArg[]): Promise<unknown>;
}

export class RedisScript {
  readonly sha: string;

  constructor(readonly lua: string) {
    this.sha = createHash('sha1').update(lua).digest('hex');
  }

  /** Runs the script with `keys` (KEYS) and `args` (ARGV); its reply as Redis gives it, strings as strings. */
  run(redis: Redis, keys: string[], args: ScriptArg[]): Promise<unknown> {
    return this.send(
      (sha) => redis.evalsha(sha, keys.length, ...keys, ...args),
      (lua) => redis.eval(lua, keys.length, ...keys, ...args),
    );
  }

  /** As `run`, its strings as Buffers (`callBuffer` loses its command name when auto-pipelined). */
  runBuffer(redis: Redis, keys: string[], args: ScriptArg[]): Promise<unknown> {
    const r = redis as Redis & BufferEval;
    return this.send(
      (sha) => r.evalshaBuffer(sha, keys.length, ...keys, ...args),
      (lua) => r.evalBuffer(lua, keys.length, ...keys, ...args),
    );
  }

  private send(bySha: (sha: string) => Promise<unknown>, whole: (lua: string) => Promise<unknown>) {
    return bySha(this.sha).catch((e: Error) => {
      if (!String(e?.message).startsWith('NOSCRIPT')) throw e;
      return whole(this.lua);
    });
  }
}
