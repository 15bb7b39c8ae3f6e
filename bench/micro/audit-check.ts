/**
 * What the sweep's check for lost sessions costs (gateway/auth/lost-sessions.ts): one whole pass
 * over a fleet's open audit rows, a batch a run, as the cluster-wide sweep runs it. A schema of
 * its own with the project's migrations: `--closed` ended rows (an audit trail's history) and
 * `--open` open rows an hour old, of which `--lost` have no session in Redis and the rest a
 * session hash and an expiry entry on a prefix of their own of the shared Redis. Each run is
 * timed, with the CPU the bench's process, Redis and the PostgreSQL backend spent on it (from
 * /proc; other clients of the shared Redis add to its figure); then a whole pass of the other
 * direction, the live sessions of the expiry index against their rows (none of them ended). The same-run reference: the
 * check's read of the rows alone, a pass with the partial index the migration adds and a pass
 * without it (dropped after the first). And the node's last-seen batch with `--uses` sessions in it:
 * resumed (their times written and their ends read), and with their access tokens used (their
 * ends read only).
 *
 *   npm run bench:audit-check [-- --open 100000 --lost 1000 --closed 1000000 --batch 1000]
 *
 * Printed, never asserted. Checks that the pass ended exactly the lost rows. Removes its schema
 * and keys.
 */
import { randomUUID } from 'node:crypto';
import { availableParallelism, loadavg } from 'node:os';
import { createDb } from '../../gateway/auth/db.ts';
import { LastSeen } from '../../gateway/auth/last-seen.ts';
import { endLostSessions, sessionsResurrected } from '../../gateway/auth/lost-sessions.ts';
import { migrate } from '../../gateway/auth/migrate.ts';
import { Keys } from '../../gateway/keys.ts';
import { createLogger } from '../../gateway/log.ts';
import { DATABASE_URL, dropSchema, REDIS_URL, redisClient } from '../../test/helpers/cleanup.ts';
import { benchArgs } from '../lib/args.ts';
import { table } from '../lib/measure.ts';
import { parentPid, processCpuMicros, reapedChildrenCpuMicros } from '../lib/proc.ts';

const { values } = benchArgs({
  script: 'bench:audit-check',
  url: import.meta.url,
  about:
    "the sweep's check of the audit trail against Redis: a pass over the open rows and one over the live sessions, per run",
  readme: 'bench:audit-check',
  options: {
    open: { type: 'int', default: 100000, help: 'open audit rows, an hour old' },
    lost: { type: 'int', default: 1000, help: 'of those, rows whose session is not in Redis' },
    closed: { type: 'int', default: 1000000, help: 'ended rows beside them (the trail’s history)' },
    batch: { type: 'int', default: 1000, help: 'rows a run (GW_AUDIT_CHECK_BATCH)' },
    uses: {
      type: 'int',
      default: 10000,
      help: "sessions in a node's last-seen batch: resumed, or whose tokens were used",
    },
  },
});
if (values.lost > values.open) throw new Error('--lost must be at most --open');

const SWEEP_INTERVAL_MS = 5000; // GW_SWEEP_INTERVAL_MS's default
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const p99 = (xs: number[]) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * 0.99))]!;
const elapsedMs = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;

const silent = createLogger('silent', {});
const tag = randomUUID().slice(0, 8);
const schema = `gwbench_${tag}`;
const keys = new Keys(`gwbench:audit:${tag}:`);
// As the gateway's client (app.ts): commands of one tick written together.
const redis = redisClient(REDIS_URL, { enableAutoPipelining: true });
const db = createDb({
  url: DATABASE_URL,
  schema,
  statementTimeoutMs: 600_000,
  connectTimeoutMs: 5000,
  queryTimeoutMs: 600_000,
  // One backend, whose CPU is read from /proc.
  max: 1,
});

console.log(
  `bench:audit-check: ${availableParallelism()} cores, load average ${loadavg()
    .map((l) => l.toFixed(2))
    .join(
      ' ',
    )}; ${values.open} open rows (${values.lost} lost), ${values.closed} ended, ${values.batch} a run`,
);
try {
  await migrate({ url: DATABASE_URL, schema, direction: 'up', log: () => {} });
  const user = randomUUID();
  await db.pool.query(
    `INSERT INTO users (id, username, email, password_hash) VALUES ($1, 'bench${tag}', 'bench${tag}@example.com', 'x')`,
    [user],
  );
  let t0 = process.hrtime.bigint();
  await db.pool.query(
    `INSERT INTO sessions (id, user_id, device_id, ip, user_agent, created_at, last_seen_at, ended_at, end_reason)
     SELECT gen_random_uuid(), $1, 'sensor-' || g, '10.0.0.1', 'gateway-client/1.0',
            now() - interval '2 days', now() - interval '2 days', now() - interval '1 day', 'logout'
       FROM generate_series(1, $2::int) g`,
    [user, values.closed],
  );
  const open = await db.pool.query<{ id: string }>(
    `INSERT INTO sessions (id, user_id, device_id, ip, user_agent, created_at, last_seen_at)
     SELECT gen_random_uuid(), $1, 'device-' || g, '10.0.0.1', 'gateway-client/1.0',
            now() - interval '1 hour', now() - interval '1 hour'
       FROM generate_series(1, $2::int) g RETURNING id`,
    [user, values.open],
  );
  await db.pool.query('VACUUM ANALYZE sessions');
  const ids = open.rows.map(({ id }) => id);
  const lost = new Set(ids.slice(0, values.lost));
  for (let i = values.lost; i < ids.length; i += 5000) {
    const p = redis.pipeline();
    for (const sid of ids.slice(i, i + 5000)) {
      p.hset(keys.session(sid), 'userId', user, 'deviceId', 'bench');
      p.zadd(keys.sessionExpiries, Date.now() + 3_600_000, sid);
    }
    await p.exec();
  }
  console.log(`written in ${(elapsedMs(t0) / 1000).toFixed(1)} s`);

  const redisPid = Number(/process_id:(\d+)/.exec(await redis.info('server'))![1]);
  const pgPid = (await db.pool.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
  const cpu = () => ({
    self: process.cpuUsage(),
    redis: processCpuMicros(redisPid) ?? Number.NaN,
    pg: processCpuMicros(pgPid) ?? Number.NaN,
  });
  type Cpu = ReturnType<typeof cpu>;
  /** The columns both passes print: times per run, CPU per run of each process, share of a core. */
  const PASS_COLUMNS = [
    'runs in the pass',
    'pass (s)',
    'run, median (ms)',
    'run, p99 (ms)',
    'bench process CPU per run (ms)',
    'Redis CPU per run (ms)',
    'PostgreSQL CPU per run (ms)',
    `share of a core at one run per ${SWEEP_INTERVAL_MS / 1000} s`,
  ];
  const passColumns = (ms: number[], passMs: number, c0: Cpu, c1: Cpu): string[] => {
    const n = ms.length;
    const self = (c1.self.user + c1.self.system - c0.self.user - c0.self.system) / 1000 / n;
    const redisMs = (c1.redis - c0.redis) / 1000 / n;
    const pgMs = (c1.pg - c0.pg) / 1000 / n;
    return [
      String(n),
      (passMs / 1000).toFixed(1),
      median(ms).toFixed(2),
      p99(ms).toFixed(2),
      self.toFixed(2),
      redisMs.toFixed(2),
      pgMs.toFixed(2),
      `${(((self + redisMs + pgMs) / SWEEP_INTERVAL_MS) * 100).toFixed(2)}%`,
    ];
  };

  // One whole pass: until the cursor is back at the start.
  const runs: { ms: number; checked: number }[] = [];
  let ended = 0;
  const c0 = cpu();
  t0 = process.hrtime.bigint();
  for (;;) {
    const r0 = process.hrtime.bigint();
    const r = await endLostSessions({ pool: db.pool, redis, keys }, values.batch);
    runs.push({ ms: elapsedMs(r0), checked: r.checked });
    ended += r.ended.length;
    for (const sid of r.ended) if (!lost.has(sid)) throw new Error(`ended a live session's row: ${sid}`);
    if (r.checked < values.batch) break;
  }
  const passMs = elapsedMs(t0);
  const c1 = cpu();
  if (ended !== values.lost) throw new Error(`the pass ended ${ended} rows, not the ${values.lost} lost`);

  // The other direction, one whole pass over the expiry index (the live sessions): none of their
  // rows is ended, so it ends none.
  const back: number[] = [];
  let backChecked = 0;
  const b0 = cpu();
  const bt0 = process.hrtime.bigint();
  for (;;) {
    const r0 = process.hrtime.bigint();
    const r = await sessionsResurrected({ pool: db.pool, redis, keys }, values.batch, async () => true);
    back.push(elapsedMs(r0));
    backChecked += r.checked;
    if (r.ended.length > 0) throw new Error(`live sessions taken for ended ones: ${r.ended.length}`);
    if ((await redis.get(keys.resurrectCheckCursor)) === '0') break;
  }
  const backPassMs = elapsedMs(bt0);
  const b1 = cpu();

  // The node's last-seen batch (gateway/auth/last-seen.ts, once a second) with `--uses`
  // sessions in it, five batches of other sessions each way: resumed (their times written,
  // their ends read: the reference) and with their tokens used (their ends read only).
  // The backend's CPU and its parallel workers' (reaped by the postmaster: other clients'
  // backends that exit meanwhile count too).
  const postmaster = parentPid(pgPid) ?? 0;
  const pgCpu = () =>
    (processCpuMicros(pgPid) ?? Number.NaN) + (reapedChildrenCpuMicros(postmaster) ?? Number.NaN);
  const lastSeenRows: string[][] = [];
  let from = 0;
  for (const way of ['resumed', 'tokens used'] as const) {
    const took: number[] = [];
    let pgMs = 0;
    for (let i = 0; i < 5; i++) {
      const batch = ids.slice(from, from + values.uses);
      from = (from + values.uses) % Math.max(1, ids.length - values.uses);
      const seen = new LastSeen(db.pool, silent, 1000, 1_000_000, {
        ended: (ended) => {
          throw new Error(`open rows taken for ended ones: ${ended.length}`);
        },
      });
      for (const sid of batch) {
        if (way === 'resumed') seen.session(sid, '10.0.0.2');
        else seen.check(sid);
      }
      const p0 = pgCpu();
      const r0 = process.hrtime.bigint();
      await seen.flush();
      took.push(elapsedMs(r0));
      pgMs += (pgCpu() - p0) / 1000;
      if (seen.pending !== 0) throw new Error(`the batch was not written: ${seen.pending} left`);
    }
    lastSeenRows.push([
      `${values.uses} sessions ${way}`,
      median(took).toFixed(1),
      Math.max(...took).toFixed(1),
      (pgMs / took.length).toFixed(1),
      `${((median(took) / 1000) * 100).toFixed(1)}%`,
    ]);
  }

  // The same-run reference: the check's read of the rows alone, a pass with the partial index
  // and a pass without it.
  const readPass = async () => {
    const took: number[] = [];
    let cursor = '00000000-0000-0000-0000-000000000000';
    for (;;) {
      const r0 = process.hrtime.bigint();
      const { rows } = await db.pool.query<{ id: string }>(
        `SELECT id FROM sessions
          WHERE ended_at IS NULL AND id > $1 AND created_at < now() - interval '10 minutes'
          ORDER BY id LIMIT $2`,
        [cursor, values.batch],
      );
      took.push(elapsedMs(r0));
      if (rows.length < values.batch) return took;
      cursor = rows[rows.length - 1]!.id;
    }
  };
  const withIndex = await readPass();
  await db.pool.query('DROP INDEX sessions_open_idx');
  await db.pool.query('ANALYZE sessions');
  const without = await readPass();

  console.log(
    table(
      ['open rows against their sessions', ...PASS_COLUMNS, 'rows ended lost'],
      [
        [
          'rows in id order, one script',
          ...passColumns(
            runs.map((r) => r.ms),
            passMs,
            c0,
            c1,
          ),
          String(ended),
        ],
      ],
    ),
  );
  console.log(
    table(
      ['live sessions against their rows', ...PASS_COLUMNS, 'sessions read'],
      [['ZSCAN of the index, rows by id', ...passColumns(back, backPassMs, b0, b1), backChecked]],
    ),
  );
  console.log(
    table(
      [
        "a node's last-seen batch",
        'statement, median (ms)',
        'max (ms)',
        'PostgreSQL CPU per batch, its parallel workers too (ms)',
        'of a second, median',
      ],
      lastSeenRows,
    ),
  );
  console.log(
    table(
      ['read of a run’s rows', 'median (ms)', 'p99 (ms)'],
      [
        ['with the partial index', median(withIndex).toFixed(2), p99(withIndex).toFixed(2)],
        ['without it', median(without).toFixed(2), p99(without).toFixed(2)],
        ['without / with', `${(median(without) / median(withIndex)).toFixed(1)}x`, ''],
      ],
    ),
  );
} finally {
  let cursor = '0';
  do {
    const [next, found] = await redis.scan(cursor, 'MATCH', `${keys.prefix}*`, 'COUNT', 5000);
    cursor = next;
    if (found.length > 0) await redis.unlink(...found);
  } while (cursor !== '0');
  redis.disconnect();
  await db.pool.end().catch(() => {});
  await dropSchema(schema);
}
