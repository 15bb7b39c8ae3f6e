/**
 * Memory per connection: N devices connect over TCP, handshake, log in (default settings: the
 * default room on, `hb` 15 s) and heartbeat; the gateway's RSS grows by so much per device.
 * Next to it, in the same run, a Mosquitto of its own (spawned on a free port, so no other
 * client is counted) with N idle MQTT clients (keepalive 15 s). Also printed, per connection,
 * from the gateway's own /metrics: the growth of the V8 heap in use (live objects and garbage
 * not yet collected), of the heap V8 has committed (in use, free space and pages it keeps),
 * and of "external" memory (ArrayBuffers and Buffers: socket reads, keys); RSS beyond the
 * committed heap is native memory (malloc: the OpenSSL contexts, libuv, uWS) and its slack.
 *
 *   npm run bench:memory -- [--devices 5000] [--concurrency 100] [--settle-seconds 35]
 *                           [--env NAME=value ...] [--snapshots DIR]
 *
 * `--snapshots DIR` also writes a V8 heap snapshot of the gateway before and after the
 * connections and prints what grew per connection, by constructor (bench/lib/heap-diff.ts).
 * Taking a snapshot costs memory itself: quote the RSS figure of a run without it.
 *
 * The gateway runs one process (`GW_PROCESSES=1`): the figure is per process. The gateway's
 * RSS "before" is taken after a warm-up round of connections (pools, JIT, room state), so that
 * what is left is the per-connection cost. The devices connect in two halves, each followed by
 * the heartbeating time; "2nd half" is the RSS growth over the second half alone, divided by
 * its devices: the marginal cost with the gateway already holding N/2, which the state of the
 * "before" reading (garbage not yet collected, malloc arenas of the hash threads) cannot move.
 */
import { type ChildProcess, execSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { GatewayClient } from '../../client/client.ts';
import { type GatewayProcess, startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs, envOption } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { PASSWORD, patiently, pool, registerUsers } from '../lib/fleet.ts';
import { diff } from '../lib/heap-diff.ts';
import { header, table } from '../lib/measure.ts';
import { processRssKib } from '../lib/proc.ts';
import { progress, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:memory',
  url: import.meta.url,
  about: "RSS per authenticated, heartbeating connection, against Mosquitto's idle MQTT connection, same run",
  readme: 'bench:memory',
  options: {
    devices: { type: 'int', default: 5000, help: 'devices measured, connected in two halves' },
    concurrency: { type: 'int', default: 100, help: 'devices connecting at a time' },
    'settle-seconds': { type: 'number', min: 0, default: 35, help: 'seconds of heartbeats after each half' },
    warmup: { type: 'int', min: 0, default: 200, help: 'devices connected before the first reading' },
    env: envOption("extra gateway settings (e.g. to compare a setting's effect)"),
    snapshots: {
      type: 'string',
      arg: 'DIR',
      help: 'also write heap snapshots there and print what grew per connection, by constructor',
    },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const N = values.devices;
const CONCURRENCY = values.concurrency;
const SETTLE_S = values['settle-seconds'];
const WARMUP = values.warmup;
/** Extra gateway settings, `--env NAME=value` (e.g. to compare a setting's effect). */
const EXTRA_ENV = Object.fromEntries(values.env.map((kv) => kv.split(/=(.*)/s).slice(0, 2)));

const rssKib = (pid: number): number => processRssKib(pid) ?? Number.NaN;
const SNAPSHOTS = values.snapshots;

/** Asks the gateway for a heap snapshot (SIGUSR2) and waits until the file is complete. */
async function snapshot(pid: number): Promise<string> {
  const dir = SNAPSHOTS!;
  const known = new Set(readdirSync(dir));
  process.kill(pid, 'SIGUSR2');
  const end = Date.now() + 300_000;
  let file: string | undefined;
  let size = -1;
  while (Date.now() < end) {
    await sleep(1000);
    file ??= readdirSync(dir).find((f) => f.endsWith('.heapsnapshot') && !known.has(f));
    if (!file) continue;
    const now = statSync(join(dir, file)).size;
    if (now > 0 && now === size) return join(dir, file);
    size = now;
  }
  throw new Error(`no heap snapshot in ${dir} within 300 s`);
}

interface Heap {
  heapUsed: number;
  /** Committed by V8 for its heap: in use, free lists and pages not given back. */
  heapTotal: number;
  external: number;
}

/** Heap in use and external memory of the gateway, bytes, from its /metrics. */
async function heapOf(g: GatewayProcess): Promise<Heap> {
  const text = await (
    await fetch(`http://127.0.0.1:${g.metricsPort}/metrics`, { signal: AbortSignal.timeout(20000) })
  ).text();
  const value = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? Number.NaN);
  return {
    heapUsed: value('nodejs_heap_size_used_bytes'),
    heapTotal: value('nodejs_heap_size_total_bytes'),
    external: value('nodejs_external_memory_bytes'),
  };
}

interface Row {
  target: string;
  connections: number;
  rssBeforeMib: number;
  rssAfterMib: number;
  kibPerConn: number;
  /** RSS growth per connection over the second half of the connections alone (see below). */
  kibPerConnSecondHalf: number | undefined;
  heapKibPerConn: number | undefined;
  heapTotalKibPerConn: number | undefined;
  externalKibPerConn: number | undefined;
}

async function gatewayRow(): Promise<Row> {
  const g = await startGateway({
    GW_PROCESSES: '1',
    GW_REGISTER_PER_MINUTE: '1000000',
    GW_IP_FAILURE_BUDGET: '1000000',
    GW_LOG_LEVEL: 'info',
    ...(SNAPSHOTS ? { NODE_OPTIONS: `--heapsnapshot-signal=SIGUSR2 --diagnostic-dir=${SNAPSHOTS}` } : {}),
    ...EXTRA_ENV,
  });
  if (SNAPSHOTS) mkdirSync(SNAPSHOTS, { recursive: true });
  const pid = g.proc.pid!;
  const total = N + WARMUP;
  const users = Array.from({ length: total }, (_, i) => `m${i}_${Date.now() % 1000000}`.slice(0, 16));
  try {
    await registerUsers(g.tcpUrl, users);

    let closed = 0;
    const connect = async (from: number, count: number, into: GatewayClient[]) => {
      let n = 0;
      const stop = progress(`  connect + login ${from}..${from + count}`, () => `${n}/${count}`);
      await pool(count, CONCURRENCY, async (i) => {
        const c = new GatewayClient({ url: g.tcpUrl, requestTimeoutMs: 120000, connectTimeoutMs: 60000 });
        await c.connect();
        await patiently(c, 'login', { username: users[from + i], password: PASSWORD });
        c.once('close', () => {
          closed++;
        });
        into.push(c);
        n++;
      });
      stop();
    };
    // Warm-up: a round of connections that stay, so that what follows is the marginal cost.
    const warm: GatewayClient[] = [];
    await connect(0, WARMUP, warm);
    await sleep(3000);
    const rss0 = rssKib(pid);
    const heap0 = await heapOf(g);
    const snap0 = SNAPSHOTS ? await snapshot(pid) : undefined;
    const devices: GatewayClient[] = [];
    // Two halves, each followed by the same heartbeating time: the growth over the second half
    // is the marginal cost of a connection with the gateway already in its steady state, free
    // of what the first reading may hold that the process sheds later (garbage of the account
    // registrations not yet collected, the hash threads' malloc arenas).
    const half = Math.floor(N / 2);
    // Heartbeating: at least two pings of the default hb (15 s) answered by every device.
    const heartbeat = async () => {
      const done = progress('  heartbeating', () => `${rssKib(pid)} KiB RSS`);
      await sleep(SETTLE_S * 1000);
      done();
    };
    await connect(WARMUP, half, devices);
    await heartbeat();
    const rssHalf = rssKib(pid);
    await connect(WARMUP + half, N - half, devices);
    await heartbeat();
    const rss1 = rssKib(pid);
    const heap1 = await heapOf(g);
    if (snap0) console.log(`\n${diff(snap0, await snapshot(pid), N)}\n`);
    const open = devices.length + warm.length - closed - WARMUP;
    for (const c of [...devices, ...warm]) c.destroy();
    return {
      target: `gateway (TCP, AES-GCM, logged in, default room ${EXTRA_ENV.GW_DEFAULT_ROOM === '' ? 'off' : 'on'})`,
      connections: open,
      rssBeforeMib: rss0 / 1024,
      rssAfterMib: rss1 / 1024,
      kibPerConn: (rss1 - rss0) / N,
      kibPerConnSecondHalf: (rss1 - rssHalf) / (N - half),
      heapKibPerConn: (heap1.heapUsed - heap0.heapUsed) / 1024 / N,
      heapTotalKibPerConn: (heap1.heapTotal - heap0.heapTotal) / 1024 / N,
      externalKibPerConn: (heap1.external - heap0.external) / 1024 / N,
    };
  } finally {
    await g.stop();
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => (typeof a === 'object' && a ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

async function mosquittoRow(): Promise<Row> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'mosq-bench-'));
  const conf = join(dir, 'mosquitto.conf');
  writeFileSync(
    conf,
    `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_keepalive 65535\n`,
  );
  const bin = execSync('command -v mosquitto || echo /usr/sbin/mosquitto', { shell: '/bin/sh' })
    .toString()
    .trim();
  const proc: ChildProcess = spawn(bin, ['-c', conf], { stdio: 'ignore' });
  try {
    const url = `mqtt://127.0.0.1:${port}`;
    const warm: mqtt.MqttClient[] = [];
    const clients: mqtt.MqttClient[] = [];
    const connect = async (count: number, into: mqtt.MqttClient[], tag: string) => {
      let n = 0;
      const stop = progress(`  MQTT connect ${tag}`, () => `${n}/${count}`);
      await pool(count, CONCURRENCY, async (i) => {
        for (let attempt = 0; ; attempt++) {
          try {
            const c = await mqtt.connectAsync(url, {
              clientId: `mem-${tag}-${i}`,
              clean: true,
              keepalive: 15,
              reconnectPeriod: 0,
              connectTimeout: 60000,
            });
            into.push(c);
            n++;
            return;
          } catch (e) {
            if (attempt >= 20) throw e; // the broker is still starting
            await sleep(100);
          }
        }
      });
      stop();
    };
    await connect(WARMUP, warm, 'warm');
    await sleep(3000);
    const rss0 = rssKib(proc.pid!);
    await connect(N, clients, 'idle');
    const done = progress('  MQTT idle', () => `${rssKib(proc.pid!)} KiB RSS`);
    await sleep(Math.min(SETTLE_S, 20) * 1000);
    done();
    const rss1 = rssKib(proc.pid!);
    const open = clients.filter((c) => c.connected).length;
    for (const c of [...clients, ...warm]) c.end(true);
    return {
      target: 'Mosquitto 2 (MQTT, idle, keepalive 15 s)',
      connections: open,
      rssBeforeMib: rss0 / 1024,
      rssAfterMib: rss1 / 1024,
      kibPerConn: (rss1 - rss0) / N,
      kibPerConnSecondHalf: undefined,
      heapKibPerConn: undefined,
      heapTotalKibPerConn: undefined,
      externalKibPerConn: undefined,
    };
  } finally {
    proc.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  console.log(header(`memory: RSS per authenticated, heartbeating connection, ${N} connections`));
  console.log(
    `default settings (hb 15 s, default room #general) unless --env; ${WARMUP} warm-up connections first; ` +
      `${SETTLE_S} s of heartbeats before the figure (gateway: after each half of the connections)\n`,
  );
  const rows = [await gatewayRow(), await mosquittoRow()];
  const kib = (v: number | undefined) => (v === undefined ? '—' : v.toFixed(2));
  console.log(
    table(
      [
        'target',
        'open',
        'RSS before MiB',
        'RSS after MiB',
        'KiB RSS / conn',
        'KiB RSS / conn, 2nd half',
        'V8 heap in use',
        'V8 heap committed',
        'external',
      ],
      rows.map((r) => [
        r.target,
        r.connections,
        r.rssBeforeMib.toFixed(1),
        r.rssAfterMib.toFixed(1),
        r.kibPerConn.toFixed(2),
        kib(r.kibPerConnSecondHalf),
        kib(r.heapKibPerConn),
        kib(r.heapTotalKibPerConn),
        kib(r.externalKibPerConn),
      ]),
    ),
  );
  const [gw, mosq] = rows;
  console.log(`\ngateway / Mosquitto: ${(gw.kibPerConn / mosq.kibPerConn).toFixed(1)}x RSS per connection`);
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
