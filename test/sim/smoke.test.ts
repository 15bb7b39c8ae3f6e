/**
 * A short simulation against a real gateway process: 20 devices over TCP and WebSocket, churn,
 * withheld acks (a short ACK deadline so that redeliveries happen within the run). Every
 * accepted event must be received (0 lost), the withheld acks must have been redelivered, and
 * the HTML report must open in headless Chromium without errors, every chart drawn.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { CHARTS } from '../../bench/sim/report.ts';
import { REDIS_URL } from '../helpers/cleanup.ts';
import { within } from '../helpers/deadline.ts';
import { type GatewayProcess, startGateway } from '../helpers/gateway-process.ts';

const ROOT = new URL('../../', import.meta.url).pathname;
const API_KEY = randomBytes(16).toString('hex');
const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));

let gw: GatewayProcess;
let dir: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'sim-test-'));
  gw = await startGateway({
    GW_API_KEY: API_KEY,
    GW_ACK_TIMEOUT_MS: '500',
    GW_RETRY_BASE_MS: '200',
    GW_RETRY_MAX_MS: '1000',
    GW_REGISTER_PER_MINUTE: '10000',
    // Every device is to log in within the run, however loaded the machine: hash jobs queue
    // rather than being refused `overloaded` past the default 2 s of expected wait (on a machine
    // running two suites, 5 of 20 devices were still waiting out a retryAfter when the run ended).
    GW_HASH_MAX_WAIT_MS: '30000',
    GW_LOG_LEVEL: 'info',
  });
});

after(async () => {
  await gw?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Command-line arguments from an object: `{a: 1, b: true}` → `--a 1 --b`. */
function argv(options: Record<string, string | number | boolean>): string[] {
  return Object.entries(options).flatMap(([k, v]) => (v === true ? [`--${k}`] : [`--${k}`, String(v)]));
}

interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs the simulator. With `npm`, as a user does (`npm run simulate`), in a process group of
 * its own, so that a test can interrupt the whole group as Ctrl-C in a terminal does.
 */
function simulate(
  args: string[],
  onStderr?: (child: ChildProcess, text: string) => void,
  options: { npm?: boolean } = {},
): Promise<RunResult> {
  const child = options.npm
    ? spawn('npm', ['run', '-s', 'simulate', '--', ...args], {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
      })
    : spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bench/sim/main.ts'), ...args], {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => {
    stdout += d;
  });
  child.stderr.on('data', (d) => {
    stderr += d;
    onStderr?.(child, stderr);
  });
  const done = new Promise<RunResult>((resolve) =>
    // 'close': every process holding the pipes is done (npm may exit before the simulator).
    child.on('close', (code) => resolve({ code, stdout, stderr })),
  );
  return within('the simulator to finish', done, 120_000).catch((e) => {
    if (options.npm) process.kill(-child.pid!, 'SIGKILL');
    else child.kill('SIGKILL');
    throw new Error(`${(e as Error).message}\nstdout: ${stdout}\nstderr: ${stderr.slice(-3000)}`);
  });
}

/** Every error of a report is counted once under a step: the two accounts agree. */
function assertStepsAdd(
  report: { errors: Record<string, number>; errorsByStep: Record<string, Record<string, number>> },
  detail: string,
) {
  const summed: Record<string, number> = {};
  for (const byCode of Object.values(report.errorsByStep))
    for (const [code, n] of Object.entries(byCode)) summed[code] = (summed[code] ?? 0) + n;
  assert.deepEqual(summed, report.errors, `errors by step add up to the errors\n${detail}`);
}

test('a short run with churn and withheld acks loses nothing, sees redeliveries, and writes its reports', async () => {
  const tcp = gw.tcpUrl.replace('tcp://', '');
  const r = await simulate(
    argv({
      tcp,
      ws: gw.wsUrl,
      http: `http://127.0.0.1:${gw.httpPort}`,
      transport: 'mix',
      devices: 20,
      rate: 20,
      // The 6 s of events start once every device is in: the counts below (events delivered,
      // redeliveries, duplicates, reconnects after churn, 20 logins) then do not depend on how
      // fast a busy machine signs the fleet up, which a run timed from the start did.
      'wait-for-fleet': true,
      duration: 6,
      'event-rate': 100,
      'no-ack-prob': 0.2,
      // 20 devices x ~5 run-phase ticks x 0.15: ~15 drops expected; P(none) = 0.85^100 ~ 1e-7.
      // (At 0.05, P(none) = 0.95^100 ~ 0.6%: a CI run once saw no churn at all.)
      'churn-prob': 0.15,
      'publish-rate': 5,
      rooms: 2,
      'say-rate': 2,
      'chunked-handshake': true,
      drain: 30,
      seed: 7,
      'api-key': API_KEY,
      redis: REDIS_URL,
      prefix: gw.prefix,
      'gateway-pid': gw.proc.pid!,
      json: join(dir, 'report.json'),
      html: join(dir, 'report.html'),
    }),
  );
  const detail = `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-3000)}`;
  assert.equal(r.code, 0, detail);
  const report = JSON.parse(readFileSync(join(dir, 'report.json'), 'utf8'));
  assert.equal(report.lost, 0, detail);
  assert.ok(report.delivered > 100, `delivered ${report.delivered}\n${detail}`);
  assert.equal(report.delivered, report.totals.accepted, detail);
  assert.ok(report.redeliveries > 0, `no redelivery seen\n${detail}`);
  assert.ok(report.duplicates > 0, `no duplicate seen\n${detail}`);
  assert.ok(report.reconnects > 0, `no reconnect after churn\n${detail}`);
  assert.equal(report.devices.started, 20, detail);
  assert.ok(
    report.latency.delivery.count > 0 && report.latency.delivery.p99 >= report.latency.delivery.p50,
    'report.latency.delivery.count > 0 && report.latency.delivery.p99 >= report.latency.delivery.p50',
  );
  assert.ok(report.latency.handshake.count >= 20 && report.latency.login.count === 20, detail);
  assert.ok(report.devicePublishes > 0 && report.says > 0, detail);
  assert.ok(report.gateway.cpuSeconds > 0 && report.gateway.peakRssMb > 0, detail);
  assert.ok(report.backendScan && report.backendScan.scanned > 0, detail);
  assertStepsAdd(report, detail);
  if (Object.keys(report.errors).length > 0) assert.match(r.stdout, /^errors by step: /m, detail);
  console.log(r.stdout);
});

test('the HTML report opens in headless Chromium without errors and every chart drew its series', async (t) => {
  if (!CHROMIUM) {
    if (process.env.CI) assert.fail('chromium is not installed (.ci/run installs it)');
    t.skip('chromium is not installed');
    return;
  }
  const html = join(dir, 'report.html');
  assert.ok(existsSync(html), 'the first test wrote no HTML report');
  const page = readFileSync(html, 'utf8');
  assert.ok(!/<script[^>]+src=|<link[^>]+href=/i.test(page), 'the page loads nothing from outside');
  const profile = mkdtempSync(join(tmpdir(), 'sim-chromium-'));
  try {
    const r = spawnSync(
      CHROMIUM,
      [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--no-first-run',
        `--user-data-dir=${profile}`,
        '--virtual-time-budget=5000',
        '--dump-dom',
        `file://${html}`,
      ],
      { encoding: 'utf8', timeout: 60_000, maxBuffer: 64 * 1024 * 1024 },
    );
    assert.equal(r.error, undefined, `chromium did not finish: ${r.error}`);
    assert.equal(r.status, 0, `chromium exited ${r.status}: ${r.stderr.slice(-2000)}`);
    const dom = r.stdout;
    assert.ok(!/data-page-errors=/.test(dom), `the page logged errors: ${r.stderr.slice(-2000)}`);
    assert.match(dom, new RegExp(`data-charts-drawn="${CHARTS.length}"`), 'not every chart was drawn');
    for (const c of CHARTS) {
      const m = new RegExp(`id="chart-${c.id}"[^>]*`).exec(dom);
      assert.ok(m, `chart ${c.id} missing`);
      assert.match(m[0], new RegExp(`data-drawn-series="${c.series.length}"`), `chart ${c.id}: ${m[0]}`);
      assert.doesNotMatch(m[0], /data-points="0"/, `chart ${c.id} has no points`);
    }
  } finally {
    rmSync(profile, { recursive: true, force: true });
  }
});

test('Ctrl-C (SIGINT to the whole process group of `npm run simulate`) ends a run early with a partial report', async () => {
  let interrupted = false;
  const json = join(dir, 'interrupted.json');
  const r = await simulate(
    argv({
      tcp: gw.tcpUrl.replace('tcp://', ''),
      http: `http://127.0.0.1:${gw.httpPort}`,
      devices: 5,
      rate: 10,
      duration: 600,
      'event-rate': 50,
      'api-key': API_KEY,
      prefix: gw.prefix,
      json,
    }),
    (child, stderr) => {
      // Interrupt once the run is under way: a status line with every device authenticated.
      if (!interrupted && /\(5 auth\)/.test(stderr)) {
        interrupted = true;
        // As a terminal does: every process of the group (npm, the simulator) gets it.
        process.kill(-child.pid!, 'SIGINT');
      }
    },
    { npm: true },
  );
  const detail = `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-3000)}`;
  assert.ok(interrupted, detail);
  // npm itself dies of the SIGINT (no exit code); the simulator finishes and reports.
  assert.match(r.stdout, /INTERRUPTED: partial report/, detail);
  const report = JSON.parse(readFileSync(json, 'utf8'));
  assert.equal(report.interrupted, true);
  // Ended before its 600 s.
  assert.ok(report.elapsedS < 600, `ended after ${report.elapsedS} s: ${detail}`);
  assert.ok(report.totals.published > 0, detail);
});

test('--workers 2 splits the fleet over two processes and merges their accounts', async () => {
  const json = join(dir, 'workers.json');
  const r = await simulate(
    argv({
      tcp: gw.tcpUrl.replace('tcp://', ''),
      http: `http://127.0.0.1:${gw.httpPort}`,
      workers: 2,
      devices: 11,
      rate: 20,
      // Each worker's 4 s of events start once its devices are in (see the first test).
      'wait-for-fleet': true,
      duration: 4,
      'event-rate': 100,
      'no-ack-prob': 0.1,
      // 20 devices x ~5 run-phase ticks x 0.15: ~15 drops expected; P(none) = 0.85^100 ~ 1e-7.
      // (At 0.05, P(none) = 0.95^100 ~ 0.6%: a CI run once saw no churn at all.)
      'churn-prob': 0.15,
      drain: 30,
      'api-key': API_KEY,
      redis: REDIS_URL,
      prefix: gw.prefix,
      'gateway-pid': gw.proc.pid!,
      json,
    }),
  );
  const detail = `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-3000)}`;
  assert.equal(r.code, 0, detail);
  assert.match(r.stderr, /\[w0\] /, detail);
  assert.match(r.stderr, /\[w1\] /, detail);
  const report = JSON.parse(readFileSync(json, 'utf8'));
  assert.equal(report.devices.started, 11, detail);
  assert.equal(report.options.devices, 11, detail);
  assert.equal(report.lost, 0, detail);
  assert.ok(report.delivered > 50, detail);
  assert.equal(report.delivered, report.totals.accepted, detail);
  // The merged histograms hold every worker's values.
  assert.equal(report.latency.delivery.count, report.delivered, detail);
  assert.equal(report.latency.login.count, 11, detail);
  assert.equal(report.histograms, undefined);
  assert.ok(report.gateway.cpuSeconds > 0, detail);
  assertStepsAdd(report, detail);
  assert.ok(
    report.series.length > 0 && report.series.some((p: { connected: number }) => p.connected > 5),
    detail,
  );
});
