/**
 * One load shape through the simulator's engine, against the gateway and against Mosquitto
 * QoS 1, in the same run: N devices (100 and 1,000), 100-byte payloads, qos 1 / at least once,
 * at max rate (a window of events published and not yet acked) and at a fixed rate. One table:
 * delivered events/s, delivery p50/p99, lost, duplicates, CPU of the server (and of Redis for
 * the gateway, whose outbox lives there) and of the load generator, then the ratios.
 *
 *   npm run bench:peers -- [--devices 100,1000] [--seconds 10] [--rate 5000] [--window 1000]
 *                          [--payload 100] [--mqtt mqtt://127.0.0.1:1883]
 */
import { execSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { REDIS_URL } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { header, table } from '../lib/measure.ts';
import { processCpuMicros } from '../lib/proc.ts';
import { type Fleet, type SimOptions, type SimReport, Simulation } from '../sim/engine.ts';
import { mqttFleet } from '../sim/mqtt-fleet.ts';

const { values } = benchArgs({
  script: 'bench:peers',
  url: import.meta.url,
  about: "the simulator's engine against the gateway and Mosquitto QoS 1, same load shape, same run",
  readme: 'bench:peers',
  options: {
    devices: {
      type: 'int',
      list: true,
      default: '100,1000',
      help: 'device counts, one gateway and one run each',
    },
    seconds: { type: 'number', default: 10, help: 'seconds of events once every device is in' },
    rate: { type: 'number', default: 5000, help: 'events/s of the fixed-rate rows' },
    window: { type: 'int', default: 1000, help: 'events accepted and not yet received/acked at max rate' },
    payload: { type: 'int', min: 0, default: 100, help: 'bytes of padding per event' },
    mqtt: { type: 'string', arg: 'URL', default: 'mqtt://127.0.0.1:1883', help: "Mosquitto's URL" },
    seed: { type: 'int', min: 0, max: 2 ** 32 - 1, default: 1, help: "the simulator's seed" },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const COUNTS = values.devices;
const SECONDS = values.seconds;
const RATE = values.rate;
const WINDOW = values.window;
const PAYLOAD = values.payload;

const pidOf = (name: string): number | null => {
  try {
    return Number(execSync(`pgrep -o ${name}`).toString().trim()) || null;
  } catch {
    return null;
  }
};
const REDIS_PID = pidOf('redis-server');
const MOSQUITTO_PID = pidOf('mosquitto');

interface Row {
  system: string;
  devices: number;
  mode: string;
  deliveredPerS: number;
  p50: number;
  p99: number;
  lost: number;
  duplicates: number;
  serverCores: number;
  redisCores: number | null;
  loadGenCores: number;
}

function baseOptions(devices: number, eventRate: number): SimOptions {
  return {
    tcpUrl: '',
    wsUrl: '',
    httpUrl: '',
    transport: 'tcp',
    devices,
    rate: 500,
    durationS: SECONDS,
    drainS: 30,
    eventRate,
    window: WINDOW,
    payloadBytes: PAYLOAD,
    maxEvents: 10_000_000,
    apiKey: '',
    publishRate: 0,
    rooms: 0,
    sayRate: 0,
    noAckProb: 0,
    churnProb: 0,
    helloChunks: 1,
    seed: values.seed,
    waitForFleet: true,
  };
}

async function measure(
  system: string,
  options: SimOptions,
  serverPid: number,
  withRedis: boolean,
  fleet?: (runId: string) => Fleet,
): Promise<Row> {
  const sim = new Simulation({ ...options, gatewayPid: serverPid }, fleet);
  let redis0: number | null = null;
  let redisS: number | null = null;
  const r: SimReport = await sim.run({
    onEventPhase: (edge) => {
      if (!withRedis || REDIS_PID === null) return;
      const now = processCpuMicros(REDIS_PID);
      if (edge === 'start') redis0 = now;
      else if (now !== null && redis0 !== null) redisS = (now - redis0) / 1e6;
    },
  });
  const secs = r.eventPhase.seconds;
  if (r.lost > 0 || r.errors.fleet_not_ready)
    console.error(
      `${system} ${options.devices} ${options.eventRate}: lost ${r.lost}, errors ${JSON.stringify(r.errors)}`,
    );
  return {
    system,
    devices: options.devices,
    mode: options.eventRate > 0 ? `${options.eventRate}/s` : `max (window ${WINDOW})`,
    deliveredPerS: r.throughput.deliveredPerS,
    p50: r.latency.delivery.p50,
    p99: r.latency.delivery.p99,
    lost: r.lost,
    duplicates: r.duplicates,
    serverCores: (r.eventPhase.gatewayCpuSeconds ?? Number.NaN) / secs,
    redisCores: redisS === null ? null : redisS / secs,
    loadGenCores: r.eventPhase.simulatorCpuSeconds / secs,
  };
}

async function main(): Promise<void> {
  console.log(
    header(`peers: ${COUNTS.join(' and ')} devices, ${PAYLOAD}-byte payloads, qos 1 / at least once`),
  );
  console.log(
    `${SECONDS} s of events per row once every device is in, then a drain; max rate (window ${WINDOW}) ` +
      `and ${RATE} events/s; the simulator's engine drives both systems from this process\n`,
  );
  if (MOSQUITTO_PID === null) throw new Error('Mosquitto is not running (pgrep mosquitto)');
  const rows: Row[] = [];
  for (const devices of COUNTS) {
    const apiKey = randomBytes(16).toString('hex');
    const g = await startGateway({
      // One load client's connection carries what many devices would: no per-connection frame budget.
      GW_FRAMES_PER_SECOND: '0',
      GW_LOG_LEVEL: 'info',
      GW_DEFAULT_ROOM: '',
      GW_API_KEY: apiKey,
      GW_REGISTER_PER_MINUTE: '1000000',
      ARGON2_MEMORY_KIB: '1024',
      ARGON2_ITERATIONS: '1',
    });
    try {
      for (const eventRate of [0, RATE]) {
        const o: SimOptions = {
          ...baseOptions(devices, eventRate),
          tcpUrl: g.tcpUrl,
          httpUrl: `http://127.0.0.1:${g.httpPort}`,
          apiKey,
          redisUrl: REDIS_URL,
          redisPrefix: g.prefix,
        };
        rows.push(await measure('gateway', o, g.proc.pid!, true));
      }
    } finally {
      await g.stop();
    }
    for (const eventRate of [0, RATE]) {
      rows.push(
        await measure('Mosquitto', baseOptions(devices, eventRate), MOSQUITTO_PID, false, (id) =>
          mqttFleet(String(values.mqtt), id),
        ),
      );
    }
  }
  const f = (n: number | null, d = 1) => (n === null || !Number.isFinite(n) ? 'n/a' : n.toFixed(d));
  console.log(
    table(
      [
        'system',
        'devices',
        'mode',
        'delivered/s',
        'p50 ms',
        'p99 ms',
        'lost',
        'dups',
        'server CPU',
        'Redis CPU',
        'load gen CPU',
      ],
      rows.map((r) => [
        r.system,
        String(r.devices),
        r.mode,
        Math.round(r.deliveredPerS).toLocaleString('en-US'),
        f(r.p50),
        f(r.p99),
        String(r.lost),
        String(r.duplicates),
        f(r.serverCores, 2),
        f(r.redisCores, 2),
        f(r.loadGenCores, 2),
      ]),
    ),
  );
  console.log('\nCPU in cores over the event phase (events and drain). Ratios gateway / Mosquitto:');
  for (const devices of COUNTS) {
    const pick = (system: string, fixed: boolean) =>
      rows.find((r) => r.system === system && r.devices === devices && r.mode.startsWith('max') !== fixed)!;
    const gMax = pick('gateway', false);
    const mMax = pick('Mosquitto', false);
    const gFix = pick('gateway', true);
    const mFix = pick('Mosquitto', true);
    console.log(
      `- ${devices} devices: delivered/s at max ${f(gMax.deliveredPerS / mMax.deliveredPerS, 2)}x; ` +
        `p99 at ${RATE}/s ${f(gFix.p99 / mFix.p99, 2)}x (${f(gFix.p99)} vs ${f(mFix.p99)} ms); ` +
        `server CPU at ${RATE}/s ${f(gFix.serverCores / mFix.serverCores, 1)}x`,
    );
  }
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
