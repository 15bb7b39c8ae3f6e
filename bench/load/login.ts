/**
 * Logins per second through the gateway (argon2id with the production parameters, on the
 * gateway's worker threads) next to the raw argon2id verify rate of this machine measured in the
 * same run (a raw window before and after each of `--rounds` login windows: each round against
 * the two beside it), the gateway's event-loop p99 delay during the storm, `resume` (token)
 * logins/s, and `refresh`es/s with their CPU.
 *
 *   npm run bench:login -- [--conns 32] [--seconds 5] [--rounds 3] [--threads <cores>]
 *
 * Storm mode: logins offered open-loop (at a fixed rate, whatever the answers) at multiples of
 * the raw verify rate measured in the same run, each for `--seconds`; prints how the logins were
 * answered (admitted or `overloaded`), the wait of the admitted ones (p50/p99/max) and how fast
 * the refusals came. Refused logins are not retried (each offered login is one attempt).
 *
 *   npm run bench:login -- --storm 2,6 [--conns 200] [--seconds 5]
 */
import { availableParallelism } from 'node:os';
import { GatewayClient, type Session } from '../../client/client.ts';
import { Hasher } from '../../gateway/auth/hasher.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { header, table } from '../lib/measure.ts';
import { machineBusyMicros } from '../lib/proc.ts';
import { cpuSeconds, mainThreadCpuSeconds, ownCpuSeconds, progress, sleep } from '../lib/procs.ts';
import { median } from '../lib/stats.ts';

const { values } = benchArgs({
  script: 'bench:login',
  url: import.meta.url,
  about:
    "logins/s through the gateway against this machine's raw argon2id verify rate; --storm: logins offered beyond it",
  readme: 'bench:login',
  options: {
    conns: { type: 'int', help: 'connections logging in (default 32; with --storm, 200)' },
    seconds: { type: 'number', default: 5, help: 'seconds per measurement (per storm step)' },
    rounds: {
      type: 'int',
      default: 3,
      help: 'login windows, each between two raw verify windows (not with --storm)',
    },
    storm: {
      type: 'number',
      list: true,
      arg: 'X,...',
      help: 'storm mode: logins offered open-loop at these multiples of the raw verify rate',
    },
    threads: {
      type: 'int',
      help: "hash threads of both the raw pool and the gateway (default: one per core, the gateway's default)",
    },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const STORM = values.storm;
const CONNS = values.conns ?? (STORM ? 200 : 32);
const SECONDS = values.seconds;
const ROUNDS = values.rounds;
/** Hash threads of both the raw pool and the gateway (default: one per core, the gateway's default). */
const THREADS = values.threads ?? availableParallelism();
const PARAMS = { memoryCost: 19456, timeCost: 2, parallelism: 1 };
/** The gateway's default GW_HASH_NICE: the raw pool runs its threads at the same priority. */
const NICE = 10;

/**
 * Verifies/s of a pool like the gateway's, the CPU (ms) this process spent per verify, and the
 * cores the rest of the machine used meanwhile (an idle gateway, Redis, PostgreSQL, other jobs:
 * what the pool did not get).
 */
async function rawVerify(): Promise<{ rate: number; cpuMs: number; others: number }> {
  const h = new Hasher({ params: PARAMS, threads: THREADS, maxQueue: 1000, nice: NICE });
  const { hash } = await h.hash('correct horse battery');
  let n = 0;
  let stop = false;
  const loop = async () => {
    while (!stop) {
      await h.verify('correct horse battery', hash);
      n++;
    }
  };
  const workers = Array.from({ length: THREADS * 2 }, loop);
  await sleep(1000);
  n = 0;
  const t0 = performance.now();
  const cpu0 = ownCpuSeconds();
  const machine0 = machineBusyMicros() ?? Number.NaN;
  await sleep(SECONDS * 1000);
  const seconds = (performance.now() - t0) / 1000;
  const rate = n / seconds;
  const own = ownCpuSeconds() - cpu0;
  const others = ((machineBusyMicros() ?? Number.NaN) - machine0) / 1e6 / seconds - own / seconds;
  const cpuMs = (own * 1000) / n;
  stop = true;
  await Promise.all(workers);
  await h.close();
  return { rate, cpuMs, others };
}

/** The raw rate alone (storm mode). */
async function rawVerifyRate(): Promise<number> {
  return (await rawVerify()).rate;
}

/**
 * The p99 of the gateway's event-loop histogram since the previous call (the scrape resets it),
 * ms. prom-client samples with a 10 ms timer (`monitorEventLoopDelay`, resolution 10) and records
 * the interval between the timer's runs, so an idle loop reads 10 ms: `delay` is that p99 less the
 * 10 ms, the time the loop was late.
 */
const LOOP_RESOLUTION_MS = 10;
async function eventLoopP99(metricsPort: number): Promise<{ scraped: number; delay: number }> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const m = /^nodejs_eventloop_lag_p99_seconds (\S+)/m.exec(text);
  const scraped = m ? Number(m[1]) * 1000 : Number.NaN;
  return { scraped, delay: scraped - LOOP_RESOLUTION_MS };
}

async function storm(
  label: string,
  clients: GatewayClient[],
  op: (c: GatewayClient, i: number) => Promise<unknown>,
) {
  let n = 0;
  let errors = 0;
  let stop = false;
  const done = progress(`  ${label}`, () => `${n} ok, ${errors} errors`);
  const loops = clients.map(async (c, i) => {
    while (!stop) {
      try {
        await op(c, i);
        n++;
      } catch {
        errors++;
      }
    }
  });
  const t0 = performance.now();
  await sleep(SECONDS * 1000);
  stop = true;
  const elapsed = (performance.now() - t0) / 1000;
  const count = n;
  await Promise.all(loops);
  done();
  return { rate: count / elapsed, errors };
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

/** Logins offered at `rate`/s for SECONDS, spread over the clients; every answer is awaited. */
async function openLoop(clients: GatewayClient[], users: string[], rate: number) {
  const answers: Promise<{ outcome: string; ms: number; retryAfter?: number }>[] = [];
  let sent = 0;
  const t0 = performance.now();
  const done = progress(`  ${rate.toFixed(0)} logins/s offered`, () => `${sent} sent`);
  while (performance.now() - t0 < SECONDS * 1000) {
    const due = Math.floor(((performance.now() - t0) / 1000) * rate);
    while (sent < due) {
      const i = sent++;
      const s = performance.now();
      answers.push(
        clients[i % clients.length]
          .request('login', { username: users[i % users.length], password: 'correct horse battery' })
          .then(
            () => ({ outcome: 'ok', ms: performance.now() - s }),
            (e: { code?: string; message: string; retryAfter?: number }) => ({
              outcome: e.code ?? e.message,
              ms: performance.now() - s,
              ...(e.retryAfter !== undefined ? { retryAfter: e.retryAfter } : {}),
            }),
          ),
      );
    }
    await sleep(10);
  }
  const got = await Promise.all(answers);
  done();
  const ok = got.filter((a) => a.outcome === 'ok');
  const refused = got.filter((a) => a.outcome === 'overloaded');
  const other = got.length - ok.length - refused.length;
  const waits = ok.map((a) => a.ms).sort((a, b) => a - b);
  const refusedMs = refused.map((a) => a.ms).sort((a, b) => a - b);
  const retry = refused.map((a) => a.retryAfter ?? 0).sort((a, b) => a - b);
  return { offered: got.length, ok: ok.length, refused: refused.length, other, waits, refusedMs, retry };
}

/** The gateway's own view of its hash pool after a step (absent before admission by wait). */
async function hashMetrics(metricsPort: number): Promise<string> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const lines = text
    .split('\n')
    .filter((l) => /^(gateway_hash_(run|admitted|jobs_total)|nodejs_eventloop_lag_(p99|max))/.test(l));
  return lines.length ? lines.map((l) => `    ${l}`).join('\n') : '    (no gateway_hash_* metrics)';
}

/** The gateway with the production argon2id parameters on THREADS hash threads. */
function startLoginGateway(env: Record<string, string>) {
  return startGateway({
    ARGON2_MEMORY_KIB: String(PARAMS.memoryCost),
    ARGON2_ITERATIONS: String(PARAMS.timeCost),
    GW_HASH_THREADS: String(THREADS),
    GW_HASH_NICE: String(NICE),
    GW_PROCESSES: '1',
    GW_REGISTER_PER_MINUTE: '100000',
    ...env,
  });
}

/** CONNS connected clients. */
function connectAll(url: string, requestTimeoutMs: number): Promise<GatewayClient[]> {
  return Promise.all(
    Array.from({ length: CONNS }, async () => {
      const c = new GatewayClient({ url, requestTimeoutMs });
      await c.connect();
      return c;
    }),
  );
}

async function stormMode(): Promise<void> {
  console.log(
    header(
      `login storm: ${CONNS} connections, argon2id m=${PARAMS.memoryCost} KiB t=${PARAMS.timeCost} p=1, ${THREADS} hash threads, ${SECONDS} s per step, gateway defaults for GW_HASH_MAX_QUEUE / GW_HASH_MAX_WAIT_MS`,
    ),
  );
  const raw = await rawVerifyRate();
  const g = await startLoginGateway({ GW_LOG_LEVEL: 'info' });
  try {
    const clients = await connectAll(g.tcpUrl, 120000);
    const users: string[] = [];
    for (let i = 0; i < 32; i++) {
      const username = `storm${i}_${Date.now() % 100000}`;
      await clients[0].request('register', {
        username,
        email: `${username}@example.com`,
        password: 'correct horse battery',
      });
      users.push(username);
    }
    const rows: (string | number)[][] = [
      ['raw argon2id verify/s (same run) = capacity', raw, '', '', '', '', '', ''],
    ];
    for (const m of STORM!) {
      await sleep(2000);
      const r = await openLoop(clients, users, m * raw);
      console.log(`  after ${m}x (cumulative):\n${await hashMetrics(g.metricsPort)}`);
      rows.push([
        `${m}x capacity: ${(m * raw).toFixed(0)}/s offered, ${r.offered} logins`,
        r.ok / SECONDS,
        `${r.ok} / ${r.refused} / ${r.other}`,
        quantile(r.waits, 0.5),
        quantile(r.waits, 0.99),
        quantile(r.waits, 1),
        quantile(r.refusedMs, 0.5),
        r.retry.length
          ? `${r.retry[0]}-${r.retry[r.retry.length - 1]} (${new Set(r.retry).size} distinct)`
          : '-',
      ]);
    }
    console.log(
      table(
        [
          'step',
          'admitted/s',
          'admitted / overloaded / other',
          'admitted wait p50 (ms)',
          'p99 (ms)',
          'max (ms)',
          'overloaded answered p50 (ms)',
          'retryAfter (ms)',
        ],
        rows,
      ),
    );
    for (const c of clients) c.destroy();
  } finally {
    await g.stop();
  }
  process.exit(0);
}

async function main(): Promise<void> {
  if (STORM) return stormMode();
  console.log(
    header(
      `logins: ${CONNS} connections, argon2id m=${PARAMS.memoryCost} KiB t=${PARAMS.timeCost} p=1, ${THREADS} hash threads, ${ROUNDS} rounds`,
    ),
  );
  // Closed loop with CONNS logins in flight: the pool's admission bound is lifted, so that on a
  // slow or busy machine (an expected wait above GW_HASH_MAX_WAIT_MS) the clients measure the
  // rate instead of spinning on `overloaded` answers (thousands of errors a second that took
  // CPU from the hashing).
  // Every client refreshes from one address: the per-IP refresh budget is lifted too.
  const g = await startLoginGateway({
    GW_HASH_MAX_QUEUE: '10000',
    GW_HASH_MAX_WAIT_MS: '600000',
    GW_REFRESH_PER_MINUTE: '100000000',
  });
  try {
    const clients = await connectAll(g.tcpUrl, 60000);
    const users: string[] = [];
    for (let i = 0; i < CONNS; i++) {
      const username = `bench${i}_${Date.now() % 100000}`;
      await clients[i].request('register', {
        username,
        email: `${username}@example.com`,
        password: 'correct horse battery',
      });
      users.push(username);
    }
    // The machine is shared and its speed drifts: the raw rate is measured before and after
    // each login window (the gateway up and idle beside it, as it is beside the logins), and
    // each window's logins are compared with the mean of the two raw windows beside it.
    const raws = [await rawVerify()];
    const pid = g.proc.pid!;
    const rounds: { rate: number; errors: number; ratio: number; loopDelay: number }[] = [];
    const used = { logins: 0, gateway: 0, main: 0, bench: 0, machine: 0 };
    for (let r = 0; r < ROUNDS; r++) {
      await eventLoopP99(g.metricsPort); // resets the event-loop histogram
      const cpu0 = cpuSeconds(pid);
      const main0 = mainThreadCpuSeconds(pid);
      const bench0 = ownCpuSeconds();
      const machine0 = machineBusyMicros() ?? Number.NaN;
      const login = await storm(`login storm ${r + 1}/${ROUNDS}`, clients, (c, i) =>
        c.request('login', { username: users[i], password: 'correct horse battery' }),
      );
      const loop = await eventLoopP99(g.metricsPort);
      used.logins += login.rate * SECONDS;
      used.gateway += cpuSeconds(pid) - cpu0;
      used.main += mainThreadCpuSeconds(pid) - main0;
      used.bench += ownCpuSeconds() - bench0;
      used.machine += ((machineBusyMicros() ?? Number.NaN) - machine0) / 1e6;
      raws.push(await rawVerify());
      const beside = (raws[r].rate + raws[r + 1].rate) / 2;
      rounds.push({
        rate: login.rate,
        errors: login.errors,
        ratio: login.rate / beside,
        loopDelay: loop.delay,
      });
    }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const list = (xs: number[], digits: number) => xs.map((x) => x.toFixed(digits)).join(', ');
    const raw = mean(raws.map((x) => x.rate));
    const loginRate = mean(rounds.map((x) => x.rate));
    const loopWorst = Math.max(...rounds.map((x) => x.loopDelay));
    /** ms of CPU per login over the rounds: the gateway's main thread, its other threads (hashing), this process (the clients), the whole machine. */
    const perLogin = {
      main: (used.main * 1000) / used.logins,
      gateway: (used.gateway * 1000) / used.logins,
      bench: (used.bench * 1000) / used.logins,
      machine: (used.machine * 1000) / used.logins,
    };
    const sessions = await Promise.all(
      clients.map((c, i) =>
        c.request<Session>('login', { username: users[i], password: 'correct horse battery' }),
      ),
    );
    const tokens = sessions.map((s) => s.token);
    const refreshTokens = sessions.map((s) => s.refresh);
    await eventLoopP99(g.metricsPort);
    const resumeMain0 = mainThreadCpuSeconds(pid);
    const resume = await storm('resume storm', clients, (c, i) => c.request('resume', { token: tokens[i] }));
    const resumeMainMs = ((mainThreadCpuSeconds(pid) - resumeMain0) * 1000) / (resume.rate * SECONDS);
    const resumeLoopP99 = await eventLoopP99(g.metricsPort);
    // Refreshes, each presenting the pair the last one gave (what the client's keepSession
    // sends once per access token's life while a device stays connected).
    const refreshMain0 = mainThreadCpuSeconds(pid);
    const refreshMachine0 = machineBusyMicros() ?? Number.NaN;
    const refresh = await storm('refresh storm', clients, async (c, i) => {
      const pair = await c.request<{ refresh: string }>('refresh', { refresh: refreshTokens[i] });
      refreshTokens[i] = pair.refresh;
    });
    const refreshes = refresh.rate * SECONDS;
    const refreshMainMs = ((mainThreadCpuSeconds(pid) - refreshMain0) * 1000) / refreshes;
    const refreshMachineMs = ((machineBusyMicros() ?? Number.NaN) - refreshMachine0) / 1000 / refreshes;
    for (const c of clients) c.destroy();
    console.log(
      table(
        ['measure', 'per second', 'note'],
        [
          [
            'raw argon2id verify (this machine, same pool size)',
            raw,
            `${THREADS} threads, ${THREADS * 2} in flight; mean of ${raws.length} windows: ${list(
              raws.map((x) => x.rate),
              0,
            )}`,
          ],
          [
            'other processes during the raw windows (cores)',
            mean(raws.map((x) => x.others)),
            `the machine's busy CPU less the raw pool's: ${list(
              raws.map((x) => x.others),
              2,
            )}`,
          ],
          [
            'logins through the gateway',
            loginRate,
            `${rounds.reduce((a, x) => a + x.errors, 0)} errors; rounds ${list(
              rounds.map((x) => x.rate),
              0,
            )}`,
          ],
          [
            'logins / raw (each round against the raw windows beside it)',
            median(rounds.map((x) => x.ratio)),
            `median of ${ROUNDS}: ${list(
              rounds.map((x) => x.ratio),
              2,
            )}`,
          ],
          [
            'gateway event-loop delay p99 during the login storm (ms)',
            loopWorst,
            `the worst round (${list(
              rounds.map((x) => x.loopDelay),
              2,
            )}): scraped nodejs_eventloop_lag_p99 less its 10 ms timer`,
          ],
          [
            'gateway CPU during the login storm (cores)',
            used.gateway / (SECONDS * ROUNDS),
            'main + hash threads',
          ],
          ['CPU per raw verify (ms)', mean(raws.map((x) => x.cpuMs)), 'the raw pool, mean of the windows'],
          [
            'CPU per login: gateway main thread (ms)',
            perLogin.main,
            `gateway's other threads (hashing) ${(perLogin.gateway - perLogin.main).toFixed(1)} ms`,
          ],
          ['CPU per login: the bench clients (ms)', perLogin.bench, 'this process'],
          ['CPU per resume: gateway main thread (ms)', resumeMainMs, 'no hashing'],
          [
            'CPU per login: the whole machine (ms)',
            perLogin.machine,
            'all processes, Redis, PostgreSQL and other jobs included',
          ],
          [
            'resume (token) logins through the gateway',
            resume.rate,
            `${resume.errors} errors; ${(resume.rate / loginRate).toFixed(0)}x of password logins`,
          ],
          [
            'gateway event-loop delay p99 during the resume storm (ms)',
            resumeLoopP99.delay,
            `scraped ${resumeLoopP99.scraped.toFixed(1)} ms less its 10 ms timer`,
          ],
          ['refreshes (token pair rotated) through the gateway', refresh.rate, `${refresh.errors} errors`],
          ['CPU per refresh: gateway main thread (ms)', refreshMainMs, 'no hashing'],
          [
            'CPU per refresh: the whole machine (ms)',
            refreshMachineMs,
            'all processes, Redis, PostgreSQL and other jobs included',
          ],
        ],
      ),
    );
  } finally {
    await g.stop();
  }
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
