/**
 * What the cluster-wide sweep's expiry step costs a fleet's offline devices: `--devices` devices
 * log in and go offline, then `--events` events each with a `ttl` are published to them through
 * `POST /v1/events` (a thousand a request); once they are due, the sweep (every `--sweep-ms`)
 * reports each `delivery.expired` and removes it. Printed per run: the events, the time from the
 * last expiry until the expiries index is empty (and that time in sweep intervals), the sweeps
 * that expired events (their counts and durations, BullMQ's `processedOn`/`finishedOn`), the
 * gateway's and Redis's CPU per event over the window from the first expiry to the empty
 * index, and whether every event was reported exactly once. The gateway is the build in dist/
 * (bench/lib/built.ts), a fresh one per run. Printed, never asserted.
 *
 *   npm run bench:expiry -- [--devices 10] [--events 1000] [--ttl 4000] [--sweep-ms 1000] [--runs 2]
 */
import { GatewayClient } from '../../client/client.ts';
import { redisClient } from '../../test/helpers/cleanup.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { QueueReader } from '../../test/helpers/queues.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { postJson } from '../lib/http.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';
import { sweepsCounting } from '../lib/sweeps.ts';

const { values } = benchArgs({
  script: 'bench:expiry',
  url: import.meta.url,
  about:
    "the expiry sweep over a fleet's offline devices: time to report and remove every due event, CPU per event",
  readme: 'bench:expiry',
  options: {
    devices: { type: 'int', min: 1, default: 10, help: 'offline devices' },
    events: {
      type: 'int',
      min: 1,
      default: 1000,
      help: 'events per device (an outbox holds 1,000 by default)',
    },
    ttl: { type: 'int', min: 100, default: 4000, help: "each event's ttl (ms)" },
    'sweep-ms': { type: 'int', min: 100, default: 1000, help: "the sweep's interval (GW_SWEEP_INTERVAL_MS)" },
    runs: { type: 'int', min: 1, default: 2, help: 'runs, each on a fresh gateway' },
  },
});

useBuiltGateway();
const REDIS_PID = redisPid();
const API_KEY = 'bench-expiry-api-key-0123456789';

interface Run {
  events: number;
  emptyAfterMs: number;
  sweeps: { expired: number; ms: number }[];
  gatewayMicros: number;
  redisMicros: number;
  reportedOnce: boolean;
}

async function run(): Promise<Run> {
  const gw = await startGateway({
    GW_LOG_LEVEL: 'info',
    GW_API_KEY: API_KEY,
    GW_DEFAULT_ROOM: '',
    GW_REGISTER_PER_MINUTE: '100000',
    GW_SWEEP_INTERVAL_MS: String(values['sweep-ms']),
  });
  const r = redisClient();
  const reader = new QueueReader(gw.prefix);
  try {
    const devices: string[] = [];
    for (let i = 0; i < values.devices; i++) {
      const c = new GatewayClient({ url: gw.tcpUrl });
      await c.connect();
      const name = `exp${i}_${Date.now() % 1e6}`;
      await c.request('register', {
        username: name,
        email: `${name}@example.com`,
        password: 'bench password',
      });
      await c.request('login', { username: name, password: 'bench password', device: { id: name } });
      await c.close();
      devices.push(name);
    }
    const total = values.devices * values.events;
    let posted = 0;
    const done = progress('  publish', () => `${posted}/${total} events`);
    const firstAt = Date.now();
    for (const device of devices) {
      for (let i = 0; i < values.events; i += 1000) {
        const n = Math.min(1000, values.events - i);
        const events = Array.from({ length: n }, (_, k) => ({
          target: { device },
          eid: `exp-${device}-${i + k}`,
          name: 'bench.expiry',
          data: {},
          ttl: values.ttl,
        }));
        const res = await postJson(
          `http://127.0.0.1:${gw.httpPort}/v1/events`,
          JSON.stringify({ events }),
          API_KEY,
        );
        if (res.status !== 202) throw new Error(`POST /v1/events: ${res.status} ${JSON.stringify(res.body)}`);
        posted += n;
      }
    }
    const lastAt = Date.now();
    done();
    await sleep(Math.max(0, firstAt + values.ttl - Date.now()));
    const s0 = cpuSeconds(gw.proc.pid!);
    const r0 = cpuSeconds(REDIS_PID);
    const waited = progress('  sweep', () => 'waiting for the expiries index to empty');
    const deadline = Date.now() + 120_000;
    while ((await r.zcard(`${gw.prefix}expiries`)) > 0) {
      if (Date.now() > deadline) throw new Error('the expiries index did not empty within 120 s');
      await sleep(20);
    }
    const emptyAt = Date.now();
    const gatewayCpu = cpuSeconds(gw.proc.pid!) - s0;
    const redisCpu = cpuSeconds(REDIS_PID) - r0;
    waited();
    // The sweep that emptied the index may not have finished its job yet (it returns its count).
    const sweeps = (await sweepsCounting(reader, 'expired', total)).map((x) => ({
      expired: x.count,
      ms: x.ms,
    }));
    const counts = new Map<string, number>();
    for (const j of await reader.jobs('gw-backend', 'delivery.expired'))
      counts.set(j.data.eid, (counts.get(j.data.eid) ?? 0) + 1);
    const reportedOnce = counts.size === total && [...counts.values()].every((n) => n === 1);
    return {
      events: total,
      emptyAfterMs: emptyAt - (lastAt + values.ttl),
      sweeps,
      gatewayMicros: (gatewayCpu / total) * 1e6,
      redisMicros: (redisCpu / total) * 1e6,
      reportedOnce,
    };
  } finally {
    await reader.close();
    r.disconnect();
    await gw.stop();
  }
}

console.log(
  header(
    `bench:expiry: ${values.devices} offline devices × ${values.events} events, ttl ${values.ttl} ms, a sweep every ${values['sweep-ms']} ms`,
  ),
);
const rows: Run[] = [];
for (let i = 0; i < values.runs; i++) rows.push(await run());
console.log(
  table(
    [
      'run',
      'events',
      'index empty after the last expiry (s)',
      'in sweep intervals',
      'sweeps that expired events (events in ms)',
      'gateway µs per event',
      'Redis µs per event',
      'each reported once',
    ],
    rows.map((x, i) => [
      String(i + 1),
      x.events,
      x.emptyAfterMs / 1000,
      x.emptyAfterMs / values['sweep-ms'],
      x.sweeps.map((s) => `${s.expired} in ${s.ms}`).join('; '),
      x.gatewayMicros,
      x.redisMicros,
      x.reportedOnce ? 'yes' : 'NO',
    ]),
  ),
);
