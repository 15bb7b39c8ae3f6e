/**
 * `npm run simulate -- [options]`: a fleet of virtual devices against a running gateway, every
 * qos-1 event accounted for. See bench/README.md ("simulate") for the options and the report.
 */
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { type SeriesPoint, type SimOptions, type SimReport, Simulation, type Transport } from './engine.ts';
import { htmlReport, jsonReport, textReport } from './report.ts';
import { runWorkers } from './workers.ts';

const OPTIONS = {
  tcp: { type: 'string', default: '127.0.0.1:9000' },
  ws: { type: 'string', default: 'ws://127.0.0.1:8080/ws' },
  http: { type: 'string', default: 'http://127.0.0.1:8080' },
  transport: { type: 'string', default: 'tcp' },
  devices: { type: 'string', default: '100' },
  duration: { type: 'string', default: '30' },
  rate: { type: 'string', default: '50' },
  ramp: { type: 'string' },
  'event-rate': { type: 'string', default: '100' },
  window: { type: 'string', default: '1000' },
  payload: { type: 'string', default: '100' },
  'max-events': { type: 'string', default: '1000000' },
  'api-key': { type: 'string', default: process.env.GW_API_KEY ?? '' },
  'publish-rate': { type: 'string', default: '0' },
  rooms: { type: 'string', default: '0' },
  'say-rate': { type: 'string', default: '0' },
  'no-ack-prob': { type: 'string', default: '0' },
  'churn-prob': { type: 'string', default: '0' },
  'refresh-grace': { type: 'string', default: '30' },
  'chunked-handshake': { type: 'boolean', default: false },
  'wait-for-fleet': { type: 'boolean', default: false },
  workers: { type: 'string', default: '1' },
  // Internal: this process is worker i/K of a --workers K run.
  worker: { type: 'string' },
  'hello-chunks': { type: 'string', default: '3' },
  drain: { type: 'string', default: '15' },
  seed: { type: 'string', default: '1' },
  fingerprint: { type: 'string' },
  redis: { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
  prefix: { type: 'string', default: process.env.GW_REDIS_PREFIX ?? 'gw:' },
  'no-backend-scan': { type: 'boolean', default: false },
  'gateway-pid': { type: 'string' },
  json: { type: 'string' },
  html: { type: 'string' },
  quiet: { type: 'boolean', default: false },
  'allow-remote': { type: 'boolean', default: false },
  help: { type: 'boolean', default: false },
} as const;

const USAGE = `npm run simulate -- [options]   (see bench/README.md, "simulate")
  --tcp HOST:PORT --ws URL --http URL --transport tcp|ws|mix
  --devices N --rate N/s | --ramp S --duration S --drain S --seed N --wait-for-fleet
  --event-rate N/s (0: as fast as acks allow) --window N --payload BYTES --max-events N --api-key KEY
  --publish-rate N/s --rooms N --say-rate N/s --no-ack-prob P --churn-prob P/s
  --refresh-grace S (the gateway's GW_REFRESH_GRACE_SECONDS)
  --chunked-handshake [--hello-chunks N] --fingerprint HEX
  --redis URL --prefix GW_REDIS_PREFIX | --no-backend-scan --gateway-pid PID
  --json FILE --html FILE --quiet --allow-remote --workers K`;

let parsed: ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>;
try {
  parsed = parseArgs({ options: OPTIONS });
} catch (e) {
  console.error(`${(e as Error).message}\n${USAGE}`);
  process.exit(2);
}
const { values } = parsed;

function num(name: string, min: number, max: number): number {
  const raw = values[name as keyof typeof values] as string;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min || n > max) {
    console.error(`--${name}: expected a number in [${min}, ${max}], got ${raw}`);
    process.exit(2);
  }
  return n;
}

if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
if (!['tcp', 'ws', 'mix'].includes(values.transport)) {
  console.error('--transport: tcp, ws or mix');
  process.exit(2);
}
const workers = num('workers', 1, 64);
const devices = num('devices', workers, 15000 * workers);
const opts: SimOptions = {
  tcpUrl: `tcp://${values.tcp}`,
  wsUrl: values.ws,
  httpUrl: values.http.replace(/\/$/, ''),
  transport: values.transport as Transport,
  devices,
  rate: values.ramp !== undefined ? devices / num('ramp', 0.001, 3600) : num('rate', 0.01, 100000),
  durationS: num('duration', 0.1, 86400),
  drainS: num('drain', 0, 3600),
  eventRate: num('event-rate', 0, 1_000_000),
  window: num('window', 1, 1_000_000),
  payloadBytes: num('payload', 0, 60000),
  maxEvents: num('max-events', 0, 100_000_000),
  apiKey: values['api-key'],
  publishRate: num('publish-rate', 0, 1_000_000),
  rooms: num('rooms', 0, 100000),
  sayRate: num('say-rate', 0, 1_000_000),
  noAckProb: num('no-ack-prob', 0, 1),
  churnProb: num('churn-prob', 0, 1),
  refreshGraceMs: num('refresh-grace', 0, 86400) * 1000,
  waitForFleet: values['wait-for-fleet'],
  helloChunks: values['chunked-handshake'] ? num('hello-chunks', 2, 64) : 1,
  seed: num('seed', 0, 2 ** 32 - 1),
  ...(values.fingerprint ? { pinnedFingerprint: values.fingerprint } : {}),
  ...(values['no-backend-scan'] ? {} : { redisUrl: values.redis, redisPrefix: values.prefix }),
  ...(values['gateway-pid'] ? { gatewayPid: num('gateway-pid', 1, 2 ** 31) } : {}),
};
if (!opts.apiKey && opts.maxEvents > 0) {
  console.error('the producer needs the gateway API key: --api-key KEY or GW_API_KEY (or --max-events 0)');
  process.exit(2);
}
const LOOPBACK = /^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$/;
for (const u of [opts.tcpUrl, opts.wsUrl, opts.httpUrl]) {
  const host = new URL(u).hostname;
  if (!LOOPBACK.test(host) && !values['allow-remote']) {
    console.error(`${u} is not on loopback: pass --allow-remote to load a gateway on another host`);
    process.exit(2);
  }
}

const workerSpec = /^(\d+)\/(\d+)$/.exec(values.worker ?? '');
if (values.worker && !workerSpec) {
  console.error('--worker: i/K');
  process.exit(2);
}
if (workerSpec) {
  // This process's share of the fleet and of every rate.
  const [index, count] = [Number(workerSpec[1]), Number(workerSpec[2])];
  opts.worker = { index, count };
  opts.devices = Math.floor(opts.devices / count) + (index < opts.devices % count ? 1 : 0);
  opts.rate /= count;
  opts.eventRate /= count;
  opts.publishRate /= count;
  opts.sayRate /= count;
  opts.window = Math.max(1, Math.ceil(opts.window / count));
  opts.maxEvents = Math.ceil(opts.maxEvents / count);
} else if (workers > 1) {
  // The parent of K workers: forwards their status lines and Ctrl-C, merges their reports.
  const run = runWorkers(process.argv.slice(2), workers, {
    quiet: values.quiet,
    ...(opts.gatewayPid ? { gatewayPid: opts.gatewayPid } : {}),
  });
  let interrupted = false;
  process.on('SIGINT', () => {
    if (interrupted) return;
    interrupted = true;
    process.stderr.write('\ninterrupted: the workers finish with a partial report\n');
    run.interrupt();
  });
  let report: SimReport;
  try {
    report = await run.report;
  } catch (e) {
    console.error((e as Error).message);
    process.exit(1);
  }
  finish(report);
}

function finish(report: SimReport): never {
  console.log(textReport(report));
  if (values.json) writeFileSync(values.json, jsonReport(report));
  if (values.html) writeFileSync(values.html, htmlReport(report));
  if (values.json || values.html)
    console.log(`\nreports: ${[values.json, values.html].filter(Boolean).join(', ')}`);
  process.exit(report.interrupted ? 130 : report.lost > 0 ? 1 : 0);
}

const sim = new Simulation(opts);
const tty = process.stderr.isTTY && !values.quiet;
const total = opts.durationS;

function bar(t: number): string {
  const width = 30;
  const done = Math.min(width, Math.round((t / total) * width));
  return `[${'#'.repeat(done)}${'-'.repeat(width - done)}] ${Math.min(100, Math.round((t / total) * 100))}%`;
}

function status(p: SeriesPoint, phase: string): string {
  const tot = sim.ledger.totals;
  const errs = Object.entries(sim.metrics.errors)
    .sort((a, b) => b[1] - a[1])
    .slice(0, 4)
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
  return (
    `[${p.t.toFixed(0).padStart(4)}s ${phase}] devices ${p.connected}/${sim.options.devices} ` +
    `(${p.authenticated} auth) | events ${p.delivered.toFixed(0)}/s, delivered ${tot.delivered}/${tot.accepted}, ` +
    `outstanding ${sim.ledger.outstanding}, dups ${tot.duplicates}, redeliv ${tot.redeliveries} | ` +
    `ack p99 ${sim.ledger.ack.at(99).toFixed(1)} ms | reconnects ${sim.metrics.reconnects} | errors ${errs || 'none'}`
  );
}

let firstInterrupt = 0;
process.on('SIGINT', () => {
  // Ctrl-C reaches every process of the terminal's group, and a wrapper (npm, tsx) may relay
  // it once more: a second SIGINT within a second is the same Ctrl-C.
  const now = Date.now();
  if (firstInterrupt !== 0) {
    if (now - firstInterrupt > 1000) process.exit(130);
    return;
  }
  firstInterrupt = now;
  process.stderr.write('\ninterrupted: finishing with a partial report (Ctrl-C again to quit now)\n');
  sim.abort();
});

const report = await sim.run({
  onTick: (p, phase) => {
    if (values.quiet) return;
    if (tty) process.stderr.write(`\r\x1b[K${status(p, phase)}\n${phase === 'run' ? bar(p.t) : 'draining…'}`);
    else process.stderr.write(`${status(p, phase)}\n`);
  },
});
if (tty) process.stderr.write('\r\x1b[K');
finish(report);
