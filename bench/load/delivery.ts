/**
 * qos-1 delivery through the gateway next to Mosquitto QoS 1, same shape, same run, on the two
 * paths a fleet uses most:
 *
 * - back end → device: `POST /v1/events` batches (one request per tick of the load generator)
 *   to `{device}` targets, 100 devices; Mosquitto: one publisher, a topic per device. Max rate
 *   (a window of outstanding publishes) and a fixed rate. `--qos 0` runs these rows at qos 0
 *   (sent to who is online, not stored, no acks) against Mosquitto at QoS 0.
 * - device → device: `send` to a username, 4 senders × 60 in flight, 20 receivers; Mosquitto:
 *   4 publishers × 60 in flight, a topic per receiver.
 * - room: `say` in one room, 4 senders × 60 in flight, 20 more members, each message delivered
 *   (qos 0, as room chatter is) to all 24 members, senders included; Mosquitto: 24 clients
 *   subscribed at QoS 0 to one topic, 4 of them publishing with QoS 1 (the publisher is answered,
 *   as a `say` is) × 60 in flight. A delivered event is one member's receipt.
 *
 * Every row prints the CPU per delivered event of the server (the gateway's process tree, Redis
 * and the PostgreSQL backends serving the gateway; Mosquitto alone), latency from publish to receipt, and events lost (accepted by the
 * server, never received after a drain). Gateway devices are encrypted and ack every event;
 * Mosquitto runs as installed (127.0.0.1:1883), clients from the `mqtt` package.
 *
 * For the gateway's rows, Redis's own accounting per delivered event follows (`INFO
 * commandstats` of the shared server, so other clients' work counts too, as in its CPU): time in
 * scripts, and the commands run (by the scripts and directly) with their time.
 *
 * Every core: the back-end path at max rate runs once more on a gateway of 2 processes
 * (`GW_PROCESSES=2`; the others run 1), and the run prints its events/s and CPU per event
 * against the 1-process gateway's and Mosquitto's (`--processes 1` leaves it out).
 *
 *   npm run bench:delivery -- [--devices 100] [--seconds 5] [--rate 5000] [--window 256]
 *                             [--senders 4] [--sender-window 60] [--receivers 20]
 *                             [--members 20] [--paths backend,direct,room] [--modes max,fixed]
 *                             [--processes 1,2] [--qos 1] [--per-request tick] [--transport tcp]
 *                             [--redis-commands] [--json FILE]
 */
import { execFile, execSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { promisify } from 'node:util';
import hdr from 'hdr-histogram-js';
import { Redis } from 'ioredis';
import mqtt from 'mqtt';
import type { EventMsg } from '../../protocol/index.ts';
import { DATABASE_URL } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { loggedInDevices } from '../lib/fleet.ts';
import { postJson } from '../lib/http.ts';
import { header, table } from '../lib/measure.ts';
import { counterSum, metricsOf, redisCallsIn } from '../lib/metrics.ts';
import { processCpuMicros } from '../lib/proc.ts';
import { cpuSeconds, ownCpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:delivery',
  url: import.meta.url,
  about:
    'qos-1 delivery through the gateway next to Mosquitto QoS 1: back end → device, device → device, room',
  readme: 'bench:delivery',
  options: {
    devices: { type: 'int', default: 100, help: 'devices the back-end rows publish to' },
    seconds: { type: 'number', default: 5, help: 'seconds measured per row' },
    warmup: { type: 'number', min: 0, default: 2, help: 'seconds of warm-up per row' },
    rate: { type: 'number', default: 5000, help: "events/s of the back end's fixed-rate row" },
    window: { type: 'int', default: 256, help: "publishes outstanding in the back end's max-rate row" },
    senders: { type: 'int', default: 4, help: 'sending devices of the device → device and room rows' },
    'sender-window': { type: 'int', default: 60, help: "each sender's requests in flight" },
    receivers: { type: 'int', default: 20, help: 'receiving devices of the device → device rows' },
    members: { type: 'int', min: 0, default: 20, help: "the room path's members besides the senders" },
    payload: { type: 'int', min: 0, default: 100, help: 'bytes of payload per event' },
    qos: {
      type: 'string',
      choices: ['0', '1'],
      default: '1',
      help: "the back-end rows' qos: 1 (stored, acked) or 0 (sent to who is online; Mosquitto QoS 0)",
    },
    mqtt: { type: 'string', arg: 'URL', default: 'mqtt://127.0.0.1:1883', help: "Mosquitto's URL" },
    paths: {
      type: 'string',
      list: true,
      choices: ['backend', 'direct', 'room'],
      default: 'backend,direct,room',
      help: 'the paths to run',
    },
    processes: {
      type: 'int',
      list: true,
      default: '1,2',
      help: 'gateway process counts the back-end max-rate row runs with (1: every row; more: that row again)',
    },
    modes: {
      type: 'string',
      list: true,
      choices: ['max', 'fixed'],
      default: 'max,fixed',
      help: 'the back-end rows to run: max (a window of publishes out) and fixed (--rate)',
    },
    /**
     * Events per `POST /v1/events` in the gateway's back-end rows: `tick` (every publish of one
     * tick of the load in one request) or a number N (at most N per request; 1: each event its own
     * request, as a back end that publishes events one by one).
     */
    'per-request': {
      type: 'string',
      arg: 'tick|N',
      pattern: /^(tick|[1-9]\d*)$/,
      means: 'tick or an integer ≥ 1',
      default: 'tick',
      help: "events per POST /v1/events in the back-end rows: tick (one tick's publishes) or at most N",
    },
    transport: {
      type: 'string',
      choices: ['tcp', 'ws'],
      default: 'tcp',
      help: "how the gateway's devices connect: tcp (framed TCP) or ws (WebSocket, uWebSockets.js)",
    },
    json: {
      type: 'string',
      arg: 'FILE',
      help: 'also write the rows as JSON to this file (bench/ab.ts reads it)',
    },
    'redis-commands': {
      type: 'flag',
      help: "also print, per gateway row, every Redis command's calls per event and µs per call",
    },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const PATHS = new Set(values.paths);
const TRANSPORT = values.transport;
/** The URL the gateway's devices dial. */
const deviceUrl = (g: { tcpUrl: string; wsUrl: string }) => (TRANSPORT === 'ws' ? g.wsUrl : g.tcpUrl);
const MODES = new Set(values.modes);
/** Gateway process counts the back-end max-rate row runs with (1: every row; more: that row again). */
const PROCESSES = values.processes;
const DEVICES = values.devices;
const SECONDS = values.seconds;
const WARMUP = values.warmup;
const RATE = values.rate;
const WINDOW = values.window;
const SENDERS = values.senders;
const SENDER_WINDOW = values['sender-window'];
const RECEIVERS = values.receivers;
const MEMBERS = values.members;
const PAYLOAD_BYTES = values.payload;
const QOS = Number(values.qos) as 0 | 1;
const PER_REQUEST = values['per-request'] === 'tick' ? 0 : Number(values['per-request']);
const API_KEY = 'bench-api-key-0123456789';

interface Row {
  path: string;
  system: string;
  mode: string;
  delivered: number;
  p50: number;
  p99: number;
  lost: number;
  serverCpu: number;
  redisCpu: number;
  pgCpu: number;
  clientCpu: number;
  /** This process's event-loop delay over the window (ms): how long its devices waited to run. */
  loopDelay: { p99: number; max: number };
  /** Redis calls (a script call is one) the gateway made per delivered event; NaN: not counted. */
  redisCalls: number;
  /** Redis's own accounting per delivered event (INFO commandstats); absent for Mosquitto. */
  redisWork?: RedisWork;
  /** The gateway's own latency histograms over the measured seconds; absent for Mosquitto. */
  latency?: GatewayLatency;
  /** Frames the gateway received and sent per delivered event (gateway_frames_total). */
  frames?: { in: number; out: number };
}

/** Shares of the gateway's own latency histograms above 10 and 25 ms (the buckets there). */
interface GatewayLatency {
  /** `POST /v1/events` requests (arrival to answer: publish call and sends from it included). */
  requests: number;
  requestsOver10: number;
  requestsOver25: number;
  /** Events sent to a device to their acks (the device's side and the way back included). */
  acks: number;
  acksOver10: number;
  acksOver25: number;
}

/** Cumulative bucket counts of one histogram series (`le` → count) in a /metrics text. */
function buckets(text: string, metric: string, labels: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${metric}_bucket{`) || !line.includes(labels)) continue;
    const le = /le="([^"]+)"/.exec(line)?.[1];
    if (le) out.set(le, (out.get(le) ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1)));
  }
  return out;
}

/** Between two /metrics texts: the count of a histogram and its shares above 10 and 25 ms. */
function over(before: string, after: string, metric: string, labels: string): [number, number, number] {
  const a = buckets(after, metric, labels);
  const b = buckets(before, metric, labels);
  const d = (le: string) => (a.get(le) ?? 0) - (b.get(le) ?? 0);
  const n = d('+Inf');
  return n > 0 ? [n, 1 - d('0.01') / n, 1 - d('0.025') / n] : [0, Number.NaN, Number.NaN];
}

function latencyBetween(before: string, after: string): GatewayLatency {
  const [requests, requestsOver10, requestsOver25] = over(
    before,
    after,
    'http_request_duration_seconds',
    'route="/v1/events"',
  );
  const [acks, acksOver10, acksOver25] = over(before, after, 'gateway_ack_latency_seconds', '');
  return { requests, requestsOver10, requestsOver25, acks, acksOver10, acksOver25 };
}

/** Per delivered event, from `INFO commandstats` (every client of the server, as its CPU). */
interface RedisWork {
  /** Time in EVAL/EVALSHA, the commands the scripts ran included (µs). */
  scriptMicros: number;
  /** Commands other than EVAL/EVALSHA: those the scripts ran and those sent directly. */
  commands: number;
  /** Their time (µs). */
  commandMicros: number;
  /** Per command (the scripts' EVALSHA included): calls per event and µs per call. */
  byCommand: { name: string; calls: number; micros: number }[];
}

/** A connection for `INFO`: read without blocking the loop (the devices live in this process). */
const statsRedis = new Redis('redis://127.0.0.1:6379', { lazyConnect: true });

/** `INFO commandstats` of the shared Redis: calls and µs by command. */
async function commandStats(): Promise<Map<string, { calls: number; usec: number }>> {
  const out = new Map<string, { calls: number; usec: number }>();
  for (const line of (await statsRedis.info('commandstats')).split('\n')) {
    const m = /^cmdstat_([^:]+):calls=(\d+),usec=(\d+)/.exec(line);
    if (m) out.set(m[1], { calls: Number(m[2]), usec: Number(m[3]) });
  }
  return out;
}

function redisWorkBetween(
  before: Map<string, { calls: number; usec: number }>,
  after: Map<string, { calls: number; usec: number }>,
  events: number,
): RedisWork {
  const w = { scriptMicros: 0, commands: 0, commandMicros: 0 };
  const byCommand: RedisWork['byCommand'] = [];
  for (const [name, a] of after) {
    const b = before.get(name) ?? { calls: 0, usec: 0 };
    const calls = a.calls - b.calls;
    if (calls > 0) byCommand.push({ name, calls: calls / events, micros: (a.usec - b.usec) / calls });
    if (name === 'eval' || name === 'evalsha') w.scriptMicros += a.usec - b.usec;
    else {
      w.commands += a.calls - b.calls;
      w.commandMicros += a.usec - b.usec;
    }
  }
  return {
    scriptMicros: w.scriptMicros / events,
    commands: w.commands / events,
    commandMicros: w.commandMicros / events,
    byCommand: byCommand.sort((x, y) => y.calls - x.calls),
  };
}

const execFileAsync = promisify(execFile);

const REDIS_PID = redisPid();

/** A process and all its descendants (a gateway may run several processes). */
function treePids(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(name));
      children.set(ppid, list);
    } catch {}
  }
  const out: number[] = [];
  const todo = [root];
  while (todo.length) {
    const pid = todo.pop()!;
    out.push(pid);
    todo.push(...(children.get(pid) ?? []));
  }
  return out;
}

/** CPU seconds of the given processes (a tree found with treePids before the run). */
function pidsCpuSeconds(pids: number[]): number {
  let micros = 0;
  for (const pid of pids) micros += processCpuMicros(pid) ?? 0;
  return micros / 1e6;
}

/**
 * PostgreSQL backends serving the connections of a process tree: its sockets to port 5432
 * (`ss -tnp`) matched to `pg_stat_activity.client_port`. The server is shared, so only these count.
 * Asynchronous: `ss` and `psql` take ~0.1 s, which a synchronous call would take from this
 * process's devices too.
 */
async function pgBackendsOf(root: number): Promise<number[]> {
  const pids = treePids(root);
  const { stdout: sockets } = await execFileAsync('ss', [
    '-tnpH',
    'state',
    'established',
    '( dport = :5432 )',
  ]);
  const ports = sockets
    .split('\n')
    .filter((l) => pids.some((pid) => l.includes(`pid=${pid},`)))
    .map((l) => l.trim().split(/\s+/)[2]?.split(':').pop())
    .filter((p): p is string => !!p);
  if (ports.length === 0) return [];
  const { stdout } = await execFileAsync('psql', [
    '-At',
    DATABASE_URL,
    '-c',
    `SELECT pid FROM pg_stat_activity WHERE client_port IN (${ports.join(',')})`,
  ]);
  return stdout.split('\n').filter(Boolean).map(Number);
}

/** CPU seconds so far of the given PostgreSQL backends, by backend. */
function pgCpu(backends: number[]): Map<number, number> {
  const out = new Map<number, number>();
  // A backend gone since it was found (the pool closes idle connections) has no reading: its
  // CPU in the window is not counted.
  for (const b of backends) {
    const cpu = cpuSeconds(b);
    if (!Number.isNaN(cpu)) out.set(b, cpu);
  }
  return out;
}

/** CPU of `pid`'s PostgreSQL backends between two readings (backends opened since: all of theirs). */
function pgCpuBetween(before: Map<number, number>, after: Map<number, number>): number {
  let s = 0;
  for (const [b, cpu] of after) s += cpu - (before.get(b) ?? 0);
  return s;
}

/** One path through one system: what the run loop drives. */
interface System {
  name: string;
  serverPid: number;
  /** Whether Redis and PostgreSQL work for this system (their CPU is charged to the server). */
  usesRedis: boolean;
  /** Publishes event `n` carrying its send time from publishing loop `loop`; resolves once accepted. */
  publish(loop: number, n: number, sentAt: number): Promise<void>;
  /** Set by the run: called for each received event with its number and send time. */
  onReceive: (n: number, sentAt: number) => void;
  /** Receipts each published event makes (a room's members; default 1). */
  fanout?: number;
  /** The server's /metrics text (gateways): Redis calls and latency histograms are read from it. */
  metrics?: () => Promise<string>;
}

async function run(sys: System, path: string, mode: 'max' | 'fixed', window: number): Promise<Row> {
  const h = hdr.build({
    lowestDiscernibleValue: 1,
    highestTrackableValue: 120_000_000,
    numberOfSignificantValueDigits: 3,
  });
  let received = 0;
  let measuring = false;
  const accepted: number[] = [];
  const fanout = sys.fanout ?? 1;
  /** Receipts so far by event number. */
  const seen = new Map<number, number>();
  sys.onReceive = (n, sentAt) => {
    seen.set(n, (seen.get(n) ?? 0) + 1);
    if (!measuring) return;
    received++;
    h.recordValue(Math.max(1, Math.round((performance.now() - sentAt) * 1000)));
  };
  let stop = false;
  let next = 0;
  let inflight = 0;
  let failed = 0;
  const one = async (loop: number) => {
    const n = next++;
    inflight++;
    try {
      await sys.publish(loop, n, performance.now());
      accepted.push(n);
    } catch {
      failed++;
    }
    inflight--;
  };
  const pump = async (loop: number) => {
    while (!stop) await one(loop);
  };
  // Found before the load starts: a /proc scan; readings in the window are /proc reads and an
  // INFO, none of which blocks this process (its devices) long.
  const tree = treePids(sys.serverPid);
  let loops: Promise<void>[] = [];
  let timer: NodeJS.Timeout | undefined;
  if (mode === 'max') loops = Array.from({ length: window }, (_, i) => pump(i));
  else {
    const perTick = RATE / 100;
    let debt = 0;
    let k = 0;
    timer = setInterval(() => {
      debt += perTick;
      while (debt >= 1) {
        debt--;
        void one(k++);
      }
    }, 10);
  }
  const done = progress(
    `  ${path}: ${sys.name} ${mode}`,
    () => `${seen.size} received, ${inflight} publishing`,
  );
  await sleep(WARMUP * 1000);
  // The PostgreSQL backends open now: their CPU counts from here. A backend opened later counts
  // whole; one the warm-up opened (the pool opens its connections on first use) must not, or
  // its start-up (~10-40 ms of CPU) is charged to the window.
  const backends = sys.usesRedis ? await pgBackendsOf(sys.serverPid) : [];
  // Read before the CPU counters, and after them below: the scrapes cost the gateway CPU.
  const metrics0 = await sys.metrics?.();
  const stats0 = sys.usesRedis ? await commandStats() : undefined;
  const s0 = pidsCpuSeconds(tree);
  const r0 = cpuSeconds(REDIS_PID);
  const p0 = pgCpu(backends);
  const c0 = ownCpuSeconds();
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const t0 = performance.now();
  measuring = true;
  await sleep(SECONDS * 1000);
  measuring = false;
  delay.disable();
  const elapsed = (performance.now() - t0) / 1000;
  const serverCpu = (pidsCpuSeconds(tree) - s0) / elapsed;
  const redisCpu = sys.usesRedis ? (cpuSeconds(REDIS_PID) - r0) / elapsed : 0;
  const clientCpu = (ownCpuSeconds() - c0) / elapsed;
  const p1 = pgCpu(backends);
  const measured = received;
  const stats1 = sys.usesRedis ? await commandStats() : undefined;
  // Backends opened during the window count whole; the scan for them is after the window.
  let pgCpuUsed = 0;
  if (sys.usesRedis) {
    for (const [b, cpu] of pgCpu(await pgBackendsOf(sys.serverPid))) if (!p1.has(b)) p1.set(b, cpu);
    pgCpuUsed = pgCpuBetween(p0, p1) / elapsed;
  }
  const redisWork = stats0 && stats1 ? redisWorkBetween(stats0, stats1, measured) : undefined;
  const metrics1 = await sys.metrics?.();
  const calls = metrics0 && metrics1 ? redisCallsIn(metrics1) - redisCallsIn(metrics0) : Number.NaN;
  const latency = metrics0 && metrics1 ? latencyBetween(metrics0, metrics1) : undefined;
  const framesPerEvent = (direction: string) =>
    (counterSum(metrics1!, 'gateway_frames_total', `direction="${direction}"`) -
      counterSum(metrics0!, 'gateway_frames_total', `direction="${direction}"`)) /
    measured;
  const frames = metrics0 && metrics1 ? { in: framesPerEvent('in'), out: framesPerEvent('out') } : undefined;
  stop = true;
  if (timer) clearInterval(timer);
  await Promise.all(loops);
  while (inflight > 0) await sleep(50);
  // Drain: wait until everything accepted arrived at all its receivers, or nothing new arrives
  // for 3 s.
  const missing = () => {
    let m = 0;
    for (const n of accepted) m += Math.max(0, fanout - (seen.get(n) ?? 0));
    return m;
  };
  let last = -1;
  let quietSince = performance.now();
  while (performance.now() - quietSince < 3000) {
    const now = missing();
    if (now === 0) break;
    if (now !== last) {
      last = now;
      quietSince = performance.now();
    }
    await sleep(100);
  }
  done();
  if (failed) console.error(`  ${failed} publishes failed (not counted as accepted)`);
  return {
    path,
    system: sys.name,
    mode: mode === 'max' ? `max rate (window ${window})` : `fixed ${RATE}/s`,
    delivered: received / elapsed,
    p50: h.getValueAtPercentile(50) / 1000,
    p99: h.getValueAtPercentile(99) / 1000,
    lost: missing(),
    serverCpu,
    redisCpu,
    pgCpu: pgCpuUsed,
    clientCpu,
    loopDelay: { p99: delay.percentile(99) / 1e6, max: delay.max / 1e6 },
    redisCalls: calls / measured,
    latency,
    frames,
    redisWork,
  };
}

type Made = { sys: System; close: () => Promise<void> };

const padding = 'x'.repeat(Math.max(0, PAYLOAD_BYTES - 30));

/**
 * A row's set-up on a started gateway: a set-up that fails (a login refused, a room not joined)
 * stops the gateway, which drops its keys and schema, before the bench fails.
 */
async function settingUp<T>(g: { stop(): Promise<unknown> }, setUp: () => Promise<T>): Promise<T> {
  try {
    return await setUp();
  } catch (e) {
    await g.stop().catch(() => {});
    throw e;
  }
}

async function startBenchGateway(processes = 1) {
  return startGateway({
    GW_PROCESSES: String(processes),
    // One load client's connection carries what many devices would: no per-connection frame budget.
    GW_FRAMES_PER_SECOND: '0',
    GW_LOG_LEVEL: 'info',
    GW_DEFAULT_ROOM: '',
    GW_API_KEY: API_KEY,
    ARGON2_MEMORY_KIB: '1024',
    ARGON2_ITERATIONS: '1',
    GW_REGISTER_PER_MINUTE: '100000',
  });
}

/**
 * Back end → device through `POST /v1/events`, every publish of one tick in one request (a
 * request per tick while others are out, so with several processes the HTTP connections spread).
 */
async function gatewayBackend(processes = 1): Promise<Made> {
  const g = await startBenchGateway(processes);
  const { clients, names } = await settingUp(g, () => loggedInDevices(deviceUrl(g), DEVICES, 'dev'));
  const url = `http://127.0.0.1:${g.httpPort}/v1/events`;
  let batch: { item: unknown; resolve: () => void; reject: (e: unknown) => void }[] = [];
  const flush = async () => {
    const mine = batch;
    // (--per-request N: a full batch went at once, before this tick's end came)
    if (mine.length === 0) return;
    batch = [];
    try {
      const res = await postJson(url, JSON.stringify({ events: mine.map((b) => b.item) }), API_KEY);
      const body = res.body as { results?: { accepted?: number }[] };
      if (res.status !== 202) throw new Error(`POST /v1/events: ${res.status} ${JSON.stringify(body)}`);
      mine.forEach((b, i) => {
        if (body.results?.[i]?.accepted === 1) b.resolve();
        else b.reject(new Error('not accepted'));
      });
    } catch (e) {
      for (const b of mine) b.reject(e);
    }
  };
  const sys: System = {
    name: processes === 1 ? 'gateway' : `gateway, ${processes} processes`,
    serverPid: g.proc.pid!,
    usesRedis: true,
    metrics: () => metricsOf(g.metricsPort),
    publish: (_loop, n, sentAt) =>
      new Promise((resolve, reject) => {
        const item = {
          target: { device: names[n % DEVICES] },
          name: 'bench',
          data: { n, t: sentAt, p: padding },
          ...(QOS === 0 ? { qos: 0 } : {}),
        };
        batch.push({ item, resolve, reject });
        if (PER_REQUEST > 0 && batch.length >= PER_REQUEST) void flush();
        else if (batch.length === 1) setImmediate(flush);
      }),
    onReceive: () => {},
  };
  for (const c of clients) {
    c.on('event', (e: EventMsg) => {
      const d = e.data as { n: number; t: number };
      sys.onReceive(d.n, d.t);
    });
  }
  return {
    sys,
    close: async () => {
      for (const c of clients) c.destroy();
      await g.stop();
    },
  };
}

/** Device → device: `send` to a username, one sender connection per `loop % SENDERS`. */
async function gatewayDirect(): Promise<Made> {
  const g = await startBenchGateway();
  const [rx, tx] = await settingUp(g, async () => [
    await loggedInDevices(deviceUrl(g), RECEIVERS, 'rx'),
    await loggedInDevices(deviceUrl(g), SENDERS, 'tx'),
  ]);
  const sys: System = {
    name: 'gateway',
    serverPid: g.proc.pid!,
    usesRedis: true,
    metrics: () => metricsOf(g.metricsPort),
    publish: async (loop, n, sentAt) => {
      await tx.clients[loop % SENDERS].request('send', {
        to: rx.names[n % RECEIVERS],
        body: `${n} ${sentAt} ${padding}`,
      });
    },
    onReceive: () => {},
  };
  for (const c of rx.clients) {
    c.on('event', (e: EventMsg) => {
      const [n, t] = (e.data as { body: string }).body.split(' ', 2);
      sys.onReceive(Number(n), Number(t));
    });
  }
  return {
    sys,
    close: async () => {
      for (const c of [...rx.clients, ...tx.clients]) c.destroy();
      await g.stop();
    },
  };
}

/**
 * Room: `say` in one room from `SENDERS` members (one connection per `loop % SENDERS`), heard by
 * them and `MEMBERS` more: every member receives every message.
 */
async function gatewayRoom(): Promise<Made> {
  const g = await startBenchGateway();
  const room = `#bench-${Date.now().toString(36)}`;
  const [listeners, tx] = await settingUp(g, async () => {
    const made = [
      await loggedInDevices(deviceUrl(g), MEMBERS, 'rm'),
      await loggedInDevices(deviceUrl(g), SENDERS, 'rs'),
    ];
    for (const c of [...made[0].clients, ...made[1].clients]) await c.request('join', { room });
    return made;
  });
  const all = [...listeners.clients, ...tx.clients];
  const sys: System = {
    name: 'gateway',
    serverPid: g.proc.pid!,
    usesRedis: true,
    fanout: all.length,
    metrics: () => metricsOf(g.metricsPort),
    publish: async (loop, n, sentAt) => {
      await tx.clients[loop % SENDERS].request('say', { room, body: `${n} ${sentAt} ${padding}` });
    },
    onReceive: () => {},
  };
  for (const c of all) {
    c.on('event', (e: EventMsg) => {
      if (e.name !== 'room.message' || e.room !== room) return;
      const [n, t] = (e.data as { body: string }).body.split(' ', 2);
      sys.onReceive(Number(n), Number(t));
    });
  }
  return {
    sys,
    close: async () => {
      for (const c of all) c.destroy();
      await g.stop();
    },
  };
}

/**
 * Mosquitto's room: `members + publishers` clients subscribed at QoS 0 to one topic, the
 * publishers publishing to it with QoS 1 (answered by a PUBACK, as a `say` is by its reply).
 */
async function mosquittoRoom(members: number, publishers: number): Promise<Made> {
  const pid = Number(execSync('pgrep -o mosquitto').toString().trim());
  const tag = Date.now().toString(36);
  const topic = `bench/${tag}/room`;
  const sys: System = {
    name: 'Mosquitto',
    serverPid: pid,
    usesRedis: false,
    fanout: members + publishers,
    publish: async () => {},
    onReceive: () => {},
  };
  const clients: mqtt.MqttClient[] = [];
  for (let i = 0; i < members + publishers; i++) {
    const c = await mqtt.connectAsync(String(values.mqtt), {
      clientId: `bench-room-${tag}-${i}`,
      clean: true,
    });
    await c.subscribeAsync(topic, { qos: 0 });
    c.on('message', (_topic, buf) => sys.onReceive(buf.readUInt32BE(8), buf.readDoubleBE(0)));
    clients.push(c);
  }
  const pubs = clients.slice(members);
  sys.publish = async (loop, n, sentAt) => {
    const b = Buffer.alloc(PAYLOAD_BYTES, 120);
    b.writeDoubleBE(sentAt, 0);
    b.writeUInt32BE(n, 8);
    await pubs[loop % publishers].publishAsync(topic, b, { qos: 1 });
  };
  return {
    sys,
    close: async () => {
      await Promise.all(clients.map((c) => c.endAsync()));
    },
  };
}

/**
 * Mosquitto: `topics` subscribers, `publishers` publishing clients (loop % publishers), at
 * QoS `qos` both ways.
 */
async function mosquitto(topics: number, publishers: number, qos: 0 | 1 = 1): Promise<Made> {
  const pid = Number(execSync('pgrep -o mosquitto').toString().trim());
  const subs: mqtt.MqttClient[] = [];
  const tag = Date.now().toString(36);
  const sys: System = {
    name: 'Mosquitto',
    serverPid: pid,
    usesRedis: false,
    publish: async () => {},
    onReceive: () => {},
  };
  for (let i = 0; i < topics; i++) {
    const c = await mqtt.connectAsync(String(values.mqtt), {
      clientId: `bench-sub-${tag}-${i}`,
      clean: true,
    });
    await c.subscribeAsync(`bench/${tag}/${i}`, { qos });
    c.on('message', (_topic, buf) => sys.onReceive(buf.readUInt32BE(8), buf.readDoubleBE(0)));
    subs.push(c);
  }
  const pubs: mqtt.MqttClient[] = [];
  for (let i = 0; i < publishers; i++) {
    pubs.push(
      await mqtt.connectAsync(String(values.mqtt), { clientId: `bench-pub-${tag}-${i}`, clean: true }),
    );
  }
  sys.publish = async (loop, n, sentAt) => {
    const b = Buffer.alloc(PAYLOAD_BYTES, 120);
    b.writeDoubleBE(sentAt, 0);
    b.writeUInt32BE(n, 8);
    await pubs[loop % publishers].publishAsync(`bench/${tag}/${n % topics}`, b, { qos });
  };
  return {
    sys,
    close: async () => {
      await Promise.all([...subs, ...pubs].map((c) => c.endAsync()));
    },
  };
}

const BACKEND = `back end → device (POST /v1/events${PER_REQUEST > 0 ? ` of at most ${PER_REQUEST} event${PER_REQUEST === 1 ? '' : 's'}` : ''}, {device} targets, ${DEVICES} devices${QOS === 0 ? ', qos 0' : ''})`;
const DIRECT = `device → device (send to a username, ${SENDERS}×${SENDER_WINDOW} in flight, ${RECEIVERS} receivers)`;
const BACKEND_SHORT = 'back end';
const DIRECT_SHORT = 'device to device';
const ROOM = `room (say in one room, ${SENDERS}×${SENDER_WINDOW} in flight, heard by ${SENDERS + MEMBERS} members, qos 0)`;
const ROOM_SHORT = 'room';

/** µs of server CPU (gateway tree + Redis + its PostgreSQL backends, or Mosquitto) per delivered event. */
const perEvent = (r: Row) => ((r.serverCpu + r.redisCpu + r.pgCpu) / r.delivered) * 1e6;

async function main(): Promise<void> {
  console.log(
    header(
      `delivery: ${PAYLOAD_BYTES}-byte payloads, qos 1 / at least once (back end: qos ${QOS}; room: qos 0), gateway vs Mosquitto`,
    ),
  );
  console.log(`- ${BACKEND}\n- ${DIRECT}\n- ${ROOM}`);
  console.log(
    `${WARMUP} s warm-up and ${SECONDS} s measured per row; publishers and devices in this process; the gateway's devices over ${TRANSPORT === 'ws' ? 'WebSocket' : 'TCP'}\n`,
  );
  const rows: Row[] = [];
  for (const make of PATHS.has('backend') ? [gatewayBackend, () => mosquitto(DEVICES, 1, QOS)] : []) {
    const { sys, close } = await make();
    try {
      if (MODES.has('max')) rows.push(await run(sys, BACKEND_SHORT, 'max', WINDOW));
      if (MODES.has('fixed')) rows.push(await run(sys, BACKEND_SHORT, 'fixed', WINDOW));
    } finally {
      await close();
    }
  }
  for (const n of PATHS.has('backend') && MODES.has('max') ? PROCESSES.filter((p) => p > 1) : []) {
    const { sys, close } = await gatewayBackend(n);
    try {
      rows.push(await run(sys, BACKEND_SHORT, 'max', WINDOW));
    } finally {
      await close();
    }
  }
  for (const make of PATHS.has('direct') ? [gatewayDirect, () => mosquitto(RECEIVERS, SENDERS)] : []) {
    const { sys, close } = await make();
    try {
      rows.push(await run(sys, DIRECT_SHORT, 'max', SENDERS * SENDER_WINDOW));
    } finally {
      await close();
    }
  }
  for (const make of PATHS.has('room') ? [gatewayRoom, () => mosquittoRoom(MEMBERS, SENDERS)] : []) {
    const { sys, close } = await make();
    try {
      rows.push(await run(sys, ROOM_SHORT, 'max', SENDERS * SENDER_WINDOW));
    } finally {
      await close();
    }
  }
  if (values.json) writeFileSync(String(values.json), JSON.stringify({ rows }));
  console.log(
    table(
      [
        'path',
        'system',
        'mode',
        'delivered/s',
        'p50 ms',
        'p99 ms',
        'lost',
        'server CPU (cores)',
        'Redis CPU (cores)',
        'PostgreSQL CPU (cores)',
        'server+Redis+PG µs/event',
        'Redis calls/event',
        'load gen CPU (cores)',
        'load gen loop delay p99 / max ms',
      ],
      rows.map((r) => [
        r.path,
        r.system,
        r.mode,
        r.delivered,
        r.p50,
        r.p99,
        String(r.lost),
        r.serverCpu.toFixed(2),
        r.system === 'Mosquitto' ? 'n/a' : r.redisCpu.toFixed(2),
        r.system === 'Mosquitto' ? 'n/a' : r.pgCpu.toFixed(3),
        perEvent(r).toFixed(1),
        Number.isNaN(r.redisCalls) ? 'n/a' : r.redisCalls.toFixed(2),
        r.clientCpu.toFixed(2),
        `${r.loopDelay.p99.toFixed(1)} / ${r.loopDelay.max.toFixed(1)}`,
      ]),
    ),
  );
  console.log(
    `\nRedis's own accounting per delivered event (INFO commandstats; script time includes the commands it ran):\n${table(
      ['path', 'system', 'mode', 'script µs/event', 'commands/event', 'command µs/event'],
      rows
        .filter((r) => r.redisWork)
        .map((r) => [
          r.path,
          r.system,
          r.mode,
          r.redisWork!.scriptMicros.toFixed(1),
          r.redisWork!.commands.toFixed(1),
          r.redisWork!.commandMicros.toFixed(1),
        ]),
    )}`,
  );
  if (values['redis-commands']) {
    for (const r of rows.filter((r) => r.redisWork)) {
      console.log(
        `\nRedis commands per delivered event, ${r.path}, ${r.system}, ${r.mode} (INFO commandstats; every client of the server):\n${table(
          ['command', 'calls/event', 'µs/call'],
          r
            .redisWork!.byCommand.filter((c) => c.calls >= 0.001)
            .map((c) => [c.name, c.calls.toFixed(3), c.micros.toFixed(2)]),
        )}`,
      );
    }
  }
  const pct = (x: number) => (Number.isNaN(x) ? 'n/a' : `${(100 * x).toFixed(2)}%`);
  console.log(
    `\nThe gateway's own latency histograms over the measured seconds (POST /v1/events: arrival to answer, the publish call and the sends from it included; ack: event sent to its ack back), and its frames per delivered event (in: the devices' acks and requests; out: events and answers):\n${table(
      [
        'path',
        'system',
        'mode',
        'requests',
        '> 10 ms',
        '> 25 ms',
        'acks',
        'ack > 10 ms',
        'ack > 25 ms',
        'frames in/event',
        'frames out/event',
      ],
      rows
        .filter((r) => r.latency)
        .map((r) => {
          const l = r.latency!;
          return [
            r.path,
            r.system,
            r.mode,
            String(l.requests),
            pct(l.requestsOver10),
            pct(l.requestsOver25),
            String(l.acks),
            pct(l.acksOver10),
            pct(l.acksOver25),
            r.frames ? r.frames.in.toFixed(2) : 'n/a',
            r.frames ? r.frames.out.toFixed(2) : 'n/a',
          ];
        }),
    )}`,
  );
  const ratio = (a: number, b: number) => `${(a / b).toFixed(2)}x`;
  /** A row of the ratio table: `g` over `base` in events/s, CPU per event and p99. */
  const pair = (label: string, g: Row, base: Row) => [
    label,
    ratio(g.delivered, base.delivered),
    ratio(perEvent(g), perEvent(base)),
    ratio(g.p99, base.p99),
  ];
  const of = (path: string, system: string, mode: string) =>
    rows.find((r) => r.path === path && r.system === system && r.mode.startsWith(mode));
  const pairs: string[][] = [];
  for (const [path, mode, label] of [
    [BACKEND_SHORT, 'max rate', `${BACKEND_SHORT}, max rate`],
    [BACKEND_SHORT, 'fixed', `${BACKEND_SHORT}, fixed ${RATE}/s`],
    [DIRECT_SHORT, 'max rate', `${DIRECT_SHORT}, max rate`],
    [ROOM_SHORT, 'max rate', `${ROOM_SHORT}, max rate`],
  ]) {
    const g = of(path, 'gateway', mode);
    const m = of(path, 'Mosquitto', mode);
    if (g && m) pairs.push(pair(label, g, m));
  }
  for (const n of PROCESSES.filter((p) => p > 1)) {
    const g = of(BACKEND_SHORT, `gateway, ${n} processes`, 'max rate');
    const one = of(BACKEND_SHORT, 'gateway', 'max rate');
    const m = of(BACKEND_SHORT, 'Mosquitto', 'max rate');
    if (g && m) pairs.push(pair(`${BACKEND_SHORT}, max rate, ${n} processes`, g, m));
    if (g && one) pairs.push(pair(`${BACKEND_SHORT}, max rate: ${n} processes / 1 process`, g, one));
  }
  console.log(
    `\n${table(['row (gateway / Mosquitto, same run, unless named)', 'delivered/s', 'CPU per event', 'p99'], pairs)}`,
  );
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
