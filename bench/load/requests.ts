/**
 * What one `POST /v1/events` request costs the gateway, next to what uWebSockets.js alone costs
 * for a request of the same size, in the same run: a back end that posts every event by itself
 * pays these per event.
 *
 * Rows, each with `--concurrency` requests in flight on keep-alive connections (node:http,
 * bench/lib/http.ts, as bench:delivery's back end):
 *   uWS alone          a child process with uWebSockets.js only: reads the body, parses it
 *                      (JSON.parse) and answers 202 with a small JSON body (the floor: the HTTP
 *                      parsing and the socket reads and writes any server on it pays)
 *   wrong key          the gateway answers 401: its routing, header copy, key check, error answer,
 *                      access line and HTTP metrics, and nothing else
 *   no session         one event to a device that has no session: the event is validated, the
 *                      publish script runs (it finds no session and stores nothing) and the
 *                      answer is 404 `not_found`, as for any lone event that reaches no session
 *   connected device   one event to one of `--devices` connected devices (round robin), which
 *                      ack it: the event is stored, sent from its publish and its ack applied
 *
 * Printed per row: requests/s, the server's CPU per request (the gateway's process tree, or the
 * uWS process) and that against the uWS row's, Redis's CPU per request, and the gateway's Redis
 * calls per request (its round-trip histogram's count; a script call is one). The devices and the
 * back end run in this process. Printed, never asserted.
 *
 *   npm run bench:requests -- [--seconds 4] [--concurrency 16] [--devices 16] [--payload 100]
 */
import { spawn } from 'node:child_process';
import type { GatewayClient } from '../../client/client.ts';
import { startGateway } from '../../test/helpers/gateway-process.ts';
import { benchArgs } from '../lib/args.ts';
import { useBuiltGateway } from '../lib/built.ts';
import { loggedInDevices } from '../lib/fleet.ts';
import { postJson } from '../lib/http.ts';
import { header, table } from '../lib/measure.ts';
import { metricsOf, redisCallsIn } from '../lib/metrics.ts';
import { cpuSeconds, progress, redisPid, sleep } from '../lib/procs.ts';

const { values } = benchArgs({
  script: 'bench:requests',
  url: import.meta.url,
  about: 'what one POST /v1/events request costs the gateway, against uWebSockets.js alone, same run',
  readme: 'bench:requests',
  options: {
    seconds: { type: 'number', default: 4, help: 'seconds measured per row' },
    warmup: { type: 'number', min: 0, default: 1.5, help: 'seconds of warm-up per row' },
    concurrency: { type: 'int', default: 16, help: 'requests in flight on keep-alive connections' },
    devices: { type: 'int', default: 16, help: 'connected devices of the last row, in turn' },
    payload: { type: 'int', min: 0, default: 100, help: 'bytes of payload per event' },
  },
});

// What `npm start` runs: the build in dist/ (bench/lib/built.ts).
useBuiltGateway();

const SECONDS = values.seconds;
const WARMUP = values.warmup;
const CONCURRENCY = values.concurrency;
const DEVICES = values.devices;
const PAYLOAD = values.payload;
const API_KEY = 'bench-api-key-0123456789';
const REDIS_PID = redisPid();
const padding = 'x'.repeat(Math.max(0, PAYLOAD - 30));

interface Row {
  name: string;
  perSecond: number;
  serverMicros: number;
  redisMicros: number;
  /** The gateway's Redis calls per request (a script call is one); NaN for uWS alone. */
  redisCalls: number;
}

/**
 * `--concurrency` loops posting `body(n)` for the warm-up and `--seconds`; every answer must be
 * `status` (anything else stops the bench: a row that measured errors would mislead).
 */
async function measure(
  name: string,
  serverPid: number,
  url: string,
  key: string,
  body: (n: number) => string,
  status: number,
  redisCalls: () => Promise<number> = async () => Number.NaN,
): Promise<Row> {
  let stop = false;
  let n = 0;
  let failure: Error | undefined;
  const loop = async () => {
    while (!stop && !failure) {
      const got = await postJson(url, body(n), key).then(
        (r) => r.status,
        (e: Error) => e,
      );
      if (got !== status) failure ??= new Error(`${name}: answered ${String(got)}, not ${status}`);
      n++;
    }
  };
  const loops = Array.from({ length: CONCURRENCY }, loop);
  const done = progress(`  ${name}`, () => `${n} requests`);
  await sleep(WARMUP * 1000);
  // Read before the CPU counters, and after them below: the scrape costs the gateway CPU.
  const c0 = await redisCalls();
  const n0 = n;
  const s0 = cpuSeconds(serverPid);
  const r0 = cpuSeconds(REDIS_PID);
  const t0 = performance.now();
  await sleep(SECONDS * 1000);
  const count = n - n0;
  const s1 = cpuSeconds(serverPid);
  const r1 = cpuSeconds(REDIS_PID);
  const elapsed = (performance.now() - t0) / 1000;
  const c1 = await redisCalls();
  stop = true;
  await Promise.all(loops);
  done();
  if (failure) throw failure;
  return {
    name,
    perSecond: count / elapsed,
    serverMicros: ((s1 - s0) / count) * 1e6,
    redisMicros: ((r1 - r0) / count) * 1e6,
    redisCalls: (c1 - c0) / count,
  };
}

/** The floor: uWebSockets.js answering the same requests with nothing of the gateway. */
async function uwsAlone(event: (n: number) => string): Promise<Row> {
  const child = spawn(
    process.execPath,
    [
      '-e',
      `const uWS = require('uWebSockets.js');
uWS.App().post('/v1/events', (res, req) => {
  req.getHeader('authorization');
  let aborted = false;
  res.onAborted(() => { aborted = true; });
  const chunks = [];
  res.onData((ab, last) => {
    chunks.push(Buffer.from(ab.slice(0)));
    if (!last) return;
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    if (aborted) return;
    res.cork(() => {
      res.writeStatus('202 Accepted');
      res.writeHeader('content-type', 'application/json');
      res.end(JSON.stringify({ eids: [String(body.name)], results: [{ sessions: 0 }] }));
    });
  });
}).listen('127.0.0.1', 0, (t) => {
  if (!t) process.exit(1);
  console.log(uWS.us_socket_local_port(t));
});`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  try {
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('uWS alone: no port within 10 s')), 10_000);
      child.once('exit', (code) => reject(new Error(`uWS alone exited (${code})`)));
      child.stdout!.once('data', (d) => {
        clearTimeout(timer);
        resolve(Number(String(d).trim()));
      });
    });
    return await measure('uWS alone', child.pid!, `http://127.0.0.1:${port}/v1/events`, API_KEY, event, 202);
  } finally {
    child.kill();
  }
}

async function main(): Promise<void> {
  console.log(header('what one POST /v1/events request costs, against uWebSockets.js alone'));
  console.log(
    `${CONCURRENCY} requests in flight on keep-alive connections, ${PAYLOAD}-byte payloads, ${WARMUP} s warm-up and ${SECONDS} s measured per row\n`,
  );
  const event = (target: Record<string, string>) => (n: number) =>
    JSON.stringify({ target, name: 'bench', data: { n, p: padding } });
  const rows: Row[] = [await uwsAlone(event({ device: 'nobody' }))];

  const g = await startGateway({
    // One load client's connection carries what many devices would: no per-connection frame budget.
    GW_FRAMES_PER_SECOND: '0',
    GW_LOG_LEVEL: 'info',
    GW_DEFAULT_ROOM: '',
    GW_API_KEY: API_KEY,
    ARGON2_MEMORY_KIB: '1024',
    ARGON2_ITERATIONS: '1',
    GW_REGISTER_PER_MINUTE: '100000',
  });
  let clients: GatewayClient[] = [];
  try {
    const url = `http://127.0.0.1:${g.httpPort}/v1/events`;
    const pid = g.proc.pid!;
    const calls = async () => redisCallsIn(await metricsOf(g.metricsPort));
    rows.push(
      await measure('wrong key (401)', pid, url, 'not-the-key', event({ device: 'nobody' }), 401, calls),
    );
    rows.push(await measure('no session (404)', pid, url, API_KEY, event({ device: 'nobody' }), 404, calls));
    const devices = await loggedInDevices(g.tcpUrl, DEVICES, 'req');
    clients = devices.clients;
    const { names } = devices;
    const toDevice = (n: number) =>
      JSON.stringify({ target: { device: names[n % names.length] }, name: 'bench', data: { n, p: padding } });
    rows.push(
      await measure(`connected device (202, ${DEVICES} devices)`, pid, url, API_KEY, toDevice, 202, calls),
    );
  } finally {
    await Promise.all(clients.map((c) => c.close()));
    await g.stop();
  }
  const floor = rows[0].serverMicros;
  console.log(
    table(
      [
        'row',
        'requests/s',
        'server CPU µs/request',
        'server CPU / uWS alone',
        'Redis CPU µs/request',
        'Redis calls/request',
      ],
      rows.map((r) => [
        r.name,
        r.perSecond,
        r.serverMicros,
        `${(r.serverMicros / floor).toFixed(2)}x`,
        r.redisMicros,
        Number.isNaN(r.redisCalls) ? 'n/a' : r.redisCalls,
      ]),
    ),
  );
}

await main();
// The keep-alive agent's sockets would hold the process open.
process.exit(0);
