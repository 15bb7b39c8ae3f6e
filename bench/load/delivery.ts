/**
 * qos-1 delivery through the gateway next to Mosquitto QoS 1, same shape, same run:
 * publisher → server → 100 devices → ack. Max rate (a window of outstanding publishes) and
 * latency at a fixed rate. Gateway devices are encrypted and its outbox is durable in Redis;
 * Mosquitto runs as installed (127.0.0.1:1883), clients from the `mqtt` package.
 *
 *   npm run bench:delivery -- [--devices 100] [--seconds 5] [--rate 5000] [--window 256]
 */
import { execSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import hdr from 'hdr-histogram-js';
import mqtt from 'mqtt';
import { GatewayClient, type Session } from '../../client/client.ts';
import { connectPublisher } from '../../gateway/publish.ts';
import type { EventMsg } from '../../protocol/index.ts';
import { REDIS_URL } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, ownCpuSeconds, progress, sleep } from '../lib/procs.ts';

const { values } = parseArgs({
  options: {
    devices: { type: 'string', default: '100' },
    seconds: { type: 'string', default: '5' },
    warmup: { type: 'string', default: '2' },
    rate: { type: 'string', default: '5000' },
    window: { type: 'string', default: '256' },
    payload: { type: 'string', default: '100' },
    mqtt: { type: 'string', default: 'mqtt://127.0.0.1:1883' },
  },
});
const DEVICES = Number(values.devices);
const SECONDS = Number(values.seconds);
const WARMUP = Number(values.warmup);
const RATE = Number(values.rate);
const WINDOW = Number(values.window);
const PAYLOAD_BYTES = Number(values.payload);

interface Row {
  target: string;
  mode: string;
  delivered: number;
  p50: number;
  p99: number;
  serverCpu: number;
  redisCpu: number;
  clientCpu: number;
}

const REDIS_PID = Number(execSync('pgrep -o redis-server').toString().trim());

/** What each system provides to the two runs. */
interface System {
  name: string;
  serverPid: number;
  /** Publishes one event to device i carrying the send time; resolves when the server accepted it. */
  publish(i: number, sentAt: number): Promise<void>;
  /** Called by the system for each received message with its send time. */
  onReceive: (sentAt: number) => void;
}

async function run(sys: System, mode: 'max' | 'fixed'): Promise<Row> {
  const h = hdr.build({
    lowestDiscernibleValue: 1,
    highestTrackableValue: 120_000_000,
    numberOfSignificantValueDigits: 3,
  });
  let received = 0;
  let measuring = false;
  sys.onReceive = (sentAt) => {
    if (!measuring) return;
    received++;
    h.recordValue(Math.max(1, Math.round((performance.now() - sentAt) * 1000)));
  };
  let stop = false;
  let next = 0;
  let inflight = 0;
  const pump = async () => {
    while (!stop) {
      inflight++;
      await sys.publish(next++ % DEVICES, performance.now());
      inflight--;
    }
  };
  let loops: Promise<void>[] = [];
  let timer: NodeJS.Timeout | undefined;
  if (mode === 'max') loops = Array.from({ length: WINDOW }, pump);
  else {
    const perTick = RATE / 100;
    let debt = 0;
    timer = setInterval(() => {
      debt += perTick;
      while (debt >= 1) {
        debt--;
        void sys.publish(next++ % DEVICES, performance.now());
      }
    }, 10);
  }
  const done = progress(`  ${sys.name} ${mode}`, () => `${received} received, ${inflight} publishing`);
  await sleep(WARMUP * 1000);
  const s0 = cpuSeconds(sys.serverPid);
  const r0 = cpuSeconds(REDIS_PID);
  const c0 = ownCpuSeconds();
  const t0 = performance.now();
  measuring = true;
  await sleep(SECONDS * 1000);
  measuring = false;
  const elapsed = (performance.now() - t0) / 1000;
  const serverCpu = (cpuSeconds(sys.serverPid) - s0) / elapsed;
  const redisCpu = (cpuSeconds(REDIS_PID) - r0) / elapsed;
  const clientCpu = (ownCpuSeconds() - c0) / elapsed;
  stop = true;
  if (timer) clearInterval(timer);
  await Promise.all(loops);
  done();
  await sleep(1500); // drain
  return {
    target: sys.name,
    mode: mode === 'max' ? `max rate (window ${WINDOW})` : `fixed ${RATE}/s`,
    delivered: received / elapsed,
    p50: h.getValueAtPercentile(50) / 1000,
    p99: h.getValueAtPercentile(99) / 1000,
    serverCpu,
    redisCpu,
    clientCpu,
  };
}

async function gatewaySystem(): Promise<{ sys: System; close: () => Promise<void> }> {
  const g = await startGateway({
    GW_LOG_LEVEL: 'info',
    GW_DEFAULT_ROOM: '',
    ARGON2_MEMORY_KIB: '1024',
    ARGON2_ITERATIONS: '1',
    GW_REGISTER_PER_MINUTE: '100000',
  });
  const devices: GatewayClient[] = [];
  const sessions: string[] = [];
  for (let i = 0; i < DEVICES; i++) {
    const c = new GatewayClient({ url: g.tcpUrl });
    await c.connect();
    const username = `dev${i}_${Date.now() % 1e6}`;
    await c.request('register', { username, email: `${username}@example.com`, password: 'bench password' });
    const s = await c.request<Session>('login', {
      username,
      password: 'bench password',
      device: { id: username },
    });
    devices.push(c);
    sessions.push(s.sessionId);
  }
  const pub = await connectPublisher({ redisUrl: REDIS_URL, prefix: g.prefix });
  const payload = 'x'.repeat(Math.max(0, PAYLOAD_BYTES - 20));
  const sys: System = {
    name: 'gateway (qos 1, AES-GCM, Redis outbox)',
    serverPid: g.proc.pid!,
    publish: async (i, sentAt) => {
      await pub.publish({ session: sessions[i] }, { name: 'bench', data: { t: sentAt, p: payload } });
    },
    onReceive: () => {},
  };
  for (const c of devices) c.on('event', (e: EventMsg) => sys.onReceive((e.data as { t: number }).t));
  return {
    sys,
    close: async () => {
      for (const c of devices) c.destroy();
      await pub.close();
      await g.stop();
    },
  };
}

async function mosquittoSystem(): Promise<{ sys: System; close: () => Promise<void> }> {
  const pid = Number(execSync('pgrep -o mosquitto').toString().trim());
  const subs: mqtt.MqttClient[] = [];
  const tag = Date.now().toString(36);
  const sys: System = {
    name: 'Mosquitto (QoS 1)',
    serverPid: pid,
    publish: async () => {},
    onReceive: () => {},
  };
  for (let i = 0; i < DEVICES; i++) {
    const c = await mqtt.connectAsync(String(values.mqtt), {
      clientId: `bench-sub-${tag}-${i}`,
      clean: true,
    });
    await c.subscribeAsync(`bench/${tag}/${i}`, { qos: 1 });
    c.on('message', (_topic, buf) => sys.onReceive(buf.readDoubleBE(0)));
    subs.push(c);
  }
  const pub = await mqtt.connectAsync(String(values.mqtt), { clientId: `bench-pub-${tag}`, clean: true });
  const payload = Buffer.alloc(PAYLOAD_BYTES, 120);
  sys.publish = async (i, sentAt) => {
    const b = Buffer.from(payload);
    b.writeDoubleBE(sentAt, 0);
    await pub.publishAsync(`bench/${tag}/${i}`, b, { qos: 1 });
  };
  return {
    sys,
    close: async () => {
      await Promise.all([...subs, pub].map((c) => c.endAsync()));
    },
  };
}

async function main(): Promise<void> {
  console.log(header(`delivery: ${DEVICES} devices, ${PAYLOAD_BYTES}-byte payloads, qos 1 / at least once`));
  console.log(
    `${WARMUP} s warm-up and ${SECONDS} s measured per row; publisher and devices in this process\n`,
  );
  const rows: Row[] = [];
  for (const make of [gatewaySystem, mosquittoSystem]) {
    const { sys, close } = await make();
    rows.push(await run(sys, 'max'));
    rows.push(await run(sys, 'fixed'));
    await close();
  }
  console.log(
    table(
      [
        'target',
        'mode',
        'delivered/s',
        'p50 ms',
        'p99 ms',
        'server CPU (cores)',
        'Redis CPU (cores)',
        'load gen CPU (cores)',
      ],
      rows.map((r) => [
        r.target,
        r.mode,
        r.delivered,
        r.p50,
        r.p99,
        r.serverCpu.toFixed(2),
        r.redisCpu.toFixed(2),
        r.clientCpu.toFixed(2),
      ]),
    ),
  );
  const [gMax, gFix, mMax, mFix] = rows;
  console.log(
    `\ngateway / Mosquitto: ${(gMax.delivered / mMax.delivered).toFixed(2)}x delivered/s at max rate; ` +
      `p99 at ${RATE}/s ${gFix.p99.toFixed(1)} ms vs ${mFix.p99.toFixed(1)} ms`,
  );
  process.exit(0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
