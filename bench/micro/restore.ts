/**
 * What a node's presence restore costs at fleet size: the write of every local session's
 * presence record again, as after a Redis reconnect or a silence in which the node was swept
 * (Presence.restore, gateway/messaging/presence.ts). A Presence in this process with N stand-in
 * connections bound to sessions, on its own prefix of the shared Redis; each round times one
 * restore and counts the script calls Redis ran for it (`INFO commandstats`, `evalsha` and
 * `eval`; other clients of a shared server add to it). The same-run reference: the
 * same records written by one ioredis pipeline of `HSET` + `SADD` per session, on its own keys.
 *
 *   npm run bench:restore [-- --sessions 1000,5000 --rounds 7]
 *
 * Printed, never asserted: the wall time is the machine's, the calls per restore are the code's.
 */
import { randomUUID } from 'node:crypto';
import { availableParallelism, loadavg } from 'node:os';
import { Writable } from 'node:stream';
import { Registry } from 'prom-client';
import { SessionBinding } from '../../gateway/binding.ts';
import type { Connection } from '../../gateway/connection.ts';
import type { Gateway } from '../../gateway/gateway.ts';
import { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { Presence } from '../../gateway/messaging/presence.ts';
import { REDIS_URL, redisClient } from '../../test/helpers/cleanup.ts';
import { benchArgs } from '../lib/args.ts';
import { table } from '../lib/measure.ts';

const { values } = benchArgs({
  script: 'bench:restore',
  url: import.meta.url,
  about: "a node's presence restore at fleet size: time and Redis script calls per restore",
  readme: 'bench:restore',
  options: {
    sessions: { type: 'int', list: true, default: '1000,5000', help: 'local sessions per run' },
    rounds: { type: 'int', default: 7, help: 'restores timed per size (after one of warm-up)' },
  },
});

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function scriptCalls(r: ReturnType<typeof redisClient>): Promise<number> {
  let n = 0;
  for (const line of (await r.info('commandstats')).split('\n')) {
    const x = /^cmdstat_(evalsha|eval):calls=(\d+)/.exec(line);
    if (x) n += Number(x[2]);
  }
  return n;
}

async function run(sessions: number): Promise<(string | number)[]> {
  const keys = new Keys(`gwbench:restore:${randomUUID().slice(0, 8)}:`);
  const redis = redisClient(REDIS_URL);
  const bull = redisClient(REDIS_URL, { maxRetriesPerRequest: null, commandTimeout: undefined });
  const stats = redisClient(REDIS_URL);
  const nodeId = `bench-${randomUUID().slice(0, 8)}`;
  const connections = new Set<Connection>();
  for (let i = 0; i < sessions; i++) {
    connections.add({
      id: i + 1,
      session: {
        userId: randomUUID(),
        username: `device${i}`,
        sessionId: randomUUID(),
        deviceId: `sensor-${i}`,
      },
    } as unknown as Connection);
  }
  const gateway = {
    nodeId,
    connections,
    metrics: new Registry(),
    onSessionBound() {},
    onSessionUnbound() {},
    onSweep() {},
  } as unknown as Gateway;
  const presence = new Presence({
    gateway,
    redis,
    bullConnection: bull,
    binding: new SessionBinding(redis),
    keys,
    log: createLogger('warn', {}, new Writable({ write: (_c, _e, cb) => cb() })),
    options: { staleMs: 10_000, sweepIntervalMs: 1000, workerCheckMs: 5000, sessionTtlSeconds: 3600 },
  });
  const ms: number[] = [];
  const floor: number[] = [];
  const calls: number[] = [];
  const floorHash = `${keys.prefix}floor:presence`;
  const floorSet = `${keys.prefix}floor:sessions`;
  try {
    for (let round = 0; round <= values.rounds; round++) {
      const p = redis.pipeline();
      for (const c of connections) {
        const s = c.session!;
        p.hset(floorHash, s.sessionId, JSON.stringify({ node: nodeId, conn: c.id, ...s, since: Date.now() }));
        p.sadd(floorSet, s.sessionId);
      }
      const f0 = process.hrtime.bigint();
      await p.exec();
      if (round > 0) floor.push(Number(process.hrtime.bigint() - f0) / 1e6);
      const before = await scriptCalls(stats);
      const t0 = process.hrtime.bigint();
      await presence.restore();
      const took = Number(process.hrtime.bigint() - t0) / 1e6;
      const made = (await scriptCalls(stats)) - before;
      if (round === 0) continue;
      ms.push(took);
      calls.push(made);
    }
    const written = await redis.hlen(keys.presence);
    if (written !== sessions) throw new Error(`restore wrote ${written} presence records, not ${sessions}`);
  } finally {
    let cursor = '0';
    do {
      const [next, found] = await stats.scan(cursor, 'MATCH', `${keys.prefix}*`, 'COUNT', 1000);
      cursor = next;
      if (found.length > 0) await stats.del(...found);
    } while (cursor !== '0');
    await presence.close().catch(() => {});
    redis.disconnect();
    bull.disconnect();
    stats.disconnect();
  }
  const m = median(ms);
  const f = median(floor);
  return [sessions, m, Math.min(...ms), Math.max(...ms), (m * 1000) / sessions, median(calls), f, m / f];
}

console.log(
  `bench:restore: ${availableParallelism()} cores, load average ${loadavg()
    .map((l) => l.toFixed(2))
    .join(' ')}, ${values.rounds} rounds`,
);
const rows: (string | number)[][] = [];
for (const n of values.sessions) rows.push(await run(n));
console.log(
  table(
    [
      'sessions',
      'restore, median (ms)',
      'min (ms)',
      'max (ms)',
      'µs per session',
      'script calls per restore',
      'pipelined HSET+SADD, median (ms)',
      'restore / pipeline',
    ],
    rows,
  ),
);
