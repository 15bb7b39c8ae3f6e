/**
 * What the cluster-wide sweep costs when a fleet's sessions run out at once (devices that all
 * logged in within a second, after a power cut say, and never resumed or refreshed):
 * `--sessions` sessions are written straight into the gateway's Redis and audit table (as its
 * logins write them, with the session store's own script, a second or so for ten thousand;
 * logins through the gateway would spread them over minutes), half of them with one qos-1 event
 * waiting (published through `POST /v1/events`), all due within `--ttl` s. The gateway's sweep
 * (every `--sweep-ms`) then ends each: kick notice, audit row `expired`, the waiting event
 * reported `delivery.failed` (`session_expired`). Printed per run: the time from the last
 * expiry until every session is out of the index, every audit row ended and every event
 * reported (and that time in sweep intervals), the sweeps that ended sessions (how many, in how
 * many ms; BullMQ's `processedOn`/`finishedOn`), the gateway's and Redis's CPU per session over
 * that window, and whether each event was reported exactly once. The gateway is the build in
 * dist/ (bench/lib/built.ts), a fresh one per run. Printed, never asserted.
 *
 *   npm run bench:session-expiry -- [--sessions 10000] [--ttl 15] [--sweep-ms 1000] [--runs 2]
 */
import { randomUUID } from 'node:crypto';
import { SessionStore } from '../../gateway/auth/session-store.ts';
import { Keys } from '../../gateway/keys.ts';
import { query, redisClient } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { QueueReader } from '../../test/helpers/queues.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { postJson } from '../lib/http.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';
import { sweepsCounting } from '../lib/sweeps.ts';

const { values } = benchArgs({
  script: 'bench:session-expiry',
  url: import.meta.url,
  about:
    "a fleet's sessions running out at once: time for the sweep to end them all (kick, audit row, waiting events reported), CPU per session",
  readme: 'bench:session-expiry',
  options: {
    sessions: {
      type: 'int',
      min: 2,
      default: 10000,
      help: 'sessions, all running out within a second or so',
    },
    ttl: { type: 'int', min: 2, default: 15, help: 'SESSION_TTL (s)' },
    'sweep-ms': { type: 'int', min: 100, default: 1000, help: "the sweep's interval (GW_SWEEP_INTERVAL_MS)" },
    runs: { type: 'int', min: 1, default: 2, help: 'runs, each on a fresh gateway' },
  },
});

useBuiltGateway();
const REDIS_PID = redisPid();
const API_KEY = 'bench-session-expiry-api-key-0123';

interface Run {
  sessions: number;
  writtenMs: number;
  doneAfterMs: number;
  sweeps: { ended: number; ms: number }[];
  gatewayMicros: number;
  redisMicros: number;
  reportedOnce: boolean;
}

async function run(): Promise<Run> {
  const n = values.sessions;
  const gw = await startGateway({
    GW_LOG_LEVEL: 'info',
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    SESSION_TTL: String(values.ttl),
    GW_SWEEP_INTERVAL_MS: String(values['sweep-ms']),
  });
  const r = redisClient();
  const reader = new QueueReader(gw.prefix);
  try {
    const user = (
      await query(
        gw.schema,
        "INSERT INTO users (username, email, password_hash) VALUES ('fleet', 'fleet@example.com', 'x') RETURNING id",
      )
    ).rows[0].id as string;
    const store = new SessionStore(r, new Keys(gw.prefix), values.ttl);
    const sids = Array.from({ length: n }, () => randomUUID());
    const t0 = Date.now();
    let written = 0;
    const writing = progress('  sessions', () => `${written}/${n} written`);
    for (let i = 0; i < n; i += 500) {
      const batch = sids.slice(i, i + 500);
      await Promise.all(
        batch.map((sessionId, k) =>
          store.create(
            {
              sessionId,
              userId: user,
              username: 'fleet',
              device: { id: `fleet-${i + k}` },
              ip: '127.0.0.1',
              createdAt: t0,
              lastSeenAt: t0,
              refreshHash: randomUUID(),
              refreshExpiresAt: t0 + 3_600_000,
            },
            3_600_000,
          ),
        ),
      );
      written += batch.length;
    }
    await query(
      gw.schema,
      "INSERT INTO sessions (id, user_id, device_id, ip) SELECT unnest($1::uuid[]), $2, 'fleet', '127.0.0.1'",
      [sids, user],
    );
    const lastWritten = Date.now();
    writing();
    // One event for every other session, a thousand a request.
    const waiting = sids.filter((_, i) => i % 2 === 0);
    for (let i = 0; i < waiting.length; i += 1000) {
      const events = waiting.slice(i, i + 1000).map((sessionId) => ({
        target: { session: sessionId },
        eid: `fleet-${sessionId}`,
        name: 'bench.session-expiry',
        data: {},
      }));
      const res = await postJson(
        `http://127.0.0.1:${gw.httpPort}/v1/events`,
        JSON.stringify({ events }),
        API_KEY,
      );
      if (res.status !== 202) throw new Error(`POST /v1/events: ${res.status} ${JSON.stringify(res.body)}`);
    }
    const lastExpiry = lastWritten + values.ttl * 1000;
    if (Date.now() > t0 + values.ttl * 1000)
      throw new Error('sessions expired before the events were published: raise --ttl');
    await sleep(Math.max(0, t0 + values.ttl * 1000 - Date.now()));
    const s0 = cpuSeconds(gw.proc.pid!);
    const r0 = cpuSeconds(REDIS_PID);
    let left = '';
    const waited = progress('  sweep', () => left);
    const deadline = Date.now() + 300_000;
    // Cheap reads while waiting (the queue's counts, not its jobs): the bench's own polling is
    // in Redis's CPU too.
    for (;;) {
      const inIndex = await r.zcard(`${gw.prefix}sessexp`);
      const open = Number(
        (await query(gw.schema, 'SELECT count(*) FROM sessions WHERE ended_at IS NULL')).rows[0].count,
      );
      const jobs = await reader.count('gw-backend');
      left = `${inIndex} in the index, ${open} audit rows open, ${jobs}/${waiting.length} reported`;
      if (inIndex === 0 && open === 0 && jobs >= waiting.length) break;
      if (Date.now() > deadline) throw new Error(`not all ended within 300 s: ${left}`);
      await sleep(100);
    }
    const doneAt = Date.now();
    const gatewayCpu = cpuSeconds(gw.proc.pid!) - s0;
    const redisCpu = cpuSeconds(REDIS_PID) - r0;
    waited();
    const sweeps = (await sweepsCounting(reader, 'sessionsExpired', n)).map((x) => ({
      ended: x.count,
      ms: x.ms,
    }));
    const reported = new Map<string, number>();
    for (const j of await reader.jobs('gw-backend', 'delivery.failed'))
      reported.set(j.data.eid, (reported.get(j.data.eid) ?? 0) + 1);
    return {
      sessions: n,
      writtenMs: lastWritten - t0,
      doneAfterMs: doneAt - lastExpiry,
      sweeps,
      gatewayMicros: (gatewayCpu / n) * 1e6,
      redisMicros: (redisCpu / n) * 1e6,
      reportedOnce: reported.size === waiting.length && [...reported.values()].every((c) => c === 1),
    };
  } finally {
    await reader.close();
    r.disconnect();
    await gw.stop();
  }
}

console.log(
  header(
    `bench:session-expiry: ${values.sessions} sessions running out at once (half with an event waiting), SESSION_TTL ${values.ttl} s, a sweep every ${values['sweep-ms']} ms`,
  ),
);
const rows: Run[] = [];
for (let i = 0; i < values.runs; i++) rows.push(await run());
console.log(
  table(
    [
      'run',
      'sessions',
      'written in (ms)',
      'all ended after the last expiry (s)',
      'in sweep intervals',
      'sweeps that ended sessions (sessions in ms)',
      'gateway µs per session',
      'Redis µs per session',
      'each event reported once',
    ],
    rows.map((x, i) => [
      String(i + 1),
      x.sessions,
      x.writtenMs,
      x.doneAfterMs / 1000,
      x.doneAfterMs / values['sweep-ms'],
      x.sweeps.map((s) => `${s.ended} in ${s.ms}`).join('; '),
      x.gatewayMicros,
      x.redisMicros,
      x.reportedOnce ? 'yes' : 'NO',
    ]),
  ),
);
