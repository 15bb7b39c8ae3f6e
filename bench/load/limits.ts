/**
 * What runtime limits (admin API, docs/OPERATIONS.md "Limits") cost a device's `publish`: one
 * device pipelining publishes (W in flight) with no limit, with a limit far above its rate
 * (every publish pays the Redis count, nothing is refused), and with a binding limit (the rest
 * are refused `rate_limited`). Publishes answered per second, how many were accepted, and the
 * gateway's CPU per answer, in one run.
 *
 *   npm run bench:limits -- [--seconds 5] [--window 32] [--limit 500]
 */
import { GatewayClient } from '../../client/client.ts';
import { isProtocolError } from '../../protocol/index.ts';
import { newName, PASSWORD } from '../../test/helpers/accounts.ts';
import { benchArgs } from '../lib/args.ts';
import { type BenchGateway, startBenchGateway } from '../lib/gateway.ts';
import { header, table } from '../lib/measure.ts';
import { cpuSeconds, progress, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:limits',
  url: import.meta.url,
  about: "what runtime limits (admin API) cost a device's publish: none, counted, binding",
  readme: 'bench:limits',
  options: {
    seconds: { type: 'number', default: 5, help: 'seconds measured per row' },
    window: { type: 'int', default: 32, help: 'publishes in flight' },
    limit: { type: 'int', default: 500, help: 'the binding limit, events/s' },
  },
});
const SECONDS = values.seconds;
const WINDOW = values.window;
const LIMIT = values.limit;
const ADMIN_KEY = `bench-admin-${newName()}`;

async function setLimit(gw: BenchGateway, device: string, events: number | null): Promise<void> {
  const res = await fetch(`http://127.0.0.1:${gw.httpPort}/v1/limits/devices/${device}`, {
    method: events === null ? 'DELETE' : 'PUT',
    headers: { authorization: `Bearer ${ADMIN_KEY}`, 'content-type': 'application/json' },
    ...(events === null ? {} : { body: JSON.stringify({ publish: { events } }) }),
  });
  if (!res.ok && !(events === null && res.status === 404)) throw new Error(`limit: ${res.status}`);
  await sleep(200); // the pub/sub reload
}

async function run(gw: BenchGateway, c: GatewayClient, label: string): Promise<(string | number)[]> {
  let ok = 0;
  let refused = 0;
  let stop = false;
  const done = progress(`  ${label}`, () => `${ok} ok, ${refused} refused`);
  const cpu0 = cpuSeconds(gw.pid);
  const t0 = performance.now();
  const lanes = Array.from({ length: WINDOW }, async () => {
    while (!stop) {
      try {
        await c.request('publish', { name: 'telemetry', data: { t: 21.5, seq: ok } });
        ok++;
      } catch (e) {
        if (!isProtocolError(e) || e.code !== 'rate_limited') throw e;
        refused++;
      }
    }
  });
  await sleep(SECONDS * 1000);
  stop = true;
  await Promise.all(lanes);
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds(gw.pid) - cpu0;
  done();
  const answered = ok + refused;
  return [
    label,
    Math.round(answered / elapsed),
    Math.round(ok / elapsed),
    ((cpu / answered) * 1e6).toFixed(0),
  ];
}

const gw = await startBenchGateway('auto', { GW_DEFAULT_ROOM: '', GW_ADMIN_KEY: ADMIN_KEY });
try {
  const c = new GatewayClient({ url: `tcp://127.0.0.1:${gw.tcpPort}`, requestTimeoutMs: 30000 });
  await c.connect();
  const username = newName();
  const device = `bench-${username}`;
  await c.request('register', { username, email: `${username}@example.com`, password: PASSWORD });
  await c.request('login', { username, password: PASSWORD, device: { id: device } });
  console.log(header(`publish under runtime limits, ${SECONDS} s per run, window ${WINDOW}`));
  const rows: (string | number)[][] = [];
  rows.push(await run(gw, c, 'no limit'));
  await setLimit(gw, device, 1_000_000_000);
  rows.push(await run(gw, c, 'limit 1e9/s (counted, never refused)'));
  await setLimit(gw, device, LIMIT);
  rows.push(await run(gw, c, `limit ${LIMIT}/s (binding)`));
  await setLimit(gw, device, null);
  console.log(table(['case', 'answered/s', 'accepted/s', 'gateway CPU µs/answer'], rows));
  await c.close();
} finally {
  await gw.close();
}
