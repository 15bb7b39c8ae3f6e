/**
 * Runtime rate limits per device and per user on `publish`, `send` and `say` (events and bytes
 * per second), set through the admin API and applied by every node without a restart
 * (docs/OPERATIONS.md, "Limits").
 *
 * Where they live: one Redis hash (`P limits`, field `device:<id>` or `user:<userId>` → JSON).
 * Every node holds the whole hash in memory, so a request of a device without a limit costs a
 * Map lookup and no Redis round trip. A change is written to the hash, then announced on the
 * `P limits` channel; each node reloads that one field on the message (milliseconds). Pub/sub is
 * at most once (a message sent while a node's subscriber reconnects is lost), so each node also
 * reloads the whole hash every `RELOAD_MS`: a change is in force everywhere within that bound
 * even then.
 *
 * Enforcement: rate-limiter-flexible's RateLimiterRedis, fixed one-second windows counted in
 * Redis, so a device's budget is shared by all nodes (a device that reconnects elsewhere keeps
 * its count). Over a limit the request is `rate_limited` with `retryAfter` (ms to the window's
 * end); it is checked before the request has any effect.
 */
import type { Redis } from 'ioredis';
import { Counter, Gauge, type Registry } from 'prom-client';
import { RateLimiterRedis, RateLimiterRes } from 'rate-limiter-flexible';
import { ProtocolError } from '../../protocol/index.ts';
import type { Bus } from '../bus.ts';
import { logFailure, onceAtStart, type StartStep } from '../faults.ts';
import type { Keys } from '../keys.ts';
import type { Logger } from '../log.ts';

export const LimitedOp = { publish: 'publish', send: 'send', say: 'say' } as const;
export type LimitedOp = (typeof LimitedOp)[keyof typeof LimitedOp];
const OPS = Object.values(LimitedOp);

/** Per second; an absent figure is no limit. */
export interface Rate {
  events?: number;
  bytes?: number;
}
export type LimitSet = Partial<Record<LimitedOp, Rate>>;
export type LimitScope = 'device' | 'user';

/** How often every node reloads all limits, in case a change announcement was lost. */
export const RELOAD_MS = 5000;
const MAX_RATE = 1_000_000_000;

/** Checks a limit body: `{publish?, send?, say?}`, each `{events?, bytes?}` positive integers. */
export function parseLimitSet(body: unknown): LimitSet {
  const bad = (field: string, what: string) =>
    new ProtocolError('bad_message', `${field}: ${what}`, { field });
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw bad('body', 'an object');
  const out: LimitSet = {};
  for (const [op, rate] of Object.entries(body)) {
    if (!(OPS as string[]).includes(op)) throw bad(op, `not one of ${OPS.join(', ')}`);
    if (typeof rate !== 'object' || rate === null || Array.isArray(rate)) throw bad(op, '{events?, bytes?}');
    const r: Rate = {};
    for (const [unit, v] of Object.entries(rate)) {
      if (unit !== 'events' && unit !== 'bytes') throw bad(`${op}.${unit}`, 'only events and bytes');
      if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > MAX_RATE) {
        throw bad(`${op}.${unit}`, `an integer from 1 to ${MAX_RATE} per second`);
      }
      r[unit] = v as number;
    }
    if (r.events === undefined && r.bytes === undefined) throw bad(op, 'give events, bytes or both');
    out[op as LimitedOp] = r;
  }
  if (Object.keys(out).length === 0) throw bad('body', `give at least one of ${OPS.join(', ')}`);
  return out;
}

export class Limits {
  private readonly table = new Map<string, LimitSet>();
  /**
   * Limiters by figure (`op:unit:points`), made on first use and dropped once no limit in
   * `table` has that figure (`figures` counts the limits per figure), so that PUTs of ever new
   * figures do not grow the map. A request that took a limiter just before it is dropped still
   * counts with it: the count is in Redis, under a key that does not depend on the figure.
   */
  private readonly limiters = new Map<string, RateLimiterRedis>();
  private readonly figures = new Map<string, number>();
  private reloadTimer: NodeJS.Timeout | undefined;
  private readonly rejected: Counter;

  constructor(
    private readonly deps: { redis: Redis; bus: Bus; keys: Keys; log: Logger; registry: Registry },
  ) {
    this.rejected = new Counter({
      name: 'gateway_rate_limited_total',
      help: 'Requests refused by a runtime limit (admin API), by request type and scope.',
      labelNames: ['op', 'scope'],
      registers: [deps.registry],
    });
    const limiters = this.limiters;
    new Gauge({
      name: 'gateway_rate_limiters',
      help: 'Limiter objects this node holds for the runtime limits (one per figure in force and used).',
      registers: [deps.registry],
      collect() {
        this.set(limiters.size);
      },
    });
  }

  async start(startStep: StartStep = onceAtStart): Promise<void> {
    const { bus, keys } = this.deps;
    await startStep(() =>
      bus.subscribe(keys.limitsChannel, (m) => {
        this.reloadOne(m.toString()).catch((e) =>
          logFailure(this.deps.log, e, {}, 'could not reload a limit'),
        );
      }),
    );
    await startStep(() => this.reloadAll());
    this.reloadTimer = setInterval(() => {
      this.reloadAll().catch((e) => logFailure(this.deps.log, e, {}, 'could not reload limits'));
    }, RELOAD_MS);
    this.reloadTimer.unref();
  }

  close(): void {
    if (this.reloadTimer) clearInterval(this.reloadTimer);
  }

  private async reloadAll(): Promise<void> {
    const all = await this.deps.redis.hgetall(this.deps.keys.limits);
    for (const field of [...this.table.keys()]) if (!Object.hasOwn(all, field)) this.put(field, undefined);
    for (const [field, raw] of Object.entries(all)) this.put(field, JSON.parse(raw));
  }

  private async reloadOne(field: string): Promise<void> {
    const raw = await this.deps.redis.hget(this.deps.keys.limits, field);
    this.put(field, raw ? JSON.parse(raw) : undefined);
  }

  /** Sets (or with undefined removes) a field's limits, and drops the limiters of figures gone. */
  private put(field: string, set: LimitSet | undefined): void {
    const old = this.table.get(field);
    if (set) {
      this.table.set(field, set);
      this.count(set, 1);
    } else {
      this.table.delete(field);
    }
    // After the new figures are counted: a figure kept by the change keeps its limiter.
    if (old) this.count(old, -1);
  }

  private count(set: LimitSet, by: 1 | -1): void {
    for (const op of OPS) {
      const rate = set[op];
      if (!rate) continue;
      for (const unit of ['events', 'bytes'] as const) {
        const points = rate[unit];
        if (!points) continue;
        const name = `${op}:${unit}:${points}`;
        const n = (this.figures.get(name) ?? 0) + by;
        if (n > 0) {
          this.figures.set(name, n);
        } else {
          this.figures.delete(name);
          this.limiters.delete(name);
        }
      }
    }
  }

  // ---- the admin side ---------------------------------------------------------------------------

  async get(scope: LimitScope, id: string): Promise<LimitSet | null> {
    const raw = await this.deps.redis.hget(this.deps.keys.limits, `${scope}:${id}`);
    return raw ? JSON.parse(raw) : null;
  }

  async set(scope: LimitScope, id: string, limits: LimitSet): Promise<void> {
    const field = `${scope}:${id}`;
    const { redis, keys } = this.deps;
    await redis
      .multi()
      .hset(keys.limits, field, JSON.stringify(limits))
      .publish(keys.limitsChannel, field)
      .exec();
  }

  /** False when there was no limit to remove. */
  async remove(scope: LimitScope, id: string): Promise<boolean> {
    const field = `${scope}:${id}`;
    const { redis, keys } = this.deps;
    const r = await redis.multi().hdel(keys.limits, field).publish(keys.limitsChannel, field).exec();
    return r?.[0]?.[1] === 1;
  }

  /** Every limit, by field, in pages of `limit` (HSCAN: the cursor is Redis's). */
  async page(cursor: string, limit: number): Promise<{ items: [string, LimitSet][]; next: string }> {
    const [next, flat] = await this.deps.redis.hscan(this.deps.keys.limits, cursor, 'COUNT', limit);
    const items: [string, LimitSet][] = [];
    for (let i = 0; i < flat.length; i += 2) items.push([flat[i], JSON.parse(flat[i + 1])]);
    return { items, next };
  }

  // ---- the request side ---------------------------------------------------------------------------

  /** The limiter of a figure in `table` (`check` reads both in one turn, so it is counted). */
  private limiter(op: LimitedOp, unit: 'events' | 'bytes', points: number): RateLimiterRedis {
    const name = `${op}:${unit}:${points}`;
    let l = this.limiters.get(name);
    if (!l) {
      // The count key does not depend on the figure: a changed limit keeps the current window.
      l = new RateLimiterRedis({
        storeClient: this.deps.redis,
        keyPrefix: this.deps.keys.rateLimit(`admin:${op}:${unit}`),
        points,
        duration: 1,
      });
      // Kept only while a limit has the figure: never a limiter that no change would drop.
      if (this.figures.has(name)) this.limiters.set(name, l);
    }
    return l;
  }

  /**
   * Checks a request against the limits of its device and user: undefined (no await, no Redis)
   * when neither has one for `op`; else a promise that rejects `rate_limited` with `retryAfter`.
   * `bytes` is computed only when a bytes limit applies.
   */
  check(
    op: LimitedOp,
    who: { deviceId?: string | undefined; userId: string },
    bytes: () => number,
  ): Promise<void> | undefined {
    const device = who.deviceId ? this.table.get(`device:${who.deviceId}`)?.[op] : undefined;
    const user = this.table.get(`user:${who.userId}`)?.[op];
    if (!device && !user) return undefined;
    const checks: Promise<void>[] = [];
    let size: number | undefined;
    const add = (scope: LimitScope, id: string, rate: Rate) => {
      const key = `${scope}:${id}`;
      const consume = (unit: 'events' | 'bytes', limit: number, points: number) =>
        checks.push(
          this.limiter(op, unit, limit)
            .consume(key, points)
            .then(
              () => undefined,
              (e: unknown) => {
                // rate-limiter-flexible rejects with a RateLimiterRes when over, an Error on failure.
                if (!(e instanceof RateLimiterRes)) throw e;
                this.rejected.labels(op, scope).inc();
                throw new ProtocolError('rate_limited', `${op}: over the ${scope}'s ${unit} per second`, {
                  retryAfter: Math.max(1, e.msBeforeNext),
                });
              },
            ),
        );
      if (rate.events) consume('events', rate.events, 1);
      if (rate.bytes) {
        size ??= bytes();
        consume('bytes', rate.bytes, Math.max(1, size));
      }
    };
    if (device) add('device', who.deviceId!, device);
    if (user) add('user', who.userId, user);
    return Promise.all(checks).then(() => undefined);
  }
}
