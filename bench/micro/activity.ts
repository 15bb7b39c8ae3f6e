/**
 * The cost of session activity on the hot path and of its batched write:
 *   - `ActivityTracker.touch` per request (a Map lookup; no Redis call), for N sessions each
 *     sending many requests within one throttle window;
 *   - one flush writing the activity of N sessions to Redis (one pipeline of Lua calls).
 *
 *   npm run bench:activity [-- --sessions 10000 --requests 1000000]
 *
 * Needs Redis at REDIS_URL (keys under a random `gwbench:` prefix, removed afterwards).
 * Figures are printed, never asserted.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { ActivityTracker } from '../../gateway/auth/activity.ts';
import { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { benchArgs } from '../lib/args.ts';

const { values } = benchArgs({
  script: 'bench:activity',
  url: import.meta.url,
  about: 'session activity: touch per request (no Redis call) and one batched flush of N sessions',
  options: {
    sessions: { type: 'int', default: 10000, help: 'sessions touched, then flushed' },
    requests: { type: 'int', default: 1000000, help: 'touches timed, over the sessions in turn' },
  },
});
const n = values.sessions;
const requests = values.requests;
const redis = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
const keys = new Keys(`gwbench:${randomUUID().slice(0, 8)}:`);
const sids = Array.from({ length: n }, () => randomUUID());
const fill = redis.pipeline();
for (const sid of sids)
  fill.hset(keys.session(sid), { userId: 'u', lastSeenAt: 0 }).expire(keys.session(sid), 600);
await fill.exec();

const tracker = new ActivityTracker(redis, keys, 30_000, createLogger('silent'));
for (let i = 0; i < 100_000; i++) tracker.touch(sids[i % n]); // warm-up (takes each session once)
const t0 = process.hrtime.bigint();
for (let i = 0; i < requests; i++) tracker.touch(sids[i % n]);
const touchNs = Number(process.hrtime.bigint() - t0) / requests;
const t1 = process.hrtime.bigint();
await tracker.flush();
const flushMs = Number(process.hrtime.bigint() - t1) / 1e6;
const again = process.hrtime.bigint();
await tracker.flush(); // nothing new within the throttle: no write at all
const idleMs = Number(process.hrtime.bigint() - again) / 1e6;
await tracker.close();
console.log(
  `touch: ${touchNs.toFixed(1)} ns per request (${requests} requests over ${n} sessions, no Redis call)`,
);
console.log(`flush: ${flushMs.toFixed(1)} ms to write ${n} sessions' activity in one pipeline`);
console.log(`flush with nothing taken since: ${idleMs.toFixed(2)} ms`);
const del = redis.pipeline();
for (const sid of sids) del.del(keys.session(sid));
await del.exec();
redis.disconnect();
