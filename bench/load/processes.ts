/**
 * Every core: back-end publishes delivered by a gateway of 1 process and of 2 processes
 * (`GW_PROCESSES`), same load, same run. A back end posts batches of qos-1 events to `{device}`
 * targets (`POST /v1/events`, several requests in flight, so the HTTP connections spread over
 * the processes); devices connected over TCP (spread by the supervisor) ack each event. Prints
 * events/s delivered, latency from publish to receipt, and the CPU of the gateway's process
 * tree (supervisor and workers) and of Redis per delivered event.
 *
 *   npm run bench:processes -- [--devices 100] [--seconds 10] [--batch 50] [--window 8] [--processes 1,2]
 *                              [--env NAME=value ...]
 */
import hdr from 'hdr-histogram-js';
import { GatewayClient, type Session } from '../../client/client.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs, envOption } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, ownCpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:processes',
  url: import.meta.url,
  about:
    'back-end publishes delivered by a gateway of 1 and of 2 processes (GW_PROCESSES), same load, same run',
  readme: 'bench:processes',
  options: {
    devices: { type: 'int', default: 100, help: 'devices the back end publishes to' },
    seconds: { type: 'number', default: 10, help: 'seconds measured per row' },
    warmup: { type: 'number', min: 0, default: 3, help: 'seconds of warm-up per row' },
    batch: { type: 'int', default: 50, help: 'events per POST /v1/events' },
    window: { type: 'int', default: 8, help: 'requests in flight' },
    payload: { type: 'int', min: 0, default: 100, help: 'bytes of payload per event' },
    processes: {
      type: 'int',
      list: true,
      default: '1,2',
      help: 'one gateway per entry, of that many processes',
    },
    env: envOption("extra gateway settings for every row (e.g. to see a setting's cost)"),
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

/** Extra gateway settings for every row, `--env NAME=value` (e.g. to see a setting's cost). */
const EXTRA_ENV = Object.fromEntries(values.env.map((kv) => kv.split(/=(.*)/s).slice(0, 2)));
const DEVICES = values.devices;
const SECONDS = values.seconds;
const WARMUP = values.warmup;
const BATCH = values.batch;
const WINDOW = values.window;
const PAYLOAD_BYTES = values.payload;
const COUNTS = values.processes;
const API_KEY = 'bench-processes-api-key';
const REDIS_PID = redisPid();

export interface ProcessesRow {
  processes: number;
  delivered: number;
  p50: number;
  p99: number;
  gatewayCpu: number;
  redisCpu: number;
  clientCpu: number;
  /** Gateway tree + Redis CPU per delivered event, µs. */
  cpuPerEventUs: number;
  /** Devices per gateway process, as their welcomes said. */
  spread: string;
}

/** One gateway of `processes` processes under the same load; resolves with its row. */
export async function measureProcesses(processes: number): Promise<ProcessesRow> {
  const g = await startGateway({
    GW_PROCESSES: String(processes),
    // One load client's connection carries what many devices would: no per-connection frame budget.
    GW_FRAMES_PER_SECOND: '0',
    GW_API_KEY: API_KEY,
    GW_LOG_LEVEL: 'info',
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '100000',
    GW_HEARTBEAT_MS: '60000',
    ...EXTRA_ENV,
  });
  // Stopped whatever happens (a device that cannot log in, a run that fails): stopping drops the
  // gateway's keys and schema.
  const devices: GatewayClient[] = [];
  try {
    return await measureOn(g, processes, devices);
  } finally {
    for (const c of devices) c.destroy();
    await g.stop();
  }
}

/** The row's load and measurement on a started gateway (`devices`: those it connected). */
async function measureOn(
  g: Awaited<ReturnType<typeof startGateway>>,
  processes: number,
  devices: GatewayClient[],
): Promise<ProcessesRow> {
  const pids = [g.proc.pid!];
  for (const l of g.logs) if (l.msg === 'gateway process ready') pids.push(l.pid as number);
  const ids: string[] = [];
  const perNode = new Map<string, number>();
  const h = hdr.build({
    lowestDiscernibleValue: 1,
    highestTrackableValue: 120_000_000,
    numberOfSignificantValueDigits: 3,
  });
  let received = 0;
  let measuring = false;
  const onEvent = (e: EventMsg) => {
    if (!measuring) return;
    received++;
    h.recordValue(Math.max(1, Math.round((performance.now() - (e.data as { t: number }).t) * 1000)));
  };
  const tag = Date.now().toString(36);
  for (let i = 0; i < DEVICES; i++) {
    const c = new GatewayClient({ url: g.tcpUrl, autoAck: true });
    await c.connect();
    const username = `p${i}_${tag}`.slice(0, 16);
    await c.request('register', { username, email: `${username}@example.com`, password: 'bench password' });
    await c.request<Session>('login', { username, password: 'bench password', device: { id: username } });
    c.on('event', onEvent);
    devices.push(c);
    ids.push(username);
    const node = c.welcome!.node;
    perNode.set(node, (perNode.get(node) ?? 0) + 1);
  }
  const payload = 'x'.repeat(Math.max(0, PAYLOAD_BYTES - 20));
  let next = 0;
  let stop = false;
  let failures = 0;
  const poster = async () => {
    while (!stop) {
      const t = performance.now();
      const events = Array.from({ length: BATCH }, () => ({
        target: { device: ids[next++ % DEVICES] },
        name: 'bench',
        data: { t, p: payload },
      }));
      try {
        const res = await fetch(`http://127.0.0.1:${g.httpPort}/v1/events`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
          body: JSON.stringify({ events }),
          signal: AbortSignal.timeout(30_000),
        });
        await res.arrayBuffer();
        if (res.status !== 202) failures++;
      } catch {
        failures++;
      }
    }
  };
  const loops = Array.from({ length: WINDOW }, poster);
  const done = progress(`  ${processes} process(es)`, () => `${received} received, ${failures} failed posts`);
  await sleep(WARMUP * 1000);
  const tree = () => pids.reduce((sum, pid) => sum + cpuSeconds(pid), 0);
  const g0 = tree();
  const r0 = cpuSeconds(REDIS_PID);
  const c0 = ownCpuSeconds();
  const t0 = performance.now();
  measuring = true;
  await sleep(SECONDS * 1000);
  measuring = false;
  const elapsed = (performance.now() - t0) / 1000;
  const gatewayCpu = (tree() - g0) / elapsed;
  const redisCpu = (cpuSeconds(REDIS_PID) - r0) / elapsed;
  const clientCpu = (ownCpuSeconds() - c0) / elapsed;
  stop = true;
  await Promise.all(loops);
  done();
  const delivered = received / elapsed;
  return {
    processes,
    delivered,
    p50: h.getValueAtPercentile(50) / 1000,
    p99: h.getValueAtPercentile(99) / 1000,
    gatewayCpu,
    redisCpu,
    clientCpu,
    cpuPerEventUs: ((gatewayCpu + redisCpu) / delivered) * 1e6,
    spread: [...perNode.values()].join(' / '),
  };
}

export function processesTable(rows: ProcessesRow[]): string {
  return table(
    [
      'GW_PROCESSES',
      'delivered/s',
      'p50 ms',
      'p99 ms',
      'gateway tree CPU (cores)',
      'Redis CPU (cores)',
      'µs CPU/event (gw+Redis)',
      'load gen CPU (cores)',
      'devices per process',
    ],
    rows.map((r) => [
      String(r.processes),
      r.delivered,
      r.p50,
      r.p99,
      r.gatewayCpu.toFixed(2),
      r.redisCpu.toFixed(2),
      r.cpuPerEventUs,
      r.clientCpu.toFixed(2),
      r.spread,
    ]),
  );
}

async function main(): Promise<void> {
  console.log(
    header(
      `processes: back-end publishes (POST /v1/events, ${BATCH} events per request, ${WINDOW} in flight) to ${DEVICES} devices, ${PAYLOAD_BYTES}-byte payloads, qos 1`,
    ),
  );
  console.log(
    `${WARMUP} s warm-up and ${SECONDS} s measured per row; back end and devices in this process\n`,
  );
  const rows: ProcessesRow[] = [];
  for (const n of COUNTS) rows.push(await measureProcesses(n));
  console.log(processesTable(rows));
  if (rows.length >= 2) {
    const [a, b] = rows;
    console.log(
      `\n${b.processes} processes / ${a.processes}: ${(b.delivered / a.delivered).toFixed(2)}x delivered/s, ` +
        `${(b.cpuPerEventUs / a.cpuPerEventUs).toFixed(2)}x CPU per event`,
    );
  }
  process.exit(0);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
