/**
 * Encrypted echo through the real gateway process, next to a plain echo server, with the same
 * load shape in the same run.
 *
 *   npm run bench:echo -- [--conns 100] [--window 32] [--seconds 10] [--warmup 2] [--payload 100]
 *                         [--transport tcp|ws] [--crypto node,native] [--json]
 *
 * Targets, each a child process spawned and stopped by this bench, measured one after another:
 *   - net-echo : node:net server echoing u32-length-prefixed frames unchanged (no crypto, no
 *                MessagePack); the body has the size of a sealed gateway ping;
 *   - uws-echo : (--transport ws only) the same over uWebSockets.js, the gateway's WS library;
 *   - gateway <crypto> : gateway/main.ts with GW_CRYPTO=<crypto>, one per backend given;
 *                native is n/a when the addon does not load. Requests are sealed
 *                `{type: "ping", ts, p: bin(payload)}`, replies sealed `{type: "pong", ts}`.
 *
 * The load generator runs in this process on one thread, with the fastest crypto backend
 * available. Per target: a warm-up, then a measured window in which round trips are counted,
 * latencies recorded (hdr-histogram-js), and the CPU of the server child (utime+stime from
 * /proc/<pid>/stat) and of this process (process.cpuUsage) read before and after.
 * A status line per second goes to stderr; the result table (or JSON with --json) to stdout.
 */
import { availableParallelism, loadavg } from 'node:os';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { build } from 'hdr-histogram-js';
import { benchArgs } from '../lib/args.ts';
import { fastestBackend, probeNative } from '../lib/backends.ts';
import { type ServerChild, spawnTsChild, startBenchGateway } from '../lib/gateway.ts';
import { fmt, table } from '../lib/measure.ts';
import { machineBusyMicros, processCpuMicros, selfCpuMicros } from '../lib/proc.ts';
import { LoadConn, type LoadStats, sealedPingBytes } from './loadgen.ts';

const { values: a } = benchArgs({
  script: 'bench:echo',
  url: import.meta.url,
  about: 'encrypted echo through the real gateway process against plain echo servers, same load, same run',
  readme: 'bench:echo',
  options: {
    conns: { type: 'int', max: 5000, default: 100, help: 'connections' },
    window: { type: 'int', max: 4096, default: 32, help: 'requests outstanding per connection' },
    seconds: { type: 'number', min: 1, max: 600, default: 10, help: 'seconds measured per target' },
    warmup: { type: 'number', min: 0, max: 60, default: 2, help: 'seconds of load before each measurement' },
    payload: { type: 'int', min: 0, max: 60000, default: 100, help: 'bytes of payload in each gateway ping' },
    transport: {
      type: 'string',
      choices: ['tcp', 'ws'],
      default: 'tcp',
      help: 'framed TCP, or WebSocket (adds the uWebSockets.js echo)',
    },
    crypto: {
      type: 'string',
      list: true,
      choices: ['node', 'native'],
      default: 'node,native',
      help: "the gateway's crypto backends, one gateway each",
    },
    json: { type: 'flag', help: 'print a JSON document instead of the table' },
  },
});
const conns = a.conns;
const window = a.window;
const seconds = a.seconds;
const warmup = a.warmup;
const payload = a.payload;
const transport = a.transport as 'tcp' | 'ws';
const cryptos = a.crypto;

const HOST = '127.0.0.1';
const clientBackend = fastestBackend();
const { native, reason: nativeReason } = probeNative();
const rawBody = sealedPingBytes(payload);

interface Target {
  name: string;
  proto: 'gateway' | 'raw';
  transport: 'tcp' | 'ws';
  serverCrypto: string;
  /** Starts the server; resolves with the child and the port to load. */
  start(): Promise<{ child: ServerChild; port: number; close(): Promise<void> }>;
  unavailable?: string;
}

interface Result {
  target: string;
  transport: string;
  serverCrypto: string;
  clientCrypto: string;
  status: 'ok' | 'n/a' | 'failed';
  note?: string;
  seconds?: number;
  frames?: number;
  framesPerSec?: number;
  p50Ms?: number;
  p99Ms?: number;
  p999Ms?: number;
  maxMs?: number;
  serverCpuUsPerFrame?: number;
  serverCpuPct?: number;
  clientCpuUsPerFrame?: number;
  clientCpuPct?: number;
  /** CPU used by everything else on the machine during the window, % of one core. */
  otherCpuPct?: number;
  errors?: number;
}

const live = new Set<ServerChild>();
process.on('exit', () => {
  for (const c of live) if (c.proc.exitCode === null && c.proc.signalCode === null) c.proc.kill('SIGKILL');
});

function echoTarget(mode: 'tcp' | 'ws'): Target {
  return {
    name: mode === 'tcp' ? 'net-echo' : 'uws-echo',
    proto: 'raw',
    transport: mode,
    serverCrypto: '-',
    async start() {
      const child = await spawnTsChild('bench/load/echo-server.ts', ['--mode', mode, '--host', HOST], {
        isReady: (l) => l.msg === 'echo ready',
      });
      return {
        child,
        port: child.ready.port as number,
        close: async () => {
          await child.stop();
        },
      };
    },
  };
}

function gatewayTarget(crypto: 'node' | 'native'): Target {
  return {
    name: `gateway ${crypto}`,
    proto: 'gateway',
    transport,
    serverCrypto: crypto,
    ...(crypto === 'native' && !native ? { unavailable: `native backend unavailable: ${nativeReason}` } : {}),
    async start() {
      const gw = await startBenchGateway(crypto);
      if (gw.backend !== crypto) {
        await gw.close();
        throw new Error(`gateway reported backend ${gw.backend}, wanted ${crypto}`);
      }
      return { child: gw, port: transport === 'tcp' ? gw.tcpPort : gw.httpPort, close: () => gw.close() };
    },
  };
}

const targets: Target[] = [echoTarget('tcp')];
if (transport === 'ws') targets.push(echoTarget('ws'));
for (const c of cryptos) targets.push(gatewayTarget(c as 'node' | 'native'));

// Everything is bounded: a hard deadline for the whole run.
const deadlineMs = targets.length * (warmup + seconds + 120) * 1000;
const deadline = setTimeout(() => {
  console.error(`bench: hard deadline of ${deadlineMs / 1000} s passed; killing children`);
  process.exit(3);
}, deadlineMs);
deadline.unref();
let interrupted = false;
process.on('SIGINT', () => {
  if (interrupted) process.exit(130);
  interrupted = true;
  console.error('bench: interrupted; stopping after the current target');
});

function status(line: string): void {
  process.stderr.write(`${line}\n`);
}

async function run(t: Target): Promise<Result> {
  const base: Result = {
    target: t.name,
    transport: t.transport,
    serverCrypto: t.serverCrypto,
    clientCrypto: t.proto === 'gateway' ? clientBackend.name : '-',
    status: 'ok',
  };
  if (t.unavailable) return { ...base, status: 'n/a', note: t.unavailable };
  const label = `[${t.name} ${t.transport}]`;
  status(`${label} starting server`);
  const server = await t.start();
  live.add(server.child);
  const pid = server.child.pid;
  const stats: LoadStats = {
    frames: 0,
    errors: 0,
    hist: build({
      lowestDiscernibleValue: 1,
      highestTrackableValue: 60_000_000,
      numberOfSignificantValueDigits: 3,
      autoResize: true,
    }),
  };
  const list: LoadConn[] = [];
  let ticker: NodeJS.Timeout | undefined;
  try {
    // Connect (and handshake) in batches so that none of them waits long enough to time out.
    for (let i = 0; i < conns; i += 50) {
      const batch: LoadConn[] = [];
      for (let j = i; j < Math.min(conns, i + 50); j++) {
        const c = new LoadConn({
          transport: t.transport,
          proto: t.proto,
          host: HOST,
          port: server.port,
          window,
          payload: t.proto === 'raw' ? rawBody : payload,
          backend: clientBackend,
          stats,
        });
        batch.push(c);
        list.push(c);
      }
      await Promise.all(batch.map((c) => c.connect(20000)));
    }
    status(`${label} ${conns} connections open; warm-up ${warmup} s, then ${seconds} s measured`);

    const t0 = performance.now();
    let phase = 'warm-up';
    let last = {
      at: t0,
      frames: 0,
      cpuS: processCpuMicros(pid) ?? 0,
      cpuC: selfCpuMicros(),
      cpuM: machineBusyMicros() ?? 0,
    };
    ticker = setInterval(() => {
      const now = performance.now();
      const cpuS = processCpuMicros(pid) ?? 0;
      const cpuC = selfCpuMicros();
      const cpuM = machineBusyMicros() ?? 0;
      const dt = now - last.at;
      const pct = (us: number) => `${Math.max(0, (us / 1000 / dt) * 100).toFixed(0)}%`;
      const inflight = list.reduce((n, c) => n + c.inflight, 0);
      status(
        `${label} ${phase.padEnd(7)} t=${((now - t0) / 1000).toFixed(0).padStart(3)}s ` +
          `frames/s ${fmt(((stats.frames - last.frames) * 1000) / dt).padStart(9)}  ` +
          `in flight ${inflight}  server cpu ${pct(cpuS - last.cpuS)}  client cpu ${pct(cpuC - last.cpuC)}  ` +
          `other cpu ${pct(cpuM - last.cpuM - (cpuS - last.cpuS) - (cpuC - last.cpuC))}  errors ${stats.errors}`,
      );
      last = { at: now, frames: stats.frames, cpuS, cpuC, cpuM };
    }, 1000);

    for (const c of list) c.start();
    await sleep(warmup * 1000);
    // With a very short warm-up, give the first replies a moment (bounded) before giving up.
    const firstReplyBy = performance.now() + 5000;
    while (stats.frames === 0 && stats.errors === 0 && performance.now() < firstReplyBy) await sleep(10);
    if (stats.frames === 0) throw new Error(`no reply during the warm-up (${stats.lastError ?? 'no error'})`);

    phase = 'measure';
    stats.hist.reset();
    const start = {
      at: performance.now(),
      frames: stats.frames,
      cpuS: processCpuMicros(pid),
      cpuC: selfCpuMicros(),
      cpuM: machineBusyMicros(),
    };
    await sleep(seconds * 1000);
    const end = {
      at: performance.now(),
      frames: stats.frames,
      cpuS: processCpuMicros(pid),
      cpuC: selfCpuMicros(),
      cpuM: machineBusyMicros(),
    };
    clearInterval(ticker);
    ticker = undefined;

    const elapsedMs = end.at - start.at;
    const frames = end.frames - start.frames;
    const h = stats.hist;
    const serverCpu = start.cpuS !== null && end.cpuS !== null ? end.cpuS - start.cpuS : Number.NaN;
    const clientCpu = end.cpuC - start.cpuC;
    const otherCpu =
      start.cpuM !== null && end.cpuM !== null
        ? Math.max(0, end.cpuM - start.cpuM - serverCpu - clientCpu)
        : Number.NaN;
    const result: Result = {
      ...base,
      seconds: elapsedMs / 1000,
      frames,
      framesPerSec: (frames * 1000) / elapsedMs,
      p50Ms: h.getValueAtPercentile(50) / 1000,
      p99Ms: h.getValueAtPercentile(99) / 1000,
      p999Ms: h.getValueAtPercentile(99.9) / 1000,
      maxMs: h.maxValue / 1000,
      serverCpuUsPerFrame: serverCpu / frames,
      serverCpuPct: (serverCpu / 1000 / elapsedMs) * 100,
      clientCpuUsPerFrame: clientCpu / frames,
      clientCpuPct: (clientCpu / 1000 / elapsedMs) * 100,
      otherCpuPct: (otherCpu / 1000 / elapsedMs) * 100,
      errors: stats.errors,
      ...(stats.errors ? { note: `last error: ${stats.lastError}` } : {}),
    };

    // Let the replies in flight come back (bounded), then close.
    for (const c of list) c.stop();
    const drainEnd = performance.now() + 2000;
    while (list.some((c) => c.inflight > 0) && performance.now() < drainEnd && stats.errors === 0) {
      await sleep(20);
    }
    return result;
  } catch (e) {
    return { ...base, status: 'failed', note: (e as Error).message.split('\n')[0].slice(0, 300) };
  } finally {
    if (ticker) clearInterval(ticker);
    for (const c of list) c.close();
    await server.close();
    live.delete(server.child);
    status(`${label} server stopped`);
  }
}

const results: Result[] = [];
const startedAt = new Date().toISOString();
const loadAtStart = loadavg()
  .map((l) => l.toFixed(2))
  .join(' ');
status(
  `bench:echo ${transport}: ${conns} conns x window ${window}, payload ${payload} B, ` +
    `${warmup} s warm-up + ${seconds} s per target; client crypto ${clientBackend.name}`,
);
for (const t of targets) {
  if (interrupted) break;
  try {
    results.push(await run(t));
  } catch (e) {
    results.push({
      target: t.name,
      transport: t.transport,
      serverCrypto: t.serverCrypto,
      clientCrypto: '-',
      status: 'failed',
      note: (e as Error).message.split('\n')[0].slice(0, 300),
    });
  }
}

const byName = (n: string) => results.find((r) => r.target === n && r.status === 'ok');
const ratio = (x: number | undefined, y: number | undefined) =>
  x !== undefined && y !== undefined && y > 0 ? `${(x / y).toFixed(2)}x` : 'n/a';
const netEcho = byName('net-echo');
const uwsEcho = byName('uws-echo');
const gwNode = byName('gateway node');
const gwNative = byName('gateway native');
const ratios: [string, string][] = [
  ['gateway node / net-echo, frames/s', ratio(gwNode?.framesPerSec, netEcho?.framesPerSec)],
  ['gateway native / net-echo, frames/s', ratio(gwNative?.framesPerSec, netEcho?.framesPerSec)],
  ...(transport === 'ws'
    ? ([
        ['gateway node / uws-echo, frames/s', ratio(gwNode?.framesPerSec, uwsEcho?.framesPerSec)],
        ['gateway native / uws-echo, frames/s', ratio(gwNative?.framesPerSec, uwsEcho?.framesPerSec)],
      ] as [string, string][])
    : []),
  ['gateway native / node, frames/s', ratio(gwNative?.framesPerSec, gwNode?.framesPerSec)],
  [
    'gateway native / node, server CPU per frame',
    ratio(gwNative?.serverCpuUsPerFrame, gwNode?.serverCpuUsPerFrame),
  ],
  [
    'gateway node / net-echo, server CPU per frame',
    ratio(gwNode?.serverCpuUsPerFrame, netEcho?.serverCpuUsPerFrame),
  ],
];

if (a.json) {
  console.log(
    JSON.stringify(
      {
        bench: 'echo',
        startedAt,
        node: process.version,
        cores: availableParallelism(),
        loadAverageAtStart: loadAtStart,
        args: { conns, window, seconds, warmup, payload, transport, crypto: cryptos },
        clientCrypto: clientBackend.name,
        netEchoBodyBytes: rawBody,
        results,
        ratios: Object.fromEntries(ratios),
      },
      null,
      2,
    ),
  );
} else {
  const n = (v: number | undefined, digits?: number) =>
    v === undefined || Number.isNaN(v) ? 'n/a' : digits !== undefined ? v.toFixed(digits) : fmt(v);
  console.log(
    `# echo load (npm run bench:echo), ${startedAt}, node ${process.version}, ` +
      `${availableParallelism()} cores, load average at start ${loadAtStart}`,
  );
  console.log();
  console.log(
    `${transport}, ${conns} connections x window ${window}, ping payload ${payload} B ` +
      `(echo targets: ${rawBody} B bodies), ${warmup} s warm-up + ${seconds} s measured per target; ` +
      `load generator: this process, one thread, client crypto ${clientBackend.name}`,
  );
  console.log();
  console.log(
    table(
      [
        'target',
        'transport',
        'frames/s',
        'p50 ms',
        'p99 ms',
        'server CPU µs/frame',
        'server CPU %',
        'client CPU µs/frame',
        'client CPU %',
        'other CPU %',
        'errors',
      ],
      results.map((r) =>
        r.status === 'ok'
          ? [
              r.target,
              r.transport,
              n(r.framesPerSec),
              n(r.p50Ms, 2),
              n(r.p99Ms, 2),
              n(r.serverCpuUsPerFrame, 2),
              n(r.serverCpuPct, 0),
              n(r.clientCpuUsPerFrame, 2),
              n(r.clientCpuPct, 0),
              n(r.otherCpuPct, 0),
              String(r.errors ?? 0),
            ]
          : [r.target, r.transport, r.status, 'n/a', 'n/a', 'n/a', 'n/a', 'n/a', 'n/a', 'n/a', '-'],
      ),
    ),
  );
  console.log();
  console.log(table(['ratio', 'value'], ratios));
  const notes = results.filter((r) => r.note);
  if (notes.length) {
    console.log();
    for (const r of notes) console.log(`- ${r.target}: ${r.status}: ${r.note}`);
  }
}

const failed = results.some((r) => r.status === 'failed');
process.exit(interrupted ? 130 : failed ? 1 : 0);
