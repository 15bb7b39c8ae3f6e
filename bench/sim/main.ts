/**
 * `npm run simulate -- [options]`: a fleet of virtual devices against a running gateway, every
 * qos-1 event accounted for. See bench/README.md ("simulate") for the options and the report.
 */
import { writeFileSync } from 'node:fs';
import { benchArgs, refuse } from '../lib/args.ts';
import { type SeriesPoint, type SimOptions, type SimReport, Simulation, type Transport } from './engine.ts';
import { htmlReport, jsonReport, textReport } from './report.ts';
import { runWorkers } from './workers.ts';

const { values } = benchArgs({
  script: 'simulate',
  url: import.meta.url,
  about: 'A fleet of virtual devices against a running gateway, every qos-1 event accounted for.',
  readme: 'simulate',
  options: {
    tcp: { type: 'string', default: '127.0.0.1:9000', arg: 'HOST:PORT', help: "the gateway's TCP listener" },
    ws: {
      type: 'string',
      default: 'ws://127.0.0.1:8080/ws',
      arg: 'URL',
      help: "the gateway's WebSocket URL",
    },
    http: { type: 'string', default: 'http://127.0.0.1:8080', arg: 'URL', help: "the gateway's HTTP API" },
    transport: {
      type: 'string',
      default: 'tcp',
      choices: ['tcp', 'ws', 'mix'],
      help: "the devices' transport; mix: alternately",
    },
    devices: {
      type: 'number',
      default: 100,
      min: 1,
      help: 'devices in the fleet; with --workers K, from K to 15000 × K',
    },
    duration: { type: 'number', default: 30, min: 0.1, max: 86400, help: 'seconds of the run' },
    rate: { type: 'number', default: 50, min: 0.01, max: 100000, help: 'device starts per second' },
    ramp: {
      type: 'number',
      min: 0.001,
      max: 3600,
      arg: 'S',
      help: 'start the fleet over S seconds instead of --rate',
    },
    'event-rate': {
      type: 'number',
      default: 100,
      min: 0,
      max: 1_000_000,
      help: 'events per second; 0: as fast as acks allow',
    },
    window: {
      type: 'number',
      default: 1000,
      min: 1,
      max: 1_000_000,
      help: 'events accepted and not yet acked, at most',
    },
    payload: {
      type: 'number',
      default: 100,
      min: 0,
      max: 60000,
      arg: 'BYTES',
      help: "bytes of each event's padding",
    },
    'max-events': {
      type: 'number',
      default: 1_000_000,
      min: 0,
      max: 100_000_000,
      help: 'events published, at most',
    },
    'api-key': {
      type: 'string',
      env: 'GW_API_KEY',
      arg: 'KEY',
      help: "the gateway's API key, for the producer; needed unless --max-events 0",
    },
    'publish-rate': {
      type: 'number',
      default: 0,
      min: 0,
      max: 1_000_000,
      help: 'device publish requests per second',
    },
    rooms: {
      type: 'number',
      default: 0,
      min: 0,
      max: 100000,
      help: 'rooms the devices join; device i: room i mod N',
    },
    'say-rate': { type: 'number', default: 0, min: 0, max: 1_000_000, help: 'device says per second' },
    'no-ack-prob': {
      type: 'number',
      default: 0,
      min: 0,
      max: 1,
      arg: 'P',
      help: 'probability that a device withholds the ack of an event',
    },
    'churn-prob': {
      type: 'number',
      default: 0,
      min: 0,
      max: 1,
      arg: 'P',
      help: 'probability per second that a device drops its connection',
    },
    'refresh-grace': {
      type: 'number',
      default: 30,
      min: 0,
      max: 86400,
      arg: 'S',
      help: "the gateway's GW_REFRESH_GRACE_SECONDS",
    },
    'no-keep-session': {
      type: 'flag',
      help: "devices do not refresh while connected (the client's keepSession off): each is kicked at its session's end, SESSION_TTL after its login or last resume",
    },
    'chunked-handshake': { type: 'flag', help: 'send the hello in --hello-chunks TCP writes' },
    'hello-chunks': {
      type: 'number',
      default: 3,
      min: 2,
      max: 64,
      help: 'TCP writes of the hello, with --chunked-handshake',
    },
    'wait-for-fleet': { type: 'flag', help: 'start the clock and the producer once every device is in' },
    workers: { type: 'number', default: 1, min: 1, max: 64, arg: 'K', help: 'simulator processes' },
    worker: {
      type: 'string',
      pattern: /^(\d+)\/(\d+)$/,
      means: 'i/K',
      hidden: true,
      help: 'this process is worker i of a --workers K run',
    },
    drain: {
      type: 'number',
      default: 15,
      min: 0,
      max: 3600,
      arg: 'S',
      help: 'seconds to wait for acks after the run',
    },
    seed: { type: 'number', default: 1, min: 0, max: 2 ** 32 - 1, help: "the PRNGs' seed" },
    fingerprint: {
      type: 'string',
      arg: 'HEX',
      help: "the gateway identity key's SHA-256 (hex): any other key is refused",
    },
    redis: {
      type: 'string',
      env: 'REDIS_URL',
      default: 'redis://127.0.0.1:6379',
      arg: 'URL',
      help: "the gateway's Redis, whose back-end queue is read for the gateway's reports",
    },
    prefix: {
      type: 'string',
      env: 'GW_REDIS_PREFIX',
      default: 'gw:',
      arg: 'PREFIX',
      help: "the gateway's GW_REDIS_PREFIX",
    },
    'no-backend-scan': {
      type: 'flag',
      help: "do not read the gateway's back-end queue (no --redis, no --prefix)",
    },
    'gateway-pid': {
      type: 'number',
      min: 1,
      max: 2 ** 31,
      arg: 'PID',
      help: "the gateway's process, whose CPU and memory are measured",
    },
    json: { type: 'string', arg: 'FILE', help: 'write the report as JSON' },
    html: { type: 'string', arg: 'FILE', help: 'write the report as an HTML page' },
    quiet: { type: 'flag', help: 'no status lines' },
    'allow-remote': { type: 'flag', help: 'allow gateway URLs off loopback' },
  },
});

const workers = values.workers;
const devices = values.devices;
if (devices < workers || devices > 15000 * workers)
  refuse(
    `--devices: a number from ${workers} to ${15000 * workers} with --workers ${workers}, not '${devices}'`,
  );
const opts: SimOptions = {
  tcpUrl: `tcp://${values.tcp}`,
  wsUrl: values.ws,
  httpUrl: values.http.replace(/\/$/, ''),
  transport: values.transport as Transport,
  devices,
  rate: values.ramp !== undefined ? devices / values.ramp : values.rate,
  durationS: values.duration,
  drainS: values.drain,
  eventRate: values['event-rate'],
  window: values.window,
  payloadBytes: values.payload,
  maxEvents: values['max-events'],
  apiKey: values['api-key'] ?? '',
  publishRate: values['publish-rate'],
  rooms: values.rooms,
  sayRate: values['say-rate'],
  noAckProb: values['no-ack-prob'],
  churnProb: values['churn-prob'],
  refreshGraceMs: values['refresh-grace'] * 1000,
  keepSession: !values['no-keep-session'],
  waitForFleet: values['wait-for-fleet'],
  helloChunks: values['chunked-handshake'] ? values['hello-chunks'] : 1,
  seed: values.seed,
  ...(values.fingerprint ? { pinnedFingerprint: values.fingerprint } : {}),
  ...(values['no-backend-scan'] ? {} : { redisUrl: values.redis, redisPrefix: values.prefix }),
  ...(values['gateway-pid'] ? { gatewayPid: values['gateway-pid'] } : {}),
};
if (!opts.apiKey && opts.maxEvents > 0)
  refuse('the producer needs the gateway API key: --api-key KEY or GW_API_KEY (or --max-events 0)');
const LOOPBACK = /^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$/;
for (const [flag, u] of [
  ['--tcp', opts.tcpUrl],
  ['--ws', opts.wsUrl],
  ['--http', opts.httpUrl],
] as const) {
  let host: string;
  try {
    host = new URL(u).hostname;
  } catch {
    refuse(`${flag}: not an address the simulator can dial: ${JSON.stringify(u)}`);
  }
  if (!LOOPBACK.test(host) && !values['allow-remote'])
    refuse(`${u} is not on loopback: pass --allow-remote to load a gateway on another host`);
}

const workerSpec = /^(\d+)\/(\d+)$/.exec(values.worker ?? '');
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
