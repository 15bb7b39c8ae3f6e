/**
 * Session activity, throttled: every authenticated request (wire or HTTP) calls `touch`, which
 * costs a Map lookup and no Redis call. A session's activity is taken at most once per
 * `throttleMs` on this node; a timer writes what was taken to the session hash's `lastSeenAt`
 * in one pipeline per tick. So a fleet of N busy sessions costs at most N writes per
 * `throttleMs` however many messages they send, and `lastSeenAt` is at most `throttleMs`
 * (plus a tick) behind the last request.
 *
 * The write never creates a hash (an ended session stays ended) and never moves `lastSeenAt`
 * back (another node, or a resume, may have written a later time). A write that fails (Redis
 * down) is dropped: activity is a hint, and the next activity writes again. A write that finds
 * the hash gone tells `gone`: the session's connections here are bound to nothing.
 */
import type { Redis } from 'ioredis';
import type { Keys } from '../keys.ts';
import type { Logger } from '../log.ts';
import { Throttle } from '../throttle.ts';

/**
 * KEYS[1] session hash; ARGV[1] activity time (ms). Sets lastSeenAt if the hash exists and is
 * older (1; 0 if not older); -1 if the hash is gone. Exported for tests, which tell its calls
 * apart by its sha.
 */
export const MARK = `
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'lastSeenAt') or '0')
if cur and cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'lastSeenAt', ARGV[1])
return 1
`;

type MarkingRedis = Redis & { gwMarkActivity(key: string, at: number): Promise<number> };

export class ActivityTracker {
  /** Activity taken and not yet written, by session id. */
  private pending = new Map<string, number>();
  /** When each session's activity was last taken (entries older than the throttle are pruned). */
  private readonly taken: Throttle;
  private readonly timer: NodeJS.Timeout;
  private readonly redis: MarkingRedis;
  private flushing: Promise<void> | undefined;

  constructor(
    redis: Redis,
    private readonly keys: Keys,
    throttleMs: number,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
    /**
     * Sessions whose record the write found gone while this node took their activity: ended
     * where no notice reached this node, or lost by Redis (a rollback or a flush that kept the
     * node's connections, so no reconnect looked for them).
     */
    private readonly gone: (sessionIds: string[]) => void = () => {},
  ) {
    if (!('gwMarkActivity' in redis)) redis.defineCommand('gwMarkActivity', { numberOfKeys: 1, lua: MARK });
    this.redis = redis as MarkingRedis;
    this.taken = new Throttle(throttleMs);
    this.timer = setInterval(() => void this.flush(), Math.min(1000, throttleMs));
    this.timer.unref();
  }

  /** Activity of a session now: taken if its last was at least `throttleMs` ago. */
  touch(sessionId: string): void {
    const t = this.now();
    if (this.taken.take(sessionId, t)) this.pending.set(sessionId, t);
  }

  /** Writes the activity taken so far (one pipeline); one flush at a time. */
  flush(): Promise<void> {
    this.flushing ??= this.write().finally(() => {
      this.flushing = undefined;
    });
    return this.flushing;
  }

  private async write(): Promise<void> {
    this.taken.prune(this.now());
    if (this.pending.size === 0) return;
    const batch = this.pending;
    this.pending = new Map();
    const p = this.redis.pipeline() as unknown as {
      gwMarkActivity(k: string, at: number): void;
      exec(): Promise<unknown>;
    };
    const sids = [...batch.keys()];
    for (const [sid, at] of batch) p.gwMarkActivity(this.keys.session(sid), at);
    let replies: [Error | null, unknown][] | null;
    try {
      replies = (await p.exec()) as [Error | null, unknown][] | null;
    } catch (e) {
      this.log.debug({ err: (e as Error).message, sessions: batch.size }, 'session activity not written');
      return;
    }
    const gone = sids.filter((_, i) => replies?.[i]?.[0] === null && replies[i][1] === -1);
    if (gone.length > 0) this.gone(gone);
  }

  /** Stops the timer after writing what is pending. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.flush();
  }
}
